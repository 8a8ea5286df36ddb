"""The background round: reduce-scatter -> sharded optimizer step -> all-gather, on its own thread.

One worker thread (and, on CUDA, one stream) per optimizer; at most one round in flight.
Buffer ownership over two consecutive boundaries of the homogeneous ACCO schedule (k micro-batches
between boundaries; ``A`` and ``B`` are the two flat accumulation buffers, ``S`` the shadow flat
parameters the worker all-gathers into, ``P`` the live flat parameters the model's tensors view)::

    training thread     | accumulate G~_t into A | accumulate G_t into B  | accumulate G~_t+1 into A
                        |     (reads P=theta_t)  | (reads P=theta_t)      | (reads P=theta~_t+1)
    boundary            ^ wait C_t-1, P<->S,     ^ wait E_t, P<->S,       ^ wait C_t, P<->S, ...
                          launch E_t(A)            launch C_t(B)
    worker thread       |    E_t: RS(A), step, rollback, AG->S | C_t: RS(B)+carried, step, AG->S |

The training thread never touches a buffer while the worker owns it: it takes ``A`` back only
after waiting for the round that read it, and exchanges ``S`` and ``P`` (their memory, not their
contents: ``swap_contents``) only after the round that wrote ``S`` has finished (on CUDA, after its
completion event). After the exchange ``S`` holds what the model held, which the next estimate reads
as theta~_t. The worker only reads ``P`` (a compressed estimate rebuilds theta~ from it).
Because every rank launches the same sequence of rounds, the collectives on ACCO's process
group come in the same order everywhere, even when the ranks' micro-batch counts differ
(adaptive accumulation). The training thread issues no collective while a round is in flight.
"""

from __future__ import annotations

import contextlib
import enum
import math
import queue
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.utils import logger

from deepspeed_acco.adam import FusedAdam
from deepspeed_acco.quantize import Quantizer, scales_per_row
from deepspeed_acco.rollback import restore_state, snapshot_state
from deepspeed_acco.topology import NodeLayout

__all__ = [
    "AccoRoundError",
    "AccoRoundTimeout",
    "RoundKind",
    "RoundSpec",
    "RoundResult",
    "RoundHandle",
    "ShardedRound",
    "AccoCommWorker",
    "describe_round_error",
    "rank_partition",
    "swap_contents",
]


class AccoRoundError(RuntimeError):
    """A background round failed. The worker's traceback is in the message."""


class AccoRoundTimeout(AccoRoundError):
    """A round did not finish within ``acco.round_timeout_s`` (a dead or stalled peer)."""


_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset", "broken pipe", "timed out",
                         "connection refused", "socket closed")


def rank_partition(flat: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``rank``'s ZeRO-1 partition of a padded flat buffer (a view; the part its fp32 master shard mirrors)."""
    size = flat.numel() // world_size
    return flat.narrow(0, rank * size, size)


def swap_contents(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two flats of the same size, and of every view of them (the model's parameters
    view the live flat), without copying: their storages exchange their memory. Flats that share storage with
    something else, or a torch without the exchange, swap by copying (same result)."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    whole = a.storage_offset() == 0 and b.storage_offset() == 0 and a.is_contiguous() and b.is_contiguous() \
        and sa.nbytes() == sb.nbytes() == a.numel() * a.element_size() and a.dtype == b.dtype
    if whole and hasattr(sa, "_swap_data_ptr_"):
        sa._swap_data_ptr_(sb)
        return
    held = a.clone()
    a.copy_(b)
    b.copy_(held)


def describe_round_error(err: BaseException) -> str:
    """One line naming what went wrong in a round, with the likely cause when a peer failed.

    gloo reports a peer that died as ``Connection closed by peer [addr]:port`` (at once: the kernel
    closes a dead process's sockets) and a silent peer as a timeout of ACCO's process group
    (``acco.round_timeout_s``). Both are collective failures caused by another rank, so the line says so.
    """
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # gloo's source location prefix
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    lowered = text.lower()
    if any(marker in lowered for marker in _PEER_FAILURE_MARKERS):
        peer = re.search(r"\[[0-9a-fA-F.:]+\]:\d+", text)
        who = f"the peer at {peer.group(0)}" if peer else "a peer rank"
        line += (f" -- {who} of ACCO's process group died, exited or stalled during the round's collectives "
                 "(a silent peer is waited for at most acco.round_timeout_s). Check the other ranks' logs.")
    return line


class RoundKind(enum.Enum):
    """What a round computes: a tentative step that is rolled back, or the real one."""

    ESTIMATE = "estimate"
    COMMIT = "commit"


@dataclass
class RoundSpec:
    """What the training thread hands to the worker at a boundary."""

    index: int
    """Position of the round in the sequence (the same on every rank)."""
    kind: RoundKind
    step: int
    """The committed step this round belongs to (0-based)."""
    grads: list[torch.Tensor]
    """Flat accumulation buffers, one per parameter group; owned by the worker until waited."""
    num_micro_batches: int
    """Micro-batches this rank accumulated into ``grads``."""
    loss_scale: float
    hyperparams: list[dict[str, Any]]
    """Optimizer hyper-parameters (lr, ...) of each group, read when the round was launched."""
    base_flats: list[torch.Tensor] = field(default_factory=list)
    """The live flat parameters theta_t at an estimate's launch (read, never written, by the worker): a
    compressed estimate rebuilds theta~ = theta_t + deQ(Q(update)) from them on every rank."""
    estimate_at: list[torch.Tensor] = field(default_factory=list)
    """An estimate with ``acco.estimate="extrapolated"``: this rank's partition of each flat where the estimate
    half's gradients were computed (theta~_t): views of the shadow flats, which hold what the model held before
    the last round was loaded, read by the worker before its all-gather writes them. Empty otherwise."""
    loss_divisor: float = 1.0
    """What each micro-batch's loss was divided by before its backward (``gradient_accumulation_steps``
    as DeepSpeed's backward divides it; the step's micro-batch count for a caller that normalized a
    short step itself). The round multiplies it back and divides by the global micro-batch count."""
    ready_event: Any = None
    """CUDA event recorded on the compute stream after the last accumulation (None on CPU)."""
    lr_nominal: tuple[int, int] = (0, 0)
    """``acco.lr_scaling="sqrt"``: the global micro-batch counts of a nominal estimate half and commit half
    (world size x each half's minimum per rank). The round's LR is multiplied by ``sqrt(kappa)``, kappa = its
    global count over its nominal count: the estimate half's, plus the commit half's for a commit that adds a
    carried estimate. kappa is at most ``max_micro_batches_per_round`` over a half's minimum, since no half
    accumulates more. (0, 0): the LR as launched."""


@dataclass
class RoundResult:
    """What a finished round reports back."""

    index: int
    kind: RoundKind
    step: int
    duration_s: float
    phase_s: dict[str, float]
    counts: list[int]
    """Micro-batches contributed by each rank of the data-parallel group."""
    overflow: bool
    grad_norm: float
    bytes_sent: int
    done_event: Any = None
    phase_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds of the worker thread in each phase (``phase_s`` is wall-clock, waits included)."""
    lr_factor: float = 1.0
    """What the round multiplied the launch-time learning rate by (``acco.lr_scaling``)."""


@dataclass
class RoundHandle:
    """A round in flight. ``wait`` returns its result or raises its error; ``done`` never blocks."""

    spec: RoundSpec
    started: float = field(default_factory=time.monotonic)
    _finished: threading.Event = field(default_factory=threading.Event)
    _result: RoundResult | None = None
    _error: str | None = None
    _cause: str = ""

    def _set_result(self, result: RoundResult) -> None:
        self._result = result
        self._finished.set()

    def _set_error(self, message: str, cause: str = "") -> None:
        self._error = message
        self._cause = cause
        self._finished.set()

    def done(self) -> bool:
        """True once the round has finished (its device work too), without blocking."""
        if not self._finished.is_set():
            return False
        event = self._result.done_event if self._result is not None else None
        return event is None or bool(event.query())

    def wait(self, timeout_s: float) -> RoundResult:
        """Block until the round has finished, at most ``timeout_s`` seconds after its launch.

        Raises:
            AccoRoundError: the round raised; the worker's traceback is in the message.
            AccoRoundTimeout: the round did not finish in time.
        """
        remaining = max(0.0, self.started + timeout_s - time.monotonic())
        if not self._finished.wait(remaining):
            raise AccoRoundTimeout(
                f"ACCO round {self.spec.index} ({self.spec.kind.value} of step {self.spec.step}) did not finish "
                f"within acco.round_timeout_s={timeout_s:g} s of its launch: a peer rank has probably died or "
                "stalled before joining the round's collectives. Check the other ranks' logs; raise "
                "acco.round_timeout_s if rounds are legitimately this slow.")
        if self._error is not None:
            raise AccoRoundError(f"ACCO round {self.spec.index} ({self.spec.kind.value} of step "
                                 f"{self.spec.step}) failed in the background thread: {self._cause}"
                                 f"\nWorker traceback:\n{self._error}")
        assert self._result is not None, "a finished round has a result or an error"
        if self._result.done_event is not None:
            torch.cuda.current_stream().wait_event(self._result.done_event)
        return self._result


class ShardedRound:
    """The three phases of a round on this rank's ZeRO-1 shard, run by the worker.

    It owns the fp32 master shards (views handed over by the ZeRO-1 optimizer), the base
    optimizer's state, the shadow flat parameters and the estimate's reduced gradient carried
    into the commit. The training thread must not touch any of them while a round is in flight.
    Buffers a round fills (the reduced shards, the int8 payloads, the fused estimate's scratch) are
    allocated once and reused, so a round touches no fresh memory.
    """

    def __init__(self, *, base_optimizer: torch.optim.Optimizer, master_shards: list[torch.Tensor],
                 shadow_flats: list[torch.Tensor], group: Any, rank: int, world_size: int,
                 comm_dtype: torch.dtype, clip_grad: float, compression: str = "none", block: int = 256,
                 estimate_shift: tuple[float, float] = (1.0, 0.0), stream: Any = None,
                 layout: NodeLayout | None = None, commit_compression: str = "none") -> None:
        self.base_optimizer = base_optimizer
        self.master_shards = master_shards
        self.shadow_flats = shadow_flats
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.comm_dtype = comm_dtype
        self.clip_grad = clip_grad
        self.compression = compression
        self.block = block
        self.estimate_shift = estimate_shift
        self.stream = stream
        self.commit_compression = commit_compression
        int8 = "int8" in (compression, commit_compression)
        self.layout = layout if int8 else None
        self.quantizer = Quantizer(block, warn=logger.warning) if int8 else None
        self.fused = FusedAdam(base_optimizer, master_shards) if FusedAdam.supports(base_optimizer, master_shards) \
            else None
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._all_reduce_scatters = _is_gloo(group)
        self._carried: list[torch.Tensor] | None = None
        self._carried_count = 0
        self.commit_residual: list[torch.Tensor] | None = None
        """Compressed commit: c^r, what the last commit's quantization lost of this rank's buffer (each group's
        flat, in the accumulation dtype and the loss scale ``commit_residual_scale``); None: zero."""
        self.commit_residual_scale = 1.0

    def reset(self) -> None:
        """Forget the estimate's gradient (after a flush the next round is an estimate)."""
        self._carried = None
        self._carried_count = 0

    def _compressed(self, spec: RoundSpec) -> bool:
        return spec.kind is RoundKind.ESTIMATE and self.compression == "int8"

    def _compressed_commit(self, spec: RoundSpec) -> bool:
        return spec.kind is RoundKind.COMMIT and self.commit_compression == "int8"

    def drop_commit_residual(self) -> None:
        """Forget the compressed commit's residual (a step skipped for non-finite gradients, a load without it)."""
        self.commit_residual = None

    def _buffer(self, name: str, index: int, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A buffer of this round kept between rounds (``name``, group ``index``): allocated on first use."""
        key = (name, index)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def _payload(self, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The int8 round's payload buffer of ``dtype`` for group ``index``, shared by its all-to-all (what this rank
        receives, read before the all-gather) and its all-gather: at most a flat's size in int8 plus scales."""
        key = ("payload", index, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def prepare_kernels(self, live_flats: list[torch.Tensor], accumulation_dtype: torch.dtype) -> str:
        """Compile the int8 kernels for every shape the compressed rounds use (at ``initialize``, so no round
        compiles); returns the log line that says which path runs ("" without compression)."""
        if self.quantizer is None:
            return ""
        examples: list[tuple[str, tuple[Any, ...]]] = []
        for flat in live_flats:
            chunk = flat.numel() // self.world_size
            blocks = scales_per_row(chunk, self.block)
            dev = flat.device
            rows = self.world_size if self.layout is None else self.layout.nodes
            update_old = torch.zeros(chunk, dtype=flat.dtype if self.commit_compression == "int8" else torch.float32,
                                     device=dev)  # a commit's update is measured from the weights the ranks hold
            q = torch.zeros(rows, chunk, dtype=torch.int8, device=dev)
            s = torch.ones(rows, blocks, device=dev)
            gathered_q = torch.zeros(self.world_size, chunk, dtype=torch.int8, device=dev)
            gathered_s = torch.ones(self.world_size, blocks, device=dev)
            if self.layout is not None:  # the node-aware all-gather's [local, node] order, read as [node, local]
                g, n = self.layout.per_node, self.layout.nodes
                gathered_q = gathered_q.view(g, n, chunk).transpose(0, 1)
                gathered_s = gathered_s.view(g, n, blocks).transpose(0, 1)
            residual_of = torch.zeros(rows, chunk, dtype=accumulation_dtype if self.layout is None else torch.float32,
                                      device=dev)
            examples += [("quantize_residual_", (residual_of,)), ("dequantize_sum", (q, s)),
                         ("quantize_update", (torch.zeros(chunk, device=dev), torch.zeros(chunk, device=dev))),
                         ("quantize_update", (torch.zeros(chunk, device=dev), update_old)),
                         ("rebuild_", (torch.empty_like(flat), flat, gathered_q, gathered_s))]
            if self.commit_compression == "int8":
                examples.append(("apply_update_", (torch.empty_like(flat), gathered_q, gathered_s)))
        return self.quantizer.prepare(examples)

    def run(self, spec: RoundSpec) -> RoundResult:
        """Run one round; called on the worker thread."""
        start = time.perf_counter()
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        phase: dict[str, float] = {}
        phase_cpu: dict[str, float] = {}
        self._bytes = 0
        with ctx, torch.no_grad():
            if spec.ready_event is not None:
                self.stream.wait_event(spec.ready_event)
            compressed = self._compressed(spec) or self._compressed_commit(spec)
            with _timed(phase, phase_cpu, "reduce_scatter"):
                sums = self._reduce_scatter_quantized(spec) if compressed else self._reduce_scatter_grads(spec)
            both_halves = spec.kind is RoundKind.COMMIT and self._carried is not None
            with _timed(phase, phase_cpu, "norm"):
                counts, total, sumsq = self._all_reduce_counts_and_norm(spec, sums)
            norm = (sumsq ** 0.5) * spec.loss_divisor / total if total else 0.0
            overflow = not (sumsq == sumsq and sumsq != float("inf"))
            if overflow and self._compressed_commit(spec):
                self.drop_commit_residual()  # as ZeRO-1 drops the skipped step's gradients
            lr_factor = _lr_factor(spec, total, both_halves)
            with _timed(phase, phase_cpu, "step"):
                stepped = self._step_shard(spec, sums, total, norm, overflow, lr_factor)
            with _timed(phase, phase_cpu, "all_gather"):
                if self._compressed(spec):
                    self._all_gather_quantized_update(spec, stepped, self.master_shards)
                elif self._compressed_commit(spec):  # the update from the committed weights every rank holds
                    held = [rank_partition(flat, self.rank, self.world_size) for flat in spec.base_flats]
                    self._all_gather_quantized_update(spec, stepped, held)
                else:
                    self._all_gather_params(stepped)
            done_event = None
            if self.stream is not None:
                done_event = torch.cuda.Event()
                done_event.record(self.stream)
        return RoundResult(index=spec.index, kind=spec.kind, step=spec.step,
                           duration_s=time.perf_counter() - start, phase_s=phase, phase_cpu_s=phase_cpu,
                           counts=counts, overflow=overflow, grad_norm=norm, bytes_sent=self._bytes,
                           done_event=done_event, lr_factor=lr_factor)

    def _ring_bytes(self, numel: int, element_size: int, peers: int | None = None) -> int:
        """Bytes this rank sends for a reduce-scatter or an all-gather of ``numel`` elements among ``peers`` ranks
        (ring algorithm; default: the whole group)."""
        peers = peers or self.world_size
        return (peers - 1) * numel * element_size // peers

    def _reduce_scatter(self, out: torch.Tensor, send: torch.Tensor, group: Any, peers: int, index: int) -> None:
        """``out`` = chunk ``index`` of the sum of ``send`` over the ``peers`` ranks of ``group``; ``send`` may be
        overwritten. On gloo an in-place all-reduce and a copy: gloo's reduce-scatter moves an all-reduce's bytes
        anyway, and spends about 15 ms of the calling thread's CPU per 26 MB on copies where the all-reduce spends
        0.2 ms (docs/performance.md, "Where a round's CPU goes")."""
        if self._all_reduce_scatters:
            dist.all_reduce(send, op=dist.ReduceOp.SUM, group=group)
            out.copy_(send.view(peers, -1)[index].view(out.shape))
            self._bytes += 2 * self._ring_bytes(send.numel(), send.element_size(), peers)
        else:
            dist.reduce_scatter_tensor(out, send, op=dist.ReduceOp.SUM, group=group)
            self._bytes += self._ring_bytes(send.numel(), send.element_size(), peers)

    def _reduce_scatter_grads(self, spec: RoundSpec) -> list[torch.Tensor]:
        """Reduce-scatter each group's flat gradients; return this rank's unscaled gradient sums (the buffers in
        ``spec.grads`` are the round's to overwrite: the training thread zeroes a buffer when it takes it back)."""
        sums = []
        for i, flat in enumerate(spec.grads):
            send = flat if flat.dtype == self.comm_dtype else flat.to(self.comm_dtype)
            shard = self._buffer(spec.kind.value, i, (flat.numel() // self.world_size,), self.comm_dtype, flat.device)
            self._reduce_scatter(shard, send, self.group, self.world_size, self.rank)
            # Undo the loss scale: a sum of per-micro-batch gradients, each still divided by spec.loss_divisor.
            summed = shard.float()
            if spec.loss_scale != 1.0:
                summed.mul_(1.0 / spec.loss_scale)
            if spec.kind is RoundKind.COMMIT and self._carried is not None:
                summed.add_(self._carried[i])
            sums.append(summed)
        return sums

    def _send_buffers(self, index: int, rows: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 values and scales a compressed reduce-scatter sends (``rows`` chunks of group ``index``), kept
        between rounds: fresh ones each round were paged in again now and then, 22 ms of the worker's CPU instead
        of 5 on ``dense`` (docs/performance.md, "Where a round's CPU goes")."""
        chunk = flat.numel() // self.world_size
        return (self._buffer("send_q", index, (rows, chunk), torch.int8, flat.device),
                self._buffer("send_scales", index, (rows, scales_per_row(chunk, self.block)), torch.float32,
                             flat.device))

    def _exchange(self, index: int, q: torch.Tensor, scales: torch.Tensor, group: Any,
                  peers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All-to-all among ``peers`` ranks of ``group``: row ``j`` of ``q`` (int8) and of its scales to peer ``j``;
        returns what this rank received, in the same layout (buffers of parameter group ``index``)."""
        recv_q = self._payload(index, q.numel(), q.dtype, q.device).view(q.shape)
        recv_s = self._payload(index, scales.numel(), scales.dtype, scales.device).view(scales.shape)
        dist.all_to_all_single(recv_q, q, group=group)
        dist.all_to_all_single(recv_s, scales, group=group)
        sent = q.numel() * q.element_size() + scales.numel() * scales.element_size()
        self._bytes += (peers - 1) * sent // peers
        return recv_q, recv_s

    def _reduce_scatter_quantized(self, spec: RoundSpec) -> list[torch.Tensor]:
        """The compressed estimate's reduce-scatter: quantize, all-to-all, the owner sums in fp32.

        Flat: every rank's chunk ``j`` of its own accumulated gradients goes, quantized, to rank ``j``,
        which sums the dequantized chunks in fp32 (int8 sums would wrap). Node-aware (``layout``): the node's
        ranks first reduce-scatter at full precision, so that local rank ``l`` holds the node's sum of the chunks
        of local index ``l`` on every node; it quantizes those and exchanges them with the ranks of local index
        ``l`` on the other nodes. What the quantization lost stays in the buffer (flat: ``G~ - deQ(Q(G~))``;
        node-aware: the node sum's residual at this rank's slice, zero elsewhere); the training thread adds it
        to the commit half's gradients, so the commit sums exactly what was computed.

        A compressed commit sends its buffer the same way, with the residual of the commit before added first
        (error feedback, rescaled to this round's loss scale), keeps the new residual in ``commit_residual``, and
        adds the carried estimate sums as the exact commit does.
        """
        assert self.quantizer is not None, "a compressed round has a quantizer"
        layout = self.layout
        commit = self._compressed_commit(spec)
        if commit and self.commit_residual is not None:
            rescale = spec.loss_scale / self.commit_residual_scale
            for flat, residual in zip(spec.grads, self.commit_residual):
                flat.add_(residual, alpha=rescale)
        sums = []
        for i, flat in enumerate(spec.grads):
            if layout is None:
                q, scales = self.quantizer.quantize_residual_(flat.view(self.world_size, -1),
                                                              *self._send_buffers(i, self.world_size, flat))
                recv_q, recv_s = self._exchange(i, q, scales, self.group, self.world_size)
            else:
                nodes, per_node = layout.nodes, layout.per_node
                chunk = flat.numel() // self.world_size
                node_sum = self._buffer("node_sum", i, (nodes, chunk), torch.float32, flat.device)
                blocks = flat.view(nodes, per_node * chunk)  # node n's chunks, one per local rank (no copy)
                send = blocks if blocks.dtype == torch.float32 else blocks.float()
                for n in range(nodes):  # the round owns the buffer: it may be overwritten (it is zeroed below)
                    self._reduce_scatter(node_sum[n], send[n], layout.intra_group, per_node, layout.local)
                q, scales = self.quantizer.quantize_residual_(node_sum, *self._send_buffers(i, nodes, flat))
                recv_q, recv_s = self._exchange(i, q, scales, layout.inter_group, nodes)
                flat.zero_()
                flat.view(nodes, per_node, chunk)[:, layout.local].copy_(node_sum)
            # Into the round kind's reduced-shard buffer, kept between rounds (the plain round's, with fp32 comm).
            summed = self.quantizer.dequantize_sum(recv_q, recv_s, self._buffer(
                spec.kind.value, i, (recv_q.shape[-1],), torch.float32, recv_q.device))
            if spec.loss_scale != 1.0:
                summed.mul_(1.0 / spec.loss_scale)
            if commit and self._carried is not None:
                summed.add_(self._carried[i])
            sums.append(summed)
        if commit:  # the buffers go back to the training thread, which zeroes them: the residual is kept apart
            if self.commit_residual is None:
                self.commit_residual = [torch.empty_like(flat) for flat in spec.grads]
            for residual, flat in zip(self.commit_residual, spec.grads):
                residual.copy_(flat)
            self.commit_residual_scale = spec.loss_scale
        return sums

    def _all_reduce_counts_and_norm(self, spec: RoundSpec, sums: list[torch.Tensor]) -> tuple[list[int], int, float]:
        """One all-reduce gives every rank the per-rank micro-batch counts and the squared norm."""
        device = sums[0].device
        buf = torch.zeros(self.world_size + 1, dtype=torch.float64, device=device)
        buf[self.rank] = spec.num_micro_batches
        buf[self.world_size] = sum(float(torch.linalg.vector_norm(s)) ** 2 for s in sums)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self._bytes += 2 * buf.numel() * buf.element_size()
        values = buf.tolist()
        counts = [int(c) for c in values[:self.world_size]]
        total = sum(counts)
        if spec.kind is RoundKind.ESTIMATE:
            self._carried = sums
            self._carried_count = total
        elif self._carried is not None:
            total += self._carried_count
            self.reset()
        return counts, total, values[self.world_size]

    def _step_shard(self, spec: RoundSpec, sums: list[torch.Tensor], total: int, norm: float,
                    overflow: bool, lr_factor: float = 1.0) -> list[torch.Tensor]:
        """Step the master shards with the averaged gradient; return the stepped fp32 shards (only to be read).

        A commit steps the shards and the optimizer state for good. An estimate leaves no trace, and with
        ``acco.estimate="extrapolated"`` (``spec.estimate_at``) is shifted from theta_t. torch's Adam/AdamW run
        one fused kernel each (``adam.FusedAdam``; a commit consumes ``sums``); other optimizers step through
        ``optimizer.step()``, an estimate between a snapshot of the shards and their state and its restore.
        """
        if overflow:
            # Every rank saw the same non-finite norm: skip the step (an estimate then yields theta).
            return [shard.detach() for shard in self.master_shards]
        scale = spec.loss_divisor / total
        if self.clip_grad > 0 and (norm + 1e-6) / self.clip_grad > 1:
            scale *= self.clip_grad / (norm + 1e-6)
        hyperparams = spec.hyperparams if lr_factor == 1.0 else \
            [dict(hp, lr=hp["lr"] * lr_factor) if "lr" in hp else hp for hp in spec.hyperparams]
        stretch, carry = self.estimate_shift if spec.estimate_at else (1.0, 0.0)
        if self.fused is not None:
            if spec.kind is RoundKind.ESTIMATE:
                return self.fused.estimate(sums, scale, hyperparams, stretch, carry, spec.estimate_at or None)
            self.fused.commit(sums, scale, hyperparams)
            return [shard.detach() for shard in self.master_shards]
        grads = [(summed * scale).to(shard.dtype) for shard, summed in zip(self.master_shards, sums)]
        saved = snapshot_state(self.base_optimizer, self.master_shards) if spec.kind is RoundKind.ESTIMATE else None
        for shard, grad in zip(self.master_shards, grads):
            shard.grad = grad
        _step_with_hyperparams(self.base_optimizer, hyperparams)
        stepped = []
        for shard in self.master_shards:
            shard.grad = None
            stepped.append(shard.detach().clone() if saved is not None else shard.detach())
        if saved is not None:
            restore_state(self.base_optimizer, self.master_shards, saved)
            if spec.estimate_at:  # theta_t + s (Opt(theta_t, G~_t) - theta_t) + k (theta~_t - theta_t)
                stepped = [master + stretch * (shard - master) + carry * (at - master)
                           for shard, at, master in zip(stepped, spec.estimate_at, self.master_shards)]
        return stepped

    def _all_gather_params(self, stepped: list[torch.Tensor]) -> None:
        for flat, shard in zip(self.shadow_flats, stepped):
            own = rank_partition(flat, self.rank, self.world_size)
            own.copy_(shard)
            dist.all_gather_into_tensor(flat, own, group=self.group)
            self._bytes += self._ring_bytes(flat.numel(), flat.element_size())

    def _all_gather_quantized_update(self, spec: RoundSpec, stepped: list[torch.Tensor],
                                     old: list[torch.Tensor]) -> None:
        """A compressed all-gather: every rank rebuilds the new weights as theta_t + deQ(Q(new - old)).

        Estimate: each rank quantizes the update of its fp32 master shard (``old``: the master, small updates
        quantize well). Compressed commit: the update of the stepped master from the committed weights the ranks
        hold (``old``: this rank's partition of them), so the weights never drift from the master by more than
        half a quantization step. The int8 updates and their scales are all-gathered (node-aware: among the ranks
        of this local index across the nodes, then inside the node), and every rank adds them to its own copy of
        theta_t (``spec.base_flats``, identical on every rank; in place when they are the shadows), in fp32, then
        casts.
        """
        assert self.quantizer is not None, "a compressed round has a quantizer"
        layout = self.layout
        for i, (flat, base, shard, before) in enumerate(zip(self.shadow_flats, spec.base_flats, stepped, old)):
            q, scales = self.quantizer.quantize_update(shard.detach(), before.detach())
            chunk, blocks = q.shape[1], scales.shape[1]
            all_q = self._payload(i, self.world_size * chunk, torch.int8, q.device).view(self.world_size, chunk)
            all_s = self._payload(i, self.world_size * blocks, scales.dtype, q.device).view(self.world_size, blocks)
            if layout is None:
                dist.all_gather_into_tensor(all_q, q, group=self.group)
                dist.all_gather_into_tensor(all_s, scales, group=self.group)
                self._bytes += self._ring_bytes(all_q.numel(), 1) + self._ring_bytes(all_s.numel(), 4)
            else:
                nodes, per_node = layout.nodes, layout.per_node
                inter_q = self._buffer("inter_q", i, (nodes, chunk), torch.int8, q.device)
                inter_s = self._buffer("inter_s", i, (nodes, blocks), scales.dtype, q.device)
                dist.all_gather_into_tensor(inter_q, q, group=layout.inter_group)
                dist.all_gather_into_tensor(inter_s, scales, group=layout.inter_group)
                dist.all_gather_into_tensor(all_q, inter_q, group=layout.intra_group)
                dist.all_gather_into_tensor(all_s, inter_s, group=layout.intra_group)
                for part, inter in ((all_q, inter_q), (all_s, inter_s)):
                    size = part.element_size()
                    self._bytes += self._ring_bytes(inter.numel(), size, nodes) + \
                        self._ring_bytes(part.numel(), size, per_node)
                # Gathered as [local index, node]; the flat's chunks are ordered [node, local index].
                all_q = all_q.view(per_node, nodes, chunk).transpose(0, 1)
                all_s = all_s.view(per_node, nodes, blocks).transpose(0, 1)
            if base.data_ptr() == flat.data_ptr():  # a commit after its estimate: theta_t sits in the shadows
                self.quantizer.apply_update_(flat, all_q, all_s)
            else:  # out of place: base is the live model
                self.quantizer.rebuild_(flat, base, all_q, all_s)


def _is_gloo(group: Any) -> bool:
    """Whether ``group``'s collectives run on gloo (CPU tensors)."""
    try:
        return torch.distributed.get_backend(group) == "gloo"
    except (RuntimeError, ValueError, AttributeError):
        return False


def _step_with_hyperparams(optimizer: torch.optim.Optimizer, hyperparams: list[dict[str, Any]]) -> None:
    """``optimizer.step()`` with the hyper-parameters read at launch.

    The training thread's LR scheduler writes ``param_groups[i]["lr"]`` while a round runs, so the
    worker steps a shallow view of the optimizer that shares its ``state`` but has private
    ``param_groups`` dicts holding the launch-time values.
    """
    view = object.__new__(type(optimizer))
    view.__dict__.update(optimizer.__dict__)
    view.param_groups = [dict(group, **hp) for group, hp in zip(optimizer.param_groups, hyperparams)]
    view.step()


def _lr_factor(spec: RoundSpec, total: int, both_halves: bool) -> float:
    """``sqrt(kappa)`` under ``acco.lr_scaling="sqrt"`` (kappa: the round's batch over its nominal batch), else 1."""
    nominal = spec.lr_nominal[0] + (spec.lr_nominal[1] if both_halves else 0)
    if nominal <= 0 or total <= 0:
        return 1.0
    return math.sqrt(total / nominal)


@contextlib.contextmanager
def _timed(phase: dict[str, float], phase_cpu: dict[str, float], name: str) -> Iterator[None]:
    start, cpu_start = time.perf_counter(), time.thread_time()
    with torch.profiler.record_function(f"deepspeed_acco::pipeline::{name}"):
        yield
    phase[name] = time.perf_counter() - start
    phase_cpu[name] = time.thread_time() - cpu_start


class AccoCommWorker:
    """A daemon thread that runs submitted rounds one at a time, in submission order."""

    def __init__(self, run_round: Callable[[RoundSpec], RoundResult], name: str = "acco_comm") -> None:
        self._run_round = run_round
        self._queue: queue.Queue[RoundHandle | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, spec: RoundSpec) -> RoundHandle:
        """Queue a round and return its handle."""
        if self._closed:
            raise RuntimeError("the ACCO worker has been shut down (engine.destroy() was called)")
        if not self._thread.is_alive():
            raise AccoRoundError("the ACCO worker thread has died; see the previous error")
        handle = RoundHandle(spec)
        self._queue.put(handle)
        return handle

    def _loop(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            try:
                handle._set_result(self._run_round(handle.spec))
            except BaseException as err:  # noqa: BLE001 - every error must reach the training thread
                handle._set_error(traceback.format_exc(), describe_round_error(err))

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the thread after the round in flight; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
