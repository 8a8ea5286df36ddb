"""The background round: reduce-scatter -> sharded optimizer step -> all-gather, on its own thread.

One worker thread (and, on CUDA, one stream) per optimizer; at most one round in flight.
Buffer ownership over two consecutive boundaries of the homogeneous ACCO schedule (k micro-batches
between boundaries; ``A`` and ``B`` are the two flat accumulation buffers, ``S`` the shadow flat
parameters the worker all-gathers into, ``P`` the live flat parameters the model's tensors view)::

    training thread     | accumulate G~_t into A | accumulate G_t into B  | accumulate G~_t+1 into A
                        |     (reads P=theta_t)  | (reads P=theta_t)      | (reads P=theta~_t+1)
    boundary            ^ wait C_t-1, P<-S,      ^ wait E_t, P<-S,        ^ wait C_t, P<-S, ...
                          launch E_t(A)            launch C_t(B)
    worker thread       |    E_t: RS(A), step, rollback, AG->S | C_t: RS(B)+carried, step, AG->S |

The training thread never touches a buffer while the worker owns it: it takes ``A`` back only
after waiting for the round that read it, and copies ``S`` into ``P`` only after the round that
wrote it has finished (on CUDA, after its completion event). The worker never touches ``P``.
Because every rank launches the same sequence of rounds, the collectives on ACCO's process
group come in the same order everywhere, even when the ranks' micro-batch counts differ
(adaptive accumulation). The training thread issues no collective while a round is in flight.
"""

from __future__ import annotations

import contextlib
import enum
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

from deepspeed_acco.rollback import restore_state, snapshot_state

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
]


class AccoRoundError(RuntimeError):
    """A background round failed. The worker's traceback is in the message."""


class AccoRoundTimeout(AccoRoundError):
    """A round did not finish within ``acco.round_timeout_s`` (a dead or stalled peer)."""


_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset", "broken pipe", "timed out",
                         "connection refused", "socket closed")


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
    loss_divisor: float = 1.0
    """What each micro-batch's loss was divided by before its backward (``gradient_accumulation_steps``
    as DeepSpeed's backward divides it; the step's micro-batch count for a caller that normalized a
    short step itself). The round multiplies it back and divides by the global micro-batch count."""
    ready_event: Any = None
    """CUDA event recorded on the compute stream after the last accumulation (None on CPU)."""


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
    """

    def __init__(self, *, base_optimizer: torch.optim.Optimizer, master_shards: list[torch.Tensor],
                 shadow_flats: list[torch.Tensor], group: Any, rank: int, world_size: int,
                 comm_dtype: torch.dtype, clip_grad: float, stream: Any = None) -> None:
        self.base_optimizer = base_optimizer
        self.master_shards = master_shards
        self.shadow_flats = shadow_flats
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.comm_dtype = comm_dtype
        self.clip_grad = clip_grad
        self.stream = stream
        self._carried: list[torch.Tensor] | None = None
        self._carried_count = 0

    def reset(self) -> None:
        """Forget the estimate's gradient (after a flush the next round is an estimate)."""
        self._carried = None
        self._carried_count = 0

    def _shard(self, flat: torch.Tensor) -> torch.Tensor:
        size = flat.numel() // self.world_size
        return flat.narrow(0, self.rank * size, size)

    def run(self, spec: RoundSpec) -> RoundResult:
        """Run one round; called on the worker thread."""
        start = time.perf_counter()
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        phase: dict[str, float] = {}
        with ctx, torch.no_grad():
            if spec.ready_event is not None:
                self.stream.wait_event(spec.ready_event)
            with _timed(phase, "reduce_scatter"):
                sums = self._reduce_scatter_grads(spec)
            with _timed(phase, "norm"):
                counts, total, sumsq = self._all_reduce_counts_and_norm(spec, sums)
            norm = (sumsq ** 0.5) * spec.loss_divisor / total if total else 0.0
            overflow = not (sumsq == sumsq and sumsq != float("inf"))
            with _timed(phase, "step"):
                self._step_shard(spec, sums, total, norm, overflow)
            with _timed(phase, "all_gather"):
                self._all_gather_params()
            done_event = None
            if self.stream is not None:
                done_event = torch.cuda.Event()
                done_event.record(self.stream)
        flat_bytes = sum(f.numel() for f in self.shadow_flats)
        ring = (self.world_size - 1) / self.world_size
        bytes_sent = int(ring * flat_bytes * (torch.tensor([], dtype=self.comm_dtype).element_size()
                                              + self.shadow_flats[0].element_size()))
        bytes_sent += 8 * (self.world_size + 1) * 2
        return RoundResult(index=spec.index, kind=spec.kind, step=spec.step,
                           duration_s=time.perf_counter() - start, phase_s=phase, counts=counts,
                           overflow=overflow, grad_norm=norm, bytes_sent=bytes_sent, done_event=done_event)

    def _reduce_scatter_grads(self, spec: RoundSpec) -> list[torch.Tensor]:
        """Reduce-scatter each group's flat gradients; return this rank's unscaled gradient sums."""
        sums = []
        for i, flat in enumerate(spec.grads):
            send = flat if flat.dtype == self.comm_dtype else flat.to(self.comm_dtype)
            shard = torch.empty(flat.numel() // self.world_size, dtype=self.comm_dtype, device=flat.device)
            dist.reduce_scatter_tensor(shard, send, op=dist.ReduceOp.SUM, group=self.group)
            # Undo the loss scale: a sum of per-micro-batch gradients, each still divided by spec.loss_divisor.
            summed = shard.to(torch.float32).mul_(1.0 / spec.loss_scale)
            if spec.kind is RoundKind.COMMIT and self._carried is not None:
                summed.add_(self._carried[i])
            sums.append(summed)
        return sums

    def _all_reduce_counts_and_norm(self, spec: RoundSpec, sums: list[torch.Tensor]) -> tuple[list[int], int, float]:
        """One all-reduce gives every rank the per-rank micro-batch counts and the squared norm."""
        device = sums[0].device
        buf = torch.zeros(self.world_size + 1, dtype=torch.float64, device=device)
        buf[self.rank] = spec.num_micro_batches
        buf[self.world_size] = sum(float(s.double().pow(2).sum()) for s in sums)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
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
                    overflow: bool) -> None:
        """Step the master shard with the averaged gradient; roll it back after an estimate."""
        if overflow:
            # Every rank saw the same non-finite norm: skip the step (an estimate then yields theta).
            for shard, flat in zip(self.master_shards, self.shadow_flats):
                self._shard(flat).copy_(shard)
            return
        scale = spec.loss_divisor / total
        if self.clip_grad > 0 and (norm + 1e-6) / self.clip_grad > 1:
            scale *= self.clip_grad / (norm + 1e-6)
        saved = snapshot_state(self.base_optimizer, self.master_shards) if spec.kind is RoundKind.ESTIMATE else None
        for shard, summed in zip(self.master_shards, sums):
            # Out of place: an estimate's sums are carried into the commit unscaled.
            shard.grad = (summed * scale).to(shard.dtype)
        _step_with_hyperparams(self.base_optimizer, spec.hyperparams)
        for shard, flat in zip(self.master_shards, self.shadow_flats):
            shard.grad = None
            self._shard(flat).copy_(shard)
        if saved is not None:
            restore_state(self.base_optimizer, self.master_shards, saved)

    def _all_gather_params(self) -> None:
        for flat in self.shadow_flats:
            dist.all_gather_into_tensor(flat, self._shard(flat), group=self.group)


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


@contextlib.contextmanager
def _timed(phase: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    with torch.profiler.record_function(f"deepspeed_acco::pipeline::{name}"):
        yield
    phase[name] = time.perf_counter() - start


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
