"""One rank of the ACCO benchmark: train the same small GPT-2 with several methods, one after another.

Launched by ``benchmarks/run.py`` once per fake host (network namespace), with the ``env://``
rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that
``deepspeed.init_distributed`` reads. It also runs unchanged under a launcher on real nodes::

    deepspeed --hostfile hostfile benchmarks/worker.py --methods zero1,acco,dpu,acco_adaptive \\
        --steps 40 --out results.json

Each case (method) builds a fresh model from the same seed and trains it for ``--steps`` committed
optimizer steps on the same byte-level stdlib text stream (``examples/train_lm.py`` builders), so
zero1, acco and dpu see the same batch and the same tokens; ``acco_adaptive`` commits the same number
of steps with more tokens (fast ranks accumulate while the round is in flight). Per step it records
the wall-clock time between commits, compute time, round time, exposed waiting, the local loss, and
the interface's transmitted bytes (``/proc/net/dev``, the rank's ``eth0`` or ``--iface``). Rank 0
writes the raw per-rank records as JSON to ``--out``; ``run.py`` turns them into the summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

__all__ = ["CASES", "METHODS", "build_config", "main", "parse_args", "read_tx_bytes"]

METHODS = ("zero1", "acco", "acco_int8", "dpu", "acco_adaptive", "acco_auto")
"""The step-time sweep's cases: ds_configs/zero1.json, acco.json pinned to the default schedule (3 + 1 split),
acco.json with the int8-compressed estimate round, dpu.json, acco.json with adaptive accumulation, and acco.json's
block as it is (``{"enabled": true}``: the automatic schedule, ``deepspeed_acco/schedule.py``)."""

CASES = (*METHODS, "acco_adaptive_sqrt", "acco_half", "acco_half_int8", "acco_int8_commit")
"""Cases a worker can run: ``METHODS``, adaptive accumulation with ``acco.lr_scaling = "sqrt"``, the equal
halves (``estimate_fraction`` 0.5) plain and with the int8 estimate (with ``acco`` and ``acco_int8`` the fixed
schedules the automatic one chooses among), and ``acco_int8`` with the compressed commit
(``acco.commit_compression = "int8"``, opt-in and lossy)."""

AUTO_EXTRA_STEPS = 11
"""``acco_auto`` trains this many steps more than the others: its trials (at most 3 schedules x 3 steps, the last a
step more) and the first step of its choice, which the summaries leave out (``benchmarks/run.py``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="zero1,acco,acco_int8,dpu,acco_adaptive",
                   help=f"comma-separated cases, run in this order; any of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="committed optimizer steps per case")
    p.add_argument("--preset", default="tiny", help="examples/train_lm.py model preset")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--micro_batch", type=int, default=8, help="train_micro_batch_size_per_gpu")
    p.add_argument("--ga", type=int, default=4, help="gradient_accumulation_steps (at least 2, for acco)")
    p.add_argument("--estimate_fraction", type=float, default=None,
                   help="acco.estimate_fraction (default: the package's, 0.75; 0.5: the paper's equal halves)")
    p.add_argument("--max_micro_factor", type=int, default=4,
                   help="adaptive: acco.max_micro_batches_per_round = factor x (ga/2)")
    p.add_argument("--eval_batches", type=int, default=8, help="held-out micro-batches (split over ranks)")
    p.add_argument("--probe_s", type=float, default=0.0,
                   help="seconds of a standalone compute probe (fwd+bwd, no communication) before training")
    p.add_argument("--iface", default="eth0", help="interface whose tx bytes are counted (/proc/net/dev)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval_every_tokens", type=int, default=0,
                   help="time to target: evaluate the committed weights every this many tokens (all ranks), at "
                   "step 0 and at the end; the first case (zero1) trains --steps and its final held-out loss "
                   "becomes the target the other cases train to (0: off)")
    p.add_argument("--cap_factor", type=float, default=2.0,
                   help="time to target: a case stops unreached after this many times the first case's wall-clock")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--timeout_s", type=float, default=300.0, help="process-group and ACCO round timeout")
    p.add_argument("--out", default=None, help="rank 0 writes the JSON records here")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher; unused")
    args = p.parse_args(argv)
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.method_list if m not in CASES]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {CASES}")
    return args


BENCH_LR = 1e-3


def build_config(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed config of a case: the repository's ds_configs file with this run's batch shape."""
    name = {"zero1": "zero1", "dpu": "dpu"}.get(method, "acco")
    config: dict[str, Any] = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config["gradient_accumulation_steps"] = args.ga
    # The benchmark's own LR (its recorded results used it; the main job's configs may move): a 10-step warm-up to
    # 1e-3, then a linear decay over the most steps a case may train.
    config["optimizer"]["params"]["lr"] = BENCH_LR
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": BENCH_LR, "warmup_num_steps": 10,
        "total_num_steps": 4 * args.steps + AUTO_EXTRA_STEPS, "warmup_type": "linear"}}
    config.pop("train_batch_size", None)
    if "acco" in config and method != "acco_auto":  # every other case pins its schedule
        config["acco"]["estimate_compression"] = "int8" if method in ("acco_int8", "acco_half_int8",
                                                                       "acco_int8_commit") else "none"
        if method == "acco_int8_commit":
            config["acco"]["commit_compression"] = "int8"
        if method in ("acco_half", "acco_half_int8"):
            config["acco"]["estimate_fraction"] = 0.5
    if method.startswith("acco_adaptive"):
        config["acco"]["adaptive_accumulation"] = True
        config["acco"]["max_micro_batches_per_round"] = args.max_micro_factor * max(1, args.ga // 2)
        config["acco"]["lr_scaling"] = "sqrt" if method == "acco_adaptive_sqrt" else "none"
    if "acco" in config:
        config["acco"]["round_timeout_s"] = args.timeout_s
        config["acco"]["sync_steps"] = 0  # the benchmark measures each schedule from the first step
        if args.estimate_fraction is not None and method in ("acco", "acco_int8", "acco_int8_commit"):
            config["acco"]["estimate_fraction"] = args.estimate_fraction
    return config


def read_tx_bytes(iface: str) -> int:
    """Bytes transmitted so far by ``iface`` in this network namespace (0 when it does not exist)."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, data = line.partition(":")
        if name.strip() == iface:
            return int(data.split()[8])
    return 0


def _reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux ``clear_refs`` 5) so the next peak is per case."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """VmHWM since the last reset, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each thread of this process, summed by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    main_tid = str(os.getpid())
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = "main" if task.name == main_tid else (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _model_args(args: argparse.Namespace) -> SimpleNamespace:
    """The attribute bag examples/train_lm.py's builders read."""
    return SimpleNamespace(model=None, preset=args.preset, arch="gpt2", seq_len=args.seq_len, seed=args.seed,
                           dataset=None, dataset_config=None, text_column="text", stdlib_root=None,
                           heldout_pct=5.0, tokenizer="byte", bpe_vocab_size=4096, cache_dir=None)


def probe_rate(args: argparse.Namespace, corpus: Any, seconds: float, warmup_s: float = 1.5) -> dict[str, float]:
    """Standalone compute rate of this worker through the training stack, with no communication.

    A ZeRO-1 engine whose gradient accumulation never reaches a boundary: forward, backward and
    ``engine.step()`` of micro-batches exactly as in training, minus the rounds. The first
    ``warmup_s`` seconds are not counted. Both ranks run it at the same time (each on its own core).
    """
    import train_lm
    from deepspeed import comm as dist

    import deepspeed_acco

    rank, world = dist.get_rank(), dist.get_world_size()
    model = train_lm.build_model(_model_args(args), corpus.vocab_size, corpus.eot_id)
    config = build_config("zero1", args)
    config["gradient_accumulation_steps"] = 1_000_000
    engine, _, _, _ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(), config=config)
    windows = train_lm.ShardedWindows(corpus.train, args.seq_len, args.micro_batch, rank, world, args.seed)
    batches = [windows[i].to(engine.device) for i in range(8)]
    dist.barrier()
    engine.train()
    done, start, warm = 0, time.perf_counter(), True
    while True:
        ids = batches[done % len(batches)]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        done += 1
        now = time.perf_counter()
        if warm and now - start >= warmup_s and done >= 2:
            warm, done, start = False, 0, now
        elif not warm and now - start >= seconds and done >= 3:
            break
    elapsed = time.perf_counter() - start
    dist.barrier()
    engine.destroy()
    return {"micro_batches": done, "seconds": elapsed, "micro_batch_s": elapsed / done,
            "samples_per_s": done * args.micro_batch / elapsed}


def run_case(method: str, args: argparse.Namespace, corpus: Any, eval_set: list[torch.Tensor],
             target_tokens: int, chase: dict[str, float] | None = None) -> dict[str, Any]:
    """Train one case; return this rank's raw records.

    With ``args.eval_every_tokens`` the committed weights are evaluated at step 0, every that many
    tokens and at the end (``evals``: step, tokens, wall-clock without evaluations averaged over the
    ranks, held-out loss; every rank takes the same decisions from these all-reduced figures). Without
    ``chase`` the case trains ``args.steps`` steps (it sets the target); with ``chase``
    (``target_loss``, ``cap_s``) it trains until an evaluation reaches the target, the wall-clock
    passes the cap, or 4 x ``args.steps`` steps.
    """
    import train_lm
    from deepspeed import comm as dist

    import deepspeed_acco

    rank, world = dist.get_rank(), dist.get_world_size()
    model = train_lm.build_model(_model_args(args), corpus.vocab_size, corpus.eot_id)
    config = build_config(method, args)
    engine, _, _, _ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(), config=config)
    acco_config = deepspeed_acco.get_acco_config(config)
    acco = acco_config.enabled
    windows = train_lm.ShardedWindows(corpus.train, args.seq_len, args.micro_batch, rank, world, args.seed)
    tokens_per_micro = args.micro_batch * args.seq_len
    n_params = sum(p.numel() for p in engine.module.parameters())

    gc.collect()
    dist.barrier()
    _reset_peak_rss()
    tx0 = read_tx_bytes(args.iface)
    cpu0 = thread_cpu_s()
    t0 = time.perf_counter()
    paused = 0.0
    commit_t: list[float] = []  # training-thread time (pauses excluded) at each commit
    step_loss: list[float] = []
    step_local_micro: list[int] = []
    micro_s: list[list[float]] = []  # zero1: per step, fwd+bwd+step time of each micro-batch
    micro_boundary_s: list[float] = []
    records: list[dict[str, Any]] = []
    mid_eval: dict[str, Any] | None = None
    paused_steps: list[int] = []
    loss_sum, local_micro, position = 0.0, 0, 0
    current: list[float] = []
    adaptive = method.startswith("acco_adaptive")
    every = args.eval_every_tokens
    evals: list[dict[str, Any]] = []
    reached = False

    def committed_tokens() -> int:
        if adaptive:
            return sum(r["micro_batches"] for r in records) * tokens_per_micro
        return engine.global_steps * args.ga * world * tokens_per_micro

    def evaluate_now() -> dict[str, Any]:
        """Held-out loss of the committed weights, the evaluation excluded from the wall-clock.

        ACCO first waits for its round in flight (the committed weights are that round's result); the
        wait is counted as training time, though without the evaluation part of it would have overlapped
        the next step's compute: evaluations cost ACCO up to one round each (``drain_s`` says how much).
        """
        nonlocal paused, tx0, records
        d0 = time.perf_counter()
        if hasattr(engine.optimizer, "drain"):  # AccoZeroOptimizer
            engine.optimizer.drain()
        drain_s = time.perf_counter() - d0
        wall = time.perf_counter() - t0 - paused
        p0, txp = time.perf_counter(), read_tx_bytes(args.iface)
        value, mean_wall = train_lm.evaluate(engine, eval_set, (wall, 1))
        records += [r.as_dict() for r in deepspeed_acco.pop_metrics(engine)]
        point = {"step": engine.global_steps, "tokens": committed_tokens(), "wall_s": mean_wall, "loss": value,
                 "drain_s": drain_s}
        evals.append(point)
        paused += time.perf_counter() - p0
        if engine.global_steps:
            paused_steps.append(engine.global_steps + 1)  # the pipeline refills in the next step
        tx0 += read_tx_bytes(args.iface) - txp
        return point

    if every:
        evaluate_now()
    limit = (args.steps + (AUTO_EXTRA_STEPS if method == "acco_auto" else 0)) if chase is None else 4 * args.steps
    engine.train()
    while engine.global_steps < limit and not reached:
        batch = windows[position].to(engine.device)
        position += 1
        m0 = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        before = engine.global_steps
        engine.step()
        m1 = time.perf_counter()
        loss_sum += float(loss.detach())
        local_micro += 1
        if engine.global_steps == before:
            current.append(m1 - m0)
            continue
        micro_s.append(current)
        micro_boundary_s.append(m1 - m0)
        current = []
        commit_t.append(m1 - t0 - paused)
        step_loss.append(loss_sum / local_micro)
        step_local_micro.append(local_micro)
        loss_sum, local_micro = 0.0, 0
        records += [r.as_dict() for r in deepspeed_acco.pop_metrics(engine)]
        if every:
            if committed_tokens() >= evals[-1]["tokens"] + every or engine.global_steps >= limit:
                point = evaluate_now()
                if chase is not None:
                    reached = point["loss"] <= chase["target_loss"]
                    if not reached and point["wall_s"] >= chase["cap_s"]:
                        break
            continue
        if adaptive and mid_eval is None and records \
                and sum(r["micro_batches"] for r in records) * tokens_per_micro >= target_tokens:
            # Held-out loss once this run has consumed ZeRO-1's token budget (equal-token comparison).
            p0, txp = time.perf_counter(), read_tx_bytes(args.iface)
            value, _ = train_lm.evaluate(engine, eval_set, (0.0, 0))
            records += [r.as_dict() for r in deepspeed_acco.pop_metrics(engine)]
            mid_eval = {"step": engine.global_steps, "eval_loss": value,
                        "tokens": sum(r["micro_batches"] for r in records) * tokens_per_micro}
            paused += time.perf_counter() - p0
            paused_steps.append(engine.global_steps + 1)  # the pipeline refills in the next step
            tx0 += read_tx_bytes(args.iface) - txp
    deepspeed_acco.flush(engine)
    records += [r.as_dict() for r in deepspeed_acco.pop_metrics(engine)]
    train_s = time.perf_counter() - t0 - paused
    config_acco = config.get("acco", {})
    tx = read_tx_bytes(args.iface) - tx0
    cpu1 = thread_cpu_s()
    thread_cpu = {name: cpu1[name] - cpu0.get(name, 0.0) for name in cpu1}
    peak_rss = _peak_rss_mb()
    final_eval, _ = train_lm.evaluate(engine, eval_set, (0.0, 0))
    out = {
        "method": "zero1" if method == "zero1" else ("dpu" if method == "dpu" else "acco"),
        "case": method, "adaptive_accumulation": adaptive, "rank": rank, "world_size": world,
        "acco": acco, "estimate_fraction": acco_config.estimate_fraction if acco else None,
        "steps": engine.global_steps, "n_params": n_params, "micro_batch": args.micro_batch,
        "ga": args.ga, "seq_len": args.seq_len, "tokens_per_micro_batch": tokens_per_micro,
        "commit_t": commit_t, "train_s": train_s, "step_loss": step_loss, "step_local_micro": step_local_micro,
        "micro_s": micro_s, "micro_boundary_s": micro_boundary_s, "records": records, "tx_bytes": tx,
        "thread_cpu_s": thread_cpu,
        "peak_rss_mb": peak_rss, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_eval_loss": final_eval, "mid_eval": mid_eval, "paused_steps": paused_steps,
        "comm_dtype": str(getattr(engine.optimizer, "communication_data_type", "")),
        "seed": args.seed, "lr_scaling": config_acco.get("lr_scaling", "none") if acco else None,
        "evals": evals, "target_loss": chase["target_loss"] if chase else None,
        "cap_s": chase["cap_s"] if chase else None, "reached": reached if chase else None,
    }
    decisions = [r["decision"] for r in records if r.get("decision")]
    if method == "acco_auto":  # what the automatic schedule decided, and when
        out["auto_decisions"] = decisions
        chosen = decisions[-1]["schedule"] if decisions else None
        out["auto_schedule"] = chosen
        out["estimate_fraction"] = None if chosen in (None, "sync") else float(chosen.split("+")[0])
    engine.destroy()
    engine = model = None  # freed before the next case
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    """Initialise the process group, run every case, gather the ranks' records, write them (rank 0)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    import deepspeed
    import train_lm
    from deepspeed import comm as dist

    import deepspeed_acco

    train_lm.quiet_known_warnings()
    if args.seq_len is None:
        args.seq_len = train_lm.PRESETS[args.preset].seq_len
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        deepspeed_acco.disable_cpu_shm_build()
    else:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, timeout=timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = train_lm.build_corpus(_model_args(args))
    eval_set = train_lm.heldout_batches(corpus.heldout, args.eval_batches, args.micro_batch, args.seq_len)
    target_tokens = args.steps * args.ga * args.micro_batch * world * args.seq_len

    probe = None
    if args.probe_s > 0:
        probe = probe_rate(args, corpus, args.probe_s)
        gc.collect()

    cases = []
    chase: dict[str, float] | None = None
    for method in args.method_list:
        random.seed(args.seed)
        t = time.perf_counter()
        case = run_case(method, args, corpus, eval_set, target_tokens, chase)
        if args.eval_every_tokens and chase is None:  # the first case set the target (same on every rank)
            chase = {"target_loss": case["evals"][-1]["loss"], "cap_s": args.cap_factor * case["evals"][-1]["wall_s"]}
        case["case_wall_s"] = time.perf_counter() - t
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, case)
        cases.append({"method": case["method"], "case": method, "ranks": gathered,
                      "max_micro_batches_per_round": build_config(method, args).get("acco", {}).get(
                          "max_micro_batches_per_round")})
        if rank == 0:
            print(f"[worker] {method}: {case['steps']} steps in {case['train_s']:.1f} s, "
                  f"held-out loss {case['final_eval_loss']:.4f}", flush=True)
    probes: list[Any] = [None] * world
    dist.all_gather_object(probes, probe)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps({"cases": cases, "probe": probes, "args": vars(args)}) + "\n")
    dist.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: once (1 launch in ~20) a rank aborted there with
    # "terminate called without an active exception" after its results were written (C++ threads of
    # gloo / the ACCO worker destroyed at exit). Everything is written and synchronized by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
