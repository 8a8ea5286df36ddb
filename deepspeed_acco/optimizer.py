"""``AccoZeroOptimizer``: DeepSpeed's ZeRO-1 optimizer with ACCO's schedule (``acco-algorithm.md``).

It keeps ZeRO-1's flattening and partitioning and replaces the synchronous boundary (reduce, step, all-gather)
by rounds run in the background (``pipeline.py``). This module is the schedule: accumulate, decide a boundary,
hand the buffer to the worker, load the parameters a round produced. Boundaries, counted in micro-batches on this
rank (a step's ``gradient_accumulation_steps`` split by ``split.split_micro_batches``):

- mode ``acco``: an estimate half, then a boundary that launches an estimate round; a commit half, then the
  engine's accumulation boundary: ``engine.step()`` launches the commit round and counts ``global_steps``;
- mode ``dpu``: every ``gradient_accumulation_steps`` micro-batches, a commit;
- ``adaptive_accumulation``: after at least a half's micro-batches, as soon as the round in flight is done.

Elsewhere: the committed weights (``committed.py``), the automatic schedule (``schedule.py``), NaN/Inf steps
(``nonfinite.py``), ACCO's process groups (``topology.py``), what a checkpoint holds (``pipeline_state.py``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import logger

from deepspeed_acco import log
from deepspeed_acco.committed import CommittedWeights
from deepspeed_acco.config import ESTIMATE_SHIFTS, AccoConfig
from deepspeed_acco.metrics import MetricsLog, StepMetrics
from deepspeed_acco.nonfinite import AccoNonFiniteGradients, NonFiniteSteps
from deepspeed_acco.pipeline import (
    AccoCommWorker,
    RoundHandle,
    RoundKind,
    RoundResult,
    RoundSpec,
    ShardedRound,
    rank_partition,
    swap_contents,
)
from deepspeed_acco.pipeline_state import ACCO_STATE_KEY, CheckpointedPipeline
from deepspeed_acco.schedule import AutoSchedule, Schedule, ScheduleSwitching
from deepspeed_acco.split import split_micro_batches
from deepspeed_acco.topology import acco_node_layout, acco_process_group

__all__ = ["AccoNonFiniteGradients", "AccoZeroOptimizer", "ACCO_STATE_KEY"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HYPERPARAM_SKIP = ("params",)


class AccoZeroOptimizer(CommittedWeights, ScheduleSwitching, CheckpointedPipeline, DeepSpeedZeroOptimizer):
    """ZeRO-1 with ACCO's overlapped accumulate-while-communicate pipeline.

    Built by the engine exactly like ``DeepSpeedZeroOptimizer`` (same arguments), plus the
    parsed ``"acco"`` block. Use it through ``deepspeed_acco.initialize`` or ``install()``.
    """

    max_consecutive_nonfinite_steps: int = 3
    """Without fp16 loss scaling: this many committed steps in a row skipped for NaN/Inf gradients raise
    ``AccoNonFiniteGradients`` on every rank (0: never). Set it on the class or on ``engine.optimizer``."""

    def __init__(self, *args: Any, acco_config: AccoConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert not self.partition_gradients, "AccoZeroOptimizer is ZeRO stage 1 only"
        self.acco_config = acco_config
        self._ga = ga = int(kwargs.get("gradient_accumulation_steps", 1))
        self._mode = acco_config.mode
        acco = self._mode == "acco"
        # The minimum micro-batches of each half of a step (dpu: one half, the commit).
        estimate_half, commit_half = split_micro_batches(ga, acco_config.estimate_fraction) if acco else (ga, ga)
        self._half_micro = {RoundKind.ESTIMATE: estimate_half, RoundKind.COMMIT: commit_half}
        self._max_micro = acco_config.max_micro_batches_per_round or 2 * ga
        self._sync_steps = acco_config.sync_steps if acco else 0
        self._adaptive = acco_config.adaptive_accumulation
        self._lr_sqrt = acco_config.lr_scaling == "sqrt"
        self._timeout_s = acco_config.round_timeout_s
        ranks = dist.get_all_ranks_from_group(self.dp_process_group)
        self._acco_group = acco_process_group(ranks, self._timeout_s)
        self._world, self._rank = len(ranks), dist.get_rank(group=self.dp_process_group)

        flats = self.bit16_groups_flat
        acc_dtype = _DTYPES[acco_config.grad_accum_dtype]
        self._buffers = [[torch.zeros(f.numel(), dtype=acc_dtype, device=f.device) for f in flats] for _ in range(2)]
        self._compute_buffer = 0
        self._offsets = [self._param_offsets(i) for i in range(len(flats))]
        self._shadows = [f.detach().clone() for f in flats]
        self._stream = torch.cuda.Stream(device=flats[0].device) if flats[0].is_cuda else None
        # The automatic schedule (schedule.py) may pick the int8 estimate: its kernels and node groups are made here.
        self._auto = AutoSchedule() if acco and acco_config.automatic_schedule else None
        compression = "int8" if self._auto is not None else acco_config.estimate_compression if acco else "none"
        commit_compression = acco_config.commit_compression
        layout = acco_node_layout(ranks, self._rank, self._acco_group, flats[0].device, self._timeout_s) \
            if "int8" in (compression, commit_compression) else None
        self._round = ShardedRound(  # dpu has no estimate round: nothing to compress or shift
            base_optimizer=self.optimizer, master_shards=list(self.single_partition_of_fp32_groups),
            shadow_flats=self._shadows, group=self._acco_group, rank=self._rank, world_size=self._world,
            comm_dtype=self.communication_data_type, clip_grad=float(self.clip_grad), compression=compression,
            block=acco_config.compression_block_size, stream=self._stream, layout=layout,
            commit_compression=commit_compression,
            estimate_shift=ESTIMATE_SHIFTS[acco_config.estimate if acco else "paper"])
        # The int8 kernels compile here, also where only the automatic schedule may try them: compiled at its first
        # int8 trial, the pause (2-3 s) made that trial measure 15-25 % slow on a shaped link (docs/how-it-works.md).
        self._prepare_kernels()
        self._shift_estimate = self._round.estimate_shift != ESTIMATE_SHIFTS["paper"]
        self._compress = compression != "none"
        self._schedule = Schedule(acco_config.estimate_fraction, compression) if acco else None
        self._sync_schedule = False  # the schedule that runs is ZeRO-1's synchronous step
        self._last_commit_at = time.perf_counter()
        if self._auto is not None:
            self._apply_schedule(self._auto.current)
        self._estimate_loss_scale = 1.0  # loss scale of the estimate half whose residual the commit takes
        self._worker = AccoCommWorker(self._round.run)

        self.metrics = MetricsLog()
        self._in_flight: RoundHandle | None = None
        self._micro = 0
        self._next_kind = RoundKind.ESTIMATE if self._mode == "acco" else RoundKind.COMMIT
        self._round_index = 0
        self._step = 0  # committed steps launched
        self._commit_pending = False
        self._direct_commit = False  # the caller ended the step inside an estimate half (see end_step_early)
        self._caller_ended_step = False  # this step was ended by the caller (end_step_early)
        self._step_micro = 0  # this rank's micro-batches since the last commit boundary
        self.caller_normalized_loss = False  # backward(scale_wrt_gas=False): the caller divided the loss itself
        self.caller_boundary: bool | None = None  # the caller's set_gradient_accumulation_boundary (None: ACCO's)
        self._warned_short_steps = False
        self._half_start = time.perf_counter()
        self.overflow = False
        self._nonfinite = NonFiniteSteps()
        # Committed weights (committed.py) and checkpoints (pipeline_state.py).
        self._live_backup: list[torch.Tensor] | None = None
        self._committed_in_model = False
        self._engine_micro_steps: int | None = None  # set by AccoEngine.save_checkpoint around its save
        self.loaded_acco_state = False
        self.loaded_engine_micro_steps: int | None = None

    def _prepare_kernels(self) -> None:
        """Compile the int8 kernels for the rounds' shapes (``quantize.Quantizer``), outside any round; log the path."""
        line = self._round.prepare_kernels(self.bit16_groups_flat, self._buffers[0][0].dtype)
        if line and self._round.quantizer.path != "compiled":
            logger.warning(line)
        elif line and self._rank == 0:
            log.info(line)

    # ------------------------------------------------------------------ gradients
    def _param_offsets(self, i: int) -> dict[int, int]:
        """Element offset of each parameter (by id) inside its group's flat buffer (params are views)."""
        flat = self.bit16_groups_flat[i]
        return {id(p): (p.data_ptr() - flat.data_ptr()) // flat.element_size() for p in self.bit16_groups[i]}

    def process_gradients(self, param: torch.nn.Parameter, i: int) -> None:
        """Hook target: add ``param.grad`` into the compute-side flat buffer and free it."""
        if param.grad is None:
            return
        start = self._offsets[i][id(param)]
        buf = self._buffers[self._compute_buffer][i]
        buf.narrow(0, start, param.numel()).add_(param.grad.detach().reshape(-1))
        param.grad = None

    def reduce_gradients(self, pipeline_parallel: bool = False) -> None:
        """No-op: gradients are reduced by the background rounds."""

    def overlapping_partition_gradients_reduce_epilogue(self) -> None:
        """No-op: gradients are reduced by the background rounds."""

    def independent_gradient_partition_epilogue(self) -> None:
        """No-op: gradients are reduced by the background rounds."""

    def backward_epilogue(self, *args: Any, **kwargs: Any) -> None:
        """End of a micro-batch's backward: count it; launch an estimate round or mark the commit, when due. A
        caller that manages the boundary (``caller_boundary``: the HF Trainer, accelerate) ends the step itself."""
        if self._commit_pending:
            raise RuntimeError(
                "ACCO: a micro-batch's backward ran while a commit boundary was pending. Call engine.step() "
                "after every engine.backward() (or manage the boundary with "
                "engine.set_gradient_accumulation_boundary, as the HF Trainer and accelerate do).")
        self._micro += 1
        self._step_micro += 1
        if not self._boundary_reached():
            return
        if self._next_kind is RoundKind.ESTIMATE and not self._synchronous_step():
            self._launch_boundary()
        elif self.caller_boundary is None:
            self._direct_commit = self._next_kind is RoundKind.ESTIMATE
            self._commit_pending = True

    def _synchronous_step(self) -> bool:
        """This step is ZeRO-1's (``sync_steps``, or the automatic schedule's choice): all its micro-batches at
        theta_t, committed directly."""
        return self._sync_schedule or self._step < self._sync_steps

    def _boundary_reached(self) -> bool:
        if self._next_kind is RoundKind.ESTIMATE and self._synchronous_step():
            return self._micro >= self._ga
        if self._micro < self._half_micro[self._next_kind]:
            return False
        if not self._adaptive or self._in_flight is None or self._micro >= self._max_micro:
            return True
        return self._in_flight.done()

    @property
    def commit_pending(self) -> bool:
        """True after the micro-batch that ends a step: the next ``engine.step()`` commits."""
        return self._commit_pending

    # ------------------------------------------------------------------ boundaries
    def end_step_early(self) -> None:
        """The caller ends the step at this micro-batch (``acco-algorithm.md``, "Caller-forced boundaries").

        In a commit half the next ``step()`` commits what has accumulated; in an estimate half it commits this
        half alone and restarts the pipeline from the new committed weights (both waits exposed). Under adaptive
        accumulation one all-reduce on the engine's group aligns ranks that are in different halves.
        docs/how-it-works.md, "Steps the caller ends early".

        Raises:
            RuntimeError: no micro-batch was accumulated since the last optimizer step.
        """
        if self._step_micro == 0:
            raise RuntimeError("ACCO: the caller ended an optimizer step (set_gradient_accumulation_boundary(True) "
                               "and engine.step()) with no micro-batch accumulated since the last step; call "
                               "engine.step() once per step, after that step's backward passes")
        in_estimate_half = self._next_kind is RoundKind.ESTIMATE
        if self._adaptive:  # every rank takes part, also one whose own commit boundary is this micro-batch
            halves = torch.tensor([float(in_estimate_half), float(not in_estimate_half)],
                                  device=self.bit16_groups_flat[0].device)
            dist.all_reduce(halves, group=self.dp_process_group)
            if in_estimate_half and float(halves[1]) > 0:
                self._launch_boundary(RoundKind.ESTIMATE)
                in_estimate_half = False
        if self._commit_pending:
            return
        if in_estimate_half and not self._warned_short_steps and not self._synchronous_step():
            self._warned_short_steps = True
            logger.warning(f"ACCO: the caller ended a step after {self._step_micro} of "
                           f"gradient_accumulation_steps={self._ga} micro-batches, in the estimate half: it waits for "
                           "its commit. Fine at an epoch's end; if every step is this short, set "
                           "gradient_accumulation_steps to the caller's (logged once); see docs/how-it-works.md")
        self._direct_commit = in_estimate_half
        self._caller_ended_step = True
        self._commit_pending = True

    def step(self, closure: Any = None) -> None:
        """The engine's accumulation boundary: launch the commit round of this step."""
        if not self._commit_pending:
            raise RuntimeError("ACCO: optimizer.step() was called before the step's micro-batches were "
                               "accumulated; let engine.step() decide the boundary")
        self._commit_pending = False
        direct, self._direct_commit = self._direct_commit, False
        self._launch_boundary(RoundKind.COMMIT)
        self._caller_ended_step = False
        if direct:  # no estimate exists for the next step: wait for this commit and start again from it
            self._finish_round(self._wait_in_flight())
            self._half_start = time.perf_counter()
        if self._auto is not None and self._step > self._sync_steps - self._auto.trial_steps:
            self._auto_boundary()  # with sync_steps, its last steps are the trial of ZeRO-1's step
        self.overflow = False  # decided by the round; the LR scheduler steps once per commit
        if self.metrics.history:
            self._global_grad_norm = self.metrics.history[-1].grad_norm

    def _loss_divisor(self, kind: RoundKind) -> float:
        """What each micro-batch's loss was divided by: ``gradient_accumulation_steps`` (DeepSpeed's backward), or a
        short step's micro-batch count for a caller that normalizes the loss itself (the HF Trainer)."""
        if kind is RoundKind.COMMIT and self.caller_normalized_loss and self._caller_ended_step:
            return float(self._step_micro)
        return float(self._ga)

    def _launch_boundary(self, kind: RoundKind | None = None) -> None:
        now = time.perf_counter()
        kind = kind or self._next_kind
        self.metrics.launched(self._step, now - self._half_start, self._schedule_name(),
                              now - self._last_commit_at if kind is RoundKind.COMMIT else None)
        if kind is RoundKind.COMMIT:
            self._last_commit_at = now
        loss_scale = float(self.loss_scale)
        finishing = self._in_flight.spec.kind if self._in_flight is not None else None
        loaded = self._in_flight is not None
        if loaded:
            self._finish_round(self._wait_in_flight())
            self._raise_if_nonfinite_persists()
        # theta~_t, where this estimate half's gradients were computed: the shadows after the exchange.
        estimate_at: list[torch.Tensor] = []
        if kind is RoundKind.ESTIMATE and self._shift_estimate:
            estimate_at = [rank_partition(flat, self._rank, self._world)
                           for flat in (self._shadows if loaded else self.bit16_groups_flat)]
        grads = self._buffers[self._compute_buffer]
        if self._compress and kind is RoundKind.COMMIT and finishing is RoundKind.ESTIMATE:
            self._add_residual(grads, loss_scale)
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream())
        spec = RoundSpec(index=self._round_index, kind=kind, step=self._step, grads=grads,
                         num_micro_batches=self._micro, loss_scale=loss_scale,
                         hyperparams=[{k: v for k, v in g.items() if k not in _HYPERPARAM_SKIP}
                                      for g in self.optimizer.param_groups],
                         base_flats=self._base_flats(kind, finishing),
                         estimate_at=estimate_at,
                         loss_divisor=self._loss_divisor(kind), ready_event=ready,
                         lr_nominal=self._lr_nominal(kind))
        if kind is RoundKind.ESTIMATE:
            self._estimate_loss_scale = loss_scale
        self._in_flight = self._worker.submit(spec)
        self._round_index += 1
        self._compute_buffer ^= 1
        for buf in self._buffers[self._compute_buffer]:
            buf.zero_()
        self._micro = 0
        if kind is RoundKind.COMMIT:
            self._step += 1
            self._step_micro = 0
        if self._mode == "acco":
            self._next_kind = RoundKind.COMMIT if kind is RoundKind.ESTIMATE else RoundKind.ESTIMATE
        self._half_start = time.perf_counter()

    def _base_flats(self, kind: RoundKind, finishing: RoundKind | None) -> list[torch.Tensor]:
        """``RoundSpec.base_flats``: theta_t as every rank holds it, which a compressed round adds its update to: the
        live flats, except at a commit launched after its estimate, whose load moved theta_t into the shadows."""
        if kind is RoundKind.ESTIMATE:
            return list(self.bit16_groups_flat)
        if self._round.commit_compression == "none":
            return []
        return list(self._shadows if finishing is RoundKind.ESTIMATE else self.bit16_groups_flat)

    def _schedule_name(self) -> str:
        """What this step runs (``StepMetrics.schedule``)."""
        return "dpu" if self._schedule is None else "sync" if self._synchronous_step() else self._schedule.name

    def _lr_nominal(self, kind: RoundKind) -> tuple[int, int]:
        """``RoundSpec.lr_nominal``: a synchronous step's one round is a whole step, the others a half each."""
        if not self._lr_sqrt:
            return (0, 0)
        if kind is RoundKind.COMMIT and self._next_kind is RoundKind.ESTIMATE and self._synchronous_step():
            return (self._world * self._ga, 0)
        return (self._world * self._half_micro[RoundKind.ESTIMATE], self._world * self._half_micro[RoundKind.COMMIT])

    def _add_residual(self, grads: list[torch.Tensor], loss_scale: float) -> None:
        """Compressed estimate: add what its quantization lost (left in the estimate's buffer) to the commit's
        gradients, so that the commit sums exactly the gradients computed (each half in its own loss scale)."""
        residual = self._buffers[self._compute_buffer ^ 1]
        for buf, res in zip(grads, residual):
            buf.add_(res, alpha=loss_scale / self._estimate_loss_scale)

    def _wait_in_flight(self) -> RoundResult:
        handle, self._in_flight = self._in_flight, None
        assert handle is not None, "waiting needs a round in flight"
        start = time.perf_counter()
        result = handle.wait(self._timeout_s)
        self.metrics.open(result.step).exposed_wait_s += time.perf_counter() - start
        return result

    def _finish_round(self, result: RoundResult, load: bool = True) -> None:
        """Account a finished round and load the parameters it produced."""
        if load:  # the model's flats take the round's parameters; the shadows keep what the model held
            for live, shadow in zip(self.bit16_groups_flat, self._shadows):
                swap_contents(live, shadow)
        if self.dynamic_loss_scale:
            self.loss_scaler.update_scale(result.overflow)
        record = self.metrics.account(result, estimate=result.kind is RoundKind.ESTIMATE)
        if result.kind is RoundKind.COMMIT:
            self._lazy_init_hp_params_optimizer_state()
            if self._auto is not None:
                self._auto.observe(result.step + 1, record.step_s, record.compute_s, record.commit_round_s,
                                   record.estimate_round_s)
            self.metrics.close(result.step)
        if result.overflow:
            self._nonfinite.skipped(result.step + 1, result.kind is RoundKind.ESTIMATE, bool(self.dynamic_loss_scale),
                                    self.max_consecutive_nonfinite_steps)
        elif result.kind is RoundKind.COMMIT:
            self._nonfinite.committed()

    def _raise_if_nonfinite_persists(self) -> None:
        self._nonfinite.raise_if_persisting(bool(self.dynamic_loss_scale), self.max_consecutive_nonfinite_steps)

    # ------------------------------------------------------------------ public helpers
    def flush(self) -> None:
        """Wait for the round in flight, load the last committed parameters, restart the pipeline (micro-batches
        accumulated since the last boundary are dropped: none are at a step boundary)."""
        self.leave_committed()
        if self._in_flight is not None:
            kind = self._in_flight.spec.kind
            result = self._wait_in_flight()
            # After an estimate the live parameters already are the committed ones.
            self._finish_round(result, load=kind is RoundKind.COMMIT)
        if self._micro:
            logger.warning(f"ACCO flush: dropping {self._micro} micro-batch(es) accumulated since the last boundary; "
                           "flush at a step boundary to keep them; see docs/failures-and-checkpoints.md")
        self._restart_pipeline()

    def _restart_pipeline(self) -> None:
        """Empty the accumulation buffers and the round state: the next micro-batch starts a new step."""
        self.metrics.discard_open()
        for bufs in self._buffers:
            for buf in bufs:
                buf.zero_()
        self._round.reset()
        self._micro = 0
        self._step_micro = 0
        self._commit_pending = False
        self._direct_commit = False
        self._caller_ended_step = False
        self._next_kind = RoundKind.ESTIMATE if self._mode == "acco" else RoundKind.COMMIT
        self._half_start = time.perf_counter()

    def pop_metrics(self) -> list[StepMetrics]:
        """Records of the steps committed since the last call."""
        return self.metrics.pop()

    def destroy(self) -> None:
        """Stop the worker (after the round in flight), free ACCO's group once it has stopped (a worker blocked
        by a dead peer keeps it), then DeepSpeed's clean-up."""
        self._worker.shutdown()
        if not self._worker.alive and self._acco_group is not None:
            torch.distributed.destroy_process_group(self._acco_group)
            self._acco_group = None
        super().destroy()
