"""ACCO picks its own schedule from what its pipeline measures (``acco-algorithm.md``, "Choosing the schedule
from measurements").

Which schedule is fastest depends on M / C (one ZeRO-1 round over one step's compute), which the user rarely
knows and which moves when links are shared. ``{"acco": {"enabled": true}}`` alone (no ``estimate_fraction``
nor ``estimate_compression`` set) runs ``AutoSchedule``: it chooses among the schedules with an exact commit,

- ``sync``: ZeRO-1's synchronous step, ``C + M``;
- ``0.75`` / ``0.5``: ACCO with that ``estimate_fraction``, ``max(f C, M) + max((1 - f) C, M)``;
- ``0.75+int8`` / ``0.5+int8``: the same with the int8 estimate round ``M8``, ``max(f C, M) + max((1 - f) C, M8)``;

never a lossy commit. It tries ``sync``, ``0.75`` and ``0.75+int8`` for ``TRIAL_STEPS`` steps each (a measurement
beats a model on a noisy link; after ZeRO-1's step has measured M / C, plain ACCO is skipped where its estimate
round would be exposed and the int8 estimate where it is not needed); the last trial runs one step more and the
decision comes from what it has measured by then (by step 10), without waiting for the commit in flight. It then
keeps measuring and decides again when M / C moves by more than ``DRIFT``. It prefers, in ``PREFERENCE`` order, the
first schedule within ``MARGIN`` of the fastest (0.75 converges best, docs/convergence.md), and only an ACCO schedule
that is faster than ZeRO-1's step by ``MIN_GAIN``; otherwise ZeRO-1's step. The optimizer switches at a step
boundary by waiting for the commit round and restarting the pipeline from the committed weights, so the commit stays
exact; a run's trajectory therefore depends on measured timings (as with ``cudnn.benchmark``), while a pinned schedule
reproduces bit for bit. Figures: docs/performance.md.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Schedule", "SYNC", "PREFERENCE", "TRIALS", "TRIAL_STEPS", "PLAIN_EXPOSED", "INT8_POINTLESS", "MARGIN",
           "MIN_GAIN", "DRIFT", "DRIFT_ABS", "WINDOW", "CHECK_EVERY", "SWITCH_WITHIN", "SUMMARY", "Measured",
           "predict_step_s", "choose", "AutoSchedule", "Agreement", "ScheduleSwitching"]


@dataclass(frozen=True)
class Schedule:
    """One candidate: ``estimate_fraction`` None is ZeRO-1's synchronous step."""

    estimate_fraction: float | None
    compression: str = "none"

    @property
    def name(self) -> str:
        """``sync``, ``0.75``, ``0.5+int8``..."""
        if self.estimate_fraction is None:
            return "sync"
        return f"{self.estimate_fraction:g}" + ("+int8" if self.compression == "int8" else "")

    @classmethod
    def from_name(cls, name: str) -> Schedule:
        """The inverse of ``name``."""
        if name == "sync":
            return SYNC
        fraction, _, compression = name.partition("+")
        return cls(float(fraction), compression or "none")


SYNC = Schedule(None)
PREFERENCE = (Schedule(0.75), Schedule(0.75, "int8"), Schedule(0.5), Schedule(0.5, "int8"))
"""ACCO's candidates, preferred first: the 3 + 1 split converges closest to ZeRO-1; plain before int8."""
TRIALS = (SYNC, Schedule(0.75), Schedule(0.75, "int8"))
"""Tried in this order at the start, ``TRIAL_STEPS`` steps each (the last one a step more)."""
TRIAL_STEPS = 3
PLAIN_EXPOSED = 0.3
"""After ZeRO-1's trial: above this M / C plain ACCO is not tried. The 0.75 split exposes its full estimate round
past M / C 0.25 (more than ``MARGIN`` behind the int8 estimate here), and both plain splits are then predicted from
the int8 trial's C and M, which hold for a full round too: the trial of plain 0.75 cost 3 slow steps and a waited
commit in every run on a slow link (docs/performance.md, "Time to target")."""
INT8_POINTLESS = 0.2
"""... and below this M / C the int8 estimate is not tried (0.75 hides both full rounds below M / C 0.25)."""
MARGIN = 0.05
"""A less preferred schedule is chosen only when predicted faster than the preferred one by more than this."""
MIN_GAIN = 0.02
"""An ACCO schedule is chosen only when predicted faster than ZeRO-1's step by more than this."""
DRIFT = 0.3
"""Decide again when M / C has moved by more than this factor (either way) since the last decision..."""
DRIFT_ABS = 0.1
"""... and by more than this much: a small M / C wobbles by a factor of two and more (the main job's loopback link:
0.06 to 0.18 within one run, each a re-decision that kept 0.75 while this was 0.05), and below M / C 0.25 the 0.75
split hides both rounds anyway."""
WINDOW = 4
"""Steps whose medians measure the schedule that runs (the first step after a switch is left out)."""


@dataclass
class Measured:
    """Medians of what one schedule's steps measured: the step, its compute C, its rounds M and M_est."""

    step_s: float
    compute_s: float
    commit_round_s: float
    estimate_round_s: float | None = None


def predict_step_s(schedule: Schedule, compute_s: float, round_s: float, int8_round_s: float) -> float:
    """The step time the model predicts for ``schedule`` (C, M, the int8 estimate round M8)."""
    if schedule.estimate_fraction is None:
        return compute_s + round_s
    f = schedule.estimate_fraction
    estimate_s = int8_round_s if schedule.compression == "int8" else round_s
    return max(f * compute_s, round_s) + max((1 - f) * compute_s, estimate_s)


def choose(predicted: dict[Schedule, float]) -> tuple[Schedule, str]:
    """The schedule to run from every candidate's predicted (or measured) step seconds, and why."""
    sync = predicted[SYNC]
    eligible = {s: t for s, t in predicted.items() if s != SYNC and t * (1 + MIN_GAIN) < sync}
    figures = ", ".join(f"{s.name} {t:.3g} s" for s, t in sorted(predicted.items(), key=lambda kv: kv[1]))
    if not eligible:
        return SYNC, f"no ACCO schedule is {MIN_GAIN:.0%} faster than ZeRO-1's step ({figures})"
    best = min(eligible.values())
    for schedule in PREFERENCE:
        if schedule in eligible and eligible[schedule] <= best * (1 + MARGIN):
            return schedule, (f"{sync / eligible[schedule]:.2f}x ZeRO-1's step rate, the preferred schedule within "
                              f"{MARGIN:.0%} of the fastest ({figures})")
    raise AssertionError("the fastest eligible schedule is in PREFERENCE")


@dataclass
class _Step:
    step: int
    step_s: float
    compute_s: float
    commit_round_s: float
    estimate_round_s: float | None


CHECK_EVERY = 5
"""After the decision, M / C is compared with the decision's every this many steps (the ranks' figures are averaged
by an all-reduce started at that boundary and read at the next one)."""
SWITCH_WITHIN = WINDOW + CHECK_EVERY + 4
"""After M / C moves by more than ``DRIFT``, a new decision comes within this many steps: the window fills with
the new figures (``WINDOW`` steps, each observed up to two steps late), the next check comes, and its averaged
figures arrive a step later."""
SUMMARY = ("step_s", "compute_s", "commit_round_s", "estimate_round_s")
"""What ``local_summary`` gives (medians of the window; NaN where missing), averaged over the ranks by the caller."""


@dataclass
class AutoSchedule:
    """The automatic choice over a run: trials, the decision, re-decisions when M / C moves.

    The optimizer calls ``boundary`` at every commit boundary (a committed step launched), ``observe`` when a
    step's figures are complete (its commit round finished), ``end_trial`` at a boundary ``trial_over`` names and
    ``check`` at the boundary after one ``check_due`` names, each with the ``local_summary`` of the boundary that
    named it, averaged over the ranks: the schedules then agree on every rank, whatever each measured.
    ``current`` is what the next step runs. The state round-trips through ``state_dict`` / ``load_state_dict`` so
    that a checkpoint resumes the decision.
    """

    trials: tuple[Schedule, ...] = TRIALS
    trial_steps: int = TRIAL_STEPS
    current: Schedule = TRIALS[0]
    chosen: Schedule | None = None
    since_switch: int = 0
    first_step: int = 1
    """The first step (1-based) of ``current``: its figures, and those before it, are not ``current``'s."""
    steps: list[_Step] = field(default_factory=list)
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratio_at_decision: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def boundary(self) -> None:
        """A step of ``current`` was launched."""
        self.since_switch += 1

    def observe(self, step: int, step_s: float, compute_s: float, commit_round_s: float,
                estimate_round_s: float | None) -> None:
        """The figures of committed step ``step`` (1-based) on this rank. The first step of a schedule (the
        pipeline restarts in it) and steps of an earlier schedule are left out."""
        if step > self.first_step:
            self.steps = (self.steps + [_Step(step, step_s, compute_s, commit_round_s, estimate_round_s)])[-WINDOW:]

    @property
    def final_trial(self) -> bool:
        """``current`` is the last trial: the decision follows it."""
        return self.chosen is None and self.current != SYNC and self.current == self.trials[-1]

    def trial_over(self) -> bool:
        """At this boundary a trial ends. Before another trial the caller waits for the commit in flight (the next
        trial restarts the pipeline anyway), so that the trial's last step is measured too; the last trial runs one
        step more instead and decides from the steps observed by then, so that a decision which keeps its schedule
        waits for nothing."""
        return self.chosen is None and self.since_switch >= self.trial_steps + self.final_trial

    def check_due(self, step: int) -> bool:
        """At this boundary M / C is compared with the decision's (``check``)."""
        return self.chosen is not None and self.since_switch > WINDOW and step % CHECK_EVERY == 0

    def local_summary(self) -> list[float]:
        """Medians of this rank's window of ``current`` (``SUMMARY`` order; NaN where nothing was measured)."""
        if not self.steps:
            return [math.nan] * len(SUMMARY)
        estimates = [s.estimate_round_s for s in self.steps if s.estimate_round_s is not None]
        return [statistics.median(getattr(s, k) for s in self.steps) for k in SUMMARY[:3]] + \
            [statistics.median(estimates) if estimates else math.nan]

    @staticmethod
    def _measured(summary: list[float]) -> Measured | None:
        if any(math.isnan(v) for v in summary[:3]):
            return None
        return Measured(*summary[:3], estimate_round_s=None if math.isnan(summary[3]) else summary[3])

    def _predict(self, fresh: Measured | None) -> dict[Schedule, float]:
        """Every candidate's step.

        At the end of the trials (``fresh`` None): measured where it was tried. An untried split is predicted by
        the model from the tried schedule of the same round (plain or int8): its C, M and M8 (on a shared core C
        depends on the round's own CPU), scaled by that schedule's measured step over its modelled one (the
        overheads the model leaves out); an untried round likewise from the other round's trial: int8 (below
        ``INT8_POINTLESS``) from 0.75's figures with M8 = M, plain (above ``PLAIN_EXPOSED``) from 0.75+int8's C and
        M (its C holds the quantizer's CPU: on a shared core that leans towards int8), or both from ZeRO-1's.
        Later (``fresh``: the schedule that runs now, at today's M / C): the model from today's C and M, the int8
        round scaled with M since it was measured (the link moved, the bytes did not), every prediction scaled by
        the running schedule's measured step over its modelled one.
        """
        def figures(m: dict[str, Any] | Measured | None) -> tuple[float, float, float] | None:
            if m is None:
                return None
            m = Measured(**m) if isinstance(m, dict) else m
            return m.compute_s, m.commit_round_s, m.estimate_round_s or m.commit_round_s

        if fresh is None:
            out = {Schedule.from_name(name): f["step_s"] for name, f in self.measured.items()}

            def calibrated(tried: Schedule, untried: tuple[Schedule, ...]) -> None:
                """The model from ``tried``'s figures, scaled by its measured step over its modelled one (an
                untried schedule does not win by the overheads the model leaves out)."""
                known = figures(self.measured.get(tried.name))
                if known is None:
                    return
                scale = out[tried] / max(predict_step_s(tried, *known), 1e-9)
                for schedule in untried:
                    out.setdefault(schedule, predict_step_s(schedule, *known) * scale)

            calibrated(Schedule(0.75), (Schedule(0.5),))
            calibrated(Schedule(0.75, "int8"), (Schedule(0.5, "int8"),))
            fallback = next((s for s in (Schedule(0.75), Schedule(0.75, "int8")) if s.name in self.measured), SYNC)
            calibrated(fallback, (SYNC, *PREFERENCE))
            return out
        c, m = fresh.compute_s, fresh.commit_round_s
        int8 = self.measured.get("0.75+int8") or self.measured.get("0.5+int8")
        if self.current.compression == "int8" and fresh.estimate_round_s is not None:
            m8 = fresh.estimate_round_s
        elif int8 is not None and int8.get("estimate_round_s") is not None:
            m8 = int8["estimate_round_s"] * m / max(int8["commit_round_s"], 1e-9)
        else:
            m8 = m
        scale = fresh.step_s / max(predict_step_s(self.current, c, m, m8), 1e-9)
        return {s: predict_step_s(s, c, m, m8) * scale for s in (SYNC, *PREFERENCE)}

    def _decide(self, step: int, fresh: Measured | None, why: str) -> Schedule:
        predicted = self._predict(fresh)
        schedule, reason = choose(predicted)
        base = fresh or Measured(**self.measured[self.current.name])
        self.ratio_at_decision = base.commit_round_s / max(base.compute_s, 1e-9)
        self.decisions.append({"step": step, "schedule": schedule.name, "why": why, "reason": reason,
                               "m_over_c": round(self.ratio_at_decision, 3),
                               "predicted_s": {s.name: round(t, 4) for s, t in predicted.items()},
                               "measured": {name: {k: None if v is None else round(v, 4) for k, v in f.items()}
                                            for name, f in self.measured.items()}})
        self.chosen = schedule
        return self._switch(schedule, step)

    def end_trial(self, step: int, summary: list[float]) -> Schedule:
        """At the boundary of step ``step`` where a trial ends: the next trial, or after the last the decision.
        ``summary``: ``local_summary`` averaged over the ranks."""
        measured = self._measured(summary)
        if measured is not None:
            self.measured[self.current.name] = asdict(measured)
        if self.current == SYNC and measured is not None:  # ZeRO-1's step measured C and M: skip hopeless trials
            ratio = measured.commit_round_s / max(measured.compute_s, 1e-9)
            self.trials = tuple(t for t in self.trials if not (
                (t.compression == "none" and t != SYNC and ratio > PLAIN_EXPOSED)
                or (t.compression == "int8" and ratio < INT8_POINTLESS)))
        index = self.trials.index(self.current) if self.current in self.trials else len(self.trials) - 1
        if index + 1 < len(self.trials):
            return self._switch(self.trials[index + 1], step)
        if not self.measured:  # nothing measured (steps too short to observe): keep the preferred schedule
            self.chosen = PREFERENCE[0]
            return self._switch(PREFERENCE[0], step)
        return self._decide(step, None, f"after trying {', '.join(t.name for t in self.trials)}")

    def check(self, step: int, summary: list[float]) -> Schedule:
        """At a ``check_due`` boundary: decide again if M / C moved by more than ``DRIFT`` since the decision."""
        fresh = self._measured(summary)
        if fresh is None:
            return self.current
        ratio = fresh.commit_round_s / max(fresh.compute_s, 1e-9)
        if self.ratio_at_decision is None:  # the first full window of a new schedule: the baseline for drift
            self.ratio_at_decision = ratio
            return self.current
        if abs(math.log(max(ratio, 1e-9) / max(self.ratio_at_decision, 1e-9))) <= math.log(1 + DRIFT) or \
                abs(ratio - self.ratio_at_decision) <= DRIFT_ABS:
            return self.current
        self.measured[self.current.name] = asdict(fresh)
        return self._decide(step, fresh, f"M/C moved from {self.ratio_at_decision:.2f} to {ratio:.2f}")

    def _switch(self, schedule: Schedule, step: int) -> Schedule:
        if schedule != self.current:
            self.current = schedule
            self.since_switch = 0
            self.first_step = step + 1
            self.steps = []
            if self.chosen is not None:
                self.ratio_at_decision = None  # measured again under the new schedule (its C differs)
        return schedule

    def state_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the state (for checkpoints)."""
        return {"current": self.current.name, "chosen": self.chosen.name if self.chosen else None,
                "since_switch": self.since_switch, "first_step": self.first_step,
                "steps": [asdict(s) for s in self.steps], "measured": self.measured,
                "ratio_at_decision": self.ratio_at_decision, "decisions": self.decisions,
                "trials": [t.name for t in self.trials], "trial_steps": self.trial_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output."""
        self.trials = tuple(Schedule.from_name(n) for n in state["trials"])
        self.trial_steps = state["trial_steps"]
        self.current = Schedule.from_name(state["current"])
        self.chosen = Schedule.from_name(state["chosen"]) if state["chosen"] else None
        self.since_switch = state["since_switch"]
        self.first_step = state["first_step"]
        self.steps = [_Step(**s) for s in state["steps"]]
        self.measured = state["measured"]
        self.ratio_at_decision = state["ratio_at_decision"]
        self.decisions = state["decisions"]


class Agreement:
    """An all-reduce of the ranks' figures in flight (``work``, on ``tensor``): ``values`` waits for it and returns
    their mean. ``finished`` makes one from the mean itself (a checkpoint saved it)."""

    def __init__(self, work: Any, tensor: Any, world_size: int) -> None:
        self._work, self._tensor, self._world = work, tensor, world_size
        self._mean: list[float] | None = None

    @classmethod
    def finished(cls, mean: list[float]) -> Agreement:
        """An agreement whose mean is known."""
        agreement = cls(None, None, 1)
        agreement._mean = list(mean)
        return agreement

    def values(self) -> list[float]:
        """The figures averaged over the ranks (waits for the all-reduce the first time)."""
        if self._mean is None:
            self._work.wait()
            self._mean = (self._tensor / self._world).tolist()
        return self._mean


class ScheduleSwitching:
    """``AccoZeroOptimizer``'s side of the automatic schedule: at a commit boundary, end a trial or check M / C
    (``_auto_boundary``), and switch schedules through a waited commit (``_drain_commit``, ``_apply_schedule``).
    Uses the optimizer's ``_auto`` (an ``AutoSchedule``), ``_round``, ``_in_flight``, ``_step``, ``metrics``."""

    _auto: AutoSchedule | None
    _schedule: Schedule | None
    _sync_schedule: bool
    _agreement: Agreement | None = None
    """A check's all-reduce in flight (``Agreement``), read at the next commit boundary."""

    def _apply_schedule(self, schedule: Schedule) -> None:
        """Run ``schedule`` from the next step on (at a step boundary with no round in flight)."""
        self._schedule = schedule
        self._sync_schedule = schedule.estimate_fraction is None
        if not self._sync_schedule:
            from deepspeed_acco.pipeline import RoundKind
            from deepspeed_acco.split import split_micro_batches

            estimate_half, commit_half = split_micro_batches(self._ga, schedule.estimate_fraction)
            self._half_micro = {RoundKind.ESTIMATE: estimate_half, RoundKind.COMMIT: commit_half}
        self._round.compression = schedule.compression
        self._compress = schedule.compression != "none"

    def _drain_commit(self) -> None:
        """Wait for the commit just launched and load it: the pipeline restarts from the committed weights."""
        if self._in_flight is not None:
            self._finish_round(self._wait_in_flight())
            self._half_start = time.perf_counter()

    def _agree(self, values: list[float]) -> Agreement:
        """Start averaging ``values`` over the data-parallel ranks (one all-reduce on the engine's group, not
        ACCO's), so that every rank takes the same decision from its own measurements."""
        import torch
        from deepspeed import comm as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.bit16_groups_flat[0].device)
        return Agreement(dist.all_reduce(tensor, group=self.dp_process_group, async_op=True), tensor, self._world)

    def _auto_boundary(self) -> None:
        """At a commit boundary: end a trial, or check M / C, and switch schedules when the choice changes."""
        auto = self._auto
        assert auto is not None, "only with the automatic schedule"
        auto.boundary()
        decided = len(auto.decisions)
        if auto.trial_over():
            if not auto.final_trial:
                self._drain_commit()  # the next trial restarts the pipeline anyway: measure this one's last step
            chosen = auto.end_trial(self._step, self._agree(auto.local_summary()).values())
        elif self._agreement is not None:
            agreement, self._agreement = self._agreement, None
            chosen = auto.check(self._step, agreement.values())
        elif auto.check_due(self._step):
            # Not waited for here: on a busy link this small all-reduce queues behind the commit round in flight
            # (60-100 ms a check on the tiny model at M/C 0.8, 3-8 % of its step rate); it is read a step later.
            self._agreement = self._agree(auto.local_summary())
            return
        else:
            return
        if chosen != self._schedule:
            self._drain_commit()
            self._apply_schedule(chosen)
        if len(auto.decisions) > decided:
            decision = auto.decisions[-1]
            self.metrics.open(self._step).decision = decision
            if self._rank == 0:
                from deepspeed_acco import log

                log.info(f"ACCO schedule from step {decision['step'] + 1}: {decision['schedule']} "
                            f"({decision['why']}; M/C {decision['m_over_c']:.2f}; {decision['reason']})"[:300])
