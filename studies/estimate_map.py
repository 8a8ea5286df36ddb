"""The map of ACCO's gap to ZeRO-1: model size, world size, accumulation, learning rate and warm-up.

Each cell runs single-process simulations of ``studies/estimate_study.py`` with the same seed
(``--variants``): ZeRO-1, its rounding-level twin (each initial weight x (1 + 1e-6 x a standard normal draw):
the noise floor of a paired comparison), ACCO (``--estimate``: ``paper``, ``momentum``, ``momentum_half``,
each optionally ``+carryK`` for theta~_{t+1} + K (theta~_t - theta_t) or ``+shiftS,K1,K2`` for
``estimate_study.py``'s ``--shift``) and DPU. Per cell the table gives each run's held-out
loss and gap to ZeRO-1 at the end, ACCO's mean distance from theta~_{t+1} to theta_{t+1} relative to the
step (from step 5 on, after the LR warm-up starts) and the largest gradient norm of each run (loss spikes
show as norms far above the clipping threshold).

    python studies/estimate_map.py --out studies/results/estimate_map.json \\
        --cells "tiny,2,4,1e-3,10;tiny,1,4,1e-3,10;tiny,4,4,1e-3,10;tiny,2,8,1e-3,10;tiny,2,16,1e-3,10"

A cell is ``preset,world,ga,lr,warmup``; ``--steps``, ``--seeds``, ``--parallel`` apply to all.
Results are appended to ``--out`` as cells finish (a cell already there is not rerun).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

__all__ = ["main", "run_cell_method", "seed_summary", "table"]

VARIANTS = {"zero1": ["--method", "zero1"], "twin": ["--method", "zero1", "--perturb_init", "1e-6"],
            "acco": ["--method", "acco"], "dpu": ["--method", "dpu"]}


def run_cell_method(cell: str, variant: str, seed: int, steps: int, estimate: str) -> dict[str, Any]:
    """One simulation; returns its per-step records."""
    from studies.estimate_study import parse_args, run_study

    preset, world, ga, lr, warmup = cell.split(",")
    argv = ["--preset", preset, "--world", world, "--ga", ga, "--lr", lr, "--warmup", warmup, "--seed", str(seed),
            "--steps", str(steps), "--eval_every", str(max(1, steps // 4)), "--out", "/dev/null", *VARIANTS[variant]]
    if variant == "acco":
        rule, _, shift = estimate.partition("+")
        if shift.startswith("carry"):  # +carryK: the shift 1,K,0
            shift = f"1,{shift.removeprefix('carry')},0"
        argv += ["--estimate", rule] + (["--shift", shift.removeprefix("shift")] if shift else [])
    records = list(run_study(parse_args(argv)))
    return {"cell": cell, "variant": variant, "seed": seed, "steps": steps, "estimate": estimate, "records": records}


def _held_out(run: dict[str, Any]) -> float:
    return [x for x in run["records"] if "eval_loss" in x][-1]["eval_loss"]


def _label(run: dict[str, Any]) -> str:
    return f"ACCO, {run['estimate']} estimate" if run["variant"] == "acco" else run["variant"]


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per (cell, seed, steps), ZeRO-1's held-out loss, then one row per other run with its gap."""
    lines = ["| cell (preset, W, GA, lr, warm-up) | seed | steps | run | held-out | gap to ZeRO-1 "
             "| \\|theta~ - theta\\| / step | max grad norm |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["cell"], r["seed"], r["steps"]), []).append(r)
    for (cell, seed, steps), runs in groups.items():
        zero1 = next((r for r in runs if r["variant"] == "zero1"), None)
        if zero1 is None:
            continue
        base = _held_out(zero1)
        for r in [zero1] + [r for r in runs if r is not zero1]:
            dist = [x["est_dist_rel"] for x in r["records"] if x["step"] >= 5 and "est_dist_rel" in x]
            gap = "" if r is zero1 else f"{_held_out(r) / base - 1:+.2%}"
            lines.append(f"| {cell} | {seed} | {steps} | {_label(r)} | {_held_out(r):.4f} | {gap} | "
                         f"{f'{statistics.mean(dist):.2f}' if dist else ''} | "
                         f"{max(x['gnorm'] for x in r['records']):.1f} |")
    return "\n".join(lines) + "\n"


def seed_summary(results: list[dict[str, Any]]) -> str:
    """Markdown: per cell and run, the gap to ZeRO-1 of every seed (paired), their mean and standard deviation."""
    base = {(r["cell"], r["seed"], r["steps"]): _held_out(r) for r in results if r["variant"] == "zero1"}
    rows: dict[tuple[str, int, str], list[tuple[int, float, float]]] = {}
    for r in results:
        if r["variant"] != "zero1" and (r["cell"], r["seed"], r["steps"]) in base:
            gap = _held_out(r) / base[(r["cell"], r["seed"], r["steps"])] - 1
            rows.setdefault((r["cell"], r["steps"], _label(r)), []).append(
                (r["seed"], gap, max(x["gnorm"] for x in r["records"])))
    lines = ["| cell (preset, W, GA, lr, warm-up) | steps | run | gap to ZeRO-1 by seed (max grad norm) | mean | std |",
             "|---|---:|---|---|---:|---:|"]
    for (cell, steps, label), gaps in sorted(rows.items()):
        gaps.sort()
        values = [g for _, g, _ in gaps]
        spread = f"{statistics.stdev(values):.2%}" if len(values) > 1 else ""
        lines.append(f"| {cell} | {steps} | {label} | " + ", ".join(f"{s}: {g:+.2%} ({n:.1f})" for s, g, n in gaps)
                     + f" | {statistics.mean(values):+.2%} | {spread} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every (cell, seed, variant) not yet in ``--out``, ``--parallel`` at a time; write JSON and table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", required=True, help="';'-separated preset,world,ga,lr,warmup")
    p.add_argument("--seeds", default="1234")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--estimate", default="paper")
    p.add_argument("--variants", default="zero1,twin,acco", help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    done: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    def key(cell: str, variant: str, seed: int, steps: int, estimate: str) -> tuple[Any, ...]:
        return cell, variant, seed, steps, estimate if variant == "acco" else None  # baselines have no estimate

    have = {key(r["cell"], r["variant"], r["seed"], r["steps"], r["estimate"]) for r in done}
    todo = [(cell, variant, int(seed), args.steps, args.estimate) for cell in args.cells.split(";")
            for seed in args.seeds.split(",") for variant in args.variants.split(",")
            if key(cell, variant, int(seed), args.steps, args.estimate) not in have]
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        for result in pool.map(run_cell_method, *zip(*todo)) if todo else []:
            done.append(result)
            out.write_text(json.dumps(done) + "\n")
            print(f"{result['cell']} seed {result['seed']} {result['variant']}: held-out "
                  f"{[x for x in result['records'] if 'eval_loss' in x][-1]['eval_loss']:.4f}", flush=True)
    report = table(done) + "\n" + seed_summary(done)
    out.with_suffix(".md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
