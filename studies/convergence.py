"""Convergence study through the package: held-out loss of ZeRO-1, ACCO and DPU, paired by seed.

Every run is ``examples/train_lm.py`` under the real ``deepspeed`` launcher on CPU, with the repository's
``ds_configs`` (same model, data order and initialization for every method of a seed). Besides the methods,
``zero1_twin`` is ZeRO-1 again with each initial weight multiplied by 1 + 1e-6 x N(0, 1) (``--perturb_init``): two
runs that should be equal, up to rounding. How far the twin ends from ZeRO-1 is the noise floor of a
paired comparison at that setting: a method's gap inside it is indistinguishable from rounding.

    python studies/convergence.py --preset small --worlds 1,2 --seeds 1234,7 --steps 100 \\
        --methods zero1,acco,zero1_twin --out studies/results/convergence_small.json
    python studies/convergence.py --preset tiny --worlds 2 --seeds 1,2,3 --steps 600 --eval_every 100 \\
        --methods zero1,acco,dpu --out studies/results/convergence_tiny.json

World-size-1 runs go two at a time (one core each) with ``--parallel 2``. Results are appended to
``--out`` as they finish (a run already there is not repeated), then a markdown table is written next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["main", "paired_table", "parse_args", "seed_noise_table"]

METHODS = {"zero1": ("zero1.json", {}), "acco": ("acco.json", {}), "dpu": ("dpu.json", {}),
           "acco_int8": ("acco.json", {"estimate_compression": "int8"}),
           "acco_extrapolated": ("acco.json", {"estimate": "extrapolated", "estimate_fraction": 0.5}),
           "acco_paper": ("acco.json", {"estimate": "paper", "estimate_fraction": 0.5}),
           "acco_split": ("acco.json", {"estimate": "extrapolated", "estimate_fraction": 0.75}),
           "acco_paper_split": ("acco.json", {"estimate": "paper", "estimate_fraction": 0.75}),
           "acco_sync10": ("acco.json", {"sync_steps": 10}),
           "acco_paper_sync10": ("acco.json", {"estimate": "paper", "estimate_fraction": 0.75, "sync_steps": 10}),
           "acco_auto": ("acco.json", {}),
           "acco_int8_commit": ("acco.json", {"estimate_compression": "int8", "commit_compression": "int8"}),
           "acco_int8_commit_sync10": ("acco.json", {"estimate_compression": "int8", "commit_compression": "int8",
                                                     "sync_steps": 10})}
"""Method -> (ds_configs file, overrides of its "acco" block). ``acco_extrapolated`` and ``acco_paper`` split every
step into equal halves (``estimate_fraction`` 0.5, as every run before 0.75 became the default); ``acco_split`` is
the default written out; ``acco_sync10`` is the default with ``sync_steps`` 10 (the first 10 steps ZeRO-1's), and
``acco_paper_sync10`` the same with the paper's estimate (whose edge of stability is ZeRO-1's at this split);
``acco_auto`` the automatic schedule (the block with ``enabled`` only), ``acco_int8_commit`` both rounds int8
(the compressed commit with error feedback, opt-in and lossy), ``acco_int8_commit_sync10`` the same with
``sync_steps`` 10. Any method also runs as ``<method>_twin``
(``zero1_twin``, ``acco_sync10_twin``): the same config from perturbed initial weights (``--perturb_init 1e-6``).

The study keeps the conditions its records were measured under, whatever ``ds_configs`` say today: the LR held
after its warm-up (``WarmupLR``) unless ``--decay``, ``sync_steps`` only where the method sets it, and every method
but ``acco_auto`` on a pinned schedule (``estimate_fraction`` 0.75 unless the method sets its own)."""

PINNED = {"estimate_fraction": 0.75}
SCHEDULE_KEYS = ("estimate_fraction", "estimate_compression")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--worlds", default="2", help="comma-separated world sizes (ranks on this machine)")
    p.add_argument("--seeds", default="1234,7")
    p.add_argument("--methods", default="zero1,acco,zero1_twin",
                   help=f"any of {', '.join(METHODS)}, each also as <method>_twin")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--lr", type=float, default=None, help="override the configs' lr (and warmup_max_lr)")
    p.add_argument("--warmup", type=int, default=None, help="override the configs' warmup_num_steps")
    p.add_argument("--ga", type=int, default=None, help="override gradient_accumulation_steps")
    p.add_argument("--clip", type=float, default=None, help="override gradient_clipping (0: off)")
    p.add_argument("--decay", action="store_const", const=True, default=None,
                   help="WarmupDecayLR instead of the configs' WarmupLR: the same warm-up, then a linear decay to 0 "
                        "at --steps")
    p.add_argument("--parallel", type=int, default=2, help="world-size-1 runs at a time")
    p.add_argument("--timeout_s", type=float, default=14400.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m.removesuffix("_twin") not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)} (each also as "
                "<method>_twin)")
    return args


STUDY_LR = 1e-3


def with_study_lr(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the LR the study's records were measured under (the main job's configs may move): AdamW at
    ``STUDY_LR`` after a 10-step linear warm-up from 0 (``WarmupLR``), held."""
    config["optimizer"]["params"]["lr"] = STUDY_LR
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": STUDY_LR,
                                                          "warmup_num_steps": 10, "warmup_type": "linear"}}
    return config


def _config(method: str, args: argparse.Namespace, directory: Path) -> Path:
    base = method.removesuffix("_twin")
    name, acco_extra = METHODS[base]
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    if "acco" in config:  # the block as the study's records had it: enabled, mode, and the method's keys
        config["acco"] = {k: v for k, v in config["acco"].items() if k in ("enabled", "mode")}
        config["acco"].update(acco_extra)
        pinned = not set(SCHEDULE_KEYS) & config["acco"].keys() and config["acco"].get("mode", "acco") == "acco"
        if base != "acco_auto" and pinned:
            config["acco"].update(PINNED)
    with_study_lr(config)
    if args.warmup is not None:
        config["scheduler"]["params"]["warmup_num_steps"] = args.warmup
    if args.ga is not None:
        config["gradient_accumulation_steps"] = args.ga
    if args.clip is not None:
        config["gradient_clipping"] = args.clip
    if args.decay:
        config["scheduler"] = {"type": "WarmupDecayLR",
                               "params": {**config["scheduler"]["params"], "total_num_steps": args.steps}}
    path = directory / f"{method}.json"
    path.write_text(json.dumps(config))
    return path


def run_one(method: str, world: int, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One training run; its held-out losses by step (from metrics.jsonl) and its summary."""
    out = work / f"{args.preset}_w{world}_s{seed}_{method}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(world), "--master_port",
           str(29700 + (hash((method, world, seed)) % 200)), str(ROOT / "examples" / "train_lm.py"),
           "--deepspeed_config", str(_config(method, args, work)), "--preset", args.preset,
           "--max_steps", str(args.steps), "--seed", str(seed), "--eval_every", str(args.eval_every),
           "--no_progress", "--output_dir", str(out)]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if method.endswith("_twin"):
        cmd += ["--perturb_init", "1e-6"]
    threads = max(1, (os.cpu_count() or 1) // (world * (args.parallel if world == 1 else 1)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    return {"preset": args.preset, "world": world, "seed": seed, "method": method, "steps": args.steps,
            **{k: getattr(args, k) for k in OVERRIDES}, "wall_s": time.time() - start,
            "initial_eval_loss": summary["initial_eval_loss"],
            "eval": {str(r["step"]): r["eval_loss"] for r in rows if "eval_loss" in r},
            "train_loss": [r["loss"] for r in rows], "grad_norm": [r.get("grad_norm") for r in rows],
            "estimate_grad_norm": [r.get("estimate_grad_norm") for r in rows],
            "command": " ".join(cmd)}


OVERRIDES = ("lr", "warmup", "ga", "clip", "decay")
"""Settings a run may override (``--lr``, ``--warmup``, ``--ga``, ``--clip``, ``--decay``): recorded per run, part of
the pairing."""


def _same_setting(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("preset", "world", "seed", "steps", *OVERRIDES))


def _overrides(run: dict[str, Any]) -> str:
    """The settings a run overrode (``--lr``, ``--warmup``, ``--ga``, ``--clip``, ``--decay``), for the table's
    method column."""
    given = [f"{k} {run[k]}" for k in OVERRIDES if run.get(k) is not None]
    return f" ({', '.join(given)})" if given else ""


def paired_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per setting and seed, each method's held-out loss by step and its gap to ZeRO-1 of the same seed."""
    lines = ["| preset | W | seed | method | " + " | ".join(["held-out loss by step (gap to ZeRO-1)"]) + " |",
             "|---|---:|---:|---|---|"]
    for base in (r for r in runs if r["method"] == "zero1"):
        for run in [base] + [r for r in runs if r["method"] != "zero1" and _same_setting(r, base)]:
            cells = []
            for step, loss in run["eval"].items():
                gap = "" if run is base else f" ({loss / base['eval'][step] - 1:+.2%})"
                cells.append(f"{step}: {loss:.4f}{gap}")
            lines.append(f"| {run['preset']} | {run['world']} | {run['seed']} | {run['method']}{_overrides(run)} | "
                         + ", ".join(cells) + " |")
    gaps: dict[str, list[float]] = {}
    for run in runs:
        base = next((b for b in runs if b["method"] == "zero1" and _same_setting(run, b)), None)
        if base is not None and run is not base:
            last = str(max(int(s) for s in run["eval"]))
            gaps.setdefault(run["method"], []).append(run["eval"][last] / base["eval"][last] - 1)
    lines += ["", "| method | final gap to ZeRO-1, per setting and seed | mean | std | max abs |",
              "|---|---|---:|---:|---:|"]
    for method, values in gaps.items():
        std = f"{statistics.stdev(values):.2%}" if len(values) > 1 else ""
        lines.append(f"| {method} | {', '.join(f'{v:+.2%}' for v in values)} | {statistics.mean(values):+.2%} | "
                     f"{std} | {max(abs(v) for v in values):.2%} |")
    return "\n".join(lines) + "\n" + seed_noise_table(runs)


def seed_noise_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per (preset, world size, steps), each method's final held-out loss as mean and standard
    deviation over seeds, and whether its mean lies within one ZeRO-1 standard deviation of ZeRO-1's mean."""
    groups: dict[tuple[Any, ...], dict[str, list[float]]] = {}
    for run in runs:
        last = str(max(int(s) for s in run["eval"]))
        key = (run["preset"], run["world"], run["steps"], *(run.get(k) for k in OVERRIDES))
        groups.setdefault(key, {}).setdefault(run["method"], []).append(run["eval"][last])
    lines = ["", "| preset | W | steps | method | seeds | final held-out, mean +- std over seeds "
             "| mean - ZeRO-1's mean | in ZeRO-1 std | within 1 std |", "|---|---:|---:|---|---:|---|---:|---:|---|"]
    for (preset, world, steps, *_), methods in groups.items():
        zero1 = methods.get("zero1", [])
        if len(zero1) < 2:
            continue
        z_mean, z_std = statistics.mean(zero1), statistics.stdev(zero1)
        for method, values in methods.items():
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            diff = mean - z_mean
            lines.append(f"| {preset} | {world} | {steps} | {method} | {len(values)} | {mean:.4f} +- {std:.4f} | "
                         f"{diff:+.4f} | {diff / z_std:+.2f} | {'yes' if abs(diff) <= z_std else 'no'} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    """Run every (world size, seed, method) not yet in ``--out``; write the JSON and the table."""
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = json.loads(out.read_text())["runs"] if out.exists() else []
    work = Path(tempfile.mkdtemp(prefix="acco_convergence_"))
    todo = [(m, w, s) for w in (int(x) for x in args.worlds.split(",")) for s in (int(x) for x in args.seeds.split(","))
            for m in args.methods.split(",")]
    key = {"preset": args.preset, "steps": args.steps, **{k: getattr(args, k) for k in OVERRIDES}}
    todo = [t for t in todo if not any(_same_setting({**key, "world": t[1], "seed": t[2]}, r) and r["method"] == t[0]
                                       for r in done)]

    def record(result: dict[str, Any]) -> None:
        done.append(result)
        out.write_text(json.dumps({"runs": done}, indent=1) + "\n")
        last = max(result["eval"], key=int)
        print(f"{result['preset']} W={result['world']} seed {result['seed']} {result['method']}: held-out "
              f"{result['eval'][last]:.4f} at step {last} ({result['wall_s']:.0f} s)", flush=True)

    singles = [t for t in todo if t[1] == 1]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for result in pool.map(lambda t: run_one(*t, args, work), singles):
            record(result)
    for method, world, seed in (t for t in todo if t[1] != 1):
        record(run_one(method, world, seed, args, work))
    out.with_suffix(".md").write_text(paired_table(done))
    print(f"results: {out}, table: {out.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
