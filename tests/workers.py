"""Functions that run inside the ranks spawned by ``dist_utils.run_distributed``.

They build a small deterministic model and per-rank data from a seed, so that a single-process
reference (``acco_reference.py``) can recompute the same training from the same inputs.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

__all__ = ["DEEPSPEED_DEFAULT_CLIP", "DEFAULT_ESTIMATE_HALF", "DEFAULT_ESTIMATE_SHIFT", "PAPER_ESTIMATE_SHIFT",
           "make_model", "make_batches", "WithLoss", "train_worker", "base_config", "loss_fn"]

IN, HIDDEN, OUT, MICRO = 8, 16, 4, 4
DEEPSPEED_DEFAULT_CLIP = 1.0
"""DeepSpeed's ``gradient_clipping`` when a config does not set it (0.19: 1.0); references of runs with
``base_config`` clip at it, as the engine does."""
DEFAULT_ESTIMATE_SHIFT = (1.1, 0.2)
"""The reference's ``estimate_shift`` for a config that leaves ``acco.estimate`` at its default
(``"extrapolated"``: theta_t + 1.1 (Opt(theta_t, G~_t) - theta_t) + 0.2 (theta~_t - theta_t), docs/how-it-works.md).
Written out here, not read from the package, so a wrong constant there fails the parity tests."""
PAPER_ESTIMATE_SHIFT = (1.0, 0.0)
"""The reference's ``estimate_shift`` for ``"estimate": "paper"``: theta~_{t+1} = Opt(theta_t, G~_t)."""
DEFAULT_ESTIMATE_HALF = {2: 1, 3: 2, 4: 3, 6: 5, 8: 6}
"""The reference's ``estimate_micro_batches`` per ``gradient_accumulation_steps`` for a config that leaves
``acco.estimate_fraction`` at its default (0.75: three quarters of a step's micro-batches in the estimate half,
rounded half up, each half at least one). Written out, not computed by the package."""


def make_model(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """A tiny fp32 MLP with a deterministic initialisation (``hidden`` wide: about ``13 x hidden`` parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, OUT))


def make_batches(seed: int, world_size: int, num_micro: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``batches[rank][i]``: micro-batch i of each rank, from a seeded generator."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [[(torch.randn(MICRO, IN, generator=gen), torch.randn(MICRO, OUT, generator=gen))
             for _ in range(num_micro)] for _ in range(world_size)]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one micro-batch."""
    return torch.nn.functional.mse_loss(out, y)


class WithLoss(nn.Module):
    """Wraps a model so that ``engine(x, y)`` returns the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.model(x).float(), y.float())


SCHEDULE_KEYS = ("estimate_fraction", "estimate_compression")
PINNED_SCHEDULE = {"estimate_fraction": 0.75}
"""What the tests add to an ACCO block that sets no schedule key: the automatic schedule's choices depend on
measured timings, so tests that compare with a reference or resume bit for bit pin the default schedule."""


def pin_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ACCO block pinned to ``PINNED_SCHEDULE`` where the block would run the automatic
    schedule (enabled, mode acco, no adaptive accumulation, no schedule key)."""
    acco = config.get("acco")
    if isinstance(acco, dict) and acco.get("enabled") and acco.get("mode", "acco") == "acco" and \
            not acco.get("adaptive_accumulation") and not set(SCHEDULE_KEYS) & acco.keys():
        config = {**config, "acco": {**acco, **PINNED_SCHEDULE}}
    return config


def base_config(ga: int = 4, lr: float = 1e-2, auto_schedule: bool = False, **extra: Any) -> dict[str, Any]:
    """A ZeRO-1 config with torch's AdamW (no JIT build); an ACCO block in ``extra`` runs a pinned schedule
    (``pin_schedule``) unless ``auto_schedule``."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ga,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    cfg.update(copy.deepcopy(extra))
    return cfg if auto_schedule else pin_schedule(cfg)


def train_worker(rank: int, world_size: int, cfg: dict[str, Any], steps: int, seed: int = 0,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``steps`` committed steps through the public API; return params, counts, metrics.

    options: ``slow_s`` (CPU-bound work per micro-batch on rank 1, to slow it), ``use_install`` (go
    through ``install()`` + plain ``deepspeed.initialize``), ``plain_deepspeed``, ``dtype``
    ("bf16"/"fp16": cast inputs), ``inf_at`` (an inf input on rank 0 at that micro-batch), ``repeat``,
    ``check_rollback``, ``prescaled`` (divide the loss by the step's micro-batch count here and call
    ``backward(scale_wrt_gas=False)``, as the HF Trainer does), ``force_in_step`` ({step: j}: the caller ends
    committed step ``step`` (0-based) after its j-th micro-batch on this rank, with
    ``set_gradient_accumulation_boundary(True)`` before that backward, then gives the boundary back to DeepSpeed),
    ``watch_compression`` (see ``_watch_compression``), ``watch_commit`` (``_watch_commit_compression``),
    ``script_schedule`` (``_script_schedule``), ``synthetic_link`` (the function of that name).
    """
    import deepspeed

    import deepspeed_acco
    from tests.dist_utils import allow_cpu_fp16, init_rank

    opts = options or {}
    init_rank()
    fp16_forced = allow_cpu_fp16() if cfg.get("fp16", {}).get("enabled") else False
    model = make_model(seed)
    module = WithLoss(model)
    if opts.get("use_install"):
        deepspeed_acco.install()
        init = deepspeed.initialize
    elif opts.get("plain_deepspeed"):
        init = deepspeed.initialize
    else:
        init = deepspeed_acco.initialize
    engine, _, _, _ = init(model=module, model_parameters=module.parameters(), config=cfg)
    out: dict[str, Any] = {"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__,
                           "fp16_forced": fp16_forced}
    rollback_checks: list[bool] = []
    if opts.get("check_rollback"):
        _watch_estimate_rollback(engine.optimizer, rollback_checks)
    compression: dict[str, list[Any]] = {"commit_vs_exact": [], "update_error_over_bound": []}
    if opts.get("watch_compression"):
        _watch_compression(engine.optimizer, compression)
    commit_watch: dict[str, list[Any]] = {"drift": [], "drift_over_bound": [], "residual_drops": []}
    if opts.get("watch_commit"):
        _watch_commit_compression(engine.optimizer, commit_watch)
    if opts.get("script_schedule"):
        _script_schedule(engine.optimizer, opts["script_schedule"])
    if opts.get("synthetic_link"):
        synthetic_link(engine.optimizer, opts["synthetic_link"])
    num_micro = opts.get("num_micro", steps * cfg["gradient_accumulation_steps"] * 6 + 8)
    data = make_batches(seed, world_size, num_micro)[rank]
    if opts.get("repeat"):  # a few micro-batches seen again and again: a loss that can fall
        data = [data[j % opts["repeat"]] for j in range(num_micro)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.get("dtype", ""), None)
    losses, lrs, i = [], [], 0
    forced: dict[int, int] = opts.get("force_in_step", {})
    in_step = 0  # this rank's micro-batches in the current step
    while engine.global_steps < steps:
        x, y = data[i]
        i += 1
        in_step += 1
        if dtype is not None:
            x = x.to(dtype)
        if opts.get("slow_s") and rank == 1:
            _busy(opts["slow_s"])
        if opts.get("inf_at") == i and rank == 0:
            x = x * float("inf")
        ends_here = forced.get(engine.global_steps) == in_step
        if ends_here:
            engine.set_gradient_accumulation_boundary(True)
        loss = engine(x, y)
        if opts.get("prescaled"):
            engine.backward(loss / forced.get(engine.global_steps, cfg["gradient_accumulation_steps"]),
                            scale_wrt_gas=False)
        else:
            engine.backward(loss)
        before = engine.global_steps
        engine.step()
        if ends_here:
            engine.set_gradient_accumulation_boundary(None)
        if engine.global_steps != before:
            in_step = 0
        losses.append(float(loss.detach()))
        lrs.append(engine.get_lr()[0])
    deepspeed_acco.flush(engine)
    out["micro_batches"] = i
    out["global_steps"] = engine.global_steps
    out["params"] = [p.detach().float().clone() for p in model.parameters()]
    out["metrics"] = [m.as_dict() for m in deepspeed_acco.pop_metrics(engine)]
    out["losses"] = losses
    out["lrs"] = lrs
    out["rollback_checks"] = rollback_checks
    out["compression"] = compression
    out["commit_watch"] = commit_watch
    out["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", 1.0))
    out["param_dtype"] = str(next(model.parameters()).dtype)
    sharded = getattr(engine.optimizer, "_round", None)
    if sharded is not None:  # which kernels and which round layout ran
        layout = sharded.layout
        out["round"] = {"layout": (layout.nodes, layout.per_node) if layout is not None else None,
                        "quantizer": sharded.quantizer.path if sharded.quantizer is not None else None,
                        "fused_adam": sharded.fused is not None}
    if opts.get("use_install"):
        deepspeed_acco.uninstall()
    worker = getattr(engine.optimizer, "_worker", None)
    engine.destroy()
    out["worker_alive_after_destroy"] = worker.alive if worker is not None else None
    return out


def _script_schedule(optimizer: Any, script: dict[int, str]) -> None:
    """The automatic schedule switches at the boundaries ``script`` names ({step: schedule name}) instead of where
    its measurements say: the switch path (wait for the commit, restart from it) runs whatever the timings."""
    from deepspeed_acco.schedule import Schedule

    auto = optimizer._auto
    auto.trial_over = lambda: False
    auto.check_due = lambda step: step + 1 in script  # a check's figures are read at the next boundary
    auto.check = lambda step, summary: auto._switch(Schedule.from_name(script[step]), step)


def synthetic_link(optimizer: Any, summaries: dict[str, list[float]],
                   later: tuple[int, dict[str, list[float]]] | None = None) -> None:
    """The automatic schedule measures ``summaries`` ({schedule name: ``SUMMARY`` medians}) for whatever schedule
    runs: its trials, the end of the last one, its decision and its checks take their real path, whatever the
    timings. ``later`` (step, summaries): from the boundary of that committed step on, those summaries instead."""
    auto = optimizer._auto

    def local_summary() -> list[float]:
        table = {**summaries, **later[1]} if later is not None and optimizer._step >= later[0] else summaries
        return list(table[auto.current.name])

    auto.local_summary = local_summary


def _busy(seconds: float) -> None:
    """Really slow this rank down: CPU-bound matrix products (they release the GIL, like compute)."""
    a = torch.randn(96, 96)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def _state_copy(optimizer: Any) -> list[Any]:
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state.get(p, {}).items()}
            for p in optimizer.param_groups[0]["params"]] + [p.detach().clone()
                                                             for p in optimizer.param_groups[0]["params"]]


def _same(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, dict):
            if x.keys() != y.keys() or not _same(list(x.values()), list(y.values())):
                return False
        elif torch.is_tensor(x):
            if not (torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _watch_estimate_rollback(optimizer: Any, checks: list[bool]) -> None:
    """Around every estimate round: is the shard's optimizer state and master weight bit-identical after it?"""
    from deepspeed_acco.pipeline import RoundKind

    run = optimizer._round.run

    def checked(spec: Any) -> Any:
        if spec.kind is not RoundKind.ESTIMATE:
            return run(spec)
        before = _state_copy(optimizer.optimizer)
        result = run(spec)
        checks.append(_same(before, _state_copy(optimizer.optimizer)))
        return result

    optimizer._worker._run_round = checked


def _watch_compression(optimizer: Any, record: dict[str, list[Any]]) -> None:
    """Around a compressed estimate's rounds, on this rank (all-reduces on ACCO's group, inside the rounds):

    - ``commit_vs_exact``: per commit, the commit's reduced gradient shard against the exact sum over the
      ranks of both halves' gradients as computed (raw buffers, before quantization and residual), max |diff|
      relative to max |exact|;
    - ``update_error_over_bound``: per estimate, max over this rank's shard of |theta~ - (theta_t + update)|
      divided by its block's quantization bound max|update| / 254 (<= 1 within fp32 rounding).
    """
    import torch.distributed as torch_dist

    from deepspeed_acco.pipeline import RoundKind, rank_partition

    sharded = optimizer._round
    raw: dict[str, Any] = {}
    add_residual = optimizer._add_residual

    def watched_add_residual(grads: list[Any], loss_scale: float) -> None:
        raw["commit_half"] = [g.detach().clone() for g in grads]
        add_residual(grads, loss_scale)

    optimizer._add_residual = watched_add_residual
    rs_quantized = sharded._reduce_scatter_quantized

    def watched_rs_quantized(spec: Any) -> Any:
        raw["estimate_half"] = [g.detach().clone() for g in spec.grads]
        return rs_quantized(spec)

    sharded._reduce_scatter_quantized = watched_rs_quantized
    step_shard = sharded._step_shard

    def watched_step(spec: Any, sums: list[Any], *args: Any) -> Any:
        if spec.kind is RoundKind.COMMIT and "estimate_half" in raw and "commit_half" in raw:
            exact = raw.pop("estimate_half")[0] + raw.pop("commit_half")[0]
            torch_dist.all_reduce(exact, group=sharded.group)
            mine = rank_partition(exact, sharded.rank, sharded.world_size) / spec.loss_scale
            record["commit_vs_exact"].append(float((sums[0] - mine).abs().max() / mine.abs().max()))
        return step_shard(spec, sums, *args)

    sharded._step_shard = watched_step
    gather_update = sharded._all_gather_quantized_update

    def watched_gather(spec: Any, stepped: list[Any], old: list[Any]) -> None:
        if spec.kind is not RoundKind.ESTIMATE:
            return gather_update(spec, stepped, old)
        master, new = sharded.master_shards[0].detach().clone(), stepped[0].detach().clone()
        gather_update(spec, stepped, old)
        update = (new - master).view(-1)
        block = sharded.block
        bound = torch.stack([chunk.abs().max() / 254 for chunk in update.split(block)])
        own = rank_partition(sharded.shadow_flats[0], sharded.rank, sharded.world_size)
        error = (own.float() - (master + update)).abs()
        per_block = torch.stack([chunk.max() for chunk in error.split(block)])
        record["update_error_over_bound"].append(float((per_block / bound.clamp_min(1e-30)).max()))

    sharded._all_gather_quantized_update = watched_gather


def _watch_commit_compression(optimizer: Any, record: dict[str, list[Any]]) -> None:
    """Around a compressed commit's rounds, on this rank:

    - ``drift``: per commit, max |theta_{t+1} - master_{t+1}| over this rank's partition of the weights the ranks
      now hold (the int8 update rebuilt), and ``drift_over_bound``: the same per block over its quantization bound,
      max |master_{t+1} - theta_t| / 254 (<= 1 within fp32 rounding: half a step of the update, nothing accumulates);
    - ``residual_drops``: how many times the commit residual was dropped (a non-finite step).
    """
    from deepspeed_acco.pipeline import RoundKind, rank_partition

    sharded = optimizer._round
    gather_update = sharded._all_gather_quantized_update
    drop = sharded.drop_commit_residual

    def watched_gather(spec: Any, stepped: list[Any], old: list[Any]) -> None:
        if spec.kind is not RoundKind.COMMIT:
            return gather_update(spec, stepped, old)
        master, held = stepped[0].detach().float().clone(), old[0].detach().float().clone()
        gather_update(spec, stepped, old)
        own = rank_partition(sharded.shadow_flats[0], sharded.rank, sharded.world_size).float()
        error = (own - master).abs()
        bound = torch.stack([chunk.abs().max() / 254 for chunk in (master - held).split(sharded.block)])
        per_block = torch.stack([chunk.max() for chunk in error.split(sharded.block)])
        record["drift"].append(float(error.max()))
        record["drift_over_bound"].append(float((per_block / bound.clamp_min(1e-30)).max()))

    def counted_drop() -> None:
        record["residual_drops"].append(1)
        drop()

    sharded._all_gather_quantized_update = watched_gather
    sharded.drop_commit_residual = counted_drop


def run_jobs(rank: int, world_size: int, jobs: list[tuple[Any, ...]]) -> list[Any]:
    """Several ``train_worker`` jobs one after the other in the same ranks (one spawn); a job that raises
    gives a ``JobFailure`` (read the results with ``dist_utils.job_result``)."""
    from tests.dist_utils import run_jobs_isolated

    return run_jobs_isolated(rank, world_size, train_worker, jobs)


def tiny_lm(seq_len: int | None = None) -> tuple[Any, Any]:
    """``examples/train_lm.py`` as a module and its parsed model/data arguments for the tiny preset."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import train_lm

    p = argparse.ArgumentParser()
    train_lm.add_model_data_arguments(p)
    argv = ["--preset", "tiny"] + (["--seq_len", str(seq_len)] if seq_len is not None else [])
    return train_lm, train_lm.finish_model_data_arguments(p.parse_args(argv))


def ds_config(name: str, auto_schedule: bool = False) -> dict[str, Any]:
    """One of the repository's ``ds_configs/*.json``, as a dict (its ACCO block pinned unless ``auto_schedule``)."""
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / name).read_text())
    return config if auto_schedule else pin_schedule(config)


def train_tiny_lm(rank: int, world_size: int, config: dict[str, Any], steps: int, seq_len: int | None = None,
                  init_timeout_s: float = 60.0) -> tuple[Any, Any, Any, Any, int]:
    """In a spawned rank: train the main job's tiny GPT-2 (its data shards and initialization) for ``steps``
    committed steps through the public API, then flush. Returns (engine, model, corpus, args, micro-batches
    consumed); the caller destroys the engine."""
    import deepspeed_acco
    from tests.dist_utils import init_rank

    init_rank(timeout_s=init_timeout_s)
    train_lm, args = tiny_lm(seq_len)
    corpus = train_lm.build_corpus(args)
    model = train_lm.build_model(args, corpus.vocab_size, corpus.eot_id)
    engine, *_ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(), config=config)
    windows = train_lm.ShardedWindows(corpus.train, args.seq_len, config["train_micro_batch_size_per_gpu"], rank,
                                      world_size, args.seed)
    i = 0
    while engine.global_steps < steps:
        ids = windows[i]
        i += 1
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    deepspeed_acco.flush(engine)
    return engine, model, corpus, args, i


def replay_schedules(schedules: list[str], world: int, ga: int) -> dict[str, Any]:
    """The reference's arguments (``step_rounds``, ``compressed_steps``, ``restart_after``) for the schedule each
    committed step ran (``StepMetrics.schedule``: ``sync``, ``0.75``, ``0.5+int8``...): a switch restarts the
    pipeline after the step before it, a sync step is one round of ``ga`` micro-batches."""
    from deepspeed_acco.split import split_micro_batches

    rounds: list[list[list[int]]] = []
    for name in schedules:
        if name == "sync":
            rounds.append([[ga] * world])
        else:
            estimate, commit = split_micro_batches(ga, float(name.split("+")[0]))
            rounds.append([[estimate] * world, [commit] * world])
    return {"step_rounds": rounds,
            "compressed_steps": [t for t, name in enumerate(schedules) if name.endswith("+int8")],
            "restart_after": [t for t in range(len(schedules) - 1) if schedules[t] != schedules[t + 1]]}
