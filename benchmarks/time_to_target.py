"""Time to a target loss: how soon each method reaches ZeRO-1's held-out loss, on two fake hosts.

    python benchmarks/run.py --time_to_target --quick --out benchmarks/results/time_to_target.json
    python benchmarks/run.py --time_to_target --smoke --out /tmp/ttt.json     # a few minutes, same schema

For every seed and every ZeRO-1 M/C (the link shaped as in the step-time sweep, from the same
calibration), one launch of ``benchmarks/worker.py`` trains ZeRO-1 first for ``--steps`` optimizer
steps (a budget that ends well past the LR warm-up); its held-out loss at the end is the target of that
seed. The other methods, in shuffled order, then train from the same initialization and data until an
evaluation reaches the target or their wall-clock passes ``--cap_factor`` x ZeRO-1's (then: "did not
reach"). Every method evaluates its committed weights on the same held-out set at step 0 and every
``--eval_every_steps`` x ZeRO-1's tokens per step; evaluation time is excluded from the wall-clock. ACCO
waits for its round in flight before an evaluation, and that wait *is* counted (``eval_drain_s``), so
evaluations cost ACCO up to one round each that a run without them would partly hide.

Time and tokens to target are interpolated linearly between the last evaluation above the target and
the first at or below it. Each run row adds ``seed``, ``reached``, ``lr_scaling``, ``time_to_target_s``,
``tokens_to_target``, ``target_loss`` (and the evaluations); ``summary`` gives per M/C and method the
median over seeds with min and max, unreached seeds counting as infinitely slow.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["crossing", "summarize", "add_derived", "markdown", "write_report", "run_sweep"]

CASE_LABEL = {"zero1": "ZeRO-1", "acco": "ACCO 0.75", "acco_int8": "ACCO 0.75+int8", "dpu": "DPU",
              "acco_adaptive": "ACCO adaptive (lr none)", "acco_adaptive_sqrt": "ACCO adaptive (lr sqrt)",
              "acco_auto": "ACCO automatic", "acco_half": "ACCO 0.5", "acco_half_int8": "ACCO 0.5+int8",
              "acco_int8_commit": "ACCO int8 both (lossy)"}
CASE_COLOR = {"zero1": "tab:gray", "acco": "tab:blue", "acco_int8": "tab:purple", "dpu": "tab:orange",
              "acco_adaptive": "tab:green", "acco_adaptive_sqrt": "tab:olive", "acco_auto": "tab:red",
              "acco_half": "tab:cyan", "acco_half_int8": "tab:pink", "acco_int8_commit": "tab:brown"}
ACCO_VARIANTS = ("acco", "acco_int8", "acco_adaptive", "acco_adaptive_sqrt", "acco_auto", "acco_half",
                 "acco_half_int8", "acco_int8_commit")


def crossing(evals: list[dict[str, Any]], target: float) -> tuple[float, float] | None:
    """(wall_s, tokens) where the held-out loss first reaches ``target``, linearly interpolated between
    the last evaluation above it and the first at or below it; None if no evaluation reaches it."""
    previous = None
    for point in evals:
        if point["loss"] <= target:
            if previous is None:
                return point["wall_s"], point["tokens"]
            f = (previous["loss"] - target) / (previous["loss"] - point["loss"])
            return (previous["wall_s"] + f * (point["wall_s"] - previous["wall_s"]),
                    previous["tokens"] + f * (point["tokens"] - previous["tokens"]))
        previous = point
    return None


def summarize(case: dict[str, Any], skip: int) -> dict[str, Any]:
    """One method's run: the step-time sweep's figures plus the time-to-target fields."""
    from benchmarks.run import summarize_case

    row = summarize_case(case, skip)
    r0 = case["ranks"][0]
    evals = r0["evals"]
    target = r0["target_loss"] if r0["target_loss"] is not None else evals[-1]["loss"]  # zero1 sets it
    hit = crossing(evals, target)
    drained = sum(e["drain_s"] for e in evals if hit and e["wall_s"] <= hit[0])
    row.update(time_to_target_s_drain_excluded=hit[0] - drained if hit else None,
               seed=r0["seed"], lr_scaling=r0["lr_scaling"], target_loss=target, reached=hit is not None,
               time_to_target_s=hit[0] if hit else None, tokens_to_target=hit[1] if hit else None,
               cap_s=r0["cap_s"], evals=evals, eval_drain_s=sum(e["drain_s"] for e in evals),
               train_wall_s=evals[-1]["wall_s"], final_eval_tokens=evals[-1]["tokens"])
    return row


def _spread(values: list[float]) -> dict[str, float | None]:
    """Median, min and max; ``inf`` (did not reach) sorts last; a non-finite median is None."""
    if not values:
        return {"median": None, "min": None, "max": None}
    finite = [v for v in values if math.isfinite(v)]
    med = statistics.median(values)
    return {"median": med if math.isfinite(med) else None, "min": min(finite) if finite else None,
            "max": max(values) if math.isfinite(max(values)) else None}


def add_derived(result: dict[str, Any]) -> None:
    """Add ratios to the same seed's ZeRO-1, ``summary`` (per M/C and method) and ``targets``."""
    runs = result["runs"]
    zero1 = {(r["target_ratio"], r["seed"]): r for r in runs if r["case"] == "zero1"}
    for r in runs:
        z = zero1.get((r["target_ratio"], r["seed"]))
        r["zero1_M_over_C"] = z["comm_s"] / z["compute_s"] if z else None
        r["zero1_time_to_target_s"] = z["time_to_target_s"] if z else None
        both = z and r["reached"] and z["reached"]
        r["time_to_target_vs_zero1"] = r["time_to_target_s"] / z["time_to_target_s"] if both else None
        r["time_to_target_vs_zero1_drain_excluded"] = (r["time_to_target_s_drain_excluded"] / z["time_to_target_s"]
                                                       if both else None)
    groups: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["target_ratio"], r["case"])].append(r)
    summary = []
    order = list(CASE_LABEL)
    for (ratio, case), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        inf = float("inf")
        time_s = _spread([r["time_to_target_s"] if r["reached"] else inf for r in rows])
        vs = _spread([r["time_to_target_vs_zero1"] if r["time_to_target_vs_zero1"] is not None else inf
                      for r in rows])
        vs_free = _spread([r["time_to_target_vs_zero1_drain_excluded"]
                           if r["time_to_target_vs_zero1_drain_excluded"] is not None else inf for r in rows])
        tokens = _spread([r["tokens_to_target"] if r["reached"] else inf for r in rows])
        summary.append({
            "target_ratio": ratio, "case": case, "seeds": sorted(r["seed"] for r in rows),
            "reached": sum(r["reached"] for r in rows), "n": len(rows),
            "zero1_M_over_C": _spread([r["zero1_M_over_C"] for r in rows if r["zero1_M_over_C"]])["median"],
            "time_to_target_s": time_s["median"], "time_to_target_s_min": time_s["min"],
            "time_to_target_s_max": time_s["max"],
            "vs_zero1": vs["median"], "vs_zero1_min": vs["min"], "vs_zero1_max": vs["max"],
            "vs_zero1_drain_excluded": vs_free["median"],
            "tokens_to_target": tokens["median"], "tokens_to_target_min": tokens["min"],
            "tokens_to_target_max": tokens["max"],
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "eval_drain_s": statistics.median(r["eval_drain_s"] for r in rows),
            "target_loss": statistics.median(r["target_loss"] for r in rows),
        })
    result["summary"] = summary
    targets = []

    def pick(ratio: float, case: str) -> dict[str, Any] | None:
        return next((s for s in summary if s["target_ratio"] == ratio and s["case"] == case), None)

    acco = pick(0.5, "acco")
    if acco:
        targets.append({"target": "ACCO wall-clock to target <= 0.75x ZeRO-1's at M/C 0.5", "bound": 0.75,
                        "value": acco["vs_zero1"], "met": acco["vs_zero1"] is not None and acco["vs_zero1"] <= 0.75})
    variants = [s for s in (pick(2.0, c) for c in ACCO_VARIANTS) if s]
    if variants:
        best = min(variants, key=lambda s: s["vs_zero1"] if s["vs_zero1"] is not None else float("inf"))
        targets.append({"target": "best ACCO variant <= 0.6x ZeRO-1's at M/C 2", "bound": 0.6,
                        "value": best["vs_zero1"], "case": best["case"],
                        "met": best["vs_zero1"] is not None and best["vs_zero1"] <= 0.6})
    lossy = [(ratio, bound, pick(ratio, "acco_int8_commit")) for ratio, bound in ((2.0, 0.6), (4.0, 0.5))]
    for ratio, bound, row in lossy:
        if row:
            targets.append({"target": f"ACCO int8 both <= {bound}x ZeRO-1's at M/C {ratio:g}", "bound": bound,
                            "value": row["vs_zero1"], "met": row["vs_zero1"] is not None and row["vs_zero1"] <= bound})
    result["targets"] = targets


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The time-to-target table, settings and targets as markdown."""
    settings, machine = result["settings"], result["machine"]
    (preset, cal), = result["calibration"].items()
    lines = [f"# Time to target ({preset})", "",
             f"`{result['command']}` on {machine['cpu']} ({machine['cores']} cores), commit "
             f"{machine.get('git_commit', '')[:7]}, {result['wall_s'] / 60:.0f} min.", "",
             f"Target: ZeRO-1's held-out loss after {settings['steps']} steps (LR warm-up: the config's first "
             f"steps), per seed (seeds {settings['seeds']}); cap {settings['cap_factor']:g} x ZeRO-1's wall-clock. "
             f"Evaluations every {settings['eval_every_steps']:g} ZeRO-1 steps' tokens, their time excluded; "
             "ACCO's wait for its round in flight before each evaluation counted (column 'drain').", "",
             f"Calibration: C = {cal['C_s']:.3f} s/step, M(unshaped) = {cal['M_unshaped_s']:.3f} s, "
             f"{cal['n_params']:,} parameters, micro-batch {cal['micro_batch']}, GA {cal['ga']}.", "",
             "| ZeRO-1 M/C | method | reached | time to target (s): median (min-max) | x ZeRO-1: median (min-max) "
             "| x ZeRO-1, drain excluded | tokens to target: median | step time (s) | drain (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def cell(s: dict[str, Any], key: str, spec: str) -> str:
        if s["reached"] == 0:
            return "did not reach"
        return (f"{_fmt(s[key], spec, 'did not reach')} ({_fmt(s[key + '_min'], spec)}-"
                f"{_fmt(s[key + '_max'], spec, 'not reached')})")

    for s in result["summary"]:
        t, v = cell(s, "time_to_target_s", ".1f"), cell(s, "vs_zero1", ".2f")
        lines.append(f"| {_fmt(s['zero1_M_over_C'], '.2f')} ({s['target_ratio']:g}) | {CASE_LABEL[s['case']]} | "
                     f"{s['reached']}/{s['n']} | {t} | {v} | {_fmt(s['vs_zero1_drain_excluded'], '.2f', '-')} | "
                     f"{_fmt(s['tokens_to_target'], ',.0f', 'did not reach')} | "
                     f"{s['step_time_s']:.3f} | {s['eval_drain_s']:.1f} |")
    lines += ["", "Targets (medians over seeds):", ""]
    for t in result["targets"]:
        who = f" ({CASE_LABEL[t['case']]})" if "case" in t else ""
        lines.append(f"- {t['target']}: {_fmt(t['value'], '.2f', 'did not reach')}{who}: "
                     f"{'met' if t['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["target_ratio"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.5), constrained_layout=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        runs = [r for r in result["runs"] if r["target_ratio"] == ratio]
        labelled = set()
        for r in sorted(runs, key=lambda r: (r["case"] != "zero1", r["seed"])):
            zero1 = r["case"] == "zero1"
            ax.plot([e["wall_s"] for e in r["evals"]], [e["loss"] for e in r["evals"]], "o-", ms=2.5,
                    color=CASE_COLOR[r["case"]], lw=3 if zero1 else 1.2, alpha=0.5 if zero1 else 0.9,
                    label=None if r["case"] in labelled else CASE_LABEL[r["case"]])
            labelled.add(r["case"])
        for target in sorted({r["target_loss"] for r in runs}):
            ax.axhline(target, color="black", ls="--", lw=0.8, alpha=0.6)
        mc = next((s["zero1_M_over_C"] for s in result["summary"] if s["target_ratio"] == ratio), None)
        ax.set_title(f"ZeRO-1 M/C {_fmt(mc, '.2f')} (set for {ratio:g}); dashed: each seed's target")
        ax.set_xlabel("training wall-clock (s), evaluations excluded")
        ax.set_ylabel("held-out loss (committed weights)")
        losses = [e["loss"] for r in runs for e in r["evals"][1:]]
        if losses:
            ax.set_ylim(min(losses) - 0.05, min(max(losses), min(losses) + 1.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], json_path: Path) -> list[Path]:
    """``<stem>.md`` and ``<stem>_loss_time.png`` next to ``json_path``."""
    stem = json_path.with_suffix("")
    md = stem.with_suffix(".md")
    md.write_text(markdown(result))
    return [md, _plot(result, stem.with_name(stem.name + "_loss_time.png"))]


def run_sweep(args: argparse.Namespace, argv: list[str] | None, log_dir: Path) -> int:
    """Calibrate, then one launch per (seed, M/C): ZeRO-1 sets the target, the others chase it."""
    from benchmarks import run as sweep
    from tests.netns import FakeHosts

    rng = random.Random(args.seed)
    pargs = sweep.preset_args(args, args.preset_list[0])
    ratios = [r for r in args.ratio_list if r > 0]
    progress = sweep.Progress(3 + len(args.seed_list) * len(ratios))
    started, load_start = time.time(), os.getloadavg()
    hosts = FakeHosts(2, prefix="accottt", subnet="10.233.0")
    runs: list[dict[str, Any]] = []
    print(f"logs: {log_dir}", flush=True)
    with sweep.signals_raise():
        try:
            hosts.up()
            launcher = sweep.Launcher(hosts, pargs, log_dir)
            calibration = sweep.calibrate(launcher, hosts, pargs, progress)
            bandwidths = {float(r): b for r, b in calibration["bandwidth_mbit_for_ratio"].items()}
            tokens_per_step = pargs.ga * 2 * pargs.micro_batch * calibration["seq_len"]
            every = max(1, round(args.eval_every_steps * tokens_per_step))
            for seed in args.seed_list:
                order = list(ratios)
                rng.shuffle(order)
                for ratio in order:
                    mbit = bandwidths[ratio]
                    hosts.shape(round(mbit, 3))
                    others = [m for m in args.method_list if m != "zero1"]
                    rng.shuffle(others)
                    methods = ["zero1", *others]
                    zero1_s = pargs.steps * (calibration["C_s"] * (1 + ratio) + calibration["M_unshaped_s"])
                    timeout = args.launch_timeout_s or \
                        180 + 60 * len(methods) + 1.5 * zero1_s * (1 + args.cap_factor * len(others))
                    progress.log(f"seed {seed}, {mbit:.1f} Mbit/s (M/C {ratio:g}): {', '.join(methods)}")
                    raw = launcher.run(f"ttt_s{seed}_{ratio:g}", methods, pargs.steps, timeout_s=timeout,
                                       extra=["--seed", str(seed), "--eval_every_tokens", str(every),
                                              "--cap_factor", str(args.cap_factor)])
                    progress.done += 1
                    for order_index, case in enumerate(raw["cases"]):
                        run = summarize(case, pargs.skip)
                        run.update(preset=pargs.preset, rep=0, bandwidth_mbit=round(mbit, 3), target_ratio=ratio,
                                   heterogeneous=False, order_in_job=order_index)
                        runs.append(run)
                        progress.log(f"  {run['case']:>18}: target {run['target_loss']:.4f} "
                                     + (f"reached in {run['time_to_target_s']:.1f} s, "
                                        f"{run['tokens_to_target']:,.0f} tokens" if run["reached"] else
                                        f"not reached ({run['evals'][-1]['loss']:.4f} after "
                                        f"{run['train_wall_s']:.1f} s)")
                                     + f", step {run['step_time_s']:.3f} s, drain {run['eval_drain_s']:.1f} s")
        finally:
            hosts.down()
    return sweep.save_result({"mode": "time_to_target", "calibration": {pargs.preset: calibration},
                              "eval_every_tokens": every, "runs": runs}, args, argv, started, load_start,
                             add_derived, write_report)
