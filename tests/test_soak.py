"""Soak: a long 2-rank CPU run with adaptive accumulation and a rank that stalls for a while, then comes back.

1,000 committed steps, about 2 x 15,000 micro-batches (adaptive accumulation: ~15 per rank per
step). Checks, after a warm-up: the parameters are bit-identical on both ranks at the end, the
resident memory does not grow (< ``RSS_GROWTH_LIMIT_MB`` between the first sample after warm-up
and the last), the thread count is constant (``threading.active_count()`` and ``/proc/self/task``),
and no round ever hits ``acco.round_timeout_s`` (no deadlock). Marked ``slow``; CI runs it
(``pytest -q tests``). About a minute on 2 cores (45 s of training).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.workers import base_config

STEPS = 1000
"""Committed steps (>= 4 micro-batches per rank each: gradient_accumulation_steps=4, two rounds of >= 2)."""
STALL_AT_STEP, STALL_S = 120, 4.0
"""Rank 1 sleeps STALL_S seconds before a micro-batch of this step, well below ROUND_TIMEOUT_S."""
ROUND_TIMEOUT_S = 20.0
WARMUP_STEPS = 40
SAMPLE_EVERY = 20
RSS_GROWTH_LIMIT_MB = 20.0


def _soak(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train STEPS steps with rank 1 stalling once; sample RSS and threads every SAMPLE_EVERY steps."""
    import threading

    import psutil

    import deepspeed_acco
    from tests.dist_utils import init_rank
    from tests.workers import WithLoss, make_model

    init_rank()
    model = make_model(0)
    module = WithLoss(model)
    engine, *_ = deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(7 + rank)
    proc = psutil.Process()
    samples: list[dict[str, float]] = []
    micro, stalled_s, last_sampled = 0, 0.0, -1
    counts: list[list[int]] = []
    start = time.monotonic()
    while engine.global_steps < STEPS:
        step = engine.global_steps
        if rank == 1 and step == STALL_AT_STEP and not stalled_s:
            t0 = time.monotonic()
            time.sleep(STALL_S)  # stalled, then back: the peer waits (or accumulates more), no timeout
            stalled_s = time.monotonic() - t0
        x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
        engine.backward(engine(x, y))
        engine.step()
        micro += 1
        if engine.global_steps != step:
            counts.extend(m.micro_batches_per_rank for m in deepspeed_acco.pop_metrics(engine))
            if engine.global_steps >= WARMUP_STEPS and engine.global_steps % SAMPLE_EVERY == 0 \
                    and engine.global_steps != last_sampled:
                last_sampled = engine.global_steps
                samples.append({"step": engine.global_steps, "rss_mb": proc.memory_info().rss / 2**20,
                                "threads": threading.active_count(),
                                "tasks": len(os.listdir("/proc/self/task"))})
    deepspeed_acco.flush(engine)
    counts.extend(m.micro_batches_per_rank for m in deepspeed_acco.pop_metrics(engine))
    out = {"params": [p.detach().clone() for p in model.parameters()], "micro_batches": micro,
           "global_steps": engine.global_steps, "samples": samples, "stalled_s": stalled_s,
           "runtime_s": time.monotonic() - start, "counts": counts}
    engine.destroy()
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_adaptive_with_stalled_rank() -> None:
    """~30,000 micro-batches, adaptive accumulation, rank 1 stalls 4 s: identical params, flat RSS and threads."""
    cfg = base_config(ga=4, lr=1e-3, acco={"enabled": True, "adaptive_accumulation": True,
                                           "round_timeout_s": ROUND_TIMEOUT_S})
    results = run_distributed(_soak, 2, cfg, timeout_s=280)
    for rank, res in enumerate(results):
        first, last = res["samples"][0], res["samples"][-1]
        growth = last["rss_mb"] - first["rss_mb"]
        peak = max(s["rss_mb"] for s in res["samples"])
        print(f"rank {rank}: {res['micro_batches']} micro-batches in {res['global_steps']} steps, "
              f"{res['runtime_s']:.1f} s, stalled {res['stalled_s']:.1f} s; RSS {first['rss_mb']:.1f} MB at step "
              f"{first['step']} -> {last['rss_mb']:.1f} MB at step {last['step']} ({growth:+.2f} MB, peak "
              f"{peak:.1f}); threads {sorted({s['threads'] for s in res['samples']})}"
              f", /proc/self/task {sorted({s['tasks'] for s in res['samples']})}")
        half = res["samples"][len(res["samples"]) // 2]
        slope_kb = (last["rss_mb"] - half["rss_mb"]) * 1024 / max(1, last["step"] - half["step"])
        print(f"rank {rank} RSS MB by step: " + ", ".join(f"{s['step']}:{s['rss_mb']:.1f}" for s in res["samples"])
              + f"; second half: {slope_kb:.2f} KB per step")
        assert res["global_steps"] == STEPS
        assert growth < RSS_GROWTH_LIMIT_MB, res["samples"]
        assert len({s["threads"] for s in res["samples"]}) == 1, res["samples"]
        assert len({s["tasks"] for s in res["samples"]}) == 1, res["samples"]
        assert len(res["counts"]) == STEPS
    assert results[1]["stalled_s"] >= STALL_S
    assert sum(r["micro_batches"] for r in results) >= 8 * STEPS
    # Every step's per-rank counts agree between the ranks (they come from the same all-reduce).
    assert results[0]["counts"] == results[1]["counts"]
    # During the stall rank 0 kept accumulating up to the cap: adaptive accumulation really adapted.
    assert max(c[0] for c in results[0]["counts"]) > 4
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the ranks' parameters differ"
        assert torch.isfinite(a).all()
