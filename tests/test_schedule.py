"""The automatic schedule's decision logic (``deepspeed_acco/schedule.py``) on synthetic measurements.

- its step model is the planner's (``deepspeed_acco.plan.step_time_s``) for ZeRO-1, plain ACCO and the int8
  estimate at both splits;
- ``choose`` picks the fastest schedule the planner predicts, or a more preferred one within ``MARGIN`` of it,
  and ZeRO-1's step unless an ACCO schedule beats it by ``MIN_GAIN``, across M / C from 0 to 4;
- ``AutoSchedule`` tries sync, 0.75 and 0.75+int8 for ``TRIAL_STEPS`` steps each (the last a step more), decides
  at step 10 at most, keeps the
  decision while M / C holds, decides again within ``SWITCH_WITHIN`` steps when the link slows, and a
  state round-trip (a checkpoint) resumes the same decisions.
"""

from __future__ import annotations

import copy

import pytest

from deepspeed_acco.plan import Timing, step_time_s
from deepspeed_acco.schedule import (
    MARGIN,
    MIN_GAIN,
    PREFERENCE,
    SWITCH_WITHIN,
    SYNC,
    TRIAL_STEPS,
    TRIALS,
    AutoSchedule,
    Schedule,
    choose,
    predict_step_s,
)

GA = 8


def _planner(schedule: Schedule, c: float, m: float, m8: float) -> float:
    if schedule == SYNC:
        return step_time_s("zero1", Timing(c, m, m8, GA))[0]
    method = "acco_int8" if schedule.compression == "int8" else "acco"
    return step_time_s(method, Timing(c, m, m8, GA, estimate_fraction=schedule.estimate_fraction))[0]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0, 2.0, 4.0])
def test_model_is_the_planners(ratio: float) -> None:
    """Every candidate's predicted step equals the planner's for the same C, M and M8."""
    c, m = 2.0, 2.0 * ratio
    m8 = 0.3 * m
    for schedule in (SYNC, *PREFERENCE):
        assert predict_step_s(schedule, c, m, m8) == pytest.approx(_planner(schedule, c, m, m8))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.2, 2.0, 4.0])
@pytest.mark.parametrize("int8_share", [0.3, 1.2])
def test_choice_follows_the_planner(ratio: float, int8_share: float) -> None:
    """The choice is ZeRO-1's step unless an ACCO schedule is predicted MIN_GAIN faster; otherwise the first of
    PREFERENCE within MARGIN of the fastest; never an ACCO schedule slower than ZeRO-1's step."""
    c, m = 1.0, ratio
    m8 = int8_share * m  # 1.2: an int8 round slower than a full one (many ranks per node, a slow quantizer)
    predicted = {s: _planner(s, c, m, m8) for s in (SYNC, *PREFERENCE)}
    chosen, reason = choose(predicted)
    fastest_acco = min(predicted[s] for s in PREFERENCE)
    if fastest_acco * (1 + MIN_GAIN) >= predicted[SYNC]:
        assert chosen == SYNC and "ZeRO-1" in reason
        return
    assert chosen in PREFERENCE and predicted[chosen] <= fastest_acco * (1 + MARGIN)
    assert predicted[chosen] < predicted[SYNC]
    assert all(predicted[s] > fastest_acco * (1 + MARGIN) for s in PREFERENCE[:PREFERENCE.index(chosen)])


def test_choices_across_links() -> None:
    """What the rules give on a fast, a medium and a slow link (C = 1 s, M8 = 0.3 M)."""
    def pick(m: float) -> str:
        return choose({s: _planner(s, 1.0, m, 0.3 * m) for s in (SYNC, *PREFERENCE)})[0].name

    assert pick(0.0) == "sync"            # no link to hide: ACCO buys nothing
    assert pick(0.2) == "0.75"            # both rounds fit: the preferred schedule
    assert pick(0.4) == "0.75+int8"       # plain 0.75 exposes its estimate round above M/C 0.25
    assert pick(0.6) == "0.75+int8"
    assert pick(4.0) == "sync"            # the exposed commit round dominates every ACCO schedule


def _run(auto: AutoSchedule, steps: range, link: dict[int, tuple[float, float, float]]) -> list[str]:
    """Drive ``auto`` as the optimizer does, every step measuring the model's figures of the schedule it runs
    (C, M, M8 from ``link``: the first entry whose key is <= the step)."""
    ran = []
    for step in steps:
        c, m, m8 = next(v for k, v in sorted(link.items(), reverse=True) if k <= step)
        schedule = auto.current
        ran.append(schedule.name)
        auto.boundary()
        estimate = None if schedule == SYNC else m8 if schedule.compression == "int8" else m
        auto.observe(step, predict_step_s(schedule, c, m, m8), c, m, estimate)
        if auto.trial_over():
            auto.end_trial(step, auto.local_summary())
        elif auto.check_due(step):
            auto.check(step, auto.local_summary())
    return ran


def test_trials_decision_and_a_slower_link() -> None:
    """Trials in order (M/C 0.2 after ZeRO-1's step: every trial, the last a step longer), the decision at step 10
    (0.75 on that link), no
    change while the link holds, a new decision within SWITCH_WITHIN steps once the link slows (to the int8
    estimate), and a checkpoint of the state resumes identically."""
    auto = AutoSchedule()
    fast, slow = (1.0, 0.2, 0.06), (1.0, 0.6, 0.18)
    ran = _run(auto, range(1, 31), {1: fast})
    trial_end = TRIAL_STEPS * len(TRIALS) + 1
    assert ran[:trial_end] == [t.name for t in TRIALS for _ in range(TRIAL_STEPS)] + [TRIALS[-1].name]
    assert auto.decisions[0]["step"] == trial_end == 10
    assert auto.chosen == Schedule(0.75) and ran[trial_end:] == ["0.75"] * (30 - trial_end)
    assert len(auto.decisions) == 1
    saved = copy.deepcopy(auto.state_dict())
    ran = _run(auto, range(31, 61), {31: slow})
    switch = ran.index("0.75+int8")
    assert 0 < switch <= SWITCH_WITHIN
    assert auto.decisions[-1]["schedule"] == "0.75+int8" and "M/C moved" in auto.decisions[-1]["why"]
    assert set(ran[switch:]) == {"0.75+int8"}
    resumed = AutoSchedule()
    resumed.load_state_dict(saved)
    assert _run(resumed, range(31, 61), {31: slow}) == ran and resumed.decisions == auto.decisions


@pytest.mark.parametrize("ratio,trials,chosen", [(0.1, ["sync", "0.75"], "0.75"),
                                                 (0.5, ["sync", "0.75+int8"], "0.75+int8"),
                                                 (2.0, ["sync", "0.75+int8"], "0.75+int8"),
                                                 (5.0, ["sync", "0.75+int8"], "sync")])
def test_hopeless_trials_are_skipped(ratio: float, trials: list[str], chosen: str) -> None:
    """Once ZeRO-1's step has measured M/C: no plain ACCO trial above M/C 0.3 (0.75 exposes its full estimate round
    past 0.25; 0.5 is predicted from the int8 trial), no int8 trial below 0.2 (0.75 hides both full rounds); the
    last remaining trial runs a step more and the decision comes after it."""
    auto = AutoSchedule()
    ran = _run(auto, range(1, 16), {1: (1.0, ratio, 0.3 * ratio)})
    expected = [t for t in trials for _ in range(TRIAL_STEPS)] + [trials[-1]]
    assert ran[:len(expected)] == expected
    assert auto.decisions[0]["step"] == len(expected) and auto.chosen.name == chosen


def test_untried_schedule_does_not_win_by_the_models_omissions() -> None:
    """On a fast link (no int8 trial), the untried 0.75+int8 is predicted from 0.75's figures scaled by 0.75's
    measured step over its modelled one: it cannot beat the measured 0.75 by the overheads the model leaves out
    (seen in the main job: 0.75 measured 0.296 s, 0.75+int8 modelled 0.292 s and chosen over ZeRO-1's 0.301 s)."""
    auto = AutoSchedule()
    for step, summary in ((3, [0.301, 0.27, 0.031, float("nan")]), (6, [0.296, 0.275, 0.043, 0.017])):
        for _ in range(TRIAL_STEPS):
            auto.boundary()
        auto.end_trial(step, summary)
    decision = auto.decisions[0]
    print(f"DECISION {decision['schedule']}: {decision['reason']}")
    assert decision["why"] == "after trying sync, 0.75"
    assert decision["predicted_s"]["0.75+int8"] >= decision["predicted_s"]["0.75"] == 0.296
    assert auto.chosen == SYNC


def test_noise_does_not_switch() -> None:
    """M / C wobbling by less than DRIFT after the decision takes no new decision."""
    auto = AutoSchedule()
    link = {1: (1.0, 0.1, 0.03)}
    for k, factor in enumerate((1.1, 0.9, 1.2, 0.85, 1.15)):
        link[20 + 5 * k] = (1.0, 0.1 * factor, 0.03 * factor)
    _run(auto, range(1, 60), link)
    assert len(auto.decisions) == 1


def test_first_step_after_a_switch_is_left_out() -> None:
    """The restart step's figures do not enter the schedule's window."""
    auto = AutoSchedule()
    auto.boundary()
    auto.observe(1, 99.0, 99.0, 99.0, None)
    auto.boundary()
    auto.observe(2, 1.0, 0.9, 0.1, None)
    assert auto.local_summary()[:3] == [1.0, 0.9, 0.1]


def test_small_ratios_do_not_switch() -> None:
    """At M / C below 0.1 a factor of 1.5 is noise (every schedule is within noise of the others): no decision."""
    auto = AutoSchedule()
    _run(auto, range(1, 60), {1: (1.0, 0.04, 0.012), 25: (1.0, 0.06, 0.018), 40: (1.0, 0.03, 0.009)})
    assert len(auto.decisions) == 1
