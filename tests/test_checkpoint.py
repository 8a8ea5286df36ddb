"""Checkpoints with ACCO: save without disturbing training, exact resume, conversion, migration, crashes.

Three spawns of two gloo ranks (about 8 s each):

1. ``saved`` (module fixture): an uninterrupted ACCO run and the same run saving at a step boundary
   and at three points inside a step (during the estimate half, at the estimate boundary, during
   the commit half); a dpu run and its saving twin; a plain ZeRO-1 run that saves; a probe of when
   ``latest`` is written (plain DeepSpeed against ``AccoEngine``).
2. ``crashed``: an ACCO run that saves tag ``good``, then dies while writing tag ``bad`` (rank 1
   writes half of its optimizer-states file and raises).
3. ``resumed``: new processes that only load (each ACCO checkpoint, the crashed directory's
   ``latest``, the plain checkpoint into ACCO, the ACCO checkpoint into plain ZeRO-1) and train on.

Every comparison prints its measured difference.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.acco_reference import reference_train
from tests.dist_utils import JobFailure, job_result, run_distributed, run_jobs_isolated
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    base_config,
    loss_fn,
    make_batches,
    make_model,
    synthetic_link,
)

WORLD, GA, LR, SEED = 2, 4, 1e-2, 0
STEPS = 6  # committed steps of every run
SAVE_STEP = 3  # the step-boundary checkpoint is taken after this many committed steps
NUM_MICRO = STEPS * GA + 8
ACCO_CFG = base_config(GA, LR, acco={"enabled": True})
# The paper's whole schedule: its estimate and equal halves (2 + 2 micro-batches of GA 4).
PAPER_CFG = base_config(GA, LR, acco={"enabled": True, "estimate": "paper", "estimate_fraction": 0.5})
DPU_CFG = base_config(GA, LR, acco={"enabled": True, "mode": "dpu"})
# acco.sync_steps=4: steps 1-4 are ZeRO-1's; saved 2 micro-batches into step 2 and at the boundary where ACCO starts.
SYNC_CFG = base_config(GA, LR, acco={"enabled": True, "sync_steps": 4})
SYNC_SAVES = {6: "sync_mid6", 4 * GA: "sync_step4"}
PLAIN_CFG = base_config(GA, LR)
BF16_CFG = base_config(GA, LR, bf16={"enabled": True}, acco={"enabled": True})
FP16_CFG = base_config(GA, LR, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
                       acco={"enabled": True})
FP16_INF_AT = 12  # the last micro-batch of step 3: its commit round overflows and is still pending at the save
# Micro-batch counts (per rank) after which the saving run saves, with the state of the pipeline there.
# With the default split (3 + 1 of GA 4): 1 and 2 micro-batches into the estimate half, at the estimate boundary.
# With PAPER_CFG's equal halves the same points are 1 micro-batch into the estimate half, at the estimate boundary,
# 1 micro-batch into the commit half.
MID_POINTS = {13: "mid13", 14: "mid14", 15: "mid15"}
BOUNDARY = SAVE_STEP * GA  # 12: right after the commit boundary of step 3
# The automatic schedule on a synthetic link (medians: step, C, M, M_est): M/C 0.5, so ZeRO-1's trial (steps 1-3),
# then 0.75+int8 (from step 4), kept by the decision at step 7; from step 10 on the link measures M/C 0.05: the check
# started at the boundary of step 10 is read at the next one and switches to 0.75 from step 12.
AUTO_CFG = base_config(GA, LR, auto_schedule=True, acco={"enabled": True, "compression_block_size": 16})
AUTO_STEPS = 14
AUTO_LINK = ({"sync": [1.5, 1.0, 0.5, float("nan")], "0.75+int8": [1.0, 1.0, 0.5, 0.1]},
             (10, {"0.75+int8": [1.0, 1.0, 0.05, 0.01], "0.75": [1.0, 1.0, 0.05, 0.05]}))
AUTO_SCHEDULES = ["sync"] * 3 + ["0.75+int8"] * 8 + ["0.75"] * 3
# Saved inside the int8 trial (after step 5) and while the check's all-reduce is in flight (after step 10).
AUTO_SAVES = {5 * GA: "auto_step5", 10 * GA: "auto_step10"}
AUTO_NUM_MICRO = AUTO_STEPS * GA + 8


# ---------------------------------------------------------------------------------------------- ranks
def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in module.parameters()]


def _opt_state(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's fp32 master shard and its AdamW state (DeepSpeed's ZeRO-1 fields, ACCO or not)."""
    opt = engine.optimizer
    shard = opt.single_partition_of_fp32_groups[0]
    state = opt.optimizer.state.get(shard, {})
    return {"master": shard.detach().clone(), **{k: torch.as_tensor(v).clone() for k, v in state.items()}}


def _committed(engine: Any, module: torch.nn.Module) -> list[torch.Tensor]:
    """The committed parameters in-process, without disturbing the pipeline."""
    import deepspeed_acco

    if not isinstance(engine, deepspeed_acco.AccoEngine):
        return _params(module)
    with engine.acco_optimizer.committed_parameters_loaded():
        return _params(module)


def _inject_save_crash(engine: Any) -> None:
    """Rank's next optimizer-states file: write half of its bytes, then raise (a crash mid-write)."""
    save = engine.checkpoint_engine.save

    def crashing(state_dict: Any, path: str) -> None:
        if "optim_states" not in str(path):
            return save(state_dict, path)
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        data = buf.getvalue()
        Path(path).write_bytes(data[: len(data) // 2])
        raise RuntimeError(f"injected crash while writing {path}")

    engine.checkpoint_engine.save = crashing


def _probe_latest_order(engine: Any, rank: int, save_dir: str, tag: str, record: dict[str, Any]) -> None:
    """On rank 1, before writing its optimizer-states file of ``tag``: does ``latest`` already name ``tag``?"""
    if rank != 1:
        return
    import time

    save = engine.checkpoint_engine.save

    def probing(state_dict: Any, path: str) -> None:
        if "optim_states" in str(path) and f"/{tag}/" in str(path):
            latest = Path(save_dir) / "latest"
            end = time.monotonic() + 3.0
            seen = False
            while time.monotonic() < end and not seen:
                seen = latest.exists() and latest.read_text().strip() == tag
                time.sleep(0.05)
            record["latest_before_rank1_file"] = seen
        return save(state_dict, path)

    engine.checkpoint_engine.save = probing


def ckpt_worker(rank: int, world_size: int, job: dict[str, Any]) -> dict[str, Any]:
    """One training job: optionally load, train to ``steps`` committed steps, save at micro-batch counts."""
    import deepspeed

    import deepspeed_acco
    from tests.dist_utils import allow_cpu_fp16, init_rank, logged_warnings
    from tests.workers import WithLoss

    init_rank()
    if job["cfg"].get("fp16", {}).get("enabled"):
        allow_cpu_fp16()
    model = make_model(SEED)
    module = WithLoss(model)
    init = deepspeed.initialize if job.get("plain") else deepspeed_acco.initialize
    engine, _, _, _ = init(model=module, model_parameters=module.parameters(), config=job["cfg"])
    if job.get("synthetic_link"):
        synthetic_link(engine.optimizer, *job["synthetic_link"])
    out: dict[str, Any] = {"engine": type(engine).__name__, "saved": {}}
    i = 0
    if job.get("load"):
        load_dir, tag = job["load"]
        with logged_warnings() as warnings:
            path, client_state = engine.load_checkpoint(load_dir, tag=tag, **job.get("load_kwargs", {}))
        i = client_state["data_position"]
        out["after_load"] = {"path": path, "data_position": i, "global_steps": engine.global_steps,
                             "micro_steps": engine.micro_steps, "state": _opt_state(engine),
                             "params": _committed(engine, model),
                             "warnings": [w for w in warnings if w.startswith("ACCO load")]}
    data = make_batches(SEED, world_size, job.get("num_micro", NUM_MICRO))[rank]
    saves: dict[int, tuple[str, str]] = job.get("saves", {})
    losses = []
    while engine.global_steps < job["steps"]:
        x, y = data[i]
        i += 1
        if job.get("dtype"):
            x = x.to(job["dtype"])
        if job.get("inf_at") == i and rank == 0:
            x = x * float("inf")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if i in saves:
            save_dir, tag = saves[i]
            if job.get("crash_tag") == tag and rank == 1:
                _inject_save_crash(engine)
            if job.get("probe_tag") == tag:
                _probe_latest_order(engine, rank, save_dir, tag, out)
            engine.save_checkpoint(save_dir, tag=tag, client_state={"data_position": i})
            closed = [m.step for m in getattr(engine.optimizer, "metrics", None).history] if not job.get("plain") \
                else []
            out["saved"][tag] = {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
                                 "state": _opt_state(engine), "committed": _committed(engine, model),
                                 "closed_metric_steps": closed}
    deepspeed_acco.flush(engine)
    metrics = deepspeed_acco.pop_metrics(engine)
    out.update(params=_params(model), global_steps=engine.global_steps, micro_steps=engine.micro_steps,
               losses=losses, metric_steps=[m.step for m in metrics],
               schedules={m.step: m.schedule for m in metrics},
               decisions={m.step: m.decision["schedule"] for m in metrics if m.decision},
               micro_batches=i, loss_scale=float(getattr(engine.optimizer, "loss_scale", 1.0)))
    engine.destroy()
    return out


def run_ckpt_jobs(rank: int, world_size: int, jobs: list[dict[str, Any]]) -> list[Any]:
    """Several ``ckpt_worker`` jobs one after the other in the same ranks (one spawn); a job that raises gives
    a ``JobFailure`` that fails only the tests reading it."""
    return run_jobs_isolated(rank, world_size, ckpt_worker, [(job,) for job in jobs])


def _spawn(jobs: dict[str, dict[str, Any]], timeout_s: float = 150, world: int = WORLD) -> dict[str, list[Any]]:
    results = run_distributed(run_ckpt_jobs, world, list(jobs.values()), timeout_s=timeout_s)
    return {name: [rank_results[j] for rank_results in results] for j, name in enumerate(jobs)}


# ---------------------------------------------------------------------------------------------- fixtures
def mid_step_checkpoints(cfg: dict[str, Any], ckpt: str, extra_loads: dict[str, dict[str, Any]] | None = None,
                         ) -> dict[str, list[Any]]:
    """2 ranks: an uninterrupted run ("plain"), one that saves at micro-batch 14 (the estimate boundary) and 15
    (inside the commit half with equal halves) ("saving"), then runs resumed from each ("at_estimate", "mid15") and
    from ``extra_loads`` (name -> job keys). Used by the compressed rounds' tests, whose residuals are pending there."""
    first = run_distributed(run_ckpt_jobs, 2, [
        {"cfg": cfg, "steps": STEPS},
        {"cfg": cfg, "steps": STEPS, "saves": {14: (ckpt, "at_estimate"), 15: (ckpt, "mid15")}}], timeout_s=200)
    loads = {"at_estimate": {"load": (ckpt, "at_estimate")}, "mid15": {"load": (ckpt, "mid15")}, **(extra_loads or {})}
    second = run_distributed(run_ckpt_jobs, 2, [{"cfg": cfg, "steps": STEPS, **job} for job in loads.values()],
                             timeout_s=200)
    runs = {"plain": [r[0] for r in first], "saving": [r[1] for r in first], "dir": [Path(ckpt)]}
    return {**runs, **{name: [r[j] for r in second] for j, name in enumerate(loads)}}


def assert_mid_step_resume(runs: dict[str, list[Any]], tag: str) -> dict[str, Any]:
    """The run resumed from ``tag`` and the saving run end bitwise on the uninterrupted run's parameters, on both
    ranks; returns rank 0's saved ACCO state."""
    ref, saving, run = job_result(runs, "plain"), job_result(runs, "saving"), job_result(runs, tag)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(run[rank]["params"], ref[rank]["params"])), (tag, rank)
        assert all(torch.equal(a, b) for a, b in zip(saving[rank]["params"], ref[rank]["params"])), ("saving", rank)
    return torch.load(runs["dir"][0] / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      weights_only=False)["optimizer_state_dict"]["acco"]


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("acco_ckpt")


@pytest.fixture(scope="module")
def saved(ckpt_root: Path) -> dict[str, list[dict[str, Any]]]:
    acco_dir, dpu_dir, plain_dir = (str(ckpt_root / name) for name in ("acco", "dpu", "plain"))
    acco_saves = {BOUNDARY: (acco_dir, "step3"), **{n: (acco_dir, tag) for n, tag in MID_POINTS.items()}}
    jobs = {
        "acco": {"cfg": ACCO_CFG, "steps": STEPS},
        "acco_saving": {"cfg": ACCO_CFG, "steps": STEPS, "saves": acco_saves},
        "paper": {"cfg": PAPER_CFG, "steps": STEPS},
        "paper_saving": {"cfg": PAPER_CFG, "steps": STEPS,
                         "saves": {n: (str(ckpt_root / "paper"), tag) for n, tag in MID_POINTS.items()}},
        "sync": {"cfg": SYNC_CFG, "steps": STEPS},
        "sync_saving": {"cfg": SYNC_CFG, "steps": STEPS,
                        "saves": {n: (str(ckpt_root / "sync"), tag) for n, tag in SYNC_SAVES.items()}},
        "dpu": {"cfg": DPU_CFG, "steps": STEPS},
        "dpu_saving": {"cfg": DPU_CFG, "steps": STEPS, "saves": {BOUNDARY: (dpu_dir, "step3")}},
        "bf16": {"cfg": BF16_CFG, "steps": STEPS, "dtype": torch.bfloat16},
        "bf16_saving": {"cfg": BF16_CFG, "steps": STEPS, "dtype": torch.bfloat16,
                        "saves": {15: (str(ckpt_root / "bf16"), "mid15")}},
        "plain_saving": {"cfg": PLAIN_CFG, "steps": SAVE_STEP, "plain": True,
                         "saves": {BOUNDARY: (plain_dir, "step3")}},
        "probe_plain": {"cfg": PLAIN_CFG, "steps": 1, "plain": True, "probe_tag": "t1",
                        "saves": {GA: (str(ckpt_root / "probe_plain"), "t1")}},
        "probe_acco": {"cfg": ACCO_CFG, "steps": 1, "probe_tag": "t1",
                       "saves": {GA: (str(ckpt_root / "probe_acco"), "t1")}},
        "auto": {"cfg": AUTO_CFG, "steps": AUTO_STEPS, "num_micro": AUTO_NUM_MICRO, "synthetic_link": AUTO_LINK},
        "auto_saving": {"cfg": AUTO_CFG, "steps": AUTO_STEPS, "num_micro": AUTO_NUM_MICRO,
                        "synthetic_link": AUTO_LINK,
                        "saves": {n: (str(ckpt_root / "auto"), tag) for n, tag in AUTO_SAVES.items()}},
    }
    return _spawn(jobs, timeout_s=240)


@pytest.fixture(scope="module")
def fp16_runs(ckpt_root: Path) -> dict[str, list[Any]]:
    """fp16 in spawns of its own: save while an overflowed commit is pending, then resume in new processes."""
    fp16_dir = str(ckpt_root / "fp16")
    first = _spawn({
        "fp16": {"cfg": FP16_CFG, "steps": STEPS, "dtype": torch.float16, "inf_at": FP16_INF_AT},
        "fp16_saving": {"cfg": FP16_CFG, "steps": STEPS, "dtype": torch.float16, "inf_at": FP16_INF_AT,
                        "saves": {BOUNDARY: (fp16_dir, "step3")}},
    })
    if any(isinstance(r, JobFailure) for r in first["fp16_saving"]):
        return {**first, "fp16_step3": first["fp16_saving"]}
    return {**first, **_spawn({"fp16_step3": {"cfg": FP16_CFG, "steps": STEPS, "dtype": torch.float16,
                                              "load": (fp16_dir, "step3")}})}


@pytest.fixture(scope="module")
def crashed(saved: Any, ckpt_root: Path) -> list[Any]:
    crash_dir = str(ckpt_root / "crash")
    job = {"cfg": ACCO_CFG, "steps": STEPS, "crash_tag": "bad",
           "saves": {2 * GA: (crash_dir, "good"), 3 * GA: (crash_dir, "bad")}}
    # One rank's job raises (a JobFailure), the other may fail or finish: each rank's result of the one job.
    return [rank_results[0] for rank_results in
            run_distributed(run_ckpt_jobs, WORLD, [job], timeout_s=90, expect_failure=True)]


@pytest.fixture(scope="module")
def resumed(saved: Any, crashed: Any, ckpt_root: Path) -> dict[str, list[dict[str, Any]]]:
    acco_dir, dpu_dir, plain_dir = (str(ckpt_root / name) for name in ("acco", "dpu", "plain"))
    jobs = {
        "step3": {"cfg": ACCO_CFG, "steps": STEPS, "load": (acco_dir, "step3")},
        **{tag: {"cfg": ACCO_CFG, "steps": STEPS, "load": (acco_dir, tag)} for tag in MID_POINTS.values()},
        "dpu_step3": {"cfg": DPU_CFG, "steps": STEPS, "load": (dpu_dir, "step3")},
        **{tag: {"cfg": SYNC_CFG, "steps": STEPS, "load": (str(ckpt_root / "sync"), tag)}
           for tag in SYNC_SAVES.values()},
        **{f"paper_{tag}": {"cfg": PAPER_CFG, "steps": STEPS, "load": (str(ckpt_root / "paper"), tag)}
           for tag in MID_POINTS.values()},
        "bf16_mid15": {"cfg": BF16_CFG, "steps": STEPS, "dtype": torch.bfloat16,
                       "load": (str(ckpt_root / "bf16"), "mid15")},
        "after_crash": {"cfg": ACCO_CFG, "steps": STEPS, "load": (str(ckpt_root / "crash"), None)},
        "plain_into_acco": {"cfg": ACCO_CFG, "steps": STEPS, "load": (plain_dir, "step3")},
        "acco_into_plain": {"cfg": PLAIN_CFG, "steps": STEPS, "plain": True, "load": (acco_dir, "step3")},
        # Saved with the default 3 + 1 split while its estimate round was in flight, loaded with equal halves.
        "split_mismatch": {"cfg": PAPER_CFG, "steps": STEPS, "load": (acco_dir, "mid15")},
        "module_only": {"cfg": ACCO_CFG, "steps": 2, "load": (acco_dir, "mid15"),
                        "load_kwargs": {"load_module_only": True}},
        **{tag: {"cfg": AUTO_CFG, "steps": AUTO_STEPS, "num_micro": AUTO_NUM_MICRO, "synthetic_link": AUTO_LINK,
                 "load": (str(ckpt_root / "auto"), tag)} for tag in AUTO_SAVES.values()},
    }
    return _spawn(jobs, timeout_s=240)


# ---------------------------------------------------------------------------------------------- helpers
def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _state_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.timeout(200)
def test_save_does_not_disturb_training(saved: dict[str, Any]) -> None:
    """Saving at a step boundary and three times inside a step changes nothing: bitwise the same run."""
    for base, saving in (("acco", "acco_saving"), ("dpu", "dpu_saving"), ("sync", "sync_saving")):
        for rank in range(WORLD):
            ref, run = job_result(saved, base)[rank], job_result(saved, saving)[rank]
            diff = _max_diff(ref["params"], run["params"])
            print(f"SAVE-IN-FLIGHT {saving} rank {rank}: final params max |diff| vs {base} = {diff:.3e}; "
                  f"losses identical: {ref['losses'] == run['losses']}")
            assert _bitwise(ref["params"], run["params"])
            assert ref["losses"] == run["losses"]
            assert run["metric_steps"] == list(range(1, STEPS + 1))


def _assert_resumed_exactly(runs: dict[str, Any], done: dict[str, Any], job: str, base: str) -> None:
    for rank in range(WORLD):
        run, ref = job_result(runs, job)[rank], job_result(done, base)[rank]
        saving = job_result(done, base + "_saving")[rank]
        diff = _max_diff(run["params"], ref["params"])
        print(f"RESUME {job} rank {rank}: final params max |diff| vs uninterrupted = {diff:.3e}; loss scale "
              f"{run['loss_scale']} vs {ref['loss_scale']}; saving run identical: "
              f"{_bitwise(saving['params'], ref['params'])}")
        assert _bitwise(run["params"], ref["params"]) and _bitwise(saving["params"], ref["params"])
        assert run["loss_scale"] == ref["loss_scale"] and run["global_steps"] == STEPS


@pytest.mark.timeout(200)
def test_resume_exact_in_bf16(saved: dict[str, Any], resumed: dict[str, Any]) -> None:
    """bf16, saved mid-step, resumes bit for bit."""
    _assert_resumed_exactly(resumed, saved, "bf16_mid15", "bf16")


@pytest.mark.timeout(300)
def test_resume_exact_in_fp16(fp16_runs: dict[str, Any]) -> None:
    """fp16, saved while an overflowed commit is pending, resumes bit for bit, the loss scale included (on every
    CPU: where DeepSpeed's probe refuses fp16 the ranks override it, see ``dist_utils.allow_cpu_fp16``)."""
    _assert_resumed_exactly(fp16_runs, fp16_runs, "fp16_step3", "fp16")
    assert job_result(fp16_runs, "fp16")[0]["loss_scale"] < 2**8  # the overflow happened, the scaler backed off


@pytest.mark.timeout(200)
def test_checkpoint_holds_committed_state(saved: dict[str, Any]) -> None:
    """The step-3 checkpoint's committed parameters are theta_3 of the reference; global_steps is 3."""
    rec = job_result(saved, "acco_saving")[0]["saved"]["step3"]
    ref = reference_train(make_model(SEED), make_batches(SEED, WORLD, NUM_MICRO), loss_fn, mode="acco",
                          num_steps=SAVE_STEP, gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                          max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                          estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA])
    diff = _max_diff(rec["committed"], list(ref.values()))
    print(f"COMMITTED at save (step {rec['global_steps']}) vs reference theta_3: max |diff| = {diff:.3e}")
    assert diff < 1e-5 and rec["global_steps"] == SAVE_STEP


@pytest.mark.timeout(200)
@pytest.mark.parametrize("job,base", [("step3", "acco"), ("mid13", "acco"), ("mid14", "acco"), ("mid15", "acco"),
                                      ("dpu_step3", "dpu"), ("paper_mid13", "paper"), ("paper_mid14", "paper"),
                                      ("paper_mid15", "paper"), ("sync_mid6", "sync"), ("sync_step4", "sync")])
def test_resume_in_new_processes_is_exact(saved: dict[str, Any], resumed: dict[str, Any], job: str,
                                          base: str) -> None:
    """Loading in new processes continues exactly as the uninterrupted run (params, steps, metrics, counters); with
    the default acco.estimate="extrapolated" (its offset comes from the live parameters, which the checkpoint holds)
    and "paper"; inside a synchronous step (acco.sync_steps) and where ACCO takes over from them."""
    saving = f"{base}_saving"
    tag = "step3" if job == "dpu_step3" else job.removeprefix("paper_")
    for rank in range(WORLD):
        run, ref = job_result(resumed, job)[rank], job_result(saved, base)[rank]
        at_save = job_result(saved, saving)[rank]["saved"][tag]
        diff = _max_diff(run["params"], ref["params"])
        print(f"RESUME {job} rank {rank} (data position {run['after_load']['data_position']}): final params max "
              f"|diff| vs uninterrupted = {diff:.3e}; global_steps {run['global_steps']} vs {ref['global_steps']}; "
              f"metric steps {run['metric_steps']}")
        assert _bitwise(run["params"], ref["params"])
        assert run["global_steps"] == ref["global_steps"] == STEPS
        assert run["micro_batches"] == ref["micro_batches"]
        # the data position round-trips through client_state; the engine counters are restored
        assert run["after_load"]["global_steps"] == at_save["global_steps"]
        assert run["after_load"]["micro_steps"] == at_save["micro_steps"] == run["after_load"]["data_position"]
        assert run["micro_steps"] == ref["micro_steps"]
        # StepMetrics.step continues after the load (it used to restart at 1): the steps recorded before the save
        # and those recorded after the load are every step exactly once (a step whose commit round was still
        # in flight at the save is recorded by the resumed run)
        print(f"  metric steps closed before the save {at_save['closed_metric_steps']}, after the load "
              f"{run['metric_steps']}")
        assert at_save["closed_metric_steps"] + run["metric_steps"] == list(range(1, STEPS + 1))
        assert run["losses"] == ref["losses"][run["after_load"]["data_position"]:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tag", list(AUTO_SAVES.values()))
def test_automatic_schedule_resumes_its_decision(saved: dict[str, Any], resumed: dict[str, Any], tag: str) -> None:
    """The automatic schedule saved inside a trial, and while a check's all-reduce is in flight, resumes in new
    processes as the uninterrupted run: the same schedules and decisions (the in-flight check's figures are in the
    checkpoint: without them the resumed run would check again only at step 15 and keep 0.75+int8), bit for bit."""
    for rank in range(WORLD):
        ref, saving, run = (job_result(runs, job)[rank] for runs, job in
                            ((saved, "auto"), (saved, "auto_saving"), (resumed, tag)))
        print(f"RESUME {tag} rank {rank}: schedules after the load {list(run['schedules'].values())}, decisions "
              f"{run['decisions']} (uninterrupted: {ref['decisions']}); final params max |diff| = "
              f"{_max_diff(run['params'], ref['params']):.3e}")
        assert list(ref["schedules"].values()) == AUTO_SCHEDULES and ref["decisions"] == {8: "0.75+int8", 12: "0.75"}
        assert saving["schedules"] == ref["schedules"] and saving["decisions"] == ref["decisions"]
        assert run["schedules"] == {s: ref["schedules"][s] for s in run["schedules"]}
        assert run["decisions"] == {s: d for s, d in ref["decisions"].items() if s in run["schedules"]}
        assert 12 in run["decisions"] and run["global_steps"] == AUTO_STEPS
        assert _bitwise(run["params"], ref["params"]) and _bitwise(saving["params"], ref["params"])


def _nbytes(value: Any) -> int:
    if value is None:
        return 0
    return sum(t.numel() * t.element_size() for t in value if t is not None)


@pytest.mark.timeout(200)
def test_acco_state_in_checkpoint(saved: dict[str, Any], ckpt_root: Path) -> None:
    """What each rank's optimizer-states file holds beyond ZeRO-1's, at each save point (measured)."""
    # (estimate params differ from committed, pending round's params stored, carried estimate gradient, partial sum)
    expected = {("acco", "step3"): (True, False, False, False), ("acco", "mid13"): (True, False, False, True),
                ("acco", "mid14"): (True, False, False, True), ("acco", "mid15"): (False, True, True, False),
                ("paper", "mid14"): (False, True, True, False), ("paper", "mid15"): (False, True, True, True)}
    for (run, tag), (live, shadow, carried, accumulated) in expected.items():
        path = ckpt_root / run / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        sd = torch.load(path, weights_only=False)["optimizer_state_dict"]
        acco = sd["acco"]
        zero1 = _nbytes(sd["single_partition_of_fp32_groups"]) + _nbytes(
            [v for st in sd["base_optimizer_state"]["state"].values() for v in st.values() if torch.is_tensor(v)])
        sizes = {k: _nbytes(v) for k, v in (("live", acco["live"]), ("shadow", (acco["pending"] or {}).get("shadow")),
                                            ("carried", acco["carried"]), ("accumulated", acco["accumulated"]))}
        print(f"ACCO STATE {run} {tag}: micro {acco['micro']}, pending {acco['pending']['spec']['kind']}, next "
              f"{acco['next_kind']}, step {acco['step']}; tensor bytes {sizes} vs ZeRO-1 shard+moments {zero1}; "
              f"file {path.stat().st_size} B")
        got = (sizes["live"] > 0, sizes["shadow"] > 0, sizes["carried"] > 0, sizes["accumulated"] > 0)
        assert got == (live, shadow, carried, accumulated), (run, tag, got)


@pytest.mark.timeout(200)
def test_zero_to_fp32_gives_committed_weights(saved: dict[str, Any], ckpt_root: Path) -> None:
    """DeepSpeed's zero_to_fp32 converts an ACCO checkpoint (saved mid-pipeline) to the committed weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for tag in ("step3", "mid15"):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root / "acco"), tag=tag)
        converted = [sd[f"model.{name}"].detach().float() for name, _ in make_model(SEED).named_parameters()]
        committed = job_result(saved, "acco_saving")[0]["saved"][tag]["committed"]
        diff = _max_diff(converted, committed)
        print(f"ZERO_TO_FP32 {tag}: max |diff| vs in-process committed params = {diff:.3e}")
        assert _bitwise(converted, committed)


def _loaded_diffs(run: dict[str, Any], at_save: dict[str, Any]) -> tuple[float, float]:
    """Max |diff| of the parameters and of the optimizer state right after a load, against the saved ones."""
    after = run["after_load"]
    return _max_diff(after["params"], at_save["committed"]), _state_diff(after["state"], at_save["state"])


@pytest.mark.timeout(200)
def test_plain_zero1_checkpoint_loads_into_acco(saved: dict[str, Any], resumed: dict[str, Any]) -> None:
    """A plain ZeRO-1 checkpoint loads into an ACCO run: same params and optimizer state, training goes on."""
    for rank in range(WORLD):
        run = job_result(resumed, "plain_into_acco")[rank]
        pdiff, sdiff = _loaded_diffs(run, job_result(saved, "plain_saving")[rank]["saved"]["step3"])
        print(f"MIGRATE plain->acco rank {rank}: params max |diff| {pdiff:.3e}, optimizer state max |diff| "
              f"{sdiff:.3e}; losses after {run['losses'][:2]}...; metric steps {run['metric_steps']}")
        assert pdiff == 0.0 and sdiff == 0.0
        assert all(torch.isfinite(torch.tensor(run["losses"])))
        assert run["global_steps"] == STEPS and run["metric_steps"] == list(range(SAVE_STEP + 1, STEPS + 1))
    migrated = job_result(resumed, "plain_into_acco")
    assert _bitwise(migrated[0]["params"], migrated[1]["params"])


@pytest.mark.timeout(200)
def test_load_module_only_into_acco(saved: dict[str, Any], resumed: dict[str, Any]) -> None:
    """``load_module_only`` (a warm start) takes the committed weights of a mid-step checkpoint; a fresh pipeline."""
    for rank in range(WORLD):
        run = job_result(resumed, "module_only")[rank]
        at_save = job_result(saved, "acco_saving")[rank]["saved"]["mid15"]
        pdiff = _max_diff(run["after_load"]["params"], at_save["committed"])
        mdiff = float((run["after_load"]["state"]["master"] - at_save["state"]["master"]).abs().max())
        print(f"MODULE-ONLY load rank {rank}: params max |diff| {pdiff:.3e}, fp32 master max |diff| {mdiff:.3e}; "
              f"global_steps after load {run['after_load']['global_steps']}; metric steps {run['metric_steps']}")
        assert pdiff == 0.0 and mdiff == 0.0 and run["after_load"]["global_steps"] == 0
        assert all(torch.isfinite(torch.tensor(run["losses"]))) and run["metric_steps"] == [1, 2]


@pytest.mark.timeout(200)
def test_checkpoint_from_another_split_restarts_from_committed(saved: dict[str, Any],
                                                              resumed: dict[str, Any]) -> None:
    """A checkpoint saved with another ``acco.estimate_fraction`` (3 + 1, mid-step, a round in flight) loaded with
    equal halves: a warning names both splits, the committed weights and AdamW state load exactly, the pipeline
    restarts from them at the saved ``global_steps`` and training goes on, ranks identical."""
    runs = job_result(resumed, "split_mismatch")
    for rank in range(WORLD):
        run = runs[rank]
        at_save = job_result(saved, "acco_saving")[rank]["saved"]["mid15"]
        pdiff, sdiff = _loaded_diffs(run, at_save)
        print(f"SPLIT MISMATCH rank {rank}: params max |diff| {pdiff:.3e}, optimizer state max |diff| {sdiff:.3e}; "
              f"global_steps after load {run['after_load']['global_steps']}; metric steps {run['metric_steps']}; "
              f"warnings {run['after_load']['warnings']}")
        assert pdiff == 0.0 and sdiff == 0.0
        assert len(run["after_load"]["warnings"]) == 1
        warning = run["after_load"]["warnings"][0]
        assert "acco.estimate_fraction/gradient_accumulation_steps differ" in warning, warning
        assert "('acco', 'none', 3, 1," in warning and "('acco', 'none', 2, 2," in warning, warning
        assert "restarting from the committed weights" in warning and len(warning) <= 300 + 40, warning
        steps = at_save["global_steps"]
        assert run["after_load"]["global_steps"] == steps and run["global_steps"] == STEPS
        assert run["metric_steps"] == list(range(steps + 1, STEPS + 1))
        assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert _bitwise(runs[0]["params"], runs[1]["params"])


def _sync_from_checkpoint(ckpt_dir: Path, start: int, steps: int) -> list[torch.Tensor]:
    """Plain ZeRO-1 (sync) training from the fp32 weights and AdamW state of a checkpoint, in one process."""
    files = [torch.load(ckpt_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             for r in range(WORLD)]
    sds = [f["optimizer_state_dict"] for f in files]
    master = torch.cat([sd["single_partition_of_fp32_groups"][0] for sd in sds])
    states = [sd["base_optimizer_state"]["state"][0] for sd in sds]
    model = make_model(SEED)
    n = sum(p.numel() for p in model.parameters())
    flat = torch.nn.Parameter(master[:n].clone())
    adam = torch.optim.AdamW([flat], lr=LR, weight_decay=0.01)
    adam.state[flat] = {"step": states[0]["step"].clone(),
                        "exp_avg": torch.cat([s["exp_avg"] for s in states])[:n].clone(),
                        "exp_avg_sq": torch.cat([s["exp_avg_sq"] for s in states])[:n].clone()}
    batches = make_batches(SEED, WORLD, NUM_MICRO)
    pos = start
    for _ in range(steps):
        torch.nn.utils.vector_to_parameters(flat.detach(), model.parameters())
        grad = torch.zeros(n)
        for rank in range(WORLD):
            for x, y in batches[rank][pos:pos + GA]:
                g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
                grad += torch.nn.utils.parameters_to_vector(g)
        pos += GA
        flat.grad = grad / (WORLD * GA)
        adam.step()
    return [t.clone() for t in torch.split(flat.detach(), [p.numel() for p in model.parameters()])]


@pytest.mark.timeout(200)
def test_acco_checkpoint_loads_into_plain_zero1(saved: dict[str, Any], resumed: dict[str, Any],
                                                ckpt_root: Path) -> None:
    """An ACCO checkpoint loads into plain ZeRO-1 with the committed params and optimizer state; the plain run
    then trains exactly as synchronous ZeRO-1 from those weights and AdamW state (single-process check)."""
    for rank in range(WORLD):
        run = job_result(resumed, "acco_into_plain")[rank]
        pdiff, sdiff = _loaded_diffs(run, job_result(saved, "acco_saving")[rank]["saved"]["step3"])
        print(f"MIGRATE acco->plain rank {rank}: params max |diff| {pdiff:.3e}, optimizer state max |diff| "
              f"{sdiff:.3e}; engine {run['engine']}")
        assert pdiff == 0.0 and sdiff == 0.0 and run["engine"] == "DeepSpeedEngine"
        assert all(torch.isfinite(torch.tensor(run["losses"])))
    expected = _sync_from_checkpoint(ckpt_root / "acco" / "step3", BOUNDARY, STEPS - SAVE_STEP)
    got = [p.reshape(-1) for p in job_result(resumed, "acco_into_plain")[0]["params"]]
    diff = _max_diff(got, expected)
    print(f"MIGRATE acco->plain: {STEPS - SAVE_STEP} plain steps vs single-process sync from the checkpoint: "
          f"max |diff| = {diff:.3e}")
    assert diff < 1e-6


@pytest.mark.timeout(200)
def test_latest_written_after_every_rank(saved: dict[str, Any]) -> None:
    """DeepSpeed's rank 0 writes ``latest`` before rank 1 has written its file; AccoEngine only after all ranks."""
    stock = job_result(saved, "probe_plain")[1].get("latest_before_rank1_file")
    ours = job_result(saved, "probe_acco")[1].get("latest_before_rank1_file")
    print(f"LATEST names the new tag while rank 1 is still writing: plain DeepSpeed {stock}, AccoEngine {ours}")
    assert stock is True and ours is False


@pytest.mark.timeout(30)
def test_latest_file_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AccoEngine writes ``latest`` through a temporary file and ``os.replace``: a failure before the rename
    leaves the old content whole (DeepSpeed's ``open(latest, 'w')`` truncates it first)."""
    import os

    from deepspeed_acco.integration import _write_latest_atomically

    _write_latest_atomically(str(tmp_path), "good")
    assert (tmp_path / "latest").read_text() == "good"

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("injected crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        _write_latest_atomically(str(tmp_path), "bad")
    print(f"LATEST after a failed update: {(tmp_path / 'latest').read_text()!r}")
    assert (tmp_path / "latest").read_text() == "good"


@pytest.mark.timeout(200)
def test_crash_mid_save_leaves_previous_checkpoint(crashed: list[Any], resumed: dict[str, Any],
                                                   saved: dict[str, Any], ckpt_root: Path) -> None:
    """Rank 1 dies half-way through writing tag ``bad``: ``latest`` still names ``good``, which loads and resumes
    exactly (new processes, ``load_checkpoint`` without a tag)."""
    crash_dir = ckpt_root / "crash"
    errors = [r.traceback if isinstance(r, JobFailure) else r for r in crashed if isinstance(r, (JobFailure, str))]
    print(f"CRASH ranks failed: {len(errors)}; latest = {(crash_dir / 'latest').read_text()!r}; "
          f"bad tag files: {sorted(p.name for p in (crash_dir / 'bad').iterdir())}")
    assert any("injected crash" in e for e in errors)
    assert (crash_dir / "latest").read_text() == "good"
    run = job_result(resumed, "after_crash")
    assert "/good/" in str(run[0]["after_load"]["path"])
    assert run[0]["after_load"]["global_steps"] == 2 and run[0]["after_load"]["data_position"] == 2 * GA
    diff = _max_diff(run[0]["params"], job_result(saved, "acco")[0]["params"])
    print(f"CRASH resume from 'good' to step {run[0]['global_steps']}: max |diff| vs uninterrupted = {diff:.3e}")
    assert _bitwise(run[0]["params"], job_result(saved, "acco")[0]["params"])
