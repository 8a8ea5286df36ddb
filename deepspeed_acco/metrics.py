"""Per-committed-step ACCO figures: compute time, round times, exposed wait, counts, bytes."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepMetrics", "MetricsLog"]


@dataclass
class StepMetrics:
    """The figures of one committed optimizer step, on this rank.

    ``exposed_wait_s`` is the time the training thread spent blocked on this step's rounds (the
    communication that was not hidden); ``compute_s`` the training thread's time between the
    boundaries of this step, waits excluded.
    """

    step: int
    """Committed step number, 1-based (``engine.global_steps`` once this step is committed)."""
    compute_s: float = 0.0
    estimate_round_s: float | None = None
    commit_round_s: float = 0.0
    exposed_wait_s: float = 0.0
    micro_batches_per_rank: list[int] = field(default_factory=list)
    """Micro-batches each rank contributed to this step (both rounds in acco mode)."""
    bytes_communicated: int = 0
    """Bytes this rank sent for this step's rounds, counted as a ring reduce-scatter plus a ring
    all-gather of the flat buffers (plus the small count/norm all-reduce)."""
    overflow: bool = False
    """A non-finite gradient skipped the commit on every rank."""
    grad_norm: float = 0.0
    """Global gradient norm of the commit (before clipping): the step's averaged gradient."""
    estimate_grad_norm: float | None = None
    """Global gradient norm of the estimate round's half-batch gradient G~ (before clipping; of the dequantized
    sums with the int8 estimate; None in a step without an estimate round)."""
    round_phases_s: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of this step's rounds by phase (reduce_scatter, norm, step, all_gather)."""
    round_phases_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds the worker thread spent in each phase of this step's rounds (its own work: quantizing,
    the optimizer step, copies; not the collectives' transport threads, not time spent waiting)."""
    round_counts: list[list[int]] = field(default_factory=list)
    """Per round of this step (estimate first in acco mode): micro-batches of each rank."""
    round_lr_factors: list[float] = field(default_factory=list)
    """Per round of this step: what the round multiplied the scheduler's LR by (``acco.lr_scaling``; 1.0
    without it)."""
    step_s: float = 0.0
    """Wall-clock seconds from the previous step's commit boundary to this step's."""
    schedule: str | None = None
    """The schedule this step ran: ``sync`` (ZeRO-1's step), ``0.75``, ``0.5+int8``... (``schedule.py``), ``dpu``."""
    decision: dict[str, Any] | None = None
    """The automatic schedule's decision taken at the boundary before this step, with its figures."""

    @property
    def micro_batches(self) -> int:
        """Micro-batches of all ranks in this step."""
        return sum(self.micro_batches_per_rank)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["micro_batches"] = self.micro_batches
        return out

    def monitor_events(self) -> list[tuple[str, float]]:
        """(name, value) pairs for DeepSpeed's monitor."""
        events = [("Train/ACCO/compute_s", self.compute_s), ("Train/ACCO/commit_round_s", self.commit_round_s),
                  ("Train/ACCO/exposed_wait_s", self.exposed_wait_s),
                  ("Train/ACCO/micro_batches", float(self.micro_batches)),
                  ("Train/ACCO/bytes_communicated", float(self.bytes_communicated))]
        if self.estimate_round_s is not None:
            events.append(("Train/ACCO/estimate_round_s", self.estimate_round_s))
        return events


class MetricsLog:
    """Steps in progress (keyed by step index), the finished ones not yet read, and the most recent ones.

    Both finished-step queues are bounded (``keep`` records), so a run that never calls
    ``pop_metrics`` does not grow without limit: the oldest unread records are dropped first.
    """

    def __init__(self, keep: int = 4096) -> None:
        self._open: dict[int, StepMetrics] = {}
        self._done: deque[StepMetrics] = deque(maxlen=keep)
        self.history: deque[StepMetrics] = deque(maxlen=keep)

    def open(self, step: int) -> StepMetrics:
        """The record of a step in progress (0-based index), created on first use."""
        if step not in self._open:
            self._open[step] = StepMetrics(step=step + 1)
        return self._open[step]

    def launched(self, step: int, compute_s: float, schedule: str, step_s: float | None) -> None:
        """A boundary of ``step`` launched a round after ``compute_s`` of compute (``step_s``: a commit's, the
        time since the previous commit boundary)."""
        record = self.open(step)
        record.compute_s += compute_s
        record.schedule = schedule
        if step_s is not None:
            record.step_s = step_s

    def account(self, result: Any, estimate: bool) -> StepMetrics:
        """Add a finished round (``pipeline.RoundResult``) to its step's record; return the record."""
        record = self.open(result.step)
        record.bytes_communicated += result.bytes_sent
        record.micro_batches_per_rank = [a + b for a, b in zip(record.micro_batches_per_rank, result.counts)] \
            if record.micro_batches_per_rank else list(result.counts)
        record.round_counts.append(list(result.counts))
        record.round_lr_factors.append(result.lr_factor)
        record.round_phases_s = {k: record.round_phases_s.get(k, 0.0) + v for k, v in result.phase_s.items()}
        record.round_phases_cpu_s = {k: record.round_phases_cpu_s.get(k, 0.0) + v
                                     for k, v in result.phase_cpu_s.items()}
        if estimate:
            record.estimate_round_s = result.duration_s
            record.estimate_grad_norm = result.grad_norm
        else:
            record.commit_round_s = result.duration_s
            record.overflow = result.overflow
            record.grad_norm = result.grad_norm
        return record

    def close(self, step: int) -> None:
        """Mark a step committed: its record becomes readable."""
        record = self._open.pop(step)
        self._done.append(record)
        self.history.append(record)

    def discard_open(self) -> None:
        """Drop records of steps that will not commit (after a flush restarts the pipeline)."""
        self._open.clear()

    def pop(self) -> list[StepMetrics]:
        """The committed steps finished since the last call (at most the last ``keep``)."""
        done = list(self._done)
        self._done.clear()
        return done
