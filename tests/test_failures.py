"""Failures in 2-rank gloo runs: errors cross from the background round to the training thread,
and a peer that never joins a round produces a clear error within ``acco.round_timeout_s``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.dist_utils import run_distributed
from tests.workers import base_config, make_batches


def _train_until_error(rank: int, world_size: int, cfg: dict[str, Any], stall_rank: int | None,
                       inject: bool) -> dict[str, Any]:
    """Train; return the error the training thread saw and how long after the stall it came."""
    import deepspeed_acco
    from tests.dist_utils import init_rank
    from tests.workers import WithLoss, make_model

    init_rank()
    module = WithLoss(make_model())
    engine, *_ = deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    if inject:
        def exploding_round(spec: Any) -> Any:
            raise ValueError("injected failure in the round")
        engine.optimizer._worker._run_round = exploding_round
    data = make_batches(0, world_size, 64)[rank]
    stall_at = None
    try:
        for i, (x, y) in enumerate(data):
            if rank == stall_rank and i == 3:  # after launching the first round: never join the next one
                time.sleep(12)
                return {"error": None, "stalled": True}
            if stall_at is None and i == 3:
                stall_at = time.monotonic()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        deepspeed_acco.flush(engine)
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - the error is the result
        return {"error": f"{type(err).__name__}: {err}", "after_s": time.monotonic() - (stall_at or time.monotonic())}
    finally:
        engine.destroy()


@pytest.mark.timeout(120)
def test_round_exception_reaches_training_thread() -> None:
    """An exception raised inside the background round is raised by the training thread, with its traceback."""
    cfg = base_config(acco={"enabled": True})
    results = run_distributed(_train_until_error, 2, cfg, None, True, timeout_s=100)
    for res in results:
        print(res["error"].splitlines()[0])
        assert res["error"].startswith("AccoRoundError")
        assert "injected failure in the round" in res["error"] and "exploding_round" in res["error"]


@pytest.mark.timeout(120)
def test_dead_peer_times_out() -> None:
    """A peer that never joins the next round makes the other rank fail within round_timeout_s, naming the cause."""
    timeout = 4.0
    cfg = base_config(acco={"enabled": True, "round_timeout_s": timeout})
    start = time.monotonic()
    results = run_distributed(_train_until_error, 2, cfg, 1, False, timeout_s=100)
    waiting = results[0]
    print(f"rank 0 error after {waiting['after_s']:.1f} s (round_timeout_s={timeout}): {waiting['error'][:300]}")
    assert results[1].get("stalled")
    assert waiting["error"] is not None and "AccoRound" in waiting["error"]
    assert "peer" in waiting["error"] or "Timed out" in waiting["error"] or "timeout" in waiting["error"].lower()
    assert waiting["after_s"] < timeout + 8
    assert time.monotonic() - start < 90
