"""Where a round's CPU time goes, and ACCO's extra memory per rank by buffer, on the compute-dense model.

Two gloo ranks on this machine (spawned, loopback, one thread each), the ``dense`` preset of
``examples/train_lm.py``, plain ZeRO-1 and ACCO (and ACCO with the int8 estimate where the package has it),
a few optimizer steps each after a warm-up. For every method it reports, per optimizer step and per rank:

- CPU seconds of each thread (``/proc/self/task``: the training thread, ACCO's worker, which the kernel
  names ``python3``, and gloo's threads), and per round phase (reduce-scatter, norm, step, all-gather) both
  the wall-clock ACCO records and the worker thread's own CPU seconds (``time.thread_time``);
- ACCO's extra memory by buffer: the storage of every tensor ACCO keeps beyond ZeRO-1 (the two flat
  accumulation buffers, the shadow parameters, the carried estimate shard), read from the tensors, against
  the formula ``2 P a + P b + 4 P / N`` (a = accumulation dtype bytes, b = parameter dtype bytes).

The worker's phases are also ``torch.profiler.record_function`` ranges (``deepspeed_acco::pipeline::*``),
for a trace taken inside a training script; a profiler started on the training thread does not record
them here, because the worker thread exists before the profiler starts (measured: no range recorded), so
this script reads the thread clocks instead.

    python benchmarks/round_profile.py --out benchmarks/results/round_profile.json

Run it on two commits (``git worktree``) to compare the round before and after a change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

__all__ = ["main", "profile_rank"]


def _train(engine: Any, windows: Any, position: int, steps: int) -> int:
    """``steps`` optimizer steps from micro-batch ``position``; returns the next position."""
    target = engine.global_steps + steps
    while engine.global_steps < target:
        ids = windows[position]
        position += 1
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return position


def profile_rank(rank: int, world: int, methods: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """In a spawned rank: train each method, measure threads, phases, profiler ranges and ACCO's buffers."""
    import train_lm
    from deepspeed import comm as dist

    import deepspeed_acco
    from benchmarks.worker import _model_args, build_config, thread_cpu_s
    from tests.dist_utils import init_rank

    init_rank(timeout_s=600)
    args = argparse.Namespace(preset="dense", seq_len=train_lm.PRESETS["dense"].seq_len, micro_batch=4, ga=4,
                              max_micro_factor=4, timeout_s=600.0, seed=1234,
                              estimate_fraction=None)
    corpus = train_lm.build_corpus(_model_args(args))
    out: dict[str, Any] = {}
    for method in methods:
        model = train_lm.build_model(_model_args(args), corpus.vocab_size, corpus.eot_id)
        if method == "acco_int8" and "estimate_compression" not in deepspeed_acco.AccoConfig.model_fields:
            continue
        config = build_config(method, args)
        engine, _, _, _ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(),
                                                    config=config)
        windows = train_lm.ShardedWindows(corpus.train, args.seq_len, args.micro_batch, rank, world, args.seed)
        position = _train(engine, windows, 0, warmup)
        deepspeed_acco.pop_metrics(engine)
        dist.barrier()
        cpu0, t0 = thread_cpu_s(), time.perf_counter()
        _train(engine, windows, position, steps)
        wall = time.perf_counter() - t0
        cpu1 = thread_cpu_s()
        records = [r.as_dict() for r in deepspeed_acco.pop_metrics(engine)]
        threads = {name: (cpu1[name] - cpu0.get(name, 0.0)) / steps for name in cpu1
                   if cpu1[name] - cpu0.get(name, 0.0) > 0}
        result: dict[str, Any] = {"wall_s_per_step": wall / steps, "thread_cpu_s_per_step": threads,
                                  "n_params": sum(p.numel() for p in model.parameters())}
        for key in ("round_phases_s", "round_phases_cpu_s"):
            if records and key in records[0]:
                phases: dict[str, float] = {}
                for rec in records:
                    for k, v in rec[key].items():
                        phases[k] = phases.get(k, 0.0) + v / len(records)
                result[f"{key}_per_step"] = phases
        optimizer = engine.optimizer
        if isinstance(optimizer, deepspeed_acco.AccoZeroOptimizer):
            def nbytes(tensors: list[Any]) -> int:
                return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

            flats = optimizer.bit16_groups_flat
            p_total = sum(f.numel() for f in flats)
            acc = optimizer._buffers[0][0].element_size()
            b = flats[0].element_size()
            carried = getattr(getattr(optimizer, "_round", None), "_carried", None)
            result["acco_buffers_bytes"] = {
                "accumulation buffers (2 x P x a)": nbytes([t for pair in optimizer._buffers for t in pair]),
                "shadow parameters (P x b)": nbytes(optimizer._shadows),
                "carried estimate shard (4P/N, between an estimate and its commit)":
                    nbytes(carried) if carried is not None else 4 * p_total // world,
            }
            result["acco_buffers_formula_bytes"] = 2 * p_total * acc + p_total * b + 4 * p_total // world
        out[method] = result
        engine.destroy()
        dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    """Spawn 2 ranks, profile every method, write rank 0's and rank 1's figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="zero1,acco,acco_int8")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tests.dist_utils import run_distributed

    results = run_distributed(profile_rank, 2, args.methods.split(","), args.steps, args.warmup, timeout_s=1800)
    text = json.dumps({"ranks": results, "args": vars(args)}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for method, r0 in results[0].items():
        threads = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r0["thread_cpu_s_per_step"].items(),
                                                               key=lambda kv: -kv[1]) if v >= 0.001)
        print(f"{method}: {r0['wall_s_per_step']:.3f} s/step; CPU s/step by thread: {threads}")
        if "round_phases_s_per_step" in r0:
            phases = r0["round_phases_s_per_step"].items()
            print("  round phases, wall s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in phases))
        if "round_phases_cpu_s_per_step" in r0:
            phases = r0["round_phases_cpu_s_per_step"].items()
            print("  round phases, worker CPU s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in phases))
        if "acco_buffers_bytes" in r0:
            total = sum(r0["acco_buffers_bytes"].values())
            print(f"  ACCO buffers: {total / 1e6:.1f} MB (formula {r0['acco_buffers_formula_bytes'] / 1e6:.1f} MB): "
                  + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r0["acco_buffers_bytes"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
