"""What ``train_lm.py`` writes: the rows of metrics.jsonl, the summary, the loss plot, the progress bar.

Rank 0 writes ``metrics.jsonl`` (one row per committed optimizer step, keys ``STEP_FIELDS`` plus,
with ACCO, ``ACCO_FIELDS``), and after the run ``summary.json`` (``summarize``) and ``loss.png``
(``plot_losses``). With ACCO a step's figures arrive one boundary after the step (with its commit
round), so ``MetricsLog`` holds each row until its record comes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepspeed import comm as dist

__all__ = ["ACCO_FIELDS", "STEP_FIELDS", "MetricsLog", "plot_losses", "summarize", "update_bar"]

STEP_FIELDS = ("step", "loss", "lr", "samples", "tokens", "wall_s")
"""Keys present in every line of metrics.jsonl. ACCO runs add ``ACCO_FIELDS`` (null without ACCO),
evaluation steps add ``eval_loss`` and ``train_loss_window`` (mean train loss over all ranks'
micro-batches since the previous evaluation)."""

ACCO_FIELDS = ("exposed_wait_s", "commit_round_s", "estimate_round_s", "compute_s", "micro_batches_per_rank",
               "micro_batches", "bytes_communicated", "overflow", "grad_norm", "estimate_grad_norm",
               "round_phases_s", "schedule", "decision")


def _acco_fields(record: Any | None) -> dict[str, Any]:
    if record is None:
        return dict.fromkeys(ACCO_FIELDS)
    data = record.as_dict()
    return {k: data.get(k) for k in ACCO_FIELDS}


class MetricsLog:
    """Per-step rows: held until their ACCO record arrives (one boundary later), then appended to metrics.jsonl."""

    def __init__(self, path: Path | None, acco: bool, micro_batch: int, seq_len: int, world: int,
                 samples: int, resumed_step: int | None, pending: list[dict[str, Any]] | None = None) -> None:
        self.path, self.acco, self.micro_batch, self.seq_len, self.world = path, acco, micro_batch, seq_len, world
        self.samples = self.start_samples = samples
        self.pending: list[dict[str, Any]] = list(pending or [])  # from a checkpoint: their records come later
        self.records: list[Any] = []
        self.rows: list[dict[str, Any]] = []
        self.new_rows: list[dict[str, Any]] = []
        if path is not None and resumed_step is not None and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            last = self.pending[0]["step"] - 1 if self.pending else resumed_step
            self.rows = [r for r in kept if r["step"] <= last]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path is not None:
            path.write_text("")

    def add_step(self, step: int, loss: float, lr: float, local_micro: int, wall_s: float,
                 grad_norm: float | None) -> None:
        """Queue the row of a committed step (ACCO figures are filled when the record arrives)."""
        self.pending.append({"step": step, "loss": loss, "lr": lr, "wall_s": round(wall_s, 4),
                             "_micro_all_ranks": local_micro * self.world, "_grad_norm": grad_norm})

    def add_records(self, records: Iterable[Any]) -> None:
        """Attach ACCO step records (from ``deepspeed_acco.pop_metrics``) and write what became complete.

        Records come one per committed step, in commit order, so they are matched to the queued rows
        by position (the optimizer numbers them from 1 again after a checkpoint is loaded).
        """
        self.records.extend(records)
        self.emit()

    def emit(self, without_records: bool = False) -> None:
        """Write every queued row whose ACCO record is in (all of them when ACCO is off, or ``without_records``:
        after a load that restarted ACCO's pipeline, the queued rows' records will never come)."""
        while self.pending and (not self.acco or self.records or without_records):
            row = self.pending.pop(0)
            record = self.records.pop(0) if self.acco and self.records else None
            micro = record.micro_batches if record is not None else row["_micro_all_ranks"]
            self.samples += micro * self.micro_batch
            grad_norm = row.pop("_grad_norm")
            row.pop("_micro_all_ranks")
            row.update(samples=self.samples, tokens=self.samples * self.seq_len, **_acco_fields(record))
            if record is None:
                row["grad_norm"] = grad_norm
            self.rows.append(row)
            self.new_rows.append(row)
            if self.path is not None:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")

    def set_eval(self, step: int, eval_loss: float, train_window: float) -> None:
        """Attach a held-out loss to a step's row (still queued: call before ``add_records``)."""
        for row in self.pending:
            if row["step"] == step:
                row.update(eval_loss=eval_loss, train_loss_window=None if math.isnan(train_window) else train_window)
                return
        raise RuntimeError(f"step {step} has no queued row to attach its evaluation to")

    def comm_totals(self) -> dict[str, float]:
        """This rank's ACCO totals over the rows written by this run."""
        rows = [r for r in self.new_rows if r.get("commit_round_s") is not None]
        rounds = sum(r["commit_round_s"] + (r["estimate_round_s"] or 0.0) for r in rows)
        exposed = sum(r["exposed_wait_s"] for r in rows)
        return {"comm_round_s_total": rounds, "exposed_comm_s_total": exposed,
                "compute_s_total": sum(r["compute_s"] for r in rows),
                "bytes_communicated_total": float(sum(r["bytes_communicated"] for r in rows))}


def plot_losses(rows: list[dict[str, Any]], initial_eval: float | None, path: Path, title: str = "") -> None:
    """Two panels: train and held-out loss against tokens, and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    evals = [r for r in rows if r.get("eval_loss") is not None]
    for ax, key, label in ((axes[0], "tokens", "tokens"), (axes[1], "wall_s", "wall-clock seconds")):
        ax.plot([r[key] for r in rows], [r["loss"] for r in rows], label="train (rank 0)", lw=1)
        ex = ([0.0] if initial_eval is not None else []) + [r[key] for r in evals]
        ey = ([initial_eval] if initial_eval is not None else []) + [r["eval_loss"] for r in evals]
        ax.plot(ex, ey, "o-", label="held-out", ms=4)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_bar(bar: Any, log: MetricsLog, loss: float, train_s: float) -> None:
    """tqdm postfix: rank-0 loss, tokens/s over training time, exposed share of the communication so far."""
    totals = log.comm_totals()
    tokens = (log.samples - log.start_samples) * log.seq_len
    postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens / max(train_s, 1e-9):,.0f}"}
    if totals["comm_round_s_total"] > 0:
        postfix["exposed"] = f"{totals['exposed_comm_s_total'] / totals['comm_round_s_total']:.0%}"
    bar.set_postfix(postfix, refresh=False)


def summarize(args: argparse.Namespace, engine: Any, log: MetricsLog, state: dict[str, Any], acco: Any,
               n_params: int, start_step: int, wall: float, train_s: float,
               last_eval: float | None) -> dict[str, Any]:
    """Totals of this run; communication figures gathered from every rank (after the final flush)."""
    world = dist.get_world_size()
    totals = log.comm_totals()
    per_rank: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(per_rank, totals)
    run_rows = [r for r in log.rows if r["step"] > start_step] if dist.get_rank() == 0 else []
    tokens_run = (log.samples - log.start_samples) * args.seq_len
    summary: dict[str, Any] = {
        "steps": engine.global_steps,
        "steps_this_run": engine.global_steps - start_step,
        "samples": log.samples,
        "tokens": log.samples * args.seq_len,
        "tokens_this_run": tokens_run,
        "wall_s": wall,
        "train_s": train_s,
        "tokens_per_s": tokens_run / train_s if train_s > 0 else None,
        "tokens_per_s_wall": tokens_run / wall if wall > 0 else None,
        "initial_eval_loss": state["initial_eval_loss"],
        "final_eval_loss": last_eval,
        "final_train_loss": run_rows[-1]["loss"] if run_rows else None,
        "acco": acco.mode if acco.enabled else None,
        "world_size": world,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "seq_len": args.seq_len,
        "n_params": n_params,
        "model": args.model or f"{args.arch}-{args.preset}",
        "tokenizer": args.tokenizer,
        "deepspeed_config": args.deepspeed_config,
    }
    if acco.enabled:
        rounds, exposed = totals["comm_round_s_total"], totals["exposed_comm_s_total"]
        share = exposed / rounds if rounds > 0 else None
        summary.update(totals)
        summary.update({
            "exposed_comm_share": share,
            "comm_overlap_share": 1.0 - share if share is not None else None,
            "exposed_comm_share_per_rank": [r["exposed_comm_s_total"] / r["comm_round_s_total"]
                                            if r["comm_round_s_total"] > 0 else None for r in per_rank],
            "exposed_comm_s_per_rank": [r["exposed_comm_s_total"] for r in per_rank],
            "comm_round_s_per_rank": [r["comm_round_s_total"] for r in per_rank],
        })
    else:
        summary.update({"comm_round_s_total": None, "exposed_comm_s_total": None, "exposed_comm_share": None,
                        "comm_overlap_share": None})
    return summary
