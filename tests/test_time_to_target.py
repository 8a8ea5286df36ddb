"""Time to target's arithmetic (``benchmarks/time_to_target.py``): the interpolated crossing, the pairing
with ZeRO-1 by seed, unreached seeds in the medians, and the targets. The end-to-end run over fake
hosts is in ``tests/test_benchmark.py``.

Run: ``python3 -m pytest -q tests/test_time_to_target.py``.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.time_to_target import add_derived, crossing, markdown

EVALS = [{"step": 0, "tokens": 0, "wall_s": 0.0, "loss": 5.0},
         {"step": 2, "tokens": 100, "wall_s": 10.0, "loss": 4.0},
         {"step": 4, "tokens": 200, "wall_s": 20.0, "loss": 3.0},
         {"step": 6, "tokens": 300, "wall_s": 30.0, "loss": 3.2}]


def test_crossing_interpolates_between_the_evaluations_around_the_target() -> None:
    assert crossing(EVALS, 3.5) == pytest.approx((15.0, 150.0))
    assert crossing(EVALS, 4.0) == (10.0, 100)           # reached exactly at an evaluation
    assert crossing(EVALS, 3.1) == pytest.approx((19.0, 190.0))  # the first crossing, not the later rise
    assert crossing(EVALS, 6.0) == (0.0, 0)              # already below at step 0
    assert crossing(EVALS, 2.9) is None                  # never reached


def _run(case: str, seed: int, ratio: float, time_s: float | None, step_s: float = 1.0) -> dict:
    return {"case": case, "seed": seed, "target_ratio": ratio, "reached": time_s is not None,
            "time_to_target_s": time_s, "tokens_to_target": None if time_s is None else 10 * time_s,
            "comm_s": 0.5, "compute_s": 1.0, "step_time_s": step_s, "eval_drain_s": 0.0, "target_loss": 3.0 + seed,
            "time_to_target_s_drain_excluded": time_s}


def test_ratios_pair_by_seed_and_unreached_seeds_count_as_slowest() -> None:
    runs = [_run("zero1", 1, 0.5, 100.0), _run("zero1", 2, 0.5, 200.0), _run("zero1", 3, 0.5, 50.0),
            _run("acco", 1, 0.5, 60.0), _run("acco", 2, 0.5, 100.0), _run("acco", 3, 0.5, None),
            _run("zero1", 1, 2.0, 300.0), _run("acco_adaptive_sqrt", 1, 2.0, 150.0), _run("acco", 1, 2.0, None)]
    result = {"runs": runs}
    add_derived(result)
    by = {(s["target_ratio"], s["case"]): s for s in result["summary"]}
    acco = by[(0.5, "acco")]
    # Paired by seed: 60/100 = 0.6, 100/200 = 0.5, seed 3 did not reach (inf): median 0.6, max unbounded.
    assert acco["vs_zero1"] == pytest.approx(0.6) and acco["vs_zero1_min"] == pytest.approx(0.5)
    assert acco["vs_zero1_max"] is None and acco["reached"] == 2 and acco["n"] == 3
    assert by[(2.0, "acco")]["vs_zero1_min"] is None  # no seed reached: no finite minimum either
    assert acco["time_to_target_s"] == 100.0  # median of 60, 100, inf
    assert by[(2.0, "acco")]["vs_zero1"] is None  # the only seed did not reach: no median
    targets = {t["target"]: t for t in result["targets"]}
    first = targets["ACCO wall-clock to target <= 0.75x ZeRO-1's at M/C 0.5"]
    assert first["value"] == pytest.approx(0.6) and first["met"]
    best = targets["best ACCO variant <= 0.6x ZeRO-1's at M/C 2"]
    assert best["case"] == "acco_adaptive_sqrt" and best["value"] == pytest.approx(0.5) and best["met"]
    assert all(math.isfinite(r["zero1_M_over_C"]) for r in runs)


def test_markdown_says_did_not_reach() -> None:
    runs = [_run("zero1", 1, 2.0, 300.0), _run("acco", 1, 2.0, None)]
    result = {"runs": runs, "command": "python benchmarks/run.py --time_to_target", "wall_s": 60.0,
              "machine": {"cpu": "test", "cores": 2, "git_commit": "abc1234"},
              "settings": {"steps": 40, "seeds": "1", "cap_factor": 2.0, "eval_every_steps": 4},
              "calibration": {"tiny": {"C_s": 1.0, "M_unshaped_s": 0.05, "n_params": 10, "micro_batch": 8, "ga": 4}}}
    add_derived(result)
    text = markdown(result)
    assert "| ACCO 0.75 | 0/1 | did not reach" in text, text
    assert "best ACCO variant <= 0.6x ZeRO-1's at M/C 2: did not reach (ACCO 0.75): missed" in text, text
