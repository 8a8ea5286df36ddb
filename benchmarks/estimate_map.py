"""The map of ACCO's gap to ZeRO-1: model size, world size, accumulation, learning rate and warm-up.

Each cell runs three single-process simulations of ``benchmarks/estimate_study.py`` with the same seed:
ZeRO-1, its rounding-level twin (initial weights x (1 + 1e-6): the noise floor of a paired comparison)
and ACCO (``--estimate``, default the paper's). Per cell the table gives the held-out loss gaps of the
twin and of ACCO to ZeRO-1 at the end, ACCO's mean distance from theta~_{t+1} to theta_{t+1} relative to
the step (from step 5 on, after the LR warm-up starts) and the largest gradient norm of each run (loss
spikes show as norms far above the clipping threshold).

    python benchmarks/estimate_map.py --out benchmarks/results/estimate_map.json \\
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

__all__ = ["main", "run_cell_method", "table"]

VARIANTS = {"zero1": ["--method", "zero1"], "twin": ["--method", "zero1", "--perturb_init", "1e-6"],
            "acco": ["--method", "acco"]}


def run_cell_method(cell: str, variant: str, seed: int, steps: int, estimate: str) -> dict[str, Any]:
    """One simulation; returns its per-step records."""
    from benchmarks.estimate_study import parse_args, run_study

    preset, world, ga, lr, warmup = cell.split(",")
    argv = ["--preset", preset, "--world", world, "--ga", ga, "--lr", lr, "--warmup", warmup, "--seed", str(seed),
            "--steps", str(steps), "--eval_every", str(max(1, steps // 4)), "--out", "/dev/null", *VARIANTS[variant]]
    if variant == "acco":
        argv += ["--estimate", estimate]
    records = list(run_study(parse_args(argv)))
    return {"cell": cell, "variant": variant, "seed": seed, "steps": steps, "estimate": estimate, "records": records}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["variant"]: r["records"] for r in runs}
    last = {v: [x for x in recs if "eval_loss" in x][-1]["eval_loss"] for v, recs in by.items()}
    dist = [x["est_dist_rel"] for x in by.get("acco", []) if x["step"] >= 5 and "est_dist_rel" in x]
    return {"zero1": last.get("zero1"), "twin_gap": last["twin"] / last["zero1"] - 1 if "twin" in last else None,
            "acco_gap": last["acco"] / last["zero1"] - 1 if "acco" in last else None,
            "est_dist_rel_mean": statistics.mean(dist) if dist else None,
            "max_grad_norm": {v: max(x["gnorm"] for x in recs) for v, recs in by.items()}}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (cell, seed)."""
    lines = ["| cell (preset, W, GA, lr, warm-up) | seed | steps | ZeRO-1 held-out | twin gap (noise floor) | ACCO gap "
             "| ACCO \\|theta~ - theta\\| / step | max grad norm (ZeRO-1 / twin / ACCO) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["cell"], r["seed"], r["steps"]), []).append(r)
    for (cell, seed, steps), runs in groups.items():
        s = _summary(runs)
        norms = s["max_grad_norm"]
        lines.append(f"| {cell} | {seed} | {steps} | {s['zero1']:.4f} | {s['twin_gap']:+.2%} | {s['acco_gap']:+.2%} | "
                     f"{s['est_dist_rel_mean']:.2f} | {norms.get('zero1', 0):.1f} / {norms.get('twin', 0):.1f} / "
                     f"{norms.get('acco', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every (cell, seed, variant) not yet in ``--out``, ``--parallel`` at a time; write JSON and table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", required=True, help="';'-separated preset,world,ga,lr,warmup")
    p.add_argument("--seeds", default="1234")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--estimate", default="paper")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    done: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    have = {(r["cell"], r["variant"], r["seed"], r["steps"], r["estimate"]) for r in done}
    todo = [(cell, variant, int(seed), args.steps, args.estimate) for cell in args.cells.split(";")
            for seed in args.seeds.split(",") for variant in VARIANTS
            if (cell, variant, int(seed), args.steps, args.estimate) not in have]
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        for result in pool.map(run_cell_method, *zip(*todo)) if todo else []:
            done.append(result)
            out.write_text(json.dumps(done) + "\n")
            print(f"{result['cell']} seed {result['seed']} {result['variant']}: held-out "
                  f"{[x for x in result['records'] if 'eval_loss' in x][-1]['eval_loss']:.4f}", flush=True)
    out.with_suffix(".md").write_text(table(done))
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
