"""A small ACCO training job that fails on purpose, for ``tests/test_failures.py``.

Launched through the real launcher on CPU::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/fail_train.py --round_timeout_s 5 --kill_rank 1 --kill_round 6

Each rank prints tagged lines that the tests parse (``t=`` is ``time.time()``, the same clock as the test's):

- ``[rank R] pid=P started t=...``, then ``[rank R] step S t=...`` after every committed step;
- ``[rank R] killing myself with SIGKILL in round N t=...`` / ``[rank R] stalling ...`` / ``[rank R] SIGSTOP ...``;
- ``[rank R] fail_train done steps=S params_checksum=... t=...`` on success;
- ``[rank R] fail_train error t=...: <Type>: <first line>`` then the traceback (exit status 1) on an error;
- ``[rank R] fail_train stopped by <Type> t=... worker_alive=False`` when a signal stopped it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import deepspeed_acco  # noqa: E402
from tests.workers import WithLoss, base_config, make_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command line: failure injection and the acco block's knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    parser.add_argument("--steps", type=int, default=20, help="committed optimizer steps to train")
    parser.add_argument("--ga", type=int, default=4, help="gradient_accumulation_steps")
    parser.add_argument("--round_timeout_s", type=float, default=5.0)
    parser.add_argument("--adaptive", action="store_true", help="acco.adaptive_accumulation")
    parser.add_argument("--slow_s", type=float, default=0.0, help="sleep per micro-batch (slows the job down)")
    parser.add_argument("--kill_rank", type=int, default=-1, help="this rank SIGKILLs itself inside a round")
    parser.add_argument("--kill_round", type=int, default=6, help="... in this round, after its reduce-scatter")
    parser.add_argument("--freeze_launcher", action="store_true",
                        help="... after SIGSTOPping its parent (launch.py), so that the surviving rank meets the dead "
                             "peer before launch.py can SIGTERM it; the test sends SIGCONT")
    parser.add_argument("--stall_rank", type=int, default=-1, help="this rank sleeps in its training loop")
    parser.add_argument("--stall_step", type=int, default=3, help="... before the first micro-batch of this step")
    parser.add_argument("--stall_s", type=float, default=3600.0, help="... for this long")
    parser.add_argument("--sigstop_rank", type=int, default=-1, help="this rank SIGSTOPs itself (frozen process)")
    parser.add_argument("--sigstop_step", type=int, default=3, help="... before the first micro-batch of this step")
    return parser.parse_args()


def say(rank: int, text: str) -> None:
    """One tagged, timestamped line on stdout, in one write: both ranks write to the launcher's pipe, and
    ``print`` under PYTHONUNBUFFERED writes the text and its newline separately (another rank's line could
    land in between)."""
    sys.stdout.write(f"[rank {rank}] {text} t={time.time():.3f}\n")
    sys.stdout.flush()


def _kill_inside_round(optimizer: Any, rank: int, round_index: int, freeze_launcher: bool) -> None:
    """Wrap the worker's round so that round ``round_index`` SIGKILLs this process after its reduce-scatter
    (with ``freeze_launcher``, first SIGSTOP launch.py, which would otherwise race the survivor with a SIGTERM)."""
    sharded = optimizer._round
    reduce_scatter = sharded._reduce_scatter_grads

    def dying(spec: Any) -> Any:
        sums = reduce_scatter(spec)
        if spec.index == round_index:
            if freeze_launcher:
                say(rank, f"SIGSTOP to launch.py pid={os.getppid()}")
                os.kill(os.getppid(), signal.SIGSTOP)
            say(rank, f"killing myself with SIGKILL in round {spec.index} (worker thread, mid-round)")
            os.kill(os.getpid(), signal.SIGKILL)
        return sums

    sharded._reduce_scatter_grads = dying


def main() -> int:
    """Train, with the requested failure; return the exit status."""
    args = parse_args()
    import deepspeed

    torch.set_num_threads(1)
    deepspeed_acco.disable_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    say(rank, f"pid={os.getpid()} started")
    cfg = base_config(ga=args.ga, acco={"enabled": True, "round_timeout_s": args.round_timeout_s,
                                        "adaptive_accumulation": args.adaptive})
    module = WithLoss(make_model(0))
    engine, *_ = deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    worker = engine.optimizer._worker
    if rank == args.kill_rank:
        _kill_inside_round(engine.optimizer, rank, args.kill_round, args.freeze_launcher)
    gen = torch.Generator().manual_seed(1000 + rank)
    try:
        while engine.global_steps < args.steps:
            step = engine.global_steps
            if rank == args.stall_rank and step == args.stall_step and engine.optimizer._micro == 0:
                say(rank, f"stalling for {args.stall_s:g} s at step {step}")
                time.sleep(args.stall_s)
                args.stall_rank = -1
            if rank == args.sigstop_rank and step == args.sigstop_step:
                say(rank, f"SIGSTOP myself at step {step}")
                os.kill(os.getpid(), signal.SIGSTOP)
                args.sigstop_rank = -1
            x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            if args.slow_s:
                time.sleep(args.slow_s)
            if engine.global_steps != step:
                say(rank, f"step {engine.global_steps}")
        deepspeed_acco.flush(engine)
        checksum = float(sum(p.detach().double().sum() for p in module.parameters()))
        say(rank, f"fail_train done steps={engine.global_steps} params_checksum={checksum:.10f}")
        return 0
    except BaseException as err:
        first = str(err).splitlines()[0] if str(err) else ""
        if isinstance(err, deepspeed_acco.AccoRoundError):
            say(rank, f"fail_train error: {type(err).__name__}: {first}")
        else:
            say(rank, f"fail_train stopped by {type(err).__name__}: {first}")
        raise
    finally:
        # No signal masking here: deepspeed_acco's SIGTERM handler does not interrupt this clean-up when the
        # launcher's SIGTERM comes while the rank is already stopping (the launch tests rely on it).
        engine.destroy()
        say(rank, f"fail_train exiting worker_alive={worker.alive} threads={threading.active_count()}")


if __name__ == "__main__":
    sys.exit(main())
