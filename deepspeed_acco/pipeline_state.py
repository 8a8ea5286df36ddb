"""ACCO's pipeline state in a checkpoint: what a save adds to ZeRO-1's state dict, and how a load restores it.

A checkpoint of an ACCO run is first a ZeRO-1 checkpoint of the *committed* state theta_t: the
module weights (``AccoEngine.save_checkpoint`` saves with the committed parameters in the model),
the fp32 master shards and the optimizer moments of the last commit. Plain ZeRO-1, ``zero_to_fp32``
and universal checkpoints read it as any ZeRO-1 checkpoint and ignore the rest.

The pipeline is not at theta_t, though: in an estimate half the model runs at the estimate
theta~_{t+1}, a round may be in flight, and gradients may sit in the buffers. To resume bit for bit
at any micro-batch, each rank also writes, under ``ACCO_STATE_KEY`` of its optimizer-states file:

- the *live* parameters (what the model computes at, the estimate in an estimate half), as this
  rank's 1/N partition of each flat, all-gathered again at load; ``None`` where the partition equals
  the fp32 master cast to the parameter dtype, i.e. where live = committed (nothing to store);
- the round in flight (``pending``): the save drains it first, so it is stored as finished: its
  spec, its result, and the shadow parameters it wrote (partitioned, same ``None`` rule). At load
  it becomes a completed handle, and the next boundary finishes it as it would have;
- the carried estimate gradient: the estimate round's reduce-scattered sums, which the commit round
  adds (already a shard), and their micro-batch count;
- the partial accumulation (only when saved between two boundaries): this rank's whole compute
  buffer;
- the pending residual (compressed estimate, in a commit half): what quantization lost of this
  rank's estimate gradients, left in the estimate's buffer until the commit boundary adds it,
  and the loss scale of that estimate half;
- the compressed commit's residual (``acco.commit_compression``): what the last commit's quantization lost of
  this rank's buffer, carried into the next commit, and its loss scale; a load without it (plain ZeRO-1,
  universal) starts it at zero and logs so;
- the schedule's counters (step, round index, micro-batches in this half and this step, a pending
  commit, the next round's kind, non-finite steps), the metrics records of steps still open, and
  the engine's ``micro_steps``;
- with the automatic schedule (``schedule.py``), the schedule that runs and the chooser's state (trials,
  measurements, decisions), so that a resumed run goes on with the same decision;
- what the state is valid for: mode, estimate and commit compression, micro-batches of each half, world size,
  flat sizes. A checkpoint that differs in any of them, or has no ACCO state (plain ZeRO-1,
  universal, ``load_optimizer_states=False``), restarts the pipeline from the loaded committed
  parameters, as at the start of training.

Format versions (``"format"``), both loaded: 2 is written now; 1 (0.1.x) stored the carried
estimate sums multiplied by ``gradient_accumulation_steps`` and no ``step_micro`` (both are
converted at load). Keys added later within format 2 (``compression``, ``residual``,
``estimate_loss_scale``, ``nonfinite_*``, ``engine_micro_steps``, ``commit_compression``,
``commit_residual``) take their defaults when absent.
Tensors are stored as CPU clones: ``torch.save`` of a view would write its whole storage.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from deepspeed import comm as dist
from deepspeed.utils import logger

from deepspeed_acco.metrics import StepMetrics
from deepspeed_acco.pipeline import AccoRoundError, RoundHandle, RoundKind, RoundResult, RoundSpec, rank_partition
from deepspeed_acco.schedule import Agreement, Schedule

if TYPE_CHECKING:
    from deepspeed_acco.optimizer import AccoZeroOptimizer

__all__ = [
    "ACCO_STATE_KEY",
    "STATE_FORMAT",
    "after_checkpoint_load",
    "before_checkpoint_load",
    "discard_pipeline",
    "incompatibility",
    "restore_pipeline_state",
    "save_pipeline_state",
]

ACCO_STATE_KEY = "acco"
"""Key of ACCO's pipeline state in the ZeRO optimizer state dict (each rank's ``*_optim_states.pt``)."""

STATE_FORMAT = 2
"""Format version written by ``save_pipeline_state``."""

_READABLE_FORMATS = (1, 2)


def save_pipeline_state(opt: AccoZeroOptimizer) -> dict[str, Any]:
    """ACCO's pipeline state on this rank (call after ``opt.drain()``): enough to resume bit for bit."""
    live = opt._live_backup or opt.bit16_groups_flat
    pending = None
    if opt._in_flight is not None:
        handle = opt._in_flight
        result = handle.wait(opt._timeout_s)
        spec = handle.spec
        pending = {
            "spec": {"index": spec.index, "kind": spec.kind.value, "step": spec.step,
                     "num_micro_batches": spec.num_micro_batches, "loss_scale": spec.loss_scale},
            "result": {**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                          if f.name not in ("kind", "done_event")}, "kind": result.kind.value},
            "shadow": _saved_partitions(opt, opt._shadows),
        }
    carried = opt._round._carried
    return {
        "format": STATE_FORMAT,
        "mode": opt._mode,
        "compression": opt._round.compression,
        "min_micro": opt._half_micro[RoundKind.ESTIMATE],
        "commit_min_micro": opt._half_micro[RoundKind.COMMIT],
        "world_size": opt._world,
        "flat_numels": [flat.numel() for flat in opt.bit16_groups_flat],
        "step": opt._step,
        "round_index": opt._round_index,
        "micro": opt._micro,
        "step_micro": opt._step_micro,
        "commit_pending": opt._commit_pending,
        "next_kind": opt._next_kind.value,
        "nonfinite_steps": opt._nonfinite.total,
        "nonfinite_in_a_row": opt._nonfinite.in_a_row,
        "live": _saved_partitions(opt, live),
        "pending": pending,
        "carried": [t.detach().cpu().clone() for t in carried] if carried is not None else None,
        "carried_count": opt._round._carried_count,
        "accumulated": ([b.detach().cpu().clone() for b in opt._buffers[opt._compute_buffer]]
                        if opt._micro else None),
        "residual": ([b.detach().cpu().clone() for b in opt._buffers[opt._compute_buffer ^ 1]]
                     if opt._compress and _carries_residual(opt) else None),
        "estimate_loss_scale": opt._estimate_loss_scale,
        "commit_compression": opt._round.commit_compression,
        "commit_residual": ([t.detach().cpu().clone() for t in opt._round.commit_residual]
                            if opt._round.commit_residual is not None else None),
        "commit_residual_scale": opt._round.commit_residual_scale,
        "open_metrics": [dataclasses.asdict(r) for r in opt.metrics._open.values()],
        "engine_micro_steps": opt._engine_micro_steps,
        "schedule": opt._schedule.name if opt._schedule is not None else None,
        "auto": opt._auto.state_dict() if opt._auto is not None else None,
        "auto_agreement": opt._agreement.values() if opt._agreement is not None else None,
    }


def _carries_residual(opt: AccoZeroOptimizer) -> bool:
    """In a commit half: the estimate's buffer holds its quantization residual until the commit boundary."""
    return opt._mode == "acco" and opt._next_kind is RoundKind.COMMIT and opt._round._carried is not None


def _saved_partitions(opt: AccoZeroOptimizer, flats: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """This rank's partition of each flat, or None where it equals the (saved) fp32 master cast to its dtype."""
    out: list[torch.Tensor | None] = []
    for flat, master in zip(flats, opt.single_partition_of_fp32_groups):
        part = rank_partition(flat, opt._rank, opt._world)
        out.append(None if torch.equal(part, master.detach().to(part.dtype)) else part.detach().cpu().clone())
    return out


def incompatibility(opt: AccoZeroOptimizer, acco: dict[str, Any] | None) -> str | None:
    """Why the saved pipeline state cannot resume this run (None: it can)."""
    if acco is None:
        return "the checkpoint has no ACCO state"
    if acco.get("format") not in _READABLE_FORMATS:
        return f"unknown ACCO state format {acco.get('format')!r}"
    # Checkpoints saved before acco.estimate_fraction existed have equal halves (no commit_min_micro).
    saved = (acco["mode"], acco.get("compression", "none"), acco["min_micro"],
             acco.get("commit_min_micro", acco["min_micro"]), acco["world_size"],
             acco["flat_numels"], acco.get("commit_compression", "none"))
    current = (opt._mode, opt._round.compression, opt._half_micro[RoundKind.ESTIMATE],
               opt._half_micro[RoundKind.COMMIT], opt._world,
               [f.numel() for f in opt.bit16_groups_flat], opt._round.commit_compression)
    if saved != current:
        names = ("acco.mode", "acco.estimate_compression", "acco.estimate_fraction/gradient_accumulation_steps",
                 "acco.estimate_fraction/gradient_accumulation_steps", "world size", "the model's flat sizes",
                 "acco.commit_compression")
        differ = list(dict.fromkeys(name for name, a, b in zip(names, saved, current) if a != b))
        return (f"{', '.join(differ)} differ from the checkpoint's (saved {saved[:5]}, now {current[:5]}); "
                "use the saved values to resume exactly")
    return None


def restore_pipeline_state(opt: AccoZeroOptimizer, acco: dict[str, Any] | None) -> None:
    """After ZeRO-1's loader: put the pipeline back where the saving run was, or restart it from the loaded weights.

    Collective (all-gathers the saved parameter partitions on ACCO's group): every rank calls it.
    When the state is missing or ``incompatibility`` finds a reason (logged when there was a state),
    the pipeline restarts from the loaded (committed) parameters and ``opt.loaded_acco_state`` stays False.
    """
    opt._agreement = None
    if acco is not None and acco.get("auto") is not None and opt._auto is not None:
        # The automatic schedule resumes its decision (and a check's averaged figures, read at the next boundary),
        # and the pipeline the schedule that ran.
        opt._auto.load_state_dict(acco["auto"])
        if acco.get("auto_agreement"):
            opt._agreement = Agreement.finished(acco["auto_agreement"])
        if acco.get("schedule"):
            opt._apply_schedule(Schedule.from_name(acco["schedule"]))
    reason = incompatibility(opt, acco)
    if reason is None:
        with torch.no_grad():
            _restore(opt, acco)
        return
    if acco is not None:
        logger.warning(f"ACCO load: {reason}; restarting from the committed weights; see "
                       "docs/failures-and-checkpoints.md")
    _shadows_from_live(opt)
    _without_commit_residual(opt)


def _without_commit_residual(opt: AccoZeroOptimizer) -> None:
    """A load without ACCO's state (universal, elastic, plain ZeRO-1): the compressed commit's residual starts at
    zero, which drops the gradient mass it carried (at most half a quantization step per value); logged once."""
    opt._round.drop_commit_residual()
    if opt._round.commit_compression != "none" and opt._rank == 0 and not getattr(opt, "_said_residual_zero", False):
        opt._said_residual_zero = True
        logger.warning("ACCO load: the checkpoint has no commit residual for this run (universal, elastic or "
                       "ZeRO-1 checkpoint): acco.commit_compression's error feedback starts at zero; see "
                       "docs/failures-and-checkpoints.md")


def _restore(opt: AccoZeroOptimizer, acco: dict[str, Any]) -> None:
    """Put the pipeline back exactly where ``save_pipeline_state`` saw it (the round in flight as finished)."""
    _gather_into(opt, opt.bit16_groups_flat, acco["live"])
    pending = acco["pending"]
    if pending is None:
        _shadows_from_live(opt)
    else:
        _gather_into(opt, opt._shadows, pending["shadow"])
        s = pending["spec"]
        spec = RoundSpec(index=s["index"], kind=RoundKind(s["kind"]), step=s["step"], grads=[],
                         num_micro_batches=s["num_micro_batches"], loss_scale=s["loss_scale"], hyperparams=[])
        handle = RoundHandle(spec)
        handle._set_result(RoundResult(**{**pending["result"], "kind": RoundKind(pending["result"]["kind"])}))
        opt._in_flight = handle
    device = opt.bit16_groups_flat[0].device
    if acco["carried"] is not None:
        # Format 1 (0.1.x) carried the estimate's sums multiplied by gradient_accumulation_steps.
        undo = 1.0 / opt._ga if acco["format"] == 1 else 1.0
        opt._round._carried = [t.to(device) * undo for t in acco["carried"]]
        opt._round._carried_count = acco["carried_count"]
    if acco["accumulated"] is not None:
        for buf, saved in zip(opt._buffers[opt._compute_buffer], acco["accumulated"]):
            buf.copy_(saved)
    if acco.get("residual") is not None:
        for buf, saved in zip(opt._buffers[opt._compute_buffer ^ 1], acco["residual"]):
            buf.copy_(saved)
    opt._estimate_loss_scale = acco.get("estimate_loss_scale", 1.0)
    residual = acco.get("commit_residual")
    opt._round.commit_residual = [t.to(device) for t in residual] if residual is not None else None
    opt._round.commit_residual_scale = acco.get("commit_residual_scale", 1.0)
    opt._micro = acco["micro"]
    in_commit_half = opt._mode == "acco" and acco["next_kind"] == RoundKind.COMMIT.value
    estimate_half = opt._half_micro[RoundKind.ESTIMATE] if in_commit_half else 0
    opt._step_micro = acco.get("step_micro", opt._micro + estimate_half)
    opt._commit_pending = acco["commit_pending"]
    opt._next_kind = RoundKind(acco["next_kind"])
    opt._step = acco["step"]
    opt._round_index = acco["round_index"]
    opt._nonfinite.total = acco.get("nonfinite_steps", 0)
    opt._nonfinite.in_a_row = acco.get("nonfinite_in_a_row", 0)
    for record in acco["open_metrics"]:
        opt.metrics._open[record["step"] - 1] = StepMetrics(**record)
    opt.loaded_acco_state = True
    opt.loaded_engine_micro_steps = acco.get("engine_micro_steps")


def _gather_into(opt: AccoZeroOptimizer, flats: list[torch.Tensor], parts: list[torch.Tensor | None]) -> None:
    """All-gather saved partitions into full flats; a None partition is the loaded fp32 master's cast."""
    for flat, part, master in zip(flats, parts, opt.single_partition_of_fp32_groups):
        source = master.detach() if part is None else part
        dist.all_gather_into_tensor(flat, source.to(device=flat.device, dtype=flat.dtype), group=opt._acco_group)


def _shadows_from_live(opt: AccoZeroOptimizer) -> None:
    """No round in flight: the shadow parameters (which a round writes) start as the live ones."""
    for live, shadow in zip(opt.bit16_groups_flat, opt._shadows):
        shadow.copy_(live)


def discard_pipeline(opt: AccoZeroOptimizer) -> None:
    """Before a load: wait for the round in flight and forget everything in the pipeline."""
    if opt._in_flight is not None:
        handle, opt._in_flight = opt._in_flight, None
        try:
            handle.wait(opt._timeout_s)
        except AccoRoundError as err:  # the load replaces the state the round was writing
            logger.warning(f"ACCO load: discarding a failed round in flight: {err}")
    opt._restart_pipeline()
    opt.loaded_acco_state = False
    opt.loaded_engine_micro_steps = None


def before_checkpoint_load(opt: AccoZeroOptimizer) -> None:
    """Before DeepSpeed's load: wait for the round in flight, and change nothing else.

    So a load that finds no checkpoint leaves training as it was. A failed round is only logged:
    the load replaces the state it was writing.
    """
    opt.leave_committed()
    try:
        opt.drain()
    except AccoRoundError as err:
        logger.warning(f"ACCO load: the round in flight failed; the checkpoint replaces its state: {err}")
    opt.loaded_acco_state = False
    opt.loaded_engine_micro_steps = None


def after_checkpoint_load(opt: AccoZeroOptimizer, global_steps: int) -> None:
    """After a load without ACCO state: restart the pipeline at the engine's ``global_steps``.

    A plain ZeRO-1 checkpoint, ``load_module_only`` or ``load_optimizer_states=False`` leave the
    pipeline fresh, from the loaded parameters (as at the start of training); the committed-step
    counter (``StepMetrics.step``) then follows ``global_steps``. With ACCO state, only check that
    the two step counts agree.
    """
    if opt.loaded_acco_state:
        if opt._step != global_steps:
            logger.warning(f"ACCO load: the ACCO state counts {opt._step} committed steps, the engine "
                           f"{global_steps}")
        return
    discard_pipeline(opt)
    _without_commit_residual(opt)
    opt._nonfinite.in_a_row = 0
    opt._step = global_steps
    opt._round_index = global_steps * (2 if opt._mode == "acco" else 1)
    _shadows_from_live(opt)


class CheckpointedPipeline:
    """``AccoZeroOptimizer``'s checkpoint methods: ZeRO-1's, plus ACCO's pipeline state (this module's functions).
    ``AccoEngine.load_checkpoint`` calls ``before_checkpoint_load`` and ``after_checkpoint_load`` around
    DeepSpeed's load."""

    _rank: int

    def state_dict(self) -> dict[str, Any]:
        """ZeRO-1's state dict of the committed state, plus ACCO's pipeline state under ``"acco"``.

        Drains the round in flight first; does not disturb training (unlike ``flush``). DeepSpeed's
        own loaders (plain ZeRO-1, ``zero_to_fp32``) ignore the extra key. What it holds: ``pipeline_state``.
        """
        self.drain()
        state = super().state_dict()
        state[ACCO_STATE_KEY] = save_pipeline_state(self)  # type: ignore[arg-type]
        return state

    def load_state_dict(self, state_dict_list: Any, load_optimizer_states: bool = True,
                        load_from_fp32_weights: bool = False, checkpoint_folder: Any = None,
                        load_serial: Any = None, param_shapes: Any = None) -> None:
        """ZeRO-1's loader, then ACCO's pipeline state when the checkpoint has one.

        Collective (all-gathers the saved parameter partitions on ACCO's group): every rank calls
        it, as ``engine.load_checkpoint`` does. Without ACCO state (a plain ZeRO-1 checkpoint, a
        universal checkpoint, another mode or GA) the pipeline restarts from the loaded parameters.
        """
        discard_pipeline(self)  # type: ignore[arg-type]
        super().load_state_dict(state_dict_list, load_optimizer_states=load_optimizer_states,
                                load_from_fp32_weights=load_from_fp32_weights,
                                checkpoint_folder=checkpoint_folder, load_serial=load_serial,
                                param_shapes=param_shapes)
        own = state_dict_list[self._rank] if state_dict_list and not checkpoint_folder else None
        acco = own.get(ACCO_STATE_KEY) if isinstance(own, dict) and load_optimizer_states else None
        restore_pipeline_state(self, acco)  # type: ignore[arg-type]

    def before_checkpoint_load(self) -> None:
        """Called by ``AccoEngine.load_checkpoint`` before DeepSpeed's load: wait for the round in flight.

        Nothing else changes here, so a load that finds no checkpoint leaves training as it was.
        """
        before_checkpoint_load(self)  # type: ignore[arg-type]

    def after_checkpoint_load(self, global_steps: int) -> None:
        """Called by ``AccoEngine.load_checkpoint`` after a load: without ACCO state, restart the pipeline.

        It restarts from the loaded parameters, at the engine's ``global_steps`` (a plain ZeRO-1
        checkpoint, ``load_module_only``, ``load_optimizer_states=False``).
        """
        after_checkpoint_load(self, global_steps)  # type: ignore[arg-type]
