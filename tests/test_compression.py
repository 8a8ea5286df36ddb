"""The compressed estimate round with an exact commit (``acco.estimate_compression = "int8"``).

Gloo ranks through the public API, in spawns of their own (world size 2: fp32, low precision,
checkpoints; world size 3: padded flat buffers), checked against ``tests/acco_reference.py``, whose
quantizer is written from the algorithm page (``int8_roundtrip``), not from the package:

- parity of the final parameters with the reference (< 1e-5), blocks of 256 (one per chunk here) and 16;
- every commit's reduced gradient equals the exact sum over the ranks of both halves' gradients as
  computed, to fp32 rounding (the residual makes the commit exact);
- every estimate's theta~ lies within the quantization bound of theta_t + update (half a step of its block);
- bf16 trains; fp16 with an inf in an estimate half skips that step on every rank; adaptive
  accumulation and caller-forced boundaries equal the reference at the recorded rounds; a checkpoint
  saved mid-step (the residual pending) resumes bit for bit.

Run alone: ``python -m pytest -q tests/test_compression.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.acco_reference import int8_roundtrip, reference_train
from tests.dist_utils import job_result, spawn_jobs
from tests.test_checkpoint import GA, LR, NUM_MICRO, SEED, assert_mid_step_resume, mid_step_checkpoints
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    PAPER_ESTIMATE_SHIFT,
    base_config,
    loss_fn,
    make_batches,
    make_model,
    replay_schedules,
)

TOL = 1e-5


def _int8(block: int = 256, **block_extra: Any) -> dict[str, Any]:
    return {"acco": {"enabled": True, "estimate_compression": "int8", "compression_block_size": block,
                     **block_extra}}


JOBS: dict[str, tuple[Any, ...]] = {
    "int8": (base_config(GA, LR, **_int8()), 4, SEED, {"watch_compression": True, "check_rollback": True}),
    "int8_block16": (base_config(GA, LR, **_int8(16)), 4, SEED, {"watch_compression": True}),
    "int8_clip": (base_config(GA, LR, gradient_clipping=0.05, **_int8(16)), 3, SEED),
    "int8_adaptive": (base_config(GA, LR, **_int8(16, adaptive_accumulation=True, max_micro_batches_per_round=6)),
                      3, SEED, {"slow_s": 0.15}),
    "int8_forced": (base_config(GA, LR, **_int8(16)), 5, SEED, {"force_in_step": {1: 3, 2: 2, 3: 1}}),
    "none": (base_config(GA, LR, acco={"enabled": True}), 4, SEED),
    "int8_paper": (base_config(GA, LR, **_int8(16, estimate="paper")), 4, SEED),
}
LOW_PRECISION = {
    "int8_bf16": (base_config(GA, 3e-2, bf16={"enabled": True}, **_int8(16)), 8, SEED, {"dtype": "bf16", "repeat": 2}),
    "int8_fp16_inf": (base_config(GA, LR, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
                                  **_int8(16)), 4, SEED, {"dtype": "fp16", "inf_at": 5}),
}
# The automatic schedule with its switches scripted ({step: schedule}): every kind of switch, int8 to plain included.
SCRIPT = {2: "0.75+int8", 5: "0.75", 8: "0.5+int8", 10: "sync", 12: "0.75+int8", 14: "0.5", 16: "0.75+int8"}
SCRIPTED_STEPS = 18
JOBS["auto_scripted"] = (base_config(GA, LR, auto_schedule=True, acco={"enabled": True, "compression_block_size": 16}),
                         SCRIPTED_STEPS, SEED, {"script_schedule": SCRIPT})
# The automatic schedule on a link it measures at M/C 0.5 (synthetic medians: step, C, M, M_est): ZeRO-1's trial, then
# only 0.75+int8 (plain 0.75 exposes its estimate round past M/C 0.25), which the decision keeps at step 7.
KEPT_LINK = {"sync": [1.5, 1.0, 0.5, float("nan")], "0.75+int8": [1.0, 1.0, 0.5, 0.1]}
KEPT_STEPS = 12
JOBS["auto_kept"] = (base_config(GA, LR, auto_schedule=True, acco={"enabled": True, "compression_block_size": 16}),
                     KEPT_STEPS, SEED, {"synthetic_link": KEPT_LINK})
WORLD3 = {"int8": (base_config(GA, LR, **_int8(16)), 4, SEED, {"watch_compression": True})}
NODE_AWARE = {"int8": (base_config(GA, LR, **_int8(16)), 4, SEED, {"watch_compression": True}),
              "int8_clip": (base_config(GA, LR, gradient_clipping=0.05, **_int8(16)), 3, SEED)}
NODE_TOL = 1e-6


@pytest.fixture(scope="module")
def runs() -> dict[str, list[Any]]:
    return spawn_jobs(2, JOBS)


@pytest.fixture(scope="module")
def low_precision() -> dict[str, list[Any]]:
    return spawn_jobs(2, LOW_PRECISION)


@pytest.fixture(scope="module")
def world3() -> dict[str, list[Any]]:
    return spawn_jobs(3, WORLD3)


@pytest.fixture(scope="module")
def nodes() -> dict[str, list[Any]]:
    """World size 4 as 2 nodes x 2 ranks (``LOCAL_WORLD_SIZE=2``, as torchrun sets it): the node-aware round."""
    return spawn_jobs(4, NODE_AWARE, env={"LOCAL_WORLD_SIZE": "2"})


def _reference(world: int, steps: int, block: int, **kw: Any) -> list[torch.Tensor]:
    batches = make_batches(SEED, world, steps * GA * 6 + 8)
    kw.setdefault("estimate_shift", DEFAULT_ESTIMATE_SHIFT)
    kw.setdefault("estimate_micro_batches", DEFAULT_ESTIMATE_HALF[GA])
    out = reference_train(make_model(SEED), batches, loss_fn, mode="acco", num_steps=steps,
                          gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                          max_grad_norm=kw.pop("max_grad_norm", DEEPSPEED_DEFAULT_CLIP),
                          estimate_compression="int8", block=block, **kw)
    return list(out.values())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _identical(job: list[dict[str, Any]]) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(job[0]["params"], r["params"])) for r in job[1:])


def test_reference_quantizer() -> None:
    """The reference's deQ(Q(x)): error at most half a step of its block; zeros stay zeros; NaN/Inf give NaN."""
    x = torch.randn(1000)
    x[100:200] = 0.0
    y = int8_roundtrip(x, 64)
    for start in range(0, 1000, 64):
        block = x[start:start + 64]
        assert float((y[start:start + 64] - block).abs().max()) <= float(block.abs().max()) / 254 * (1 + 1e-6)
    assert torch.equal(y[128:192], torch.zeros(64))
    x[5] = float("inf")
    assert torch.isnan(int8_roundtrip(x, 64)[:64]).all() and torch.isfinite(int8_roundtrip(x, 64)[64:]).all()


@pytest.mark.parametrize("job,block", [("int8", 256), ("int8_block16", 16)])
def test_int8_matches_reference(runs: dict[str, list[Any]], job: str, block: int) -> None:
    """World size 2: the compressed estimate equals the reference with the same quantizer; estimates roll back."""
    result = job_result(runs, job)
    diff = _max_diff(result[0]["params"], _reference(2, 4, block))
    none = _max_diff(result[0]["params"], job_result(runs, "none")[0]["params"])
    print(f"PARITY int8 (block {block}) vs reference: max |diff| = {diff:.3e}; vs uncompressed ACCO {none:.3e}")
    assert diff < TOL and none > TOL  # the tolerance tells compressed from uncompressed ACCO
    assert _identical(result)
    if job == "int8":
        assert all(all(r["rollback_checks"]) and len(r["rollback_checks"]) == 4 for r in result)


def test_int8_paper_matches_reference(runs: dict[str, list[Any]]) -> None:
    """With acco.estimate="paper" the compressed estimate sends the paper's update, quantized (the default sends
    the whole extrapolated update: the other tests here)."""
    expected = _reference(2, 4, 16, estimate_shift=PAPER_ESTIMATE_SHIFT)
    diff = _max_diff(job_result(runs, "int8_paper")[0]["params"], expected)
    print(f"PARITY int8_paper vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL
    assert _identical(job_result(runs, "int8_paper"))


def test_int8_matches_reference_at_world_size_3(world3: dict[str, list[Any]]) -> None:
    """World size 3 (212 parameters in a flat of 216, chunks of 72 quantized in blocks of 16)."""
    result = job_result(world3, "int8")
    diff = _max_diff(result[0]["params"], _reference(3, 4, 16))
    print(f"PARITY int8 world 3 vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL and _identical(result)


@pytest.mark.parametrize("job", ["int8", "int8_block16"])
def test_commit_is_exact_and_estimate_within_bound(runs: dict[str, list[Any]], world3: dict[str, list[Any]],
                                                   job: str) -> None:
    """Every commit reduces exactly the sum of both halves (fp32 rounding); every theta~ is within the bound."""
    for name, result in ((f"world 2 {job}", job_result(runs, job)),
                         *((("world 3 int8", job_result(world3, "int8")),) if job == "int8" else ())):
        for rank, r in enumerate(result):
            exact, bound = r["compression"]["commit_vs_exact"], r["compression"]["update_error_over_bound"]
            print(f"COMPRESSION {name} rank {rank}: commit vs exact sum (relative) max {max(exact):.2e} over "
                  f"{len(exact)} commits; theta~ error / bound max {max(bound):.3f} over {len(bound)} estimates")
            assert len(exact) == 4 and max(exact) < 1e-6
            assert len(bound) == 4 and max(bound) <= 1.01


def test_clipping_adaptive_and_forced_boundaries(runs: dict[str, list[Any]]) -> None:
    """Clipping, adaptive accumulation and caller-forced boundaries with the compressed estimate equal the reference."""
    clip = job_result(runs, "int8_clip")
    diff = _max_diff(clip[0]["params"], _reference(2, 3, 16, max_grad_norm=0.05))
    print(f"PARITY int8 + clip vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL and _identical(clip)
    for job in ("int8_adaptive", "int8_forced"):
        result = job_result(runs, job)
        rounds = [m["round_counts"] for m in result[0]["metrics"]]
        diff = _max_diff(result[0]["params"], _reference(2, len(rounds), 16, step_rounds=rounds))
        print(f"PARITY {job} (rounds {rounds}) vs reference: max |diff| = {diff:.3e}")
        assert diff < TOL and _identical(result)
    assert any(len(r) == 1 for r in (m["round_counts"] for m in job_result(runs, "int8_forced")[0]["metrics"]))


def test_schedule_switches_match_reference(runs: dict[str, list[Any]]) -> None:
    """The automatic schedule's switches (restart from the waited commit; int8 to plain, plain to int8, to and from
    ZeRO-1's step) equal the reference replaying the schedule sequence the run recorded."""
    result = job_result(runs, "auto_scripted")
    schedules = [m["schedule"] for m in result[0]["metrics"]]
    expected = ["sync"] * 2
    for (at, name), end in zip(SCRIPT.items(), [*list(SCRIPT)[1:], SCRIPTED_STEPS], strict=True):
        expected += [name] * (end - at)
    assert schedules == expected, schedules
    reference = _reference(2, SCRIPTED_STEPS, 16, **replay_schedules(schedules, 2, GA))
    diff = _max_diff(result[0]["params"], reference)
    print(f"PARITY scripted schedule switches {schedules} vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL and _identical(result)


def test_decision_that_keeps_the_last_trial_waits_for_nothing(runs: dict[str, list[Any]]) -> None:
    """The trials' end: the last trial runs a step more and a decision that keeps its schedule does not restart the
    pipeline (the reference replays one restart, at the switch from ZeRO-1's step to the trial, and matches)."""
    result = job_result(runs, "auto_kept")
    schedules = [m["schedule"] for m in result[0]["metrics"]]
    decisions = [m["decision"] for m in result[0]["metrics"] if m.get("decision")]
    print(f"SCHEDULES {schedules}; DECISION at step {decisions[0]['step']}: {decisions[0]['reason']}")
    assert schedules == ["sync"] * 3 + ["0.75+int8"] * (KEPT_STEPS - 3), schedules
    assert len(decisions) == 1 and decisions[0]["step"] == 7 and decisions[0]["schedule"] == "0.75+int8"
    assert decisions[0]["why"] == "after trying sync, 0.75+int8"
    replay = replay_schedules(schedules, 2, GA)
    diff = _max_diff(result[0]["params"], _reference(2, KEPT_STEPS, 16, **replay))
    # The negative control: a reference that also restarts at the decision (after step 7) must differ.
    restarted = _reference(2, KEPT_STEPS, 16, **{**replay, "restart_after": [2, 6]})
    diff_restarted = _max_diff(result[0]["params"], restarted)
    print(f"PARITY trials kept {diff:.3e}; against a reference that restarts at the decision {diff_restarted:.3e}")
    assert diff < TOL and _identical(result)
    assert diff_restarted > 10 * diff


def test_low_precision(low_precision: dict[str, list[Any]]) -> None:
    """bf16 trains with the compressed estimate; fp16: an inf in an estimate half skips that step on every rank."""
    bf16 = job_result(low_precision, "int8_bf16")
    losses = bf16[0]["losses"]
    print(f"INT8 bf16 loss {sum(losses[:GA]) / GA:.4f} -> {sum(losses[-GA:]) / GA:.4f}")
    assert sum(losses[-GA:]) < 0.9 * sum(losses[:GA]) and _identical(bf16)
    fp16 = job_result(low_precision, "int8_fp16_inf")
    flags = [[m["overflow"] for m in r["metrics"]] for r in fp16]
    print(f"INT8 fp16 overflow flags per step {flags}, loss scale {fp16[0]['loss_scale']}")
    assert flags[0] == flags[1] == [False, True, False, False]
    assert fp16[0]["loss_scale"] < 2**8 and _identical(fp16)
    assert all(torch.isfinite(p).all() for p in fp16[0]["params"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    # Equal halves (2 + 2), so that micro-batch 15 is inside a commit half (the default's commit half is 1).
    return mid_step_checkpoints(base_config(GA, LR, **_int8(16, estimate_fraction=0.5)),
                                str(tmp_path_factory.mktemp("int8_ckpt")))


@pytest.mark.parametrize("tag", ["at_estimate", "mid15"])
def test_checkpoint_mid_step_resumes_exactly(checkpoints: dict[str, list[Any]], tag: str) -> None:
    """Saved at the estimate boundary and inside the commit half (quantization residual pending): bitwise resume."""
    sd = assert_mid_step_resume(checkpoints, tag)
    print(f"INT8 checkpoint {tag}: residual saved {sd['residual'] is not None}, resumed bitwise")
    assert sd["residual"] is not None and sd["compression"] == "int8"
    assert NUM_MICRO >= 15


def test_node_aware_round_matches_reference(nodes: dict[str, list[Any]]) -> None:
    """2 nodes x 2 ranks: the estimate quantizes each node's sum (``ranks_per_node=2`` in the reference), within
    1e-6 of the reference, clipping included, and far from the flat round's trajectory; every commit is exact."""
    result = job_result(nodes, "int8")
    assert all(r["round"] == {"layout": (2, 2), "quantizer": "compiled", "fused_adam": True} for r in result)
    diff = _max_diff(result[0]["params"], _reference(4, 4, 16, ranks_per_node=2))
    flat = _max_diff(result[0]["params"], _reference(4, 4, 16))
    clip = job_result(nodes, "int8_clip")
    clip_diff = _max_diff(clip[0]["params"], _reference(4, 3, 16, ranks_per_node=2, max_grad_norm=0.05))
    print(f"PARITY node-aware int8 (2 x 2) vs reference: {diff:.3e} (clipped {clip_diff:.3e}); vs the flat "
          f"round's reference {flat:.3e}")
    assert diff < NODE_TOL and clip_diff < NODE_TOL and flat > 10 * NODE_TOL
    assert _identical(result) and _identical(clip)
    compression = result[0]["compression"]
    assert len(compression["commit_vs_exact"]) == 4 and max(compression["commit_vs_exact"]) < 1e-5
    assert len(compression["update_error_over_bound"]) == 4 and max(compression["update_error_over_bound"]) <= 1 + 1e-4
