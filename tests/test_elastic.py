"""Checkpoints across world sizes: exact resume at world size 3, and elastic resume 2 -> 3 and 2 -> 4.

Spawns of gloo ranks running ``test_checkpoint.ckpt_worker``:

1. world size 3 (flat buffers padded: 212 parameters, 216 in the flat): an uninterrupted ACCO run
   and the same run saving at a step boundary and mid-step (1 micro-batch into the commit half);
   then new processes resume each checkpoint and must end bitwise equal to the uninterrupted run.
2. world size 2 saves at a step boundary; ``python -m deepspeed.checkpoint.ds_to_universal
   --inject_missing_state`` converts the tag to a universal checkpoint; runs at world sizes 3 and 4
   load it with ``"checkpoint": {"load_universal": true}``. Right after the load every rank holds
   the committed parameters, and the ranks' optimizer shards put together are the saved run's fp32
   master weights and AdamW moments. Training then goes on, identical on every rank and equal to
   the single-process reference started from the saved state (``acco_reference``, initial_state).

Run alone with ``python -m pytest tests/test_elastic.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.acco_reference import reference_train
from tests.dist_utils import JobFailure, job_result
from tests.test_checkpoint import ACCO_CFG, BOUNDARY, GA, LR, NUM_MICRO, SAVE_STEP, SEED, STEPS, _spawn
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    base_config,
    loss_fn,
    make_batches,
    make_model,
)

UNIVERSAL_CFG = base_config(GA, LR, acco={"enabled": True}, checkpoint={"load_universal": True})
N_PARAMS = sum(p.numel() for p in make_model(SEED).parameters())
MID = BOUNDARY + DEFAULT_ESTIMATE_HALF[GA]  # step 4's estimate boundary: its estimate round in flight


def _flat_state(ranks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The ranks' fp32 master shards and AdamW moments put together (padding dropped): flat vectors."""
    return {key: torch.cat([r["state"][key].reshape(-1) for r in ranks])[:N_PARAMS]
            for key in ("master", "exp_avg", "exp_avg_sq")}


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.reshape(-1) - y.reshape(-1)).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def world3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    ckpt = str(tmp_path_factory.mktemp("w3"))
    first = _spawn({"acco": {"cfg": ACCO_CFG, "steps": STEPS},
                    "acco_saving": {"cfg": ACCO_CFG, "steps": STEPS,
                                    "saves": {BOUNDARY: (ckpt, "step3"), MID: (ckpt, "mid")}}}, world=3)
    resumed = _spawn({"resumed_step3": {"cfg": ACCO_CFG, "steps": STEPS, "load": (ckpt, "step3")},
                      "resumed_mid": {"cfg": ACCO_CFG, "steps": STEPS, "load": (ckpt, "mid")}}, world=3)
    return {**first, **resumed}


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ckpt = tmp_path_factory.mktemp("elastic")
    saved = _spawn({"saving": {"cfg": ACCO_CFG, "steps": SAVE_STEP, "saves": {BOUNDARY: (str(ckpt), "step3")}}})
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "step3"),
           "--output_folder", str(ckpt / "step3_universal"), "--inject_missing_state"]
    conv = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, f"{' '.join(cmd)} failed:\n{conv.stderr[-3000:]}"
    job = {"cfg": UNIVERSAL_CFG, "steps": STEPS, "load": (str(ckpt), "step3_universal")}
    not_universal = {"cfg": ACCO_CFG, "steps": STEPS, "load": (str(ckpt), None)}
    at3 = _spawn({"job": job, "not_universal": not_universal}, world=3)
    return {"saved": saved["saving"], 3: at3["job"], 4: _spawn({"job": job}, world=4)["job"],
            "not_universal": at3["not_universal"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tag", ["step3", "mid"])
def test_resume_exact_at_world_size_3(world3: dict[str, Any], tag: str) -> None:
    """World size 3: a checkpoint saved at a step boundary or mid-step resumes bit for bit in new processes."""
    ref = job_result(world3, "acco")
    run = job_result(world3, f"resumed_{tag}")
    saving = job_result(world3, "acco_saving")
    for rank in range(3):
        diff = _max_diff(run[rank]["params"], ref[rank]["params"])
        print(f"RESUME world 3 {tag} rank {rank}: final params max |diff| vs uninterrupted = {diff:.3e}")
        assert _bitwise(run[rank]["params"], ref[rank]["params"])
        assert _bitwise(saving[rank]["params"], ref[rank]["params"])
        assert run[rank]["global_steps"] == STEPS and run[rank]["losses"] == \
            ref[rank]["losses"][run[rank]["after_load"]["data_position"]:]
    expected = reference_train(make_model(SEED), make_batches(SEED, 3, NUM_MICRO), loss_fn, mode="acco",
                               num_steps=STEPS, gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                               max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                               estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA])
    diff = _max_diff(ref[0]["params"], list(expected.values()))
    print(f"PARITY world 3 acco, {STEPS} steps, vs reference: max |diff| = {diff:.3e}")
    assert diff < 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [3, 4])
def test_elastic_resume_from_universal_checkpoint(elastic: dict[str, Any], world: int) -> None:
    """Saved at world size 2, converted to universal, loaded at 3 and 4: committed params and AdamW state on every
    rank right after the load; then training goes on, ranks identical, equal to the reference from that state."""
    saved = [r["saved"]["step3"] for r in job_result(elastic, "saved")]
    run = job_result(elastic, world)
    before = _flat_state(saved)
    after = _flat_state([r["after_load"] for r in run])
    for rank, res in enumerate(run):
        loaded = res["after_load"]
        pdiff = _max_diff(loaded["params"], saved[0]["committed"])
        print(f"ELASTIC 2 -> {world} rank {rank}: params max |diff| vs saved committed = {pdiff:.3e}; AdamW step "
              f"{float(loaded['state']['step'])}; global_steps {loaded['global_steps']}; data position "
              f"{loaded['data_position']}")
        assert _bitwise(loaded["params"], saved[0]["committed"])
        assert loaded["global_steps"] == SAVE_STEP
        assert float(loaded["state"]["step"]) == float(saved[0]["state"]["step"])
    for key in before:
        diff = float((after[key] - before[key]).abs().max())
        print(f"ELASTIC 2 -> {world}: {key} (all shards) max |diff| = {diff:.3e}")
        assert torch.equal(after[key], before[key]), key
    for res in run[1:]:
        assert _bitwise(res["params"], run[0]["params"]), "ranks diverged after the elastic resume"
    assert all(r["global_steps"] == STEPS for r in run)
    start = run[0]["after_load"]["data_position"]
    batches = [b[start:] for b in make_batches(SEED, world, NUM_MICRO)]
    expected = reference_train(make_model(SEED), batches, loss_fn, mode="acco", num_steps=STEPS - SAVE_STEP,
                               gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                               max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                               estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA],
                               initial_state={"flat": before["master"], "exp_avg": before["exp_avg"],
                                              "exp_avg_sq": before["exp_avg_sq"],
                                              "step": float(saved[0]["state"]["step"])})
    diff = _max_diff(run[0]["params"], list(expected.values()))
    print(f"ELASTIC 2 -> {world}: {STEPS - SAVE_STEP} ACCO steps after the load vs reference from the saved state: "
          f"max |diff| = {diff:.3e}")
    assert diff < 1e-5


@pytest.mark.timeout(300)
def test_other_world_size_without_conversion_names_the_fix(elastic: dict[str, Any]) -> None:
    """Loading a world-size-2 checkpoint at 3 without converting it fails on every rank with the command to run."""
    failures = elastic["not_universal"]
    assert all(isinstance(f, JobFailure) for f in failures)
    message = failures[0].traceback.strip().splitlines()[-1]
    print(f"NOT UNIVERSAL at world size 3: {message[:400]}")
    assert "world size of 2 but the current world size is 3" in message
    assert "ds_to_universal" in message and "step3_universal" in message and '"load_universal": true' in message
