"""Markdown table, target checks and PNG plots from the JSON that ``benchmarks/run.py`` writes.

    python benchmarks/report.py benchmarks/results/quick.json

writes ``quick.md``, ``quick_step_time.png``, ``quick_speedup.png``, ``quick_loss_time.png`` and
``quick_loss_tokens.png``
next to the JSON (``run.py`` calls it at the end of a run). ``add_derived`` adds to every run the
figures that need its ZeRO-1 twin (same model, repetition, bandwidth and host setup): speed-up,
ZeRO-1's M/C and the method's step-time bound (below); and the ``summary`` (medians over repetitions,
with their min and max) and ``targets`` blocks.

Step-time bounds, from ZeRO-1's compute C and round M of the same setting, with the run's split f of a step
(``acco.estimate_fraction``): ZeRO-1 ``C + M``; DPU ``max(C, M)``; ACCO ``max(f C, M) + max((1 - f) C, M)``
(the commit round behind the estimate half, the estimate round behind the commit half); ACCO with the int8
estimate ``max(f C, M) + max((1 - f) C, M_est)``, ``M_est`` the estimate round's own measured time.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from deepspeed_acco.plan import Timing, step_time_s

__all__ = ["add_derived", "write_report", "markdown", "main"]

CASE_ORDER = ("zero1", "acco", "acco_int8", "acco_half", "acco_half_int8", "acco_auto", "acco_int8_commit", "dpu",
              "acco_adaptive")
CASE_LABEL = {"zero1": "ZeRO-1", "acco": "ACCO 0.75", "acco_int8": "ACCO 0.75+int8", "acco_half": "ACCO 0.5",
              "acco_half_int8": "ACCO 0.5+int8", "acco_auto": "ACCO automatic",
              "acco_int8_commit": "ACCO int8 both (lossy)", "dpu": "DPU",
              "acco_adaptive": "ACCO adaptive"}
CASE_COLOR = {"zero1": "tab:gray", "acco": "tab:blue", "acco_int8": "tab:purple", "acco_half": "tab:cyan",
              "acco_half_int8": "tab:pink", "acco_auto": "tab:red", "acco_int8_commit": "tab:brown",
              "dpu": "tab:orange", "acco_adaptive": "tab:green"}
PLANNER_METHOD = {"acco_half": "acco", "acco_half_int8": "acco_int8", "acco_adaptive": "acco"}
"""The planner's method of each case whose schedule is one of the planner's (``acco_auto``: of its choice)."""


def _key(run: dict[str, Any]) -> tuple[str, bool, float]:
    return run.get("preset", "tiny"), run["heterogeneous"], run["target_ratio"]


def recorded_estimate_fraction(run: dict[str, Any]) -> float:
    """A run's ``acco.estimate_fraction`` (runs recorded before it existed split every step in equal halves)."""
    return run.get("estimate_fraction") or 0.5


def step_bound(case: str, c: float, m: float, m_estimate: float | None, ga: int = 8,
               estimate_fraction: float = 0.5) -> float:
    """The step-time bound of a method from ZeRO-1's C and M (and the int8 estimate round's own time).

    The formulas are the planner's (``deepspeed_acco.plan.step_time_s``), with the run's split of a step
    (``acco.estimate_fraction``; 0.5 for runs recorded before it existed); adaptive accumulation is bounded
    like ACCO (its extra micro-batches fill the wait, they do not lengthen the step).
    """
    method = PLANNER_METHOD.get(case, case)
    timing = Timing(c, m, m_estimate if m_estimate is not None else m, ga, estimate_fraction=estimate_fraction)
    return step_time_s(method, timing)[0]


def _med(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _loss_at(curve: list[dict[str, Any]], wall_s: float, points: int = 3) -> float | None:
    """Train loss around ``wall_s`` (mean of the last ``points`` steps committed by then); None if none."""
    before = [p["loss"] for p in curve if p["wall_s"] <= wall_s * 1.0001]
    return statistics.mean(before[-points:]) if before else None


def add_derived(result: dict[str, Any]) -> None:
    """Per-run comparisons with the ZeRO-1 twin, the per-setting medians (``summary``) and ``targets``."""
    runs = result["runs"]
    twins = {(r["rep"], *_key(r)): r for r in runs if r["case"] == "zero1"}
    acco_twins = {(r["rep"], *_key(r)): r for r in runs if r["case"] == "acco"}
    for run in runs:
        z = twins.get((run["rep"], *_key(run)))
        if z is None:
            continue
        c, m = z["compute_s"], z["comm_s"]
        run["zero1_M_over_C"] = m / c if c else None
        run["M_over_C"] = run["round_s"] / run["compute_s"] if run["compute_s"] else None
        case = run["case"]
        if case == "acco_auto":  # bounded as the schedule it chose
            chosen = run.get("auto_schedule") or "0.75"
            case = "zero1" if chosen == "sync" else "acco_int8" if chosen.endswith("+int8") else "acco"
        run["limit_s"] = step_bound(case, c, m, run.get("estimate_round_s"), run.get("ga", 8),
                                    recorded_estimate_fraction(run))
        run["step_time_over_limit"] = run["step_time_s"] / run["limit_s"] if run["limit_s"] else None
        run["speedup_vs_zero1"] = z["step_time_s"] / run["step_time_s"]
        run["samples_per_s_vs_zero1"] = run["samples_per_s"] / z["samples_per_s"]
        run["loss_vs_zero1"] = run["loss_at_equal_tokens"] / z["loss_at_equal_tokens"] - 1.0
        a = acco_twins.get((run["rep"], *_key(run)))
        if a is not None and run["case"] == "acco_int8":
            run["loss_vs_acco"] = run["loss_at_equal_tokens"] / a["loss_at_equal_tokens"] - 1.0
            run["bytes_vs_zero1"] = run["bytes_per_step"] / z["bytes_per_step"]
        elif run["case"] == "acco":
            run["bytes_vs_zero1"] = run["bytes_per_step"] / z["bytes_per_step"]
        end = z["loss_curve"][-1]["wall_s"]
        run["train_loss_at_zero1_end_time"] = _loss_at(run["loss_curve"], end)
        run["zero1_train_loss_at_end"] = _loss_at(z["loss_curve"], end)
        probes = run.get("standalone_probe")
        if probes:
            rates = [p["samples_per_s"] for p in probes]
            run["standalone_samples_per_s"] = rates
            run["share_of_sum_of_rates"] = run["samples_per_s"] / sum(rates)
        if run.get("in_situ_samples_per_s") and z.get("in_situ_samples_per_s"):
            # Cross-check: each rank's rate between boundaries inside the ZeRO-1 twin (no waiting there).
            run["share_of_sum_of_in_situ_rates"] = run["samples_per_s"] / sum(z["in_situ_samples_per_s"])

    groups: dict[tuple[str, bool, float, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(*_key(run), run["case"])].append(run)
    fields = ("bandwidth_mbit", "step_time_s", "compute_s", "comm_s", "round_s", "exposed_comm_s", "tokens_per_s",
              "samples_per_s", "final_loss", "loss_at_equal_tokens", "tokens", "bytes_per_step",
              "bytes_per_step_metrics", "peak_rss_mb", "zero1_M_over_C", "M_over_C", "limit_s",
              "step_time_over_limit", "speedup_vs_zero1", "samples_per_s_vs_zero1", "loss_vs_zero1",
              "share_of_sum_of_rates", "micro_batches_per_step", "train_loss_at_zero1_end_time",
              "zero1_train_loss_at_end", "background_cpu_s_per_step", "main_thread_cpu_s_per_step",
              "share_of_sum_of_in_situ_rates", "rounds_at_cap_share", "estimate_round_s", "commit_round_s",
              "loss_vs_acco", "bytes_vs_zero1")
    summary = []
    presets = list(dict.fromkeys(r.get("preset", "tiny") for r in runs))
    for (preset, hetero, ratio, case), members in sorted(groups.items(), key=lambda kv: (
            presets.index(kv[0][0]), kv[0][1], kv[0][2], CASE_ORDER.index(kv[0][3]))):
        row: dict[str, Any] = {"preset": preset, "heterogeneous": hetero, "target_ratio": ratio, "case": case,
                               "method": members[0]["method"],
                               "adaptive_accumulation": members[0]["adaptive_accumulation"], "reps": len(members)}
        row.update({f: _med([m.get(f) for m in members]) for f in fields})
        if members[0].get("micro_batches_per_round_per_rank"):
            row["micro_batches_per_round_per_rank"] = [
                _med([m["micro_batches_per_round_per_rank"][k] for m in members])
                for k in range(len(members[0]["micro_batches_per_round_per_rank"]))]
        if hetero:
            for key in ("standalone_samples_per_s", "in_situ_samples_per_s"):
                row[key] = [_med([m[key][k] for m in members if m.get(key)])
                            for k in range(len(members[0].get(key) or []))]
        for field in ("step_time_s", "speedup_vs_zero1", "step_time_over_limit"):
            values = [m.get(field) for m in members if m.get(field) is not None]
            row[f"{field}_min"], row[f"{field}_max"] = (min(values), max(values)) if values else (None, None)
        row["speedup_vs_zero1_per_rep"] = [m.get("speedup_vs_zero1") for m in sorted(members, key=lambda m: m["rep"])]
        row["samples_per_s_vs_zero1_per_rep"] = [m.get("samples_per_s_vs_zero1")
                                                 for m in sorted(members, key=lambda m: m["rep"])]
        summary.append(row)
    result["summary"] = summary
    result["targets"] = _targets(summary)


def _pick(summary: list[dict[str, Any]], case: str, ratio: float, hetero: bool = False,
          preset: str | None = None) -> dict[str, Any] | None:
    rows = [r for r in summary if r["case"] == case and r["heterogeneous"] == hetero
            and (preset is None or r["preset"] == preset)]
    if not rows:
        return None
    return min(rows, key=lambda r: abs(r["target_ratio"] - ratio))


def _homogeneous(summary: list[dict[str, Any]], case: str, preset: str) -> list[dict[str, Any]]:
    return [r for r in summary if r["case"] == case and not r["heterogeneous"] and r["preset"] == preset]


def _targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each with the measured value (None where the run does not have it)."""
    out: list[dict[str, Any]] = []
    presets = list(dict.fromkeys(r["preset"] for r in summary))
    dense = "dense" if "dense" in presets else None
    if dense:
        free = [r for r in _homogeneous(summary, "acco", dense) if r["target_ratio"] == 0]
        if free and free[0]["speedup_vs_zero1"] is not None:
            out.append({"target": "dense model, unshaped link: ACCO step within 3% of ZeRO-1's (speed-up >= 0.97x)",
                        "value": free[0]["speedup_vs_zero1"], "ok": free[0]["speedup_vs_zero1"] >= 0.97,
                        "per_rep": free[0]["speedup_vs_zero1_per_rep"]})
    for preset in presets:
        shaped = [r for r in _homogeneous(summary, "acco_int8", preset) if 0.2 <= r["target_ratio"] <= 3.1]
        if shaped:
            worst = min(shaped, key=lambda r: r["speedup_vs_zero1"])
            out.append({"target": f"{preset}: ACCO int8 >= 1.0x ZeRO-1 at every M/C from 0.25 to 3 (worst: M/C~"
                                  f"{worst['target_ratio']:g})", "value": worst["speedup_vs_zero1"],
                        "ok": worst["speedup_vs_zero1"] >= 1.0, "per_rep": worst["speedup_vs_zero1_per_rep"]})
        for ratio, goal in ((0.5, 1.4), (1.0, 1.25)):
            row = next((r for r in _homogeneous(summary, "acco_int8", preset) if r["target_ratio"] == ratio), None)
            if row is not None:
                out.append({"target": f"{preset}: ACCO int8 >= {goal}x ZeRO-1 at M/C~{ratio:g} (measured ZeRO-1 "
                                      f"M/C {row['zero1_M_over_C']:.2f})", "value": row["speedup_vs_zero1"],
                            "ok": row["speedup_vs_zero1"] >= goal, "per_rep": row["speedup_vs_zero1_per_rep"]})
        for case in ("acco", "acco_int8", "acco_adaptive"):
            rows = [r for r in _homogeneous(summary, case, preset) if r["step_time_over_limit"] is not None]
            if rows:
                worst = max(rows, key=lambda r: r["step_time_over_limit"])
                out.append({"target": f"{preset}: {CASE_LABEL[case]} step within 10% of its bound (worst: M/C~"
                                      f"{worst['target_ratio']:g})", "value": worst["step_time_over_limit"],
                            "ok": worst["step_time_over_limit"] <= 1.10})
        losses = [r["loss_vs_acco"] for r in _homogeneous(summary, "acco_int8", preset)
                  if r["loss_vs_acco"] is not None]
        if losses:
            worst_loss = max(losses, key=abs)
            out.append({"target": f"{preset}: ACCO int8 held-out loss at equal tokens within 0.5% of ACCO's "
                                  "(worst bandwidth)", "value": worst_loss, "ok": abs(worst_loss) <= 0.005})
        homo_acco = [r["loss_vs_zero1"] for r in _homogeneous(summary, "acco", preset)]
        if homo_acco:
            worst = max(homo_acco, key=abs)
            out.append({"target": f"{preset}: ACCO held-out loss at equal tokens within 2% of ZeRO-1 (worst "
                                  "bandwidth)", "value": worst, "ok": abs(worst) <= 0.02})
        homo_dpu = [r["loss_vs_zero1"] for r in _homogeneous(summary, "dpu", preset)]
        if homo_dpu:
            out.append({"target": f"{preset}: DPU held-out loss gap vs ZeRO-1 at equal tokens (shown, no threshold)",
                        "value": _med(homo_dpu), "ok": None})
    adaptive = _pick(summary, "acco_adaptive", 2.0, preset=presets[0] if presets else None)
    if adaptive and adaptive["samples_per_s_vs_zero1"] is not None:
        out.append({"target": f"adaptive ACCO samples/s vs ZeRO-1 at M/C~2 (measured ZeRO-1 M/C "
                              f"{adaptive['zero1_M_over_C']:.2f}) >= 2.5x", "value": adaptive["samples_per_s_vs_zero1"],
                    "ok": adaptive["samples_per_s_vs_zero1"] >= 2.5,
                    "per_rep": adaptive["samples_per_s_vs_zero1_per_rep"]})
    het = _pick(summary, "acco_adaptive", 0.5, hetero=True)
    if het and het.get("share_of_sum_of_rates") is not None:
        out.append({"target": "heterogeneous: adaptive ACCO samples/s >= 80% of the sum of the workers' rates",
                    "value": het["share_of_sum_of_rates"], "ok": het["share_of_sum_of_rates"] >= 0.8})
        if het.get("share_of_sum_of_in_situ_rates") is not None:
            out.append({"target": "heterogeneous: the same against the sum of in-situ rates (cross-check: each "
                                  "rank's micro-batch rate inside the ZeRO-1 run)",
                        "value": het["share_of_sum_of_in_situ_rates"],
                        "ok": het["share_of_sum_of_in_situ_rates"] >= 0.8})
    hz = _pick(summary, "zero1", 0.5, hetero=True)
    if hz and hz.get("share_of_sum_of_rates") is not None:
        out.append({"target": "heterogeneous: ZeRO-1 samples/s as a share of the sum of the workers' rates "
                              "(reference)", "value": hz["share_of_sum_of_rates"], "ok": None})
    return out


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _range(row: dict[str, Any], field: str, spec: str) -> str:
    low, high = row.get(f"{field}_min"), row.get(f"{field}_max")
    if low is None or row.get("reps", 1) < 2:
        return ""
    return f" ({format(low, spec)}–{format(high, spec)})"


def _setting(row: dict[str, Any], result: dict[str, Any]) -> str:
    if row["heterogeneous"]:
        return "hetero x" + format(result["settings"]["hetero_slowdown"], "g")
    if row.get("bandwidth_mbit") == 0:
        return "unshaped"
    return f"M/C~{row['target_ratio']:g}" if row["target_ratio"] else "real link"


def markdown(result: dict[str, Any]) -> str:
    """The results tables (one per model), the calibrations and the target checks, as markdown."""
    machine = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min). Machine: {machine['cpu']}, "
        f"{machine['cores']} cores, torch {machine['torch']}, deepspeed {machine['deepspeed']}; 2 fake hosts "
        "(network namespaces), 1 rank x 1 thread each, pinned to its own core. Medians over repetitions, "
        "(min–max) next to them; bounds from ZeRO-1's C and M of the same setting (see benchmarks/report.py).",
    ]
    calibrations = result["calibration"]
    for preset, cal in calibrations.items():
        lines += [
            "", f"### {preset}: {cal['model']} ({cal['n_params']:,} params)", "",
            f"Micro-batch {cal['micro_batch']} x {cal['seq_len']} tokens, gradient accumulation {cal['ga']}, 2 ranks. "
            f"Calibration (unshaped, ZeRO-1): C = {cal['C_s']:.3f} s per optimizer step, M = "
            f"{cal['M_unshaped_s']:.3f} s, {cal['tx_bytes_per_step'] / 1e6:.2f} MB sent per step per rank.", "",
            "| setting | Mbit/s | method | ZeRO-1 M/C | step s | bound s | step/bound | speed-up vs ZeRO-1 | "
            "exposed s | C s | comm s/step | tokens/s | samples/s vs Z1 | held-out loss (equal tokens) | "
            "bytes/step (eth0) | round CPU s/step | peak RSS MB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (row for row in result["summary"] if row["preset"] == preset):
            loss = _fmt(r["loss_at_equal_tokens"], ".4f")
            if r["adaptive_accumulation"] and r["final_loss"] is not None:
                loss += f" (end: {r['final_loss']:.4f})"
            bytes_ratio = f" ({r['bytes_vs_zero1']:.2f}x)" if r.get("bytes_vs_zero1") else ""
            lines.append(
                f"| {_setting(r, result)} | {r['bandwidth_mbit']:.1f} | {CASE_LABEL[r['case']]} "
                f"| {_fmt(r['zero1_M_over_C'], '.2f')} | {r['step_time_s']:.3f}{_range(r, 'step_time_s', '.3f')} "
                f"| {_fmt(r['limit_s'], '.3f')} | {_fmt(r['step_time_over_limit'], '.2f')} "
                f"| {_fmt(r['speedup_vs_zero1'], '.2f')}x{_range(r, 'speedup_vs_zero1', '.2f')} "
                f"| {r['exposed_comm_s']:.3f} | {r['compute_s']:.3f} | {r['comm_s']:.3f} | {r['tokens_per_s']:,.0f} "
                f"| {_fmt(r['samples_per_s_vs_zero1'], '.2f')}x | {loss} "
                f"| {r['bytes_per_step'] / 1e6:.2f} MB{bytes_ratio} | {_fmt(r['background_cpu_s_per_step'], '.3f')} "
                f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:+.2%}" if "loss" in t["target"] else (f"{value:.0%}" if "rates" in t["target"]
                                                               else f"{value:.2f}")
        met = "n/a" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        if t.get("per_rep"):
            shown += " (reps: " + ", ".join(_fmt(v, ".2f") for v in t["per_rep"]) + ")"
        lines.append(f"| {t['target']} | {shown} | {met} |")
    het = [r for r in result["summary"] if r["heterogeneous"]]
    if het and het[0].get("standalone_samples_per_s"):
        cal = calibrations[het[0]["preset"]]
        rates = het[0]["standalone_samples_per_s"]
        lines += ["", f"Heterogeneous run ({het[0]['preset']}): {cal.get('heterogeneous_mechanism', '')}. "
                      f"Standalone rates (forward, backward and engine.step of ZeRO-1 micro-batches that never reach a "
                      f"boundary, i.e. no communication; both ranks at once): "
                      + ", ".join(f"rank {k} {v:.1f} samples/s" for k, v in enumerate(rates))
                      + f"; sum {sum(rates):.1f} samples/s."]
        adaptive = next((r for r in het if r["case"] == "acco_adaptive"), None)
        if adaptive and adaptive.get("micro_batches_per_round_per_rank") \
                and adaptive.get("rounds_at_cap_share") is not None:
            lines[-1] += (" Adaptive ACCO: micro-batches per round per rank "
                          + ", ".join(f"{v:.1f}" for v in adaptive["micro_batches_per_round_per_rank"])
                          + f"; {adaptive['rounds_at_cap_share']:.0%} of rounds reached "
                          "max_micro_batches_per_round on the fast rank.")
        in_situ = next((r.get("in_situ_samples_per_s") for r in het if r["case"] == "zero1"), None)
        if in_situ:
            lines[-1] += (" In-situ rates (each rank's micro-batch rate between boundaries inside the ZeRO-1 run): "
                          + ", ".join(f"rank {k} {v:.1f}" for k, v in enumerate(in_situ))
                          + f"; sum {sum(in_situ):.1f} samples/s.")
    return "\n".join(lines) + "\n"


def _plots(result: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    presets = list(result["calibration"])
    homo_all = [r for r in result["summary"] if not r["heterogeneous"] and r.get("zero1_M_over_C")]
    fig, axes = plt.subplots(len(presets), 2, figsize=(12, 4.3 * len(presets)), constrained_layout=True,
                             squeeze=False)
    for (ax, ax2), preset in zip(axes, presets):
        homo = [r for r in homo_all if r["preset"] == preset]
        for case in CASE_ORDER:
            rows = sorted((r for r in homo if r["case"] == case), key=lambda r: r["zero1_M_over_C"])
            if not rows:
                continue
            x = [r["zero1_M_over_C"] for r in rows]
            err = [[r["step_time_s"] - (r["step_time_s_min"] or r["step_time_s"]) for r in rows],
                   [(r["step_time_s_max"] or r["step_time_s"]) - r["step_time_s"] for r in rows]]
            ax.errorbar(x, [r["step_time_s"] for r in rows], yerr=err, fmt="o-", color=CASE_COLOR[case],
                        label=CASE_LABEL[case], capsize=3)
            ax2.plot(x, [r["samples_per_s"] for r in rows], "o-", color=CASE_COLOR[case], label=CASE_LABEL[case])
            if case in ("zero1", "acco", "acco_int8"):
                ax.plot(x, [r["limit_s"] for r in rows], "--", color=CASE_COLOR[case], alpha=0.7,
                        label=f"bound {CASE_LABEL[case]}")
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_xlabel("ZeRO-1 M/C (measured; the leftmost point is the unshaped link)")
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=7)
        ax.set_ylabel("time per optimizer step (s): median, min-max")
        ax.set_title(f"{preset}: step time and bounds (adaptive: same steps, more samples)")
        ax2.set_ylabel("samples/s (both ranks)")
        ax2.set_title(f"{preset}: throughput")
    paths.append(stem.with_name(stem.name + "_step_time.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # Step rate against ZeRO-1's, per schedule (the picture a user looks at): median and min-max of the repetitions.
    fig, axes = plt.subplots(1, len(presets), figsize=(6.2 * len(presets), 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, preset in zip(axes[0], presets):
        homo = [r for r in homo_all if r["preset"] == preset]
        for case in CASE_ORDER:
            rows = sorted((r for r in homo if r["case"] == case and r.get("speedup_vs_zero1") is not None),
                          key=lambda r: r["zero1_M_over_C"])
            if not rows or case == "zero1":
                continue
            x = [r["zero1_M_over_C"] for r in rows]
            y = [r["speedup_vs_zero1"] for r in rows]
            err = [[v - (r["speedup_vs_zero1_min"] or v) for v, r in zip(y, rows)],
                   [(r["speedup_vs_zero1_max"] or v) - v for v, r in zip(y, rows)]]
            auto = case == "acco_auto"
            ax.errorbar(x, y, yerr=err, fmt="o-", color=CASE_COLOR[case], label=CASE_LABEL[case], capsize=3,
                        lw=3 if auto else 1.2, ms=7 if auto else 4, zorder=3 if auto else 2)
        ax.axhline(1.0, color=CASE_COLOR["zero1"], lw=2, label="ZeRO-1")
        ax.set_xscale("log")
        ax.set_xlabel("ZeRO-1 M/C (measured; the leftmost point is the unshaped link)")
        ax.set_ylabel("step rate / ZeRO-1's (median, min-max of repetitions)")
        ax.set_title(f"{preset}: step rate against ZeRO-1's")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    paths.append(stem.with_name(stem.name + "_speedup.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # Loss curves: the first repetition of each homogeneous setting, one row per model, one panel per setting.
    for xkey, xlabel, suffix in (("wall_s", "training wall-clock (s)", "_loss_time.png"),
                                 ("tokens", "tokens", "_loss_tokens.png")):
        settings = {p: sorted({r["target_ratio"] for r in result["runs"] if not r["heterogeneous"]
                               and r.get("preset", "tiny") == p}) for p in presets}
        cols = max([len(v) for v in settings.values()] + [1])
        fig, axes = plt.subplots(len(presets), cols, figsize=(3.8 * cols, 3.5 * len(presets)),
                                 constrained_layout=True, squeeze=False)
        for row_axes, preset in zip(axes, presets):
            for ax, ratio in zip(row_axes, settings[preset]):
                for case in CASE_ORDER:
                    runs = [r for r in result["runs"] if not r["heterogeneous"] and r["target_ratio"] == ratio
                            and r["case"] == case and r.get("preset", "tiny") == preset]
                    if runs:
                        curve = min(runs, key=lambda r: r["rep"])["loss_curve"]
                        zero1 = case == "zero1"  # drawn wide underneath: ACCO follows its trajectory
                        ax.plot([q[xkey] for q in curve], [q["loss"] for q in curve], color=CASE_COLOR[case],
                                label=CASE_LABEL[case], lw=4 if zero1 else 1.2, alpha=0.45 if zero1 else 1.0)
                mbit = next(r["bandwidth_mbit"] for r in result["runs"] if r["target_ratio"] == ratio
                            and r.get("preset", "tiny") == preset)
                ax.set_title(f"{preset}, " + (f"{mbit:.1f} Mbit/s (M/C~{ratio:g})" if mbit else "unshaped"),
                             fontsize=9)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
            row_axes[0].set_ylabel("train loss (mean over ranks)")
        axes[0][0].legend(fontsize=7)
        paths.append(stem.with_name(stem.name + suffix))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def write_report(result: dict[str, Any], json_path: Path) -> list[Path]:
    """Write ``<stem>.md`` and the plots next to ``json_path``; return their paths."""
    stem = json_path.with_suffix("")
    md = stem.with_suffix(".md")
    md.write_text(markdown(result))
    return [md, *_plots(result, stem)]


def main(argv: list[str] | None = None) -> int:
    """Re-derive and re-write the report of a results JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    result = json.loads(path.read_text())
    add_derived(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    for out in write_report(result, path):
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
