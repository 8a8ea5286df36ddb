"""2-rank gloo runs through the public API, checked against the single-process reference.

One module-scoped launch runs every job in the same two processes (spawning costs ~8 s), then
each test asserts on its job. What it localizes: the ACCO and DPU schedules, the disabled path
(DeepSpeed's own ZeRO-1), the LR scheduler stepping once per commit, clipping in both rounds,
the estimate rollback, adaptive accumulation with a really slowed rank, bf16 and fp16 paths.
Run alone with ``python -m pytest tests/test_parity.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.acco_reference import reference_train
from tests.dist_utils import run_distributed
from tests.workers import base_config, loss_fn, make_batches, make_model, run_jobs

WORLD, GA, STEPS, LR, SEED = 2, 4, 3, 1e-2, 0
TOL = 1e-5
SCHED = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01, "warmup_num_steps": 2,
                                        "warmup_type": "linear"}}


def _acco(**block: Any) -> dict[str, Any]:
    return {"acco": {"enabled": True, **block}}


JOBS: dict[str, tuple[Any, ...]] = {
    "plain": (base_config(GA, LR), STEPS, SEED, {"plain_deepspeed": True}),
    "disabled": (base_config(GA, LR, acco={"enabled": False}), STEPS, SEED),
    "acco": (base_config(GA, LR, **_acco()), STEPS, SEED, {"check_rollback": True}),
    "acco_install": (base_config(GA, LR, **_acco()), STEPS, SEED, {"use_install": True}),
    "acco_prescaled": (base_config(GA, LR, **_acco()), STEPS, SEED, {"prescaled": True}),
    "dpu": (base_config(GA, LR, **_acco(mode="dpu")), STEPS, SEED),
    "acco_sched": (base_config(GA, LR, scheduler=SCHED, **_acco()), 4, SEED),
    "acco_clip": (base_config(GA, LR, gradient_clipping=0.05, **_acco()), STEPS, SEED),
    "adaptive": (base_config(GA, LR, **_acco(adaptive_accumulation=True, max_micro_batches_per_round=6)),
                 STEPS, SEED, {"slow_s": 0.15}),
    "bf16": (base_config(GA, 3e-2, bf16={"enabled": True}, **_acco()), 8, SEED, {"dtype": "bf16", "repeat": 2}),
    "fp16_overflow": (base_config(GA, LR, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
                                  **_acco()), 4, SEED, {"dtype": "fp16", "inf_at": 7}),
}


@pytest.fixture(scope="module")
def monitor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitor")


@pytest.fixture(scope="module")
def runs(monitor_dir: Path) -> dict[str, list[dict[str, Any]]]:
    jobs = dict(JOBS)
    jobs["monitor"] = (base_config(GA, LR, csv_monitor={"enabled": True, "output_path": str(monitor_dir),
                                                        "job_name": "acco"}, **_acco()), STEPS, SEED)
    results = run_distributed(run_jobs, WORLD, list(jobs.values()), timeout_s=280)
    return {name: [rank_results[j] for rank_results in results] for j, name in enumerate(jobs)}


def _reference(mode: str, steps: int = STEPS, **kw: Any) -> list[torch.Tensor]:
    batches = make_batches(SEED, WORLD, steps * GA * 6 + 8)
    out = reference_train(make_model(SEED), batches, loss_fn, mode=mode, num_steps=steps,
                          gradient_accumulation_steps=GA, lr=kw.pop("lr", LR), weight_decay=0.01, **kw)
    return list(out.values())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _ranks_identical(job: list[dict[str, Any]]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(job[0]["params"], job[1]["params"]))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job,mode", [("acco", "acco"), ("dpu", "dpu"), ("disabled", "sync"), ("plain", "sync")])
def test_matches_reference(runs: dict[str, Any], job: str, mode: str) -> None:
    """Final parameters equal the independent reference to fp32 rounding, identically on both ranks."""
    diff = _max_diff(runs[job][0]["params"], _reference(mode))
    print(f"PARITY {job} vs reference {mode}: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(runs[job])
    assert runs[job][0]["global_steps"] == STEPS


def test_engine_classes(runs: dict[str, Any]) -> None:
    """ACCO builds AccoEngine/AccoZeroOptimizer; without an enabled block it is DeepSpeed's own classes."""
    assert (runs["acco"][0]["engine"], runs["acco"][0]["optimizer"]) == ("AccoEngine", "AccoZeroOptimizer")
    assert (runs["disabled"][0]["engine"], runs["disabled"][0]["optimizer"]) == ("DeepSpeedEngine",
                                                                               "DeepSpeedZeroOptimizer")


def test_disabled_is_bitwise_deepspeed(runs: dict[str, Any]) -> None:
    """A disabled block gives exactly the parameters of plain deepspeed.initialize."""
    assert all(torch.equal(a, b) for a, b in zip(runs["disabled"][0]["params"], runs["plain"][0]["params"]))


def test_install_path_equals_initialize(runs: dict[str, Any]) -> None:
    """install() + plain deepspeed.initialize gives the same ACCO run as deepspeed_acco.initialize."""
    assert runs["acco_install"][0]["optimizer"] == "AccoZeroOptimizer"
    assert all(torch.equal(a, b) for a, b in zip(runs["acco_install"][0]["params"], runs["acco"][0]["params"]))


def test_prescaled_loss_equals_default(runs: dict[str, Any]) -> None:
    """``backward(loss / GA, scale_wrt_gas=False)`` (what the HF Trainer calls) gives the default run's parameters."""
    diff = _max_diff(runs["acco_prescaled"][0]["params"], runs["acco"][0]["params"])
    print(f"PARITY acco prescaled loss vs default: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(runs["acco_prescaled"])


def test_modes_differ(runs: dict[str, Any]) -> None:
    """acco, dpu and synchronous ZeRO-1 give different parameters, so parity can tell them apart."""
    acco, dpu, sync = (runs[j][0]["params"] for j in ("acco", "dpu", "disabled"))
    for a, b in ((acco, dpu), (acco, sync), (dpu, sync)):
        assert _max_diff(a, b) > 100 * TOL


def test_acco_micro_batches_consumed(runs: dict[str, Any]) -> None:
    """Each committed step consumes GA micro-batches per rank, as ZeRO-1 does (2 rounds of GA/2)."""
    run = runs["acco"][0]
    assert run["micro_batches"] == STEPS * GA
    assert [m["round_counts"] for m in run["metrics"]] == [[[GA // 2] * WORLD] * 2] * STEPS


def test_estimate_rollback_is_exact(runs: dict[str, Any]) -> None:
    """After every estimate round the shard's optimizer state and master weights are bit-identical."""
    for rank in range(WORLD):
        checks = runs["acco"][rank]["rollback_checks"]
        assert len(checks) == STEPS and all(checks), checks


def test_scheduler_steps_once_per_commit(runs: dict[str, Any]) -> None:
    """WarmupLR steps once per committed step; both rounds of step t use lr(t)."""
    def lr(t: int) -> float:
        return 0.002 + 0.008 * min(1.0, max(0, t - 1) / 2)

    diff = _max_diff(runs["acco_sched"][0]["params"], _reference("acco", steps=4, lr=lr))
    print(f"PARITY acco+WarmupLR: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert runs["acco_sched"][0]["global_steps"] == 4


def test_clipping_applies_in_both_rounds(runs: dict[str, Any]) -> None:
    """gradient_clipping changes the update exactly as the reference clips both rounds."""
    clipped = runs["acco_clip"][0]["params"]
    diff = _max_diff(clipped, _reference("acco", max_grad_norm=0.05))
    print(f"PARITY acco+clip: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _max_diff(clipped, runs["acco"][0]["params"]) > 100 * TOL
    assert all(m["grad_norm"] > 0.05 for m in runs["acco_clip"][0]["metrics"])


def test_adaptive_accumulation(runs: dict[str, Any]) -> None:
    """The fast rank contributes more micro-batches; the update equals the reference at the recorded counts."""
    run0, run1 = runs["adaptive"]
    counts = [c for m in run0["metrics"] for c in m["round_counts"]]
    assert counts == [c for m in run1["metrics"] for c in m["round_counts"]]
    fast, slow = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"ADAPTIVE round counts {counts}: fast rank {fast}, slow rank {slow}")
    assert fast > slow
    assert all(c[1] >= GA // 2 and c[0] <= 6 for c in counts)
    diff = _max_diff(run0["params"], _reference("acco", counts=counts))
    print(f"PARITY adaptive: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _ranks_identical(runs["adaptive"])


def test_bf16_trains(runs: dict[str, Any]) -> None:
    """bf16 with ACCO: the loss falls and the ranks stay identical."""
    losses = runs["bf16"][0]["losses"]
    first, last = sum(losses[:GA]) / GA, sum(losses[-GA:]) / GA
    print(f"BF16 loss {first:.4f} -> {last:.4f}")
    assert last < 0.9 * first
    assert _ranks_identical(runs["bf16"])


def test_fp16_overflow_skips_step_on_all_ranks(runs: dict[str, Any]) -> None:
    """An inf on one rank makes every rank skip that step and back off the loss scale."""
    run0, run1 = runs["fp16_overflow"]
    flags0 = [m["overflow"] for m in run0["metrics"]]
    flags1 = [m["overflow"] for m in run1["metrics"]]
    print(f"FP16 overflow flags per step: rank0 {flags0} rank1 {flags1}; loss scale {run0['loss_scale']}")
    assert flags0 == flags1 and any(flags0) and not all(flags0)
    assert run0["loss_scale"] < 2**8 and run0["loss_scale"] == run1["loss_scale"]
    assert _ranks_identical(runs["fp16_overflow"])
    assert all(torch.isfinite(p).all() for p in run0["params"])


def test_metrics_recorded_and_sent_to_monitor(runs: dict[str, Any], monitor_dir: Path) -> None:
    """Per committed step: figures readable from Python, and written to DeepSpeed's csv monitor."""
    records = runs["monitor"][0]["metrics"]
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records:
        assert m["commit_round_s"] > 0 and m["estimate_round_s"] > 0 and m["compute_s"] > 0
        assert m["exposed_wait_s"] >= 0 and m["bytes_communicated"] > 0 and m["micro_batches"] == GA * WORLD
    written = {p.name for p in monitor_dir.rglob("*.csv")}
    print("monitor files:", sorted(written))
    assert any("exposed_wait_s" in name for name in written) and any("commit_round_s" in name for name in written)


def test_destroy_stops_worker(runs: dict[str, Any]) -> None:
    """engine.destroy() stops ACCO's background thread."""
    assert runs["acco"][0]["worker_alive_after_destroy"] is False
