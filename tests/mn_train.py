"""A few ACCO steps on whatever ranks a launcher started; each rank saves its parameters and prints a success line.

The script that ``tests/test_multinode.py`` launches through ``deepspeed --no_ssh``, ``deepspeed --launcher
openmpi``, and ``mpirun`` (across fake hosts and on one host). It trains exactly what
``tests.workers.train_worker`` trains (same model, data, config and loop), so its parameters can be compared
bitwise with the in-process single-host run. Rank, world size and rendezvous come from the DeepSpeed launcher's
environment or, when those variables are absent (mpirun), from MPI through
``deepspeed.init_distributed(auto_mpi_discovery=True)``.

    python3 tests/mn_train.py --out /tmp/params_{rank}.pt [--steps 3] [--ga 4] [--port 29500]

``--method zero1`` trains plain ZeRO-1, ``--compression int8`` compresses ACCO's estimate round (node-aware where
the launcher puts several ranks on a host), ``--hidden`` widens the model, and ``--iface eth0`` has each host's
first rank count the bytes that host sent during training (its ``/proc/net/dev`` counter, between barriers).

On success each rank prints ``[rank R/W] host=<hostname> ... done`` as its last line. DeepSpeed's runner exits 0
when a child is killed by a signal, so callers check these lines, not only the exit code.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tests.workers` (deepspeed_acco is installed)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed import comm as dist  # noqa: E402

import deepspeed_acco  # noqa: E402
from tests.workers import HIDDEN, WithLoss, _busy, base_config, make_batches, make_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--local_rank`` is what the DeepSpeed launcher appends)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="where this rank writes its parameters; '{rank}' is replaced")
    parser.add_argument("--steps", type=int, default=3, help="committed optimizer steps")
    parser.add_argument("--ga", type=int, default=4, help="gradient_accumulation_steps (even for ACCO)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port when discovered through MPI")
    parser.add_argument("--timeout", type=float, default=120.0, help="process-group and ACCO round timeout (s)")
    parser.add_argument("--method", choices=("acco", "zero1"), default="acco")
    parser.add_argument("--compression", choices=("none", "int8"), default="none", help="acco.estimate_compression")
    parser.add_argument("--block", type=int, default=256, help="acco.compression_block_size")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the MLP's width (about 13 x this parameters)")
    parser.add_argument("--iface", default="", help="count this host's bytes sent on it while training (first rank "
                        "of each host)")
    parser.add_argument("--auto", action="store_true", help="the automatic schedule (the block sets no schedule key)")
    parser.add_argument("--busy_s", type=float, default=0.0, help="CPU-bound work per micro-batch (a larger C)")
    parser.add_argument("--shape_at", type=int, default=0, help="after this committed step, each host's first rank "
                        "limits its eth0 to --shape_mbit (tc tbf, both hosts: a slower link mid-run)")
    parser.add_argument("--shape_mbit", type=float, default=1.0)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher (unused)")
    return parser.parse_args(argv)


def _tx_bytes(iface: str) -> int:
    """Bytes this host (network namespace) has sent on ``iface`` so far."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, data = line.partition(":")
        if name.strip() == iface:
            return int(data.split()[8])
    raise RuntimeError(f"no interface {iface!r} in /proc/net/dev")


def _shape(mbit: float) -> None:
    """Every host's first rank limits its host's eth0 egress to ``mbit`` (as ``tests/netns.py`` shapes), between
    barriers: the link slows for every rank at the same step boundary."""
    import subprocess

    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        burst = max(65536, int(mbit * 1e6 / 8 / 250))
        subprocess.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit", "burst",
                        str(burst), "latency", "50ms"], check=True, timeout=30)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """Initialise, train ``--steps`` ACCO steps, flush, save this rank's parameters, print the success line."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    deepspeed_acco.disable_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, distributed_port=args.port,
                               timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    acco = {"enabled": args.method == "acco", "round_timeout_s": args.timeout,
            "estimate_compression": args.compression, "compression_block_size": args.block}
    if args.auto:
        acco = {"enabled": True, "round_timeout_s": args.timeout}
    cfg = base_config(args.ga, args.lr, auto_schedule=args.auto, acco=acco)
    model = make_model(args.seed, args.hidden)
    module = WithLoss(model)
    engine, _, _, _ = deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    data = make_batches(args.seed, world, args.steps * args.ga * 6 + 8)[rank]
    counts_bytes = bool(args.iface) and int(os.environ.get("LOCAL_RANK", "0")) == 0
    dist.barrier()
    sent = _tx_bytes(args.iface) if counts_bytes else 0
    i = 0
    records = []
    while engine.global_steps < args.steps:
        x, y = data[i]
        i += 1
        if args.busy_s:
            _busy(args.busy_s)
        loss = engine(x, y)
        engine.backward(loss)
        before = engine.global_steps
        engine.step()
        if args.shape_at and before < args.shape_at == engine.global_steps:
            _shape(args.shape_mbit)
    deepspeed_acco.flush(engine)
    records = [m.as_dict() for m in deepspeed_acco.pop_metrics(engine)]
    dist.barrier()
    sent = _tx_bytes(args.iface) - sent if counts_bytes else None
    sharded = getattr(engine.optimizer, "_round", None)
    layout = getattr(sharded, "layout", None)
    out = Path(args.out.format(rank=rank))
    hostname = socket.gethostname()
    torch.save({"rank": rank, "world_size": world, "hostname": hostname, "master_addr": os.environ.get("MASTER_ADDR"),
                "global_steps": engine.global_steps, "micro_batches": i,
                "params": [p.detach().float().clone() for p in model.parameters()], "host_tx_bytes": sent,
                "layout": (layout.nodes, layout.per_node) if layout is not None else None,
                "n_params": sum(p.numel() for p in model.parameters()),
                "schedules": [r["schedule"] for r in records],
                "decisions": [r["decision"] for r in records if r["decision"]]}, out)
    steps = engine.global_steps
    engine.destroy()
    dist.barrier()
    torch.distributed.destroy_process_group()
    print(f"[rank {rank}/{world}] host={hostname} local_rank={os.environ.get('LOCAL_RANK')} "
          f"master={os.environ.get('MASTER_ADDR')} steps={steps} micro_batches={i} params={out} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
