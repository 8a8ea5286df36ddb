"""Gloo runs through the public API, checked against the single-process reference.

Jobs run in groups, one spawn per group, each group in the same processes (spawning costs ~8 s):
the fp32 jobs at world size 2, the low-precision jobs (bf16, fp16) at world size 2, and the ACCO,
DPU and adaptive schedules at world sizes 3 (flat buffers padded: 212 parameters, 216 in the flat)
and 4. A job that raises fails only the tests that read it, with its traceback
(``dist_utils.job_result``). What it localizes: the ACCO and DPU schedules, the disabled path
(DeepSpeed's own ZeRO-1), the LR scheduler stepping once per commit, clipping in both rounds,
the estimate rollback, adaptive accumulation with a really slowed rank, bf16 and fp16 paths.
fp16 jobs run on every CPU: where DeepSpeed's probe refuses fp16 (no mkldnn fp16 kernels), the
ranks override it (``dist_utils.allow_cpu_fp16``, see the README's Tests section).
Run alone with ``python -m pytest tests/test_parity.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.acco_reference import Simulator, reference_train
from tests.dist_utils import JobFailure, job_result, spawn_jobs
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    PAPER_ESTIMATE_SHIFT,
    base_config,
    loss_fn,
    make_batches,
    make_model,
)

WORLD, GA, STEPS, LR, SEED = 2, 4, 3, 1e-2, 0
WIDE_WORLDS = (3, 4)
TOL = 1e-5
SCHED = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01, "warmup_num_steps": 2,
                                        "warmup_type": "linear"}}


def _acco(**block: Any) -> dict[str, Any]:
    return {"acco": {"enabled": True, **block}}


ADAPTIVE = (base_config(GA, LR, **_acco(adaptive_accumulation=True, max_micro_batches_per_round=6)),
            STEPS, SEED, {"slow_s": 0.15})
JOBS: dict[str, tuple[Any, ...]] = {
    "plain": (base_config(GA, LR), STEPS, SEED, {"plain_deepspeed": True}),
    "disabled": (base_config(GA, LR, acco={"enabled": False}), STEPS, SEED),
    "acco": (base_config(GA, LR, **_acco()), STEPS, SEED, {"check_rollback": True}),
    "acco_install": (base_config(GA, LR, **_acco()), STEPS, SEED, {"use_install": True}),
    "acco_prescaled": (base_config(GA, LR, **_acco()), STEPS, SEED, {"prescaled": True}),
    "dpu": (base_config(GA, LR, **_acco(mode="dpu")), STEPS, SEED),
    "acco_sched": (base_config(GA, LR, scheduler=SCHED, **_acco()), 4, SEED),
    "acco_clip": (base_config(GA, LR, gradient_clipping=0.05, **_acco()), STEPS, SEED),
    "adaptive": ADAPTIVE,
    "adaptive_sqrt": (base_config(GA, LR, scheduler=SCHED, **_acco(adaptive_accumulation=True, lr_scaling="sqrt",
                                                                   max_micro_batches_per_round=6)),
                      4, SEED, {"slow_s": 0.15}),
    # The caller ends steps early (set_gradient_accumulation_boundary(True) + step): in the commit half, at the
    # estimate boundary and inside the estimate half ({step: micro-batches of that step}); equal halves (2 + 2),
    # since the default split's commit half (1 micro-batch) cannot be ended early.
    "forced_acco": (base_config(GA, LR, **_acco(estimate_fraction=0.5)), 5, SEED,
                    {"force_in_step": {1: 3, 2: 2, 3: 1}}),
    "forced_acco_prescaled": (base_config(GA, LR, **_acco()), 5, SEED, {"force_in_step": {3: 1}, "prescaled": True}),
    "forced_dpu": (base_config(GA, LR, **_acco(mode="dpu")), 4, SEED, {"force_in_step": {1: 3, 2: 1}}),
    # acco.estimate="paper" (the default is "extrapolated", shifted from where the last half was computed; a
    # step ended inside an estimate half, step 2, restarts the pipeline and the next estimate has no offset).
    "paper": (base_config(GA, LR, **_acco(estimate="paper")), 5, SEED),
    "forced_paper": (base_config(GA, LR, **_acco(estimate="paper")), 5, SEED, {"force_in_step": {1: 3, 2: 1}}),
    "forced_adaptive": (ADAPTIVE[0], 5, SEED, {"slow_s": 0.15, "force_in_step": {1: 3, 2: 4, 3: 1}}),
    # acco.sync_steps: the first two steps are ZeRO-1's, then ACCO starts; ACCO ends the steps, or the caller does
    # (every step at GA, as the HF Trainer does, and a short step among the synchronous ones).
    "acco_sync": (base_config(GA, LR, **_acco(sync_steps=2)), 5, SEED),
    "acco_sync_caller": (base_config(GA, LR, **_acco(sync_steps=2)), 5, SEED,
                         {"force_in_step": {0: GA, 1: 2, 2: GA, 3: GA, 4: GA}}),
    "acco_sync_sqrt": (base_config(GA, LR, scheduler=SCHED, **_acco(sync_steps=2, adaptive_accumulation=True,
                                                                    lr_scaling="sqrt", max_micro_batches_per_round=6)),
                       4, SEED, {"slow_s": 0.15}),
    # An odd GA: the default split makes 2 + 1 of GA 3 (no equal halves exist).
    "acco_ga3": (base_config(3, LR, **_acco()), STEPS, SEED),
}
LOW_PRECISION_JOBS: dict[str, tuple[Any, ...]] = {
    "bf16": (base_config(GA, 3e-2, bf16={"enabled": True}, **_acco()), 8, SEED, {"dtype": "bf16", "repeat": 2}),
    "fp16_overflow": (base_config(GA, LR, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
                                  **_acco()), 4, SEED, {"dtype": "fp16", "inf_at": 7}),
}
WIDE_JOBS: dict[str, tuple[Any, ...]] = {
    "acco": (base_config(GA, LR, **_acco()), STEPS, SEED, {"check_rollback": True}),
    "dpu": (base_config(GA, LR, **_acco(mode="dpu")), STEPS, SEED),
    "adaptive": ADAPTIVE,
}


@pytest.fixture(scope="module")
def monitor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitor")


@pytest.fixture(scope="module")
def runs(monitor_dir: Path) -> dict[str, list[Any]]:
    jobs = dict(JOBS)
    # Refused at initialize (GA 1 in acco mode), between two jobs that must still run: see test_refused_job_*.
    jobs["refused"] = (base_config(1, LR, **_acco()), STEPS, SEED)
    jobs["monitor"] = (base_config(GA, LR, csv_monitor={"enabled": True, "output_path": str(monitor_dir),
                                                        "job_name": "acco"}, **_acco()), STEPS, SEED)
    return spawn_jobs(WORLD, jobs)


@pytest.fixture(scope="module")
def low_precision_runs() -> dict[str, list[Any]]:
    return spawn_jobs(WORLD, LOW_PRECISION_JOBS, timeout_s=200)


@pytest.fixture(scope="module", params=WIDE_WORLDS, ids=lambda w: f"world{w}")
def wide_runs(request: pytest.FixtureRequest) -> tuple[int, dict[str, list[Any]]]:
    return request.param, spawn_jobs(request.param, WIDE_JOBS, timeout_s=280)


def _reference(mode: str, steps: int = STEPS, world: int = WORLD, ga: int = GA, **kw: Any) -> list[torch.Tensor]:
    batches = make_batches(SEED, world, steps * ga * 6 + 8)
    if mode == "acco":
        kw.setdefault("estimate_shift", DEFAULT_ESTIMATE_SHIFT)
        kw.setdefault("estimate_micro_batches", DEFAULT_ESTIMATE_HALF[ga])
    out = reference_train(make_model(SEED), batches, loss_fn, mode=mode, num_steps=steps,
                          gradient_accumulation_steps=ga, lr=kw.pop("lr", LR), weight_decay=0.01,
                          max_grad_norm=kw.pop("max_grad_norm", DEEPSPEED_DEFAULT_CLIP), **kw)
    return list(out.values())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _ranks_identical(job: list[dict[str, Any]]) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(job[0]["params"], other["params"])) for other in job[1:])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job,mode", [("acco", "acco"), ("dpu", "dpu"), ("disabled", "sync"), ("plain", "sync")])
def test_matches_reference(runs: dict[str, Any], job: str, mode: str) -> None:
    """Final parameters equal the independent reference to fp32 rounding, identically on both ranks."""
    diff = _max_diff(job_result(runs, job)[0]["params"], _reference(mode))
    print(f"PARITY {job} vs reference {mode}: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(job_result(runs, job))
    assert job_result(runs, job)[0]["global_steps"] == STEPS


def test_engine_classes(runs: dict[str, Any]) -> None:
    """ACCO builds AccoEngine/AccoZeroOptimizer; without an enabled block it is DeepSpeed's own classes."""
    acco, disabled = job_result(runs, "acco")[0], job_result(runs, "disabled")[0]
    assert (acco["engine"], acco["optimizer"]) == ("AccoEngine", "AccoZeroOptimizer")
    assert (disabled["engine"], disabled["optimizer"]) == ("DeepSpeedEngine", "DeepSpeedZeroOptimizer")


def test_disabled_is_bitwise_deepspeed(runs: dict[str, Any]) -> None:
    """A disabled block gives exactly the parameters of plain deepspeed.initialize."""
    disabled, plain = job_result(runs, "disabled")[0], job_result(runs, "plain")[0]
    assert all(torch.equal(a, b) for a, b in zip(disabled["params"], plain["params"]))


def test_install_path_equals_initialize(runs: dict[str, Any]) -> None:
    """install() + plain deepspeed.initialize gives the same ACCO run as deepspeed_acco.initialize."""
    assert job_result(runs, "acco_install")[0]["optimizer"] == "AccoZeroOptimizer"
    installed, acco = job_result(runs, "acco_install")[0], job_result(runs, "acco")[0]
    assert all(torch.equal(a, b) for a, b in zip(installed["params"], acco["params"]))


def test_prescaled_loss_equals_default(runs: dict[str, Any]) -> None:
    """``backward(loss / GA, scale_wrt_gas=False)`` (what the HF Trainer calls) gives the default run's parameters."""
    diff = _max_diff(job_result(runs, "acco_prescaled")[0]["params"], job_result(runs, "acco")[0]["params"])
    print(f"PARITY acco prescaled loss vs default: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(job_result(runs, "acco_prescaled"))


def test_modes_differ(runs: dict[str, Any]) -> None:
    """acco, dpu and synchronous ZeRO-1 give different parameters, so parity can tell them apart."""
    acco, dpu, sync = (job_result(runs, j)[0]["params"] for j in ("acco", "dpu", "disabled"))
    for a, b in ((acco, dpu), (acco, sync), (dpu, sync)):
        assert _max_diff(a, b) > 100 * TOL


def test_acco_micro_batches_consumed(runs: dict[str, Any]) -> None:
    """Each committed step consumes GA micro-batches per rank, as ZeRO-1 does: an estimate round of 3 (the default
    estimate_fraction 0.75 of GA 4) and a commit round of 1."""
    run = job_result(runs, "acco")[0]
    assert run["micro_batches"] == STEPS * GA
    half = DEFAULT_ESTIMATE_HALF[GA]
    assert [m["round_counts"] for m in run["metrics"]] == [[[half] * WORLD, [GA - half] * WORLD]] * STEPS


def test_odd_accumulation_matches_reference(runs: dict[str, Any]) -> None:
    """GA 3 (odd, accepted since the split need not be equal) splits 2 + 1 and matches the reference run with an
    estimate half of 2 micro-batches; consumed as ZeRO-1 would: 3 per step."""
    run = job_result(runs, "acco_ga3")
    diff = _max_diff(run[0]["params"], _reference("acco", ga=3))
    print(f"PARITY acco GA 3 (2 + 1) vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(run)
    assert [m["round_counts"] for m in run[0]["metrics"]] == [[[2] * WORLD, [1] * WORLD]] * STEPS
    assert run[0]["micro_batches"] == STEPS * 3


SYNC_ROUNDS = {
    "acco_sync": [[[GA] * WORLD]] * 2 + [[[3] * WORLD, [1] * WORLD]] * 3,
    "acco_sync_caller": [[[GA] * WORLD], [[2] * WORLD]] + [[[3] * WORLD, [1] * WORLD]] * 3,
}


@pytest.mark.parametrize("job", ["acco_sync", "acco_sync_caller", "acco_sync_sqrt"])
def test_sync_steps_match_reference(runs: dict[str, Any], job: str) -> None:
    """acco.sync_steps=2: two ZeRO-1 steps (one round of GA micro-batches at theta_t, the caller's short step
    included), then ACCO from the committed weights; equal to the reference's ``sync_steps`` to fp32 rounding,
    with ACCO or the caller ending the steps, and with adaptive accumulation under the sqrt LR rule (a
    synchronous step's LR factor is 1: its nominal batch is the whole step). That the reference's synchronous steps
    are its ZeRO-1 steps: ``tests/test_reference.py``."""
    result = job_result(runs, job)
    rounds = [m["round_counts"] for m in result[0]["metrics"]]
    print(f"SYNC {job}: rounds per step {rounds}")
    if job in SYNC_ROUNDS:
        assert rounds == SYNC_ROUNDS[job]
        expected = _reference("acco", steps=len(rounds), step_rounds=rounds, sync_steps=2)
    else:
        assert rounds[:2] == [[[GA] * WORLD]] * 2
        factors = [f for m in result[0]["metrics"] for f in m["round_lr_factors"]]
        assert factors[:2] == [1.0, 1.0]
        expected = _reference("acco", steps=len(rounds), step_rounds=rounds, sync_steps=2, lr=_sched_lr,
                              lr_scaling="sqrt")
    diff = _max_diff(result[0]["params"], expected)
    print(f"PARITY {job} vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(result)


def test_estimate_rollback_is_exact(runs: dict[str, Any]) -> None:
    """After every estimate round the shard's optimizer state and master weights are bit-identical."""
    for rank in range(WORLD):
        checks = job_result(runs, "acco")[rank]["rollback_checks"]
        assert len(checks) == STEPS and all(checks), checks


def _sched_lr(t: int) -> float:
    """SCHED's LR at committed step t (DeepSpeed's WarmupLR, linear)."""
    return 0.002 + 0.008 * min(1.0, max(0, t - 1) / 2)


def test_scheduler_steps_once_per_commit(runs: dict[str, Any]) -> None:
    """WarmupLR steps once per committed step; both rounds of step t use lr(t)."""
    diff = _max_diff(job_result(runs, "acco_sched")[0]["params"], _reference("acco", steps=4, lr=_sched_lr))
    print(f"PARITY acco+WarmupLR: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert job_result(runs, "acco_sched")[0]["global_steps"] == 4


def test_clipping_applies_in_both_rounds(runs: dict[str, Any]) -> None:
    """gradient_clipping changes the update exactly as the reference clips both rounds."""
    clipped = job_result(runs, "acco_clip")[0]["params"]
    diff = _max_diff(clipped, _reference("acco", max_grad_norm=0.05))
    print(f"PARITY acco+clip: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _max_diff(clipped, job_result(runs, "acco")[0]["params"]) > 100 * TOL
    assert all(m["grad_norm"] > 0.05 for m in job_result(runs, "acco_clip")[0]["metrics"])


def test_adaptive_accumulation(runs: dict[str, Any]) -> None:
    """The fast rank contributes more micro-batches; the update equals the reference at the recorded counts."""
    run0, run1 = job_result(runs, "adaptive")
    counts = [c for m in run0["metrics"] for c in m["round_counts"]]
    assert counts == [c for m in run1["metrics"] for c in m["round_counts"]]
    fast, slow = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"ADAPTIVE round counts {counts}: fast rank {fast}, slow rank {slow}")
    assert fast > slow
    half = DEFAULT_ESTIMATE_HALF[GA]  # each half's minimum: estimate rounds 3, commit rounds 1; the cap is 6
    assert all(c[1] >= half for c in counts[0::2]) and all(c[1] >= GA - half for c in counts[1::2])
    assert all(c[0] <= 6 for c in counts)
    diff = _max_diff(run0["params"], _reference("acco", counts=counts))
    print(f"PARITY adaptive: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(job_result(runs, "adaptive"))


def test_adaptive_sqrt_lr_scaling(runs: dict[str, Any]) -> None:
    """``lr_scaling="sqrt"``: each round's LR is the scheduler's times sqrt(its batch over the nominal batch);
    the factors and the parameters equal the reference's at the recorded counts."""
    run0, run1 = job_result(runs, "adaptive_sqrt")
    counts = [c for m in run0["metrics"] for c in m["round_counts"]]
    assert counts == [c for m in run1["metrics"] for c in m["round_counts"]]
    factors = [f for m in run0["metrics"] for f in m["round_lr_factors"]]
    expected: list[float] = []
    diff = _max_diff(run0["params"], _reference("acco", steps=4, counts=counts, lr=_sched_lr, lr_scaling="sqrt",
                                                lr_factors=expected))
    print(f"ADAPTIVE sqrt: round counts {counts}, LR factors {[round(f, 4) for f in factors]}; "
          f"PARITY max |diff| = {diff:.3e}")
    assert factors == pytest.approx(expected, rel=1e-12)
    assert max(factors) > 1.0, "a round with more than the nominal micro-batches ran at a higher LR"
    assert diff < TOL
    unscaled = _reference("acco", steps=4, counts=counts, lr=_sched_lr)
    assert _max_diff(run0["params"], unscaled) > 100 * TOL, "the scaling changed the trajectory"
    assert _ranks_identical(job_result(runs, "adaptive_sqrt"))


def test_bf16_trains(low_precision_runs: dict[str, Any]) -> None:
    """bf16 with ACCO: the loss falls and the ranks stay identical."""
    job = job_result(low_precision_runs, "bf16")
    losses = job[0]["losses"]
    first, last = sum(losses[:GA]) / GA, sum(losses[-GA:]) / GA
    print(f"BF16 loss {first:.4f} -> {last:.4f}")
    assert last < 0.9 * first
    assert _ranks_identical(job)


def test_fp16_overflow_skips_step_on_all_ranks(low_precision_runs: dict[str, Any]) -> None:
    """An inf on one rank makes every rank skip that step and back off the loss scale (fp16 on every CPU)."""
    job = job_result(low_precision_runs, "fp16_overflow")
    run0, run1 = job
    flags0 = [m["overflow"] for m in run0["metrics"]]
    flags1 = [m["overflow"] for m in run1["metrics"]]
    print(f"FP16 overflow flags per step: rank0 {flags0} rank1 {flags1}; loss scale {run0['loss_scale']}; "
          f"DeepSpeed's CPU fp16 probe overridden: {run0['fp16_forced']}")
    assert flags0 == flags1 and any(flags0) and not all(flags0)
    assert run0["loss_scale"] < 2**8 and run0["loss_scale"] == run1["loss_scale"]
    assert _ranks_identical(job)
    assert all(torch.isfinite(p).all() for p in run0["params"])
    assert run0["param_dtype"] == "torch.float16", "the engine really trained in fp16"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["acco", "dpu", "adaptive"])
def test_matches_reference_at_wider_world(wide_runs: tuple[int, dict[str, list[Any]]], mode: str) -> None:
    """At world sizes 3 (padded flat buffers) and 4: acco, dpu and adaptive accumulation equal the reference."""
    world, wide = wide_runs
    job = job_result(wide, mode)
    kw: dict[str, Any] = {}
    if mode == "adaptive":
        counts = [c for m in job[0]["metrics"] for c in m["round_counts"]]
        assert all(counts == [c for m in other["metrics"] for c in m["round_counts"]] for other in job[1:])
        slow = sum(c[1] for c in counts)
        fast = [sum(c[r] for c in counts) for r in range(world) if r != 1]
        print(f"ADAPTIVE world {world} round counts {counts}: slowed rank 1 {slow}, others {fast}")
        assert all(f > slow for f in fast)
        kw["counts"] = counts
    diff = _max_diff(job[0]["params"], _reference("acco" if mode == "adaptive" else mode, world=world, **kw))
    print(f"PARITY world {world} {mode} vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(job)
    assert job[0]["global_steps"] == STEPS
    if mode == "acco":
        assert all(all(r["rollback_checks"]) and len(r["rollback_checks"]) == STEPS for r in job)


def test_metrics_recorded_and_sent_to_monitor(runs: dict[str, Any], monitor_dir: Path) -> None:
    """Per committed step: figures readable from Python, and written to DeepSpeed's csv monitor."""
    records = job_result(runs, "monitor")[0]["metrics"]
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records:
        assert m["commit_round_s"] > 0 and m["estimate_round_s"] > 0 and m["compute_s"] > 0
        assert m["exposed_wait_s"] >= 0 and m["bytes_communicated"] > 0 and m["micro_batches"] == GA * WORLD
    written = {p.name for p in monitor_dir.rglob("*.csv")}
    print("monitor files:", sorted(written))
    assert any("exposed_wait_s" in name for name in written) and any("commit_round_s" in name for name in written)


def test_estimate_grad_norm_is_the_half_batch_norm(runs: dict[str, Any]) -> None:
    """``estimate_grad_norm`` is the norm of the estimate round's averaged gradient, before clipping: at step 1,
    G~_0 over each rank's first 3 micro-batches (the estimate half) at theta_0 (computed here from the reference's
    model and data); dpu has no estimate round and reports none."""
    batches = make_batches(SEED, WORLD, STEPS * GA * 6 + 8)  # as the "acco" job drew them
    sim = Simulator(make_model(SEED), batches, loss_fn, LR, (0.9, 0.999), 1e-8, 0.0, 0.0)
    sums, count = sim.accumulate(sim.snapshot_params(), [DEFAULT_ESTIMATE_HALF[GA]] * WORLD)
    expected = math.sqrt(sum(float((s / count).pow(2).sum()) for s in sums))
    first = job_result(runs, "acco")[0]["metrics"][0]
    print(f"estimate_grad_norm {first['estimate_grad_norm']:.6f}, reference {expected:.6f}, "
          f"commit grad_norm {first['grad_norm']:.6f}")
    assert first["estimate_grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert first["estimate_grad_norm"] != pytest.approx(first["grad_norm"], rel=1e-3)
    assert all(m["estimate_grad_norm"] is None for m in job_result(runs, "dpu")[0]["metrics"])


FORCED_ROUNDS = {
    "forced_acco": [[[2, 2], [2, 2]], [[2, 2], [1, 1]], [[2, 2], [0, 0]], [[1, 1]], [[2, 2], [2, 2]]],
    "forced_dpu": [[[4, 4]], [[3, 3]], [[1, 1]], [[4, 4]]],
}


@pytest.mark.parametrize("job,mode", [("forced_acco", "acco"), ("forced_dpu", "dpu"), ("forced_adaptive", "acco")])
def test_caller_forced_boundaries(runs: dict[str, Any], job: str, mode: str) -> None:
    """Steps the caller ends early (in each half, acco, dpu, adaptive) commit what they have, as the reference's
    short steps; global_steps counts them; ranks identical."""
    result = job_result(runs, job)
    rounds = [m["round_counts"] for m in result[0]["metrics"]]
    assert all(rounds == [m["round_counts"] for m in other["metrics"]] for other in result[1:])
    print(f"FORCED {job}: rounds per step {rounds}")
    if job in FORCED_ROUNDS:
        assert rounds == FORCED_ROUNDS[job]
    else:  # adaptive: the forced steps hold exactly the micro-batches the caller gave them on each rank
        for step, per_rank in {1: 3, 2: 4, 3: 1}.items():
            assert [sum(r[rank] for r in rounds[step]) for rank in range(WORLD)] == [per_rank] * WORLD, rounds[step]
    diff = _max_diff(result[0]["params"], _reference(mode, steps=len(rounds), step_rounds=rounds))
    print(f"PARITY {job} vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(result)
    assert result[0]["global_steps"] == len(rounds)


@pytest.mark.parametrize("job", ["paper", "forced_paper"])
def test_paper_estimate_matches_reference(runs: dict[str, Any], job: str) -> None:
    """acco.estimate="paper" equals the reference's paper estimate (estimate_shift (1, 0)), also across a restart,
    and differs from the default (extrapolated) estimate by far more than the tolerance (the key is in effect)."""
    result = job_result(runs, job)
    rounds = [m["round_counts"] for m in result[0]["metrics"]]
    expected = _reference("acco", steps=len(rounds), step_rounds=rounds, estimate_shift=PAPER_ESTIMATE_SHIFT)
    diff = _max_diff(result[0]["params"], expected)
    apart = _max_diff(expected, _reference("acco", steps=len(rounds), step_rounds=rounds))
    print(f"PARITY {job} vs reference (1, 0): max |diff| = {diff:.3e}; the default estimate ends {apart:.3e} away")
    assert diff < TOL
    assert apart > 10 * TOL
    assert _ranks_identical(result)
    if job == "forced_paper":
        assert [1, 1] in [r for step in rounds for r in step if len(step) == 1], rounds  # a restart happened


def test_caller_normalized_short_steps(runs: dict[str, Any]) -> None:
    """A caller that divides each step's losses by that step's micro-batch count and calls
    ``backward(scale_wrt_gas=False)`` (the HF Trainer) gets the mean over a short step's micro-batches."""
    result = job_result(runs, "forced_acco_prescaled")
    rounds = [m["round_counts"] for m in result[0]["metrics"]]
    half = DEFAULT_ESTIMATE_HALF[GA]
    normal = [[half] * WORLD, [GA - half] * WORLD]
    assert rounds == [normal] * 3 + [[[1, 1]]] + [normal]
    diff = _max_diff(result[0]["params"], _reference("acco", steps=len(rounds), step_rounds=rounds))
    print(f"PARITY forced acco, caller-normalized loss, vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL


def test_refused_job_fails_only_its_own_tests(runs: dict[str, Any]) -> None:
    """A job whose config is refused becomes a JobFailure with its message; the jobs after it in the spawn ran."""
    refused = runs["refused"]
    assert all(isinstance(r, JobFailure) for r in refused)
    print("REFUSED job:", refused[0].traceback.strip().splitlines()[-1][:200])
    assert "AccoConfigError" in refused[0].traceback and "gradient_accumulation_steps must be at least 2" in \
        refused[0].traceback
    with pytest.raises(pytest.fail.Exception, match="job 'refused' failed on rank 0: .*AccoConfigError"):
        job_result(runs, "refused")
    assert job_result(runs, "monitor")[0]["global_steps"] == STEPS


def test_destroy_stops_worker(runs: dict[str, Any]) -> None:
    """engine.destroy() stops ACCO's background thread."""
    assert job_result(runs, "acco")[0]["worker_alive_after_destroy"] is False
