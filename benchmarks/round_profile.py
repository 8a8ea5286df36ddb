"""Where a round's CPU time goes, and ACCO's extra memory per rank by buffer, on the compute-dense model.

Two gloo ranks on this machine (spawned, loopback, one thread each), the ``dense`` preset of
``examples/train_lm.py``, plain ZeRO-1 and ACCO (and ACCO with the int8 estimate where the package has it),
a few optimizer steps each after a warm-up. For every method it reports, per optimizer step and per rank:

- CPU seconds of each thread (``/proc/self/task``: the training thread, ACCO's worker, which the kernel
  names ``python3``, and gloo's threads), and per round phase (reduce-scatter, norm, step, all-gather) both
  the wall-clock ACCO records and the worker thread's own CPU seconds (``time.thread_time``);
- ACCO's extra memory by buffer: the storage of every tensor ACCO keeps beyond ZeRO-1 (the two flat
  accumulation buffers, the shadow parameters, the round's reduced shards, one of which is the estimate's
  carried into the commit, the fused estimate's scratch copies of the shard, its gradient and both moments,
  and with int8 the payload and send buffers), read from the tensors, against the planner's formula
  (``deepspeed_acco.plan.memory_per_rank``: ``2 P a + P b + 24 P / N`` for plain ACCO, plus 2 P (1 + 4 / block)
  with int8 on one node; a = accumulation dtype bytes, b = parameter dtype bytes).

The worker's phases are also ``torch.profiler.record_function`` ranges (``deepspeed_acco::pipeline::*``),
for a trace taken inside a training script; a profiler started on the training thread does not record
them here, because the worker thread exists before the profiler starts (measured: no range recorded), so
this script reads the thread clocks instead.

    python benchmarks/round_profile.py --out benchmarks/results/round_profile.json     # 3 interleaved repetitions

Run it on two commits (``git worktree``) to compare the round before and after a change.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def profile_rank(rank: int, world: int, methods: list[str], steps: int, warmup: int, reps: int = 1) -> dict[str, Any]:
    """In a spawned rank: train each method ``reps`` times, the methods interleaved (rotated each repetition),
    and measure threads, phases and ACCO's buffers; a method's figures are lists, one entry per repetition."""
    import train_lm
    from deepspeed import comm as dist

    import deepspeed_acco
    from benchmarks.worker import _model_args, build_config, thread_cpu_s
    from deepspeed_acco.plan import memory_per_rank
    from tests.dist_utils import init_rank

    init_rank(timeout_s=600)
    args = argparse.Namespace(preset="dense", seq_len=train_lm.PRESETS["dense"].seq_len, micro_batch=4, ga=4,
                              max_micro_factor=4, timeout_s=600.0, seed=1234,
                              estimate_fraction=None, steps=warmup + steps)  # steps: the LR decay's horizon
    corpus = train_lm.build_corpus(_model_args(args))
    out: dict[str, Any] = {}
    order = [methods[(k + r) % len(methods)] for r in range(reps) for k in range(len(methods))]
    for method in order:
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
        # What the rank holds for parameters, gradients and optimizer, after a step and in the middle of one.
        after_step = held_bytes(engine)
        ids = windows[position + steps * args.ga]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        b = engine.optimizer.bit16_groups_flat[0].element_size()
        planned = memory_per_rank(method if method in ("zero1", "acco_int8") else "acco", result["n_params"], world,
                                  param_bytes=b, accum_bytes=4)
        result["memory_bytes"] = {"measured": max(after_step, held_bytes(engine)), "planned": sum(planned.values()),
                                  "planned_parts": planned}
        optimizer = engine.optimizer
        if isinstance(optimizer, deepspeed_acco.AccoZeroOptimizer):
            def nbytes(tensors: list[Any]) -> int:
                return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

            sharded = optimizer._round
            fused = sharded.fused._scratch if sharded.fused is not None and sharded.fused._scratch else []
            result["acco_buffers_bytes"] = {
                "accumulation buffers (2 x P x a)": nbytes([t for pair in optimizer._buffers for t in pair]),
                "shadow parameters (P x b)": nbytes(optimizer._shadows),
                "round buffers (reduced shards 2 x 4P/N; int8: payload and send buffers 2 x P (1 + 4/block))":
                    nbytes(list(sharded._buffers.values())),
                "fused estimate's scratch (4 x 4P/N)": nbytes([t for group in fused for t in group]),
            }
            # The planner's parts beyond the parameters and the optimizer shard: ACCO's own buffers.
            result["acco_buffers_formula_bytes"] = sum(v for k, v in planned.items()
                                                       if k not in ("parameters", "optimizer shard"))
        out.setdefault(method, []).append(result)
        engine.destroy()
        dist.barrier()
    return out


def held_bytes(engine: Any) -> int:
    """Bytes of the distinct storages this rank holds for parameters, gradients and optimizer: the flat parameters,
    the fp32 master shards and the optimizer's state, the parameters' ``.grad`` and ZeRO-1's averaged gradient
    partitions, and ACCO's buffers (accumulation, shadow, the rounds', the fused estimate's scratch, the carried
    estimate sums)."""
    import torch

    optimizer = engine.optimizer
    tensors: list[Any] = [*optimizer.bit16_groups_flat, *optimizer.single_partition_of_fp32_groups]
    tensors += [v for state in optimizer.optimizer.state.values() for v in state.values()]
    tensors += [p.grad for p in engine.module.parameters()]
    averaged = getattr(optimizer, "averaged_gradients", None) or {}
    tensors += [t for group in (averaged.values() if isinstance(averaged, dict) else averaged) for t in group or []]
    from deepspeed_acco import AccoZeroOptimizer

    if isinstance(optimizer, AccoZeroOptimizer):
        sharded = optimizer._round
        tensors += [t for pair in optimizer._buffers for t in pair] + list(optimizer._shadows)
        tensors += list(sharded._buffers.values()) + list(sharded._carried or [])
        if sharded.fused is not None and sharded.fused._scratch:
            tensors += [t for group in sharded.fused._scratch for t in group]
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    """Spawn 2 ranks, profile every method, write rank 0's and rank 1's figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="zero1,acco,acco_int8")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every method (medians reported)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tests.dist_utils import run_distributed

    results = run_distributed(profile_rank, 2, args.methods.split(","), args.steps, args.warmup, args.reps,
                              timeout_s=3600)
    text = json.dumps({"ranks": results, "args": vars(args)}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(summary(results))
    return 0


def _spread(values: list[float]) -> str:
    """``median (min-max)`` of one figure over the repetitions and both ranks."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summary(results: list[dict[str, Any]]) -> str:
    """Per method: medians over repetitions and ranks (min-max) of wall and CPU seconds per step, by thread
    (``worker``: ACCO's round thread; ``gloo``: gloo's threads together) and by round phase."""
    lines = []
    for method in results[0]:
        runs = [run for rank in results for run in rank[method]]
        worker = [run["thread_cpu_s_per_step"].get("python3", run["thread_cpu_s_per_step"].get("python", 0.0))
                  for run in runs]
        gloo = [sum(v for k, v in run["thread_cpu_s_per_step"].items() if "gloo" in k) for run in runs]
        main = [run["thread_cpu_s_per_step"].get("main", 0.0) for run in runs]
        lines.append(f"{method}: {_spread([r['wall_s_per_step'] for r in runs])} s/step; CPU s/step: training thread "
                     f"{_spread(main)}, worker {_spread(worker)}, gloo threads {_spread(gloo)} "
                     f"({len(runs)} runs: {len(runs) // len(results)} repetitions x {len(results)} ranks)")
        for key, label in (("round_phases_s_per_step", "wall"), ("round_phases_cpu_s_per_step", "worker CPU")):
            if key in runs[0]:
                lines.append(f"  round phases, {label} s/step: " + ", ".join(
                    f"{k} {_spread([r[key][k] for r in runs])}" for k in runs[0][key]))
        if "memory_bytes" in runs[0]:
            measured, planned = runs[0]["memory_bytes"]["measured"], runs[0]["memory_bytes"]["planned"]
            lines.append(f"  memory per rank: {measured / 1e6:.1f} MB held, the planner's formula "
                         f"{planned / 1e6:.1f} MB ({planned / measured - 1:+.1%})")
        if "acco_buffers_bytes" in runs[0]:
            r0 = runs[0]
            total = sum(r0["acco_buffers_bytes"].values())
            lines.append(f"  ACCO buffers: {total / 1e6:.1f} MB (formula {r0['acco_buffers_formula_bytes'] / 1e6:.1f} "
                         "MB): " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r0["acco_buffers_bytes"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
