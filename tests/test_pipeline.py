"""The background worker and the rollback, without a process group.

Localizes: rounds run one at a time in submission order; a round's exception reaches the
waiting thread with the worker's traceback; a wait that cannot finish raises after the timeout;
shutdown is idempotent and stops the thread; an estimate rollback restores AdamW exactly.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deepspeed_acco.pipeline import AccoCommWorker, AccoRoundError, AccoRoundTimeout, RoundKind, RoundResult, RoundSpec
from deepspeed_acco.rollback import restore_state, snapshot_state


def _spec(index: int) -> RoundSpec:
    return RoundSpec(index=index, kind=RoundKind.COMMIT, step=index, grads=[], num_micro_batches=1, loss_scale=1.0,
                     hyperparams=[])


def _result(spec: RoundSpec) -> RoundResult:
    return RoundResult(index=spec.index, kind=spec.kind, step=spec.step, duration_s=0.0, phase_s={}, counts=[1],
                       overflow=False, grad_norm=0.0, bytes_sent=0)


def test_rounds_run_in_order_on_one_thread() -> None:
    """Rounds run in submission order on the worker thread named acco_comm, never on the caller's."""
    seen: list[tuple[int, str]] = []

    def run(spec: RoundSpec) -> RoundResult:
        time.sleep(0.01 * (3 - spec.index))
        seen.append((spec.index, threading.current_thread().name))
        return _result(spec)

    worker = AccoCommWorker(run)
    handles = [worker.submit(_spec(i)) for i in range(3)]
    assert [h.wait(5).index for h in handles] == [0, 1, 2]
    assert seen == [(0, "acco_comm"), (1, "acco_comm"), (2, "acco_comm")]
    worker.shutdown()


def test_error_reaches_caller_with_traceback() -> None:
    """An exception in the round is raised in the waiting thread with the worker's traceback."""
    def failing_phase(spec: RoundSpec) -> RoundResult:
        raise ValueError("reduce-scatter exploded")

    worker = AccoCommWorker(failing_phase)
    handle = worker.submit(_spec(0))
    with pytest.raises(AccoRoundError) as info:
        handle.wait(5)
    text = str(info.value)
    assert "reduce-scatter exploded" in text and "failing_phase" in text and "Traceback" in text
    assert worker.alive  # the worker survives and reports later rounds too
    worker.shutdown()


def test_wait_times_out() -> None:
    """A round that never finishes raises AccoRoundTimeout after the timeout, naming the setting."""
    release = threading.Event()

    def stuck(spec: RoundSpec) -> RoundResult:
        release.wait(10)
        return _result(spec)

    worker = AccoCommWorker(stuck)
    handle = worker.submit(_spec(0))
    start = time.monotonic()
    with pytest.raises(AccoRoundTimeout, match="round_timeout_s"):
        handle.wait(0.5)
    assert 0.4 < time.monotonic() - start < 3
    assert not handle.done()
    release.set()
    worker.shutdown()


def test_shutdown_is_idempotent_and_stops_thread() -> None:
    """shutdown() twice is fine, the thread ends, and a later submit is refused."""
    worker = AccoCommWorker(_result)
    worker.submit(_spec(0)).wait(5)
    worker.shutdown()
    worker.shutdown()
    assert not worker.alive
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(_spec(1))


def test_rollback_restores_adamw_exactly() -> None:
    """snapshot -> step -> restore leaves weights and AdamW state bit-identical; first-step state is removed."""
    shard = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.AdamW([shard], lr=0.1)
    empty = snapshot_state(opt, [shard])
    shard.grad = torch.randn(10)
    opt.step()
    restore_state(opt, [shard], empty)
    assert shard not in opt.state and torch.equal(shard.detach(), empty.weights[0])
    opt.step()  # a real step, then a tentative one rolled back
    saved = snapshot_state(opt, [shard])
    state = {k: v.clone() for k, v in opt.state[shard].items()}
    weights = shard.detach().clone()
    shard.grad = torch.randn(10)
    opt.step()
    assert not torch.equal(shard.detach(), weights)
    restore_state(opt, [shard], saved)
    assert torch.equal(shard.detach(), weights)
    assert all(torch.equal(opt.state[shard][k], v) for k, v in state.items())
