"""The planner against a benchmark run: predicted step time from each cell's measured C and M.

    python benchmarks/plan_check.py benchmarks/results/quick.json

For every run (cell) of the JSON that ``benchmarks/run.py`` writes, ``deepspeed_acco.plan`` predicts the
step time from that run's own measured compute per step (``compute_s``, taken at the nominal ``ga``
micro-batches; in a heterogeneous adaptive run, each rank's in-situ rate) and round times
(``commit_round_s`` as M, ``estimate_round_s`` as the int8 estimate's M_est), and the table compares it
with the measured ``step_time_s``. A second column predicts from the ZeRO-1 twin's C and M alone (what a
user has before trying ACCO): on the CPU bed the round's own CPU work slows compute under ACCO, which
that column shows and the first one absorbs.

Exit status 1 when a prediction from the run's own figures is off by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import PLANNER_METHOD, recorded_estimate_fraction  # noqa: E402
from deepspeed_acco.plan import METHODS, Timing, step_time_s  # noqa: E402

__all__ = ["check", "main"]


def _own_timing(run: dict[str, Any]) -> Timing:
    """C and M of this cell, as measured in it (C scaled to the nominal micro-batches for adaptive)."""
    world = len(run["step_time_s_per_rank"])
    ga = run["ga"]
    commit = run["commit_round_s"] if run.get("commit_round_s") is not None else run["round_s"]
    estimate = run.get("estimate_round_s")
    estimate = estimate if estimate is not None else commit
    rates = run.get("in_situ_samples_per_s")
    if run["heterogeneous"] and run["adaptive_accumulation"] and rates:
        # The ranks accumulate different counts: C and the slow/fast ratio from each rank's own rate.
        slow, fast = min(rates), max(rates)
        return Timing(ga * run["micro_batch"] / fast, commit, estimate, ga, slowest_factor=fast / slow,
                      estimate_fraction=recorded_estimate_fraction(run))
    per_rank_micro = run["micro_batches_per_step"] / world
    compute = run["compute_s"] * ga / per_rank_micro
    return Timing(compute, commit, estimate, ga, estimate_fraction=recorded_estimate_fraction(run))


def _zero1_timing(run: dict[str, Any], twin: dict[str, Any]) -> Timing:
    """ZeRO-1's C and M for every method (the int8 estimate round: the run's own)."""
    estimate = run.get("estimate_round_s")
    return Timing(twin["compute_s"], twin["comm_s"], estimate if estimate is not None else twin["comm_s"], run["ga"],
                  estimate_fraction=recorded_estimate_fraction(run))


def step_spread(run: dict[str, Any], skip: int) -> float | None:
    """(max - min) / median of the run's step durations after the first ``skip`` steps (from its loss curve).

    A cell whose own steps spread wider than a tolerance cannot check a prediction to that tolerance: the
    medians of C and M and the median step need not add up when a few steps are disturbed.
    """
    curve = run.get("loss_curve") or []
    walls = [0.0] + [p["wall_s"] for p in curve]
    steps = [walls[i] - walls[i - 1] for i in range(1, len(walls))][skip:]
    return (max(steps) - min(steps)) / statistics.median(steps) if len(steps) >= 2 else None


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run: measured and predicted step time, relative errors, the spread of its steps."""
    skip = int((result.get("settings") or {}).get("skip") or 0)
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["rep"], r.get("seed"), r.get("preset"), r["heterogeneous"], r["target_ratio"]

    twins = {key(r): r for r in result["runs"] if r["case"] == "zero1"}
    rows = []
    for run in result["runs"]:
        # --time_to_target's "acco_adaptive_sqrt" is adaptive accumulation with another LR: the same schedule;
        # the equal halves are the planner's ACCO at their recorded split; the automatic schedule, its choice
        method = "acco_adaptive" if run["case"].startswith("acco_adaptive") else PLANNER_METHOD.get(run["case"],
                                                                                                     run["case"])
        if run["case"] == "acco_auto":
            chosen = run.get("auto_schedule") or ""
            method = "zero1" if chosen == "sync" else "acco_int8" if chosen.endswith("+int8") else "acco"
        if method not in METHODS:
            continue
        measured = run["step_time_s"]
        own = step_time_s(method, _own_timing(run))[0]
        twin = twins.get(key(run))
        from_zero1 = step_time_s(method, _zero1_timing(run, twin))[0] if twin else None
        rows.append({"method": method, "case": run["case"], "preset": run.get("preset", "tiny"),
                     "target_ratio": run["target_ratio"], "seed": run.get("seed"),
                     "heterogeneous": run["heterogeneous"], "rep": run["rep"], "measured_s": measured,
                     "predicted_s": own, "error": own / measured - 1.0, "step_spread": step_spread(run, skip),
                     "predicted_from_zero1_s": from_zero1,
                     "error_from_zero1": from_zero1 / measured - 1.0 if from_zero1 else None})
    return rows


def worst(rows: list[dict[str, Any]], key: str = "error") -> dict[str, dict[str, Any]]:
    """Per method, the row with the largest absolute ``key``."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row[key] is None:
            continue
        best = out.get(row["method"])
        if best is None or abs(row[key]) > abs(best[key]):
            out[row["method"]] = row
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the per-method worst errors (and every row with ``--all``); exit 1 past the tolerance."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="JSON written by benchmarks/run.py")
    p.add_argument("--tolerance", type=float, default=0.15, help="largest allowed |relative error| (0.15)")
    p.add_argument("--all", action="store_true", help="print every cell")
    a = p.parse_args(argv)
    rows = check(json.loads(a.result.read_text()))
    if a.all:
        for r in rows:
            print(f"{r['method']:>14} {r['preset']:>6} M/C {r['target_ratio']:<5g} rep {r['rep']} "
                  f"{'hetero ' if r['heterogeneous'] else ''}measured {r['measured_s']:.3f} s, "
                  f"predicted {r['predicted_s']:.3f} s ({r['error']:+.1%})")
    print(f"{len(rows)} cells of {a.result}; |error| of the prediction from each cell's own C and M, and from "
          "ZeRO-1's C and M alone:")
    print(f"{'method':>14} {'worst':>8} {'median':>8}   {'worst (ZeRO-1 C, M)':>20}  where")
    own, z1 = worst(rows), worst(rows, "error_from_zero1")
    for method in METHODS:
        if method not in own:
            continue
        errs = [abs(r["error"]) for r in rows if r["method"] == method]
        w = own[method]
        wz = z1.get(method)
        from_zero1 = f"{wz['error_from_zero1']:+.1%}" if wz else "-"
        print(f"{method:>14} {w['error']:>+8.1%} {statistics.median(errs):>8.1%}   "
              f"{from_zero1:>20}  {w['preset']} M/C {w['target_ratio']:g} "
              f"rep {w['rep']}" + (f" seed {w['seed']}" if w["seed"] is not None else ""))
    bad = [r for r in rows if abs(r["error"]) > a.tolerance]
    if bad:
        print(f"FAIL: {len(bad)} cells off by more than {a.tolerance:.0%}")
        return 1
    print(f"ok: every cell within {a.tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
