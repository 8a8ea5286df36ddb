"""The compressed commit with error feedback (``acco.commit_compression = "int8"``).

Gloo ranks through the public API (world size 2; world size 3 for padded flats; 2 nodes x 2 ranks for the
node-aware round), checked against ``tests/acco_reference.py`` (``commit_compression="int8"``, written from
acco-algorithm.md, "Compressed commit with error feedback"):

- parity of the weights the ranks hold with the reference's (< 1e-5): the commit alone compressed, both rounds
  compressed, clipping, adaptive accumulation, a caller-forced short step, world size 3, 2 x 2 nodes;
- the held weights stay within half a quantization step of the fp32 master at every commit, and the drift does
  not grow over 30 steps;
- fp16 with an inf in a commit half skips that step on every rank and drops the residual;
- a checkpoint saved inside a step (the commit residual pending) resumes bit for bit; a load without ACCO's state
  starts the residual at zero and says so.

Run alone: ``python -m pytest -q tests/test_commit_compression.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.acco_reference import reference_train
from tests.dist_utils import job_result, spawn_jobs
from tests.test_checkpoint import GA, LR, SEED, assert_mid_step_resume, mid_step_checkpoints
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    base_config,
    loss_fn,
    make_batches,
    make_model,
)

TOL = 1e-5
BLOCK = 16


def _cc(estimate: str = "none", **extra: Any) -> dict[str, Any]:
    """A pinned schedule (estimate_fraction set) with the compressed commit."""
    return {"acco": {"enabled": True, "commit_compression": "int8", "estimate_compression": estimate,
                     "compression_block_size": BLOCK, **extra}}


JOBS: dict[str, tuple[Any, ...]] = {
    "commit": (base_config(GA, LR, **_cc()), 4, SEED, {"watch_commit": True}),
    "both": (base_config(GA, LR, **_cc("int8")), 4, SEED, {"watch_commit": True}),
    "clip": (base_config(GA, LR, gradient_clipping=0.05, **_cc("int8")), 3, SEED),
    "adaptive": (base_config(GA, LR, **_cc("int8", adaptive_accumulation=True, max_micro_batches_per_round=6)),
                 3, SEED, {"slow_s": 0.15}),
    "forced": (base_config(GA, LR, **_cc("int8")), 5, SEED, {"force_in_step": {1: 3, 2: 2, 3: 1}}),
    "dpu": (base_config(GA, LR, acco={"enabled": True, "mode": "dpu", "commit_compression": "int8",
                                      "compression_block_size": BLOCK}), 4, SEED),
    "long": (base_config(GA, 3e-3, **_cc("int8")), 30, SEED, {"watch_commit": True}),
    "fp16_inf": (base_config(GA, LR, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
                             **_cc("int8")), 4, SEED, {"dtype": "fp16", "inf_at": 8, "watch_commit": True}),
}
WORLD3 = {"both": (base_config(GA, LR, **_cc("int8")), 4, SEED, {"watch_commit": True})}
NODE_AWARE = {"both": (base_config(GA, LR, **_cc("int8")), 4, SEED, {"watch_commit": True})}


@pytest.fixture(scope="module")
def runs() -> dict[str, list[Any]]:
    return spawn_jobs(2, JOBS, timeout_s=300)


@pytest.fixture(scope="module")
def world3() -> dict[str, list[Any]]:
    return spawn_jobs(3, WORLD3, timeout_s=300)


@pytest.fixture(scope="module")
def nodes() -> dict[str, list[Any]]:
    """World size 4 as 2 nodes x 2 ranks (``LOCAL_WORLD_SIZE=2``): both rounds node-aware."""
    return spawn_jobs(4, NODE_AWARE, timeout_s=300, env={"LOCAL_WORLD_SIZE": "2"})


def _reference(world: int, steps: int, *, mode: str = "acco", lr: float = LR, **kw: Any) -> list[torch.Tensor]:
    """The weights the reference's ranks hold after ``steps`` steps, per parameter (master shapes)."""
    batches = make_batches(SEED, world, steps * GA * 6 + 8)
    model = make_model(SEED)
    if mode == "acco":
        kw.setdefault("estimate_shift", DEFAULT_ESTIMATE_SHIFT)
        kw.setdefault("estimate_micro_batches", DEFAULT_ESTIMATE_HALF[GA])
    held: list[torch.Tensor] = []
    reference_train(model, batches, loss_fn, mode=mode, num_steps=steps, gradient_accumulation_steps=GA, lr=lr,
                    weight_decay=0.01, max_grad_norm=kw.pop("max_grad_norm", DEEPSPEED_DEFAULT_CLIP),
                    block=BLOCK, commit_compression="int8", held_out=held, **kw)
    sizes = [p.numel() for p in model.parameters()]
    return [piece.view_as(p) for piece, p in zip(torch.split(held[-1][:sum(sizes)], sizes), model.parameters())]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _identical(job: list[dict[str, Any]]) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(job[0]["params"], r["params"])) for r in job[1:])


def _exact_acco(world: int, steps: int) -> list[torch.Tensor]:
    batches = make_batches(SEED, world, steps * GA * 6 + 8)
    out = reference_train(make_model(SEED), batches, loss_fn, mode="acco", num_steps=steps,
                          gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                          max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_compression="int8", block=BLOCK,
                          estimate_shift=DEFAULT_ESTIMATE_SHIFT, estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA])
    return list(out.values())


@pytest.mark.parametrize("job,estimate", [("commit", "none"), ("both", "int8")])
def test_matches_reference(runs: dict[str, list[Any]], job: str, estimate: str) -> None:
    """The held weights equal the reference's; the commit is lossy: they are not exact ACCO's."""
    result = job_result(runs, job)
    diff = _max_diff(result[0]["params"], _reference(2, 4, estimate_compression=estimate))
    lossy = _max_diff(result[0]["params"], _exact_acco(2, 4))
    print(f"PARITY commit int8 ({job}) vs reference: max |diff| = {diff:.3e}; vs exact-commit ACCO {lossy:.3e}")
    assert diff < TOL and _identical(result)
    assert lossy > 10 * TOL
    assert result[0]["round"]["quantizer"] == "compiled"


def test_world_size_3_and_node_aware(world3: dict[str, list[Any]], nodes: dict[str, list[Any]]) -> None:
    """World size 3 (a padded flat) and 2 nodes x 2 ranks (each node's sum quantized) equal the reference."""
    result = job_result(world3, "both")
    diff = _max_diff(result[0]["params"], _reference(3, 4, estimate_compression="int8"))
    node = job_result(nodes, "both")
    assert all(r["round"]["layout"] == (2, 2) for r in node)
    node_diff = _max_diff(node[0]["params"], _reference(4, 4, estimate_compression="int8", ranks_per_node=2))
    flat = _max_diff(node[0]["params"], _reference(4, 4, estimate_compression="int8"))
    print(f"PARITY commit int8 world 3 vs reference: {diff:.3e}; 2 x 2 nodes: {node_diff:.3e} (vs the flat round's "
          f"reference {flat:.3e})")
    assert diff < TOL and _identical(result)
    assert node_diff < TOL and _identical(node) and flat > 10 * TOL


def test_clipping_adaptive_forced_and_dpu(runs: dict[str, list[Any]]) -> None:
    """Clipping (on the dequantized sum), adaptive accumulation, a caller-forced short step, and dpu mode."""
    clip = job_result(runs, "clip")
    diff = _max_diff(clip[0]["params"], _reference(2, 3, estimate_compression="int8", max_grad_norm=0.05))
    print(f"PARITY commit int8 + clip vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL and _identical(clip)
    for job in ("adaptive", "forced"):
        result = job_result(runs, job)
        rounds = [m["round_counts"] for m in result[0]["metrics"]]
        diff = _max_diff(result[0]["params"], _reference(2, len(rounds), estimate_compression="int8",
                                                         step_rounds=rounds))
        print(f"PARITY commit int8 {job} (rounds {rounds}) vs reference: max |diff| = {diff:.3e}")
        assert diff < TOL and _identical(result)
    assert any(len(r) == 1 for r in (m["round_counts"] for m in job_result(runs, "forced")[0]["metrics"]))
    dpu = job_result(runs, "dpu")
    diff = _max_diff(dpu[0]["params"], _reference(2, 4, mode="dpu"))
    print(f"PARITY commit int8 dpu vs reference: max |diff| = {diff:.3e}")
    assert diff < TOL and _identical(dpu)


def test_held_weights_stay_within_half_a_step_of_the_master(runs: dict[str, list[Any]]) -> None:
    """At every commit of 30 steps the held weights are within half a quantization step of the fp32 master (per
    block, of that commit's update), and the drift does not grow."""
    for rank, r in enumerate(job_result(runs, "long")):
        watch = r["commit_watch"]
        drift, ratio = watch["drift"], watch["drift_over_bound"]
        first, last = max(drift[:10]), max(drift[-10:])
        print(f"DRIFT rank {rank}: |held - master| max {max(drift):.2e} over {len(drift)} commits (first ten "
              f"{first:.2e}, last ten {last:.2e}); over the half-step bound: max {max(ratio):.3f}")
        assert len(drift) == 30 and max(ratio) <= 1.01
        assert last <= 2 * first


def test_fp16_overflow_skips_the_step_and_drops_the_residual(runs: dict[str, list[Any]]) -> None:
    """An inf in a commit half (micro-batch 8: step 2's last): that step is skipped on every rank, the commit
    residual is dropped once on every rank, the loss scale backs off, and training goes on finite."""
    result = job_result(runs, "fp16_inf")
    flags = [[m["overflow"] for m in r["metrics"]] for r in result]
    drops = [len(r["commit_watch"]["residual_drops"]) for r in result]
    print(f"COMMIT INT8 fp16 overflow flags per step {flags}, residual drops per rank {drops}, loss scale "
          f"{result[0]['loss_scale']}")
    assert flags[0] == flags[1] == [False, True, False, False]
    assert drops == [1, 1] and result[0]["loss_scale"] < 2**8 and _identical(result)
    assert all(torch.isfinite(p).all() for p in result[0]["params"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    # Equal halves (2 + 2): micro-batch 15 is inside a commit half, with the commit residual of step 3 pending.
    ckpt = str(tmp_path_factory.mktemp("commit_int8_ckpt"))
    return mid_step_checkpoints(base_config(GA, LR, **_cc("int8", estimate_fraction=0.5)), ckpt,
                                {"no_state": {"load": (ckpt, "mid15"),
                                              "load_kwargs": {"load_optimizer_states": False}}})


@pytest.mark.parametrize("tag", ["at_estimate", "mid15"])
def test_checkpoint_mid_step_resumes_exactly(checkpoints: dict[str, list[Any]], tag: str) -> None:
    """Saved at the estimate boundary and inside the commit half (the commit residual pending): bitwise resume."""
    sd = assert_mid_step_resume(checkpoints, tag)
    print(f"COMMIT INT8 checkpoint {tag}: commit residual saved {sd['commit_residual'] is not None}, resumed bitwise")
    assert sd["commit_residual"] is not None and sd["commit_compression"] == "int8"
    assert float(sd["commit_residual"][0].abs().max()) > 0


def test_load_without_state_starts_the_residual_at_zero(checkpoints: dict[str, list[Any]]) -> None:
    """A load without ACCO's state (here ``load_optimizer_states=False``) says once that the residual starts at 0."""
    run = job_result(checkpoints, "no_state")
    said = [w for w in run[0]["after_load"]["warnings"] if "commit residual" in w]
    print(f"COMMIT INT8 load without state: {said}")
    assert len(said) == 1 and "starts at zero" in said[0]
    assert all(torch.isfinite(p).all() for p in run[0]["params"])
