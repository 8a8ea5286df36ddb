"""Markdown table, target checks and PNG plots from the JSON that ``benchmarks/run.py`` writes.

    python benchmarks/report.py benchmarks/results/quick.json

writes ``quick.md``, ``quick_step_time.png``, ``quick_loss_time.png`` and ``quick_loss_tokens.png``
next to the JSON (``run.py`` calls it at the end of a run). ``add_derived`` adds to every run the
figures that need its ZeRO-1 twin (same repetition, bandwidth and host setup): speed-up, ZeRO-1's
M/C and the overlap limit ``max(C, 2M)``; and the ``summary`` (medians over repetitions) and
``targets`` blocks.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["add_derived", "write_report", "markdown", "main"]

CASE_ORDER = ("zero1", "acco", "dpu", "acco_adaptive")
CASE_LABEL = {"zero1": "ZeRO-1", "acco": "ACCO", "dpu": "DPU", "acco_adaptive": "ACCO adaptive"}
CASE_COLOR = {"zero1": "tab:gray", "acco": "tab:blue", "dpu": "tab:orange", "acco_adaptive": "tab:green"}


def _key(run: dict[str, Any]) -> tuple[bool, float]:
    return run["heterogeneous"], run["target_ratio"]


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
    for run in runs:
        z = twins.get((run["rep"], *_key(run)))
        if z is None:
            continue
        c, m = z["compute_s"], z["comm_s"]
        run["zero1_M_over_C"] = m / c if c else None
        run["M_over_C"] = run["round_s"] / run["compute_s"] if run["compute_s"] else None
        run["limit_s"] = max(c, 2 * m) if run["case"] in ("acco", "acco_adaptive") else \
            (max(c, m) if run["case"] == "dpu" else c + m)
        run["step_time_over_limit"] = run["step_time_s"] / run["limit_s"] if run["limit_s"] else None
        run["speedup_vs_zero1"] = z["step_time_s"] / run["step_time_s"]
        run["samples_per_s_vs_zero1"] = run["samples_per_s"] / z["samples_per_s"]
        run["loss_vs_zero1"] = run["loss_at_equal_tokens"] / z["loss_at_equal_tokens"] - 1.0
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

    groups: dict[tuple[bool, float, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(*_key(run), run["case"])].append(run)
    fields = ("bandwidth_mbit", "step_time_s", "compute_s", "comm_s", "round_s", "exposed_comm_s", "tokens_per_s",
              "samples_per_s", "final_loss", "loss_at_equal_tokens", "tokens", "bytes_per_step",
              "bytes_per_step_metrics", "peak_rss_mb", "zero1_M_over_C", "M_over_C", "limit_s",
              "step_time_over_limit", "speedup_vs_zero1", "samples_per_s_vs_zero1", "loss_vs_zero1",
              "share_of_sum_of_rates", "micro_batches_per_step", "train_loss_at_zero1_end_time",
              "zero1_train_loss_at_end", "background_cpu_s_per_step", "main_thread_cpu_s_per_step",
              "share_of_sum_of_in_situ_rates", "rounds_at_cap_share")
    summary = []
    for (hetero, ratio, case), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                 CASE_ORDER.index(kv[0][2]))):
        row: dict[str, Any] = {"heterogeneous": hetero, "target_ratio": ratio, "case": case,
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
        row["speedup_vs_zero1_per_rep"] = [m.get("speedup_vs_zero1") for m in sorted(members, key=lambda m: m["rep"])]
        row["samples_per_s_vs_zero1_per_rep"] = [m.get("samples_per_s_vs_zero1")
                                                 for m in sorted(members, key=lambda m: m["rep"])]
        summary.append(row)
    result["summary"] = summary
    result["targets"] = _targets(summary)


def _pick(summary: list[dict[str, Any]], case: str, ratio: float, hetero: bool = False) -> dict[str, Any] | None:
    rows = [r for r in summary if r["case"] == case and r["heterogeneous"] == hetero]
    if not rows:
        return None
    return min(rows, key=lambda r: abs(r["target_ratio"] - ratio))


def _targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value (None where the run does not have it)."""
    out = []
    acco = _pick(summary, "acco", 0.5)
    if acco:
        out.append({"target": f"ACCO step speed-up vs ZeRO-1 at M/C~0.5 (measured ZeRO-1 M/C "
                              f"{acco['zero1_M_over_C']:.2f}) >= 1.35x", "value": acco["speedup_vs_zero1"],
                    "ok": acco["speedup_vs_zero1"] >= 1.35, "per_rep": acco["speedup_vs_zero1_per_rep"]})
        out.append({"target": "ACCO step time within 10% of max(C, 2M) at M/C~0.5",
                    "value": acco["step_time_over_limit"], "ok": acco["step_time_over_limit"] <= 1.10})
    adaptive = _pick(summary, "acco_adaptive", 2.0)
    if adaptive:
        out.append({"target": f"adaptive ACCO samples/s vs ZeRO-1 at M/C~2 (measured ZeRO-1 M/C "
                              f"{adaptive['zero1_M_over_C']:.2f}) >= 2.5x", "value": adaptive["samples_per_s_vs_zero1"],
                    "ok": adaptive["samples_per_s_vs_zero1"] >= 2.5,
                    "per_rep": adaptive["samples_per_s_vs_zero1_per_rep"]})
    homo_acco = [r["loss_vs_zero1"] for r in summary if r["case"] == "acco" and not r["heterogeneous"]]
    if homo_acco:
        worst = max(homo_acco, key=abs)
        out.append({"target": "ACCO held-out loss at equal tokens within 2% of ZeRO-1 (worst bandwidth)",
                    "value": worst, "ok": abs(worst) <= 0.02})
    homo_dpu = [r["loss_vs_zero1"] for r in summary if r["case"] == "dpu" and not r["heterogeneous"]]
    if homo_dpu:
        out.append({"target": "DPU held-out loss gap vs ZeRO-1 at equal tokens (shown, no threshold)",
                    "value": _med(homo_dpu), "ok": None})
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


def markdown(result: dict[str, Any]) -> str:
    """The results table, the calibration and the target checks, as markdown."""
    cal = result["calibration"]
    lines = [
        f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, torch {result['machine']['torch']}, deepspeed "
        f"{result['machine']['deepspeed']}; 2 fake hosts (network namespaces), 1 rank x 1 thread each, "
        f"pinned to its own core.",
        "",
        f"Model: {cal['model']} ({cal['n_params']:,} params), micro-batch {cal['micro_batch']} x {cal['seq_len']} "
        f"tokens, gradient accumulation {cal['ga']}, 2 ranks. Calibration (unshaped, ZeRO-1): C = "
        f"{cal['C_s']:.3f} s per optimizer step, M = {cal['M_unshaped_s']:.3f} s, "
        f"{cal['tx_bytes_per_step'] / 1e6:.2f} MB sent per step per rank.",
        "",
        "| setting | Mbit/s | method | ZeRO-1 M/C | step s | C s | comm s/step | exposed s | limit s | "
        "step/limit | speed-up | tokens/s | samples/s vs Z1 | held-out loss (equal tokens) | tokens | "
        "bytes/step (eth0) | peak RSS MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        setting = ("hetero x" + format(result["settings"]["hetero_slowdown"], "g")) if r["heterogeneous"] \
            else (f"M/C~{r['target_ratio']:g}" if r["target_ratio"] else "real link")
        loss = _fmt(r["loss_at_equal_tokens"], ".4f")
        if r["adaptive_accumulation"] and r["final_loss"] is not None:
            loss += f" (end: {r['final_loss']:.4f})"
        lines.append(
            f"| {setting} | {r['bandwidth_mbit']:.1f} | {CASE_LABEL[r['case']]} | {_fmt(r['zero1_M_over_C'], '.2f')} "
            f"| {r['step_time_s']:.3f} | {r['compute_s']:.3f} | {r['comm_s']:.3f} | {r['exposed_comm_s']:.3f} "
            f"| {_fmt(r['limit_s'], '.3f')} | {_fmt(r['step_time_over_limit'], '.2f')} "
            f"| {_fmt(r['speedup_vs_zero1'], '.2f')}x | {r['tokens_per_s']:,.0f} "
            f"| {_fmt(r['samples_per_s_vs_zero1'], '.2f')}x | {loss} | {int(r['tokens']):,} "
            f"| {r['bytes_per_step'] / 1e6:.2f} MB | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:+.2%}" if "loss" in t["target"] else (f"{value:.0%}" if "rates" in t["target"]
                                                               or "%" in t["target"] else f"{value:.2f}")
        met = "n/a" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        if t.get("per_rep"):
            shown += " (reps: " + ", ".join(_fmt(v, ".2f") for v in t["per_rep"]) + ")"
        lines.append(f"| {t['target']} | {shown} | {met} |")
    het = [r for r in result["summary"] if r["heterogeneous"]]
    if het and het[0].get("standalone_samples_per_s"):
        rates = het[0]["standalone_samples_per_s"]
        lines += ["", f"Heterogeneous run: {cal.get('heterogeneous_mechanism', '')}. Standalone rates "
                      f"(forward, backward and engine.step of ZeRO-1 micro-batches that never reach a boundary, "
                      f"i.e. no communication; both ranks at once): "
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
    import matplotlib.ticker

    paths = []
    homo = [r for r in result["summary"] if not r["heterogeneous"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for case in CASE_ORDER:
        rows = sorted((r for r in homo if r["case"] == case), key=lambda r: r["bandwidth_mbit"])
        if rows:
            mbit = [r["bandwidth_mbit"] for r in rows]
            ax.plot(mbit, [r["step_time_s"] for r in rows], "o-", color=CASE_COLOR[case], label=CASE_LABEL[case])
            ax2.plot(mbit, [r["samples_per_s"] for r in rows], "o-", color=CASE_COLOR[case], label=CASE_LABEL[case])
    acco = sorted((r for r in homo if r["case"] == "acco" and r["limit_s"]), key=lambda r: r["bandwidth_mbit"])
    if acco:
        ax.plot([r["bandwidth_mbit"] for r in acco], [r["limit_s"] for r in acco], "kx--",
                label="ACCO limit max(C, 2M) (ZeRO-1's C, M)")
    ticks = sorted({r["bandwidth_mbit"] for r in homo})
    for a in (ax, ax2):
        if ticks and ticks[0] > 0:
            a.set_xscale("log")
            a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            a.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
        a.set_xlabel("link bandwidth (Mbit/s, tc tbf each way)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    ax.set_ylabel("median time per optimizer step (s)")
    ax.set_title("Step time (adaptive: same steps, more samples)")
    ax2.set_ylabel("samples/s (both ranks)")
    ax2.set_title("Throughput")
    paths.append(stem.with_name(stem.name + "_step_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Loss curves: the first repetition of each homogeneous setting, one panel per setting.
    settings = sorted({(r["target_ratio"], r["bandwidth_mbit"]) for r in result["runs"] if not r["heterogeneous"]})
    for xkey, xlabel, suffix in (("wall_s", "training wall-clock (s)", "_loss_time.png"),
                                 ("tokens", "tokens", "_loss_tokens.png")):
        cols = max(1, len(settings))
        fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.8), constrained_layout=True, squeeze=False)
        for ax, (ratio, _) in zip(axes[0], settings):
            for case in CASE_ORDER:
                runs = [r for r in result["runs"] if not r["heterogeneous"] and r["target_ratio"] == ratio
                        and r["case"] == case]
                if runs:
                    curve = min(runs, key=lambda r: r["rep"])["loss_curve"]
                    zero1 = case == "zero1"  # drawn wide underneath: ACCO follows its trajectory
                    ax.plot([p[xkey] for p in curve], [p["loss"] for p in curve], color=CASE_COLOR[case],
                            label=CASE_LABEL[case], lw=4 if zero1 else 1.2, alpha=0.45 if zero1 else 1.0)
            mbit = next(r["bandwidth_mbit"] for r in result["runs"] if r["target_ratio"] == ratio)
            ax.set_title(f"{mbit:.1f} Mbit/s (ZeRO-1 M/C~{ratio:g})")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("train loss (mean over ranks)")
        axes[0][0].legend()
        paths.append(stem.with_name(stem.name + suffix))
        fig.savefig(paths[-1], dpi=100)
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
