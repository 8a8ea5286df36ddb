"""``AccoZeroOptimizer``: DeepSpeed's ZeRO-1 optimizer with ACCO's schedule.

It keeps ZeRO-1's flattening and partitioning (flat bit16 groups that the model's parameters
view, an fp32 master shard per group whose optimizer state exists only on this rank) and
replaces the synchronous boundary (reduce, step, all-gather) by rounds run in the background
(see ``pipeline.py``). This module holds only the schedule: accumulate, decide a boundary, hand
the buffer to the worker, swap parameters. The rounds' collectives are the worker's; the only one
issued here is the all-reduce that aligns the ranks' halves when the caller ends a step under
adaptive accumulation (``end_step_early``). What a checkpoint holds of the pipeline, and how a
load restores it, is in ``pipeline_state.py``; ``state_dict``/``load_state_dict`` call it.

Boundaries (counted in micro-batches on this rank; ``split.split_micro_batches`` splits a step's
``gradient_accumulation_steps`` into an estimate half and a commit half by ``acco.estimate_fraction``):

- mode ``acco``: an estimate half's micro-batches, then a boundary that launches an estimate round; a
  commit half's, then a boundary that launches a commit round. A commit boundary is the engine's
  accumulation boundary: ``engine.step()`` launches it, steps the LR scheduler and counts ``global_steps``.
- mode ``dpu``: every ``gradient_accumulation_steps`` micro-batches, each a commit.
- ``adaptive_accumulation``: a boundary comes after at least the half's micro-batches, as soon as the
  round in flight has finished (or at ``max_micro_batches_per_round``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from deepspeed import comm as dist
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import logger

from deepspeed_acco import pipeline_state
from deepspeed_acco.config import ESTIMATE_SHIFTS, AccoConfig
from deepspeed_acco.metrics import MetricsLog, StepMetrics
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
from deepspeed_acco.pipeline_state import ACCO_STATE_KEY
from deepspeed_acco.schedule import AutoSchedule, Schedule
from deepspeed_acco.split import split_micro_batches
from deepspeed_acco.topology import NodeLayout, node_layout

__all__ = ["AccoNonFiniteGradients", "AccoZeroOptimizer", "ACCO_STATE_KEY"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HYPERPARAM_SKIP = ("params",)


_GROUP_SETUP_TIMEOUT_S = 300.0
"""Seconds ACCO's process group may take to connect its ranks (more than a round on a loaded machine)."""


def _acco_process_group(ranks: list[int], timeout_s: float) -> Any:
    """ACCO's own process group, so that the worker's collectives never interleave with the engine's.

    torch.distributed directly, because ``deepspeed.comm.new_group`` takes no timeout. gloo connects
    the ranks when the group is created, within the group's timeout: that setup gets at least
    ``_GROUP_SETUP_TIMEOUT_S`` (measured: 4 s were not enough for 2 ranks on a loaded 2-core machine),
    then the collectives get ``acco.round_timeout_s`` (a worker blocked by a dead peer gives up then).
    """
    setup_s = max(timeout_s, _GROUP_SETUP_TIMEOUT_S)
    group = torch_dist.new_group(ranks=ranks, timeout=timedelta(seconds=setup_s))
    set_timeout = getattr(torch_dist.distributed_c10d, "_set_pg_timeout", None)
    member = group not in (None, torch_dist.GroupMember.NON_GROUP_MEMBER)
    if set_timeout is not None and setup_s != timeout_s and member:
        set_timeout(timedelta(seconds=timeout_s), group)
    return group


class AccoNonFiniteGradients(RuntimeError):
    """Too many optimizer steps in a row had NaN/Inf gradients (raised on every rank at the same boundary)."""


class AccoZeroOptimizer(DeepSpeedZeroOptimizer):
    """ZeRO-1 with ACCO's overlapped accumulate-while-communicate pipeline.

    Built by the engine exactly like ``DeepSpeedZeroOptimizer`` (same arguments), plus the
    parsed ``"acco"`` block. Use it through ``deepspeed_acco.initialize`` or ``install()``.
    """

    max_consecutive_nonfinite_steps: int = 3
    """Without fp16 dynamic loss scaling (fp32, bf16): this many committed steps in a row skipped for
    NaN/Inf gradients raise ``AccoNonFiniteGradients`` on every rank (0: never raise, only warn).
    Set it on the class, or on ``engine.optimizer``."""

    def __init__(self, *args: Any, acco_config: AccoConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert not self.partition_gradients, "AccoZeroOptimizer is ZeRO stage 1 only"
        self.acco_config = acco_config
        ga = int(kwargs.get("gradient_accumulation_steps", 1))
        self._ga = ga
        self._mode = acco_config.mode
        # The minimum micro-batches of each half of a step (dpu: one half, the commit).
        estimate_half, commit_half = split_micro_batches(ga, acco_config.estimate_fraction) \
            if self._mode == "acco" else (ga, ga)
        self._half_micro = {RoundKind.ESTIMATE: estimate_half, RoundKind.COMMIT: commit_half}
        self._max_micro = acco_config.max_micro_batches_per_round or 2 * ga
        self._sync_steps = acco_config.sync_steps if self._mode == "acco" else 0
        self._adaptive = acco_config.adaptive_accumulation
        self._lr_sqrt = acco_config.lr_scaling == "sqrt"
        self._timeout_s = acco_config.round_timeout_s

        group = self.dp_process_group
        ranks = dist.get_all_ranks_from_group(group)
        self._acco_group = _acco_process_group(ranks, self._timeout_s)
        self._world = len(ranks)
        self._rank = dist.get_rank(group=group)

        acc_dtype = _DTYPES[acco_config.grad_accum_dtype]
        flats = self.bit16_groups_flat
        self._buffers = [[torch.zeros(f.numel(), dtype=acc_dtype, device=f.device) for f in flats] for _ in range(2)]
        self._compute_buffer = 0
        self._offsets = [self._param_offsets(i) for i in range(len(flats))]
        shadows = [f.detach().clone() for f in flats]

        # Mode "dpu" has no estimate round: its rounds neither compress nor shift an estimate.
        shift = ESTIMATE_SHIFTS[acco_config.estimate] if self._mode == "acco" else ESTIMATE_SHIFTS["paper"]
        on_cuda = flats[0].is_cuda
        self._stream = torch.cuda.Stream(device=flats[0].device) if on_cuda else None
        # The automatic schedule (schedule.py) may pick the int8 estimate: its kernels and node groups are made here.
        self._auto = AutoSchedule() if self._mode == "acco" and acco_config.automatic_schedule else None
        compression = acco_config.estimate_compression if self._mode == "acco" else "none"
        if self._auto is not None:
            compression = "int8"
        layout = self._node_layout(ranks) if compression != "none" else None
        self._round = ShardedRound(
            base_optimizer=self.optimizer, master_shards=list(self.single_partition_of_fp32_groups),
            shadow_flats=shadows, group=self._acco_group, rank=self._rank, world_size=self._world,
            comm_dtype=self.communication_data_type, clip_grad=float(self.clip_grad),
            compression=compression, block=acco_config.compression_block_size, estimate_shift=shift,
            stream=self._stream, layout=layout)
        kernels = self._round.prepare_kernels(flats, acc_dtype)
        if kernels:
            (logger.info if self._round.quantizer.path == "compiled" else logger.warning)(kernels)
        for key in ("estimate_compression", "estimate", "estimate_fraction", "sync_steps"):
            if getattr(acco_config, key) != AccoConfig.model_fields[key].default and self._mode != "acco":
                logger.warning(f"ACCO: acco.{key}={getattr(acco_config, key)!r} is ignored in "
                               f"acco.mode={self._mode!r}, which has no estimate round: remove it; see "
                               "docs/configuration.md")
        self._shift_estimate = self._round.estimate_shift != ESTIMATE_SHIFTS["paper"]
        self._compress = self._round.compression != "none"
        self._schedule = Schedule(acco_config.estimate_fraction, compression) if self._mode == "acco" else None
        self._sync_schedule = False  # the schedule that runs is ZeRO-1's synchronous step
        self._last_commit_at = time.perf_counter()
        if self._auto is not None:
            self._apply_schedule(self._auto.current)
        self._estimate_loss_scale = 1.0  # loss scale of the estimate half whose residual the commit takes
        self._shadows = shadows
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
        self._half_compute: dict[int, float] = {}
        self.overflow = False
        self._nonfinite_steps = 0  # committed steps skipped for NaN/Inf gradients
        self._nonfinite_in_a_row = 0
        self._nonfinite_last_step = 0
        # Committed weights (the "committed weights" section below) and checkpoints (pipeline_state.py).
        self._live_backup: list[torch.Tensor] | None = None
        self._committed_in_model = False
        self._engine_micro_steps: int | None = None  # set by AccoEngine.save_checkpoint around its save
        self.loaded_acco_state = False
        self.loaded_engine_micro_steps: int | None = None

    def _node_layout(self, ranks: list[int]) -> NodeLayout | None:
        """Where ranks share a node, the compressed rounds go node-aware (``topology.py``); the groups it needs."""
        def agree(g: int) -> tuple[int, int]:
            values = torch.tensor([g, -g], dtype=torch.int64, device=self.bit16_groups_flat[0].device)
            torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MIN, group=self._acco_group)
            return int(values[0]), -int(values[1])

        def log(line: str) -> None:
            if self._rank == 0:
                logger.info(line)

        return node_layout(ranks, self._rank, agree, lambda members: _acco_process_group(members, self._timeout_s),
                           log)

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
        """End of one micro-batch's backward: count it; launch an estimate round or mark the commit, when due.

        Who ends an optimizer step: ACCO (every ``gradient_accumulation_steps`` micro-batches, or
        adaptively), unless the caller manages the boundary itself (``caller_boundary`` not None:
        ``engine.set_gradient_accumulation_boundary`` before the backward, as the HF Trainer and
        accelerate do); then the step ends at the caller's ``engine.step()`` after a True, and ACCO
        only decides where its estimate half ends.
        """
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
        """This step runs as ZeRO-1's (``acco.sync_steps``, or the automatic schedule chose it): its
        ``gradient_accumulation_steps`` micro-batches fill the estimate half's place, all at theta_t, and are
        committed directly (no estimate round)."""
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
        """The caller ends the optimizer step at this micro-batch (see ``acco-algorithm.md``, caller-forced boundaries).

        ``engine.set_gradient_accumulation_boundary(True)`` then ``engine.step()``, as the HF Trainer
        and accelerate do at every step and with fewer micro-batches at the end of an epoch. In a
        commit half (or in dpu mode) the next ``step()`` launches the commit round with what has
        accumulated, the estimate's half included; the schedule then goes on as usual. In an estimate
        half there is no estimate of the next step yet: the next ``step()`` waits for the commit in
        flight, commits the micro-batches of this half alone, waits for that too and restarts the
        pipeline from the new committed weights, as at the start of training (both waits are exposed).
        With adaptive accumulation the ranks can be in different halves here (they end their estimate
        halves at different micro-batches); one all-reduce on the data-parallel group finds out, and a
        rank still in its estimate half while another is in its commit half launches its estimate
        round first, so every rank runs the same rounds. Every rank must end the same step here: the
        caller manages every boundary (accelerate, the HF Trainer), or ends the step within its first
        ``gradient_accumulation_steps`` micro-batches, before ACCO's own adaptive commit could.

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

    # ------------------------------------------------------------------ the automatic schedule (schedule.py)
    def _apply_schedule(self, schedule: Schedule) -> None:
        """Run ``schedule`` from the next step on (at a step boundary with no round in flight)."""
        self._schedule = schedule
        self._sync_schedule = schedule.estimate_fraction is None
        if not self._sync_schedule:
            estimate_half, commit_half = split_micro_batches(self._ga, schedule.estimate_fraction)
            self._half_micro = {RoundKind.ESTIMATE: estimate_half, RoundKind.COMMIT: commit_half}
        self._round.compression = schedule.compression
        self._compress = schedule.compression != "none"

    def _drain_commit(self) -> None:
        """Wait for the commit just launched and load it: the pipeline restarts from the committed weights."""
        if self._in_flight is not None:
            self._finish_round(self._wait_in_flight())
            self._half_start = time.perf_counter()

    def _agreed(self, values: list[float]) -> list[float]:
        """``values`` averaged over the data-parallel ranks (one all-reduce on the engine's group, not ACCO's),
        so that every rank takes the same decision from its own measurements."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.bit16_groups_flat[0].device)
        dist.all_reduce(tensor, group=self.dp_process_group)
        return (tensor / self._world).tolist()

    def _auto_boundary(self) -> None:
        """At a commit boundary: end a trial, or check M / C, and switch schedules when the choice changes."""
        auto = self._auto
        assert auto is not None, "only with the automatic schedule"
        auto.boundary()
        decided = len(auto.decisions)
        if auto.trial_over():
            self._drain_commit()  # the trial's last step is measured too
            chosen = auto.end_trial(self._step, self._agreed(auto.local_summary()))
        elif auto.check_due(self._step):
            chosen = auto.check(self._step, self._agreed(auto.local_summary()))
        else:
            return
        if chosen != self._schedule:
            self._drain_commit()
            self._apply_schedule(chosen)
        if len(auto.decisions) > decided:
            decision = auto.decisions[-1]
            self.metrics.open(self._step).decision = decision
            if self._rank == 0:
                logger.info(f"ACCO schedule from step {decision['step'] + 1}: {decision['schedule']} "
                            f"({decision['why']}; M/C {decision['m_over_c']:.2f}; {decision['reason']})"[:300])

    def _loss_divisor(self, kind: RoundKind) -> float:
        """What each micro-batch's loss of this round was divided by (see ``RoundSpec.loss_divisor``).

        DeepSpeed's backward divides by ``gradient_accumulation_steps``. A caller that normalizes
        the loss itself (``backward(scale_wrt_gas=False)``, the HF Trainer) divides a short step's
        losses by that step's micro-batch count instead; only its commit can know the count.
        """
        if kind is RoundKind.COMMIT and self.caller_normalized_loss and self._caller_ended_step:
            return float(self._step_micro)
        return float(self._ga)

    def _launch_boundary(self, kind: RoundKind | None = None) -> None:
        now = time.perf_counter()
        kind = kind or self._next_kind
        record = self.metrics.open(self._step)
        record.compute_s += now - self._half_start
        record.schedule = "dpu" if self._schedule is None else "sync" if self._synchronous_step() \
            else self._schedule.name
        if kind is RoundKind.COMMIT:
            record.step_s = now - self._last_commit_at
            self._last_commit_at = now
        loss_scale = float(self.loss_scale)
        finishing = self._in_flight.spec.kind if self._in_flight is not None else None
        loaded = self._in_flight is not None
        if loaded:
            self._finish_round(self._wait_in_flight())
            self._raise_if_nonfinite_persists()
        # Where this estimate half's gradients were computed (theta~_t): what the model held before the round
        # that just finished was loaded, i.e. now the shadow flats (loading exchanges them), read by the worker.
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
                         base_flats=list(self.bit16_groups_flat) if kind is RoundKind.ESTIMATE else [],
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
        record = self.metrics.open(result.step)
        record.bytes_communicated += result.bytes_sent
        record.micro_batches_per_rank = [a + b for a, b in zip(record.micro_batches_per_rank, result.counts)] \
            if record.micro_batches_per_rank else list(result.counts)
        record.round_counts.append(list(result.counts))
        record.round_lr_factors.append(result.lr_factor)
        record.round_phases_s = {k: record.round_phases_s.get(k, 0.0) + v for k, v in result.phase_s.items()}
        record.round_phases_cpu_s = {k: record.round_phases_cpu_s.get(k, 0.0) + v
                                     for k, v in result.phase_cpu_s.items()}
        if result.kind is RoundKind.ESTIMATE:
            record.estimate_round_s = result.duration_s
            record.estimate_grad_norm = result.grad_norm
        else:
            record.commit_round_s = result.duration_s
            record.overflow = result.overflow
            record.grad_norm = result.grad_norm
            self._lazy_init_hp_params_optimizer_state()
            if self._auto is not None:
                self._auto.observe(result.step + 1, record.step_s, record.compute_s, record.commit_round_s,
                                   record.estimate_round_s)
            self.metrics.close(result.step)
        if result.overflow:
            self._note_nonfinite(result)
        elif result.kind is RoundKind.COMMIT:
            self._nonfinite_in_a_row = 0

    def _note_nonfinite(self, result: RoundResult) -> None:
        """Warn about a round whose global gradient norm was NaN/Inf (skipped on every rank) and count it.

        The decision is global: the squared norm is all-reduced inside the round, so every rank sees
        the same non-finite value, skips the same step, and raises at the same boundary
        (``_raise_if_nonfinite_persists``).
        """
        if result.kind is RoundKind.ESTIMATE:
            logger.warning(f"ACCO: NaN/Inf gradients in the estimate round of step {result.step + 1}: skipped on "
                           "every rank (the commit of this step sums them and skips too); check the data and the "
                           "LR; see docs/failures-and-checkpoints.md")
            return
        self._nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self._nonfinite_last_step = result.step + 1
        limit = self.max_consecutive_nonfinite_steps
        scaled = bool(self.dynamic_loss_scale)
        logger.warning(f"ACCO: NaN/Inf gradients in the commit round of step {result.step + 1}: skipped on every "
                       f"rank, weights unchanged ({self._nonfinite_steps} skipped, {self._nonfinite_in_a_row} in a row"
                       + ("; the fp16 loss scale backs off" if scaled else f"; raising at {limit} in a row")
                       + "); check the data and the LR; see docs/failures-and-checkpoints.md")

    def _raise_if_nonfinite_persists(self) -> None:
        """At a boundary, not in ``flush`` (a checkpoint can still be saved): raise after K skipped steps in a row."""
        limit = self.max_consecutive_nonfinite_steps
        if not self.dynamic_loss_scale and limit > 0 and self._nonfinite_in_a_row >= limit:
            raise AccoNonFiniteGradients(
                f"ACCO: {self._nonfinite_in_a_row} optimizer steps in a row (up to step "
                f"{self._nonfinite_last_step}) had non-finite gradients (NaN/Inf) and were skipped on every "
                "rank; without fp16 loss scaling this does not recover by itself. The parameters are the last "
                "finite committed ones (identical on every rank). Check the data and the learning rate, or "
                "enable gradient clipping; AccoZeroOptimizer.max_consecutive_nonfinite_steps sets the limit "
                "(0: never raise).")

    # ------------------------------------------------------------------ public helpers
    def flush(self) -> None:
        """Wait for the round in flight, load the last committed parameters, restart the pipeline.

        Micro-batches accumulated since the last boundary are dropped (none are, at a step boundary).
        """
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
        """Stop the worker thread (after the round in flight), free ACCO's process group, then DeepSpeed's clean-up.

        The group is destroyed only once the thread has stopped: a thread still blocked in one of its
        collectives (a dead peer) keeps it, and the process exits with it as before.
        """
        self._worker.shutdown()
        if not self._worker.alive and self._acco_group is not None:
            torch_dist.destroy_process_group(self._acco_group)
            self._acco_group = None
        super().destroy()

    # ------------------------------------------------------------------ committed weights
    def drain(self) -> None:
        """Wait for the round in flight without consuming it; training is not disturbed.

        The next boundary finishes the round as it would have (loads its parameters, accounts it).
        Afterwards the master shards and the base optimizer state are the committed ones and
        ``committed_flats()`` holds the committed bit16 parameters.

        Raises:
            AccoRoundError: the round in flight failed or timed out.
        """
        if self._in_flight is not None:
            self._in_flight.wait(self._timeout_s)

    def committed_flats(self) -> list[torch.Tensor]:
        """The flat bit16 parameters of the last committed step (valid after ``drain``).

        A finished commit round holds them in the shadow flats (the live ones are then the next
        estimate, or the previous step in dpu mode); otherwise the live flats are the committed ones.
        """
        handle = self._in_flight
        if handle is not None and handle.spec.kind is RoundKind.COMMIT:
            return self._shadows
        return self.bit16_groups_flat

    @property
    def committed_in_model(self) -> bool:
        """Whether the model holds the committed weights in place of the live ones (see ``enter_committed``)."""
        return self._committed_in_model

    def enter_committed(self) -> None:
        """Drain, then put the committed weights into the model; the live ones wait aside until ``leave_committed``.

        For reads from outside a training step (evaluation, a save). No training may happen in between:
        ``AccoEngine.backward`` refuses it.
        """
        if self._committed_in_model:
            return
        self.drain()
        committed = self.committed_flats()
        if committed is not self.bit16_groups_flat:
            self._live_backup = [flat.clone() for flat in self.bit16_groups_flat]
            for live, src in zip(self.bit16_groups_flat, committed):
                live.copy_(src)
        self._committed_in_model = True

    def leave_committed(self) -> None:
        """Put the live weights back (after ``enter_committed``); training continues bit for bit."""
        if not self._committed_in_model:
            return
        if self._live_backup is not None:
            for live, backup in zip(self.bit16_groups_flat, self._live_backup):
                live.copy_(backup)
            self._live_backup = None
        self._committed_in_model = False

    @contextlib.contextmanager
    def committed_parameters_loaded(self) -> Iterator[None]:
        """Drain; inside, the model's parameters are the committed ones; afterwards as they were before.

        ``AccoEngine.save_checkpoint`` saves inside it, so the checkpoint's module weights match the
        optimizer's master weights, and training after the save continues bit for bit as without it.
        """
        entered = not self._committed_in_model
        self.enter_committed()
        try:
            yield
        finally:
            if entered:
                self.leave_committed()

    def committed_copy(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A copy of the committed value of a tensor that views a live model parameter (a ``state_dict``
        entry); None when the tensor is no such view or the live weights are the committed ones."""
        if self._committed_in_model or isinstance(tensor, torch.nn.Parameter):
            return None
        self.drain()
        committed = self.committed_flats()
        if committed is self.bit16_groups_flat:
            return None
        for live, src in zip(self.bit16_groups_flat, committed):
            start = (tensor.data_ptr() - live.data_ptr()) // live.element_size()
            if tensor.dtype == live.dtype and tensor.is_contiguous() and 0 <= start and \
                    start + tensor.numel() <= live.numel() and tensor.device == live.device:
                return src.narrow(0, start, tensor.numel()).view_as(tensor).clone()
        return None

    # ------------------------------------------------------------------ checkpoints (the state: pipeline_state.py)
    def state_dict(self) -> dict[str, Any]:
        """ZeRO-1's state dict of the committed state, plus ACCO's pipeline state under ``"acco"``.

        Drains the round in flight first; does not disturb training (unlike ``flush``). DeepSpeed's
        own loaders (plain ZeRO-1, ``zero_to_fp32``) ignore the extra key. What it holds: ``pipeline_state``.
        """
        self.drain()
        state = super().state_dict()
        state[ACCO_STATE_KEY] = pipeline_state.save_pipeline_state(self)
        return state

    def load_state_dict(self, state_dict_list: Any, load_optimizer_states: bool = True,
                        load_from_fp32_weights: bool = False, checkpoint_folder: Any = None,
                        load_serial: Any = None, param_shapes: Any = None) -> None:
        """ZeRO-1's loader, then ACCO's pipeline state when the checkpoint has one.

        Collective (all-gathers the saved parameter partitions on ACCO's group): every rank calls
        it, as ``engine.load_checkpoint`` does. Without ACCO state (a plain ZeRO-1 checkpoint, a
        universal checkpoint, another mode or GA) the pipeline restarts from the loaded parameters.
        """
        pipeline_state.discard_pipeline(self)
        super().load_state_dict(state_dict_list, load_optimizer_states=load_optimizer_states,
                                load_from_fp32_weights=load_from_fp32_weights,
                                checkpoint_folder=checkpoint_folder, load_serial=load_serial,
                                param_shapes=param_shapes)
        own = state_dict_list[self._rank] if state_dict_list and not checkpoint_folder else None
        acco = own.get(ACCO_STATE_KEY) if isinstance(own, dict) and load_optimizer_states else None
        pipeline_state.restore_pipeline_state(self, acco)

    def before_checkpoint_load(self) -> None:
        """Called by ``AccoEngine.load_checkpoint`` before DeepSpeed's load: wait for the round in flight.

        Nothing else changes here, so a load that finds no checkpoint leaves training as it was.
        """
        pipeline_state.before_checkpoint_load(self)

    def after_checkpoint_load(self, global_steps: int) -> None:
        """Called by ``AccoEngine.load_checkpoint`` after a load: without ACCO state, restart the pipeline.

        It restarts from the loaded parameters, at the engine's ``global_steps`` (a plain ZeRO-1
        checkpoint, ``load_module_only``, ``load_optimizer_states=False``).
        """
        pipeline_state.after_checkpoint_load(self, global_steps)
