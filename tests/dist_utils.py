"""Run a function on N gloo ranks in fresh processes and collect each rank's return value.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes (the "spawn" start
method: no inherited threads or OpenMP pools), sets the ``env://`` rendezvous variables that
``deepspeed.init_distributed`` reads, calls ``fn(rank, world_size, *args)`` in each and returns
the list of results. Any rank's exception fails the call with that rank's traceback; a rank that
does not finish within ``timeout_s`` is killed and the call fails, so a hung collective never
hangs the test run.

``run_jobs_isolated`` runs several jobs one after the other in the same ranks (one spawn) and
keeps each job's exception as a ``JobFailure`` instead of losing the whole spawn; ``job_result``
then fails only the tests that read that job, with its traceback.

``allow_cpu_fp16`` lets DeepSpeed run fp16 configs on CPUs whose mkldnn has no fp16 kernels
(see the README's Tests section). ``logged_warnings`` collects what DeepSpeed's logger warns inside a block.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["JobFailure", "allow_cpu_fp16", "cpu_fp16_probe", "free_port", "init_rank", "job_result",
           "logged_warnings", "run_distributed", "run_jobs_isolated"]


@contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The messages DeepSpeed's logger (which deepspeed_acco logs through) emits at WARNING or above in the block."""
    import logging

    from deepspeed.utils import logger

    seen: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_rank(timeout_s: float = 60.0) -> None:
    """In a child: gloo process group through DeepSpeed, no JIT build, one intra-op thread."""
    from datetime import timedelta

    import deepspeed
    import torch

    import deepspeed_acco

    torch.set_num_threads(1)
    deepspeed_acco.disable_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=timeout_s))


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, env: dict[str, str],
           results: Any, args: tuple[Any, ...]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env})
    try:
        # Plain pickle: tensors travel by value, not as shared-memory handles of a dying process.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                    env: dict[str, str] | None = None, expect_failure: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the per-rank results.

    With ``expect_failure=True`` a rank's exception is returned as its traceback string instead
    of failing the call (for tests of error paths).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, env or {}, results, args), daemon=True)
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while len(out) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out) - set(errors))} did "
                                       f"not finish within {timeout_s} s") from None
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(1.0)
                    if results.empty():
                        raise RuntimeError(f"a rank died without reporting: exit codes "
                                           f"{[p.exitcode for p in procs]}") from None
                continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    if errors and not expect_failure:
        raise RuntimeError("\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    merged = {**out, **errors}
    return [merged[r] for r in range(world_size)]


@dataclass
class JobFailure:
    """A job that raised in one rank: the rank's traceback (the other jobs of the spawn still ran)."""

    traceback: str


def run_jobs_isolated(rank: int, world_size: int, fn: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
    """In a rank: ``fn(rank, world_size, *job)`` for each job in order; a job's exception becomes its ``JobFailure``.

    A refused config raises on every rank at ``initialize`` (before any collective), so the next job
    starts cleanly. A job that fails on one rank only, inside a collective, leaves its peer waiting
    until a timeout; the spawn's own timeout then fails the tests of that spawn.
    """
    out: list[Any] = []
    for job in jobs:
        try:
            out.append(fn(rank, world_size, *job))
        except Exception:  # noqa: BLE001 - the traceback is the job's result
            out.append(JobFailure(traceback.format_exc()))
    return out


def spawn_jobs(world_size: int, jobs: dict[str, tuple[Any, ...]], timeout_s: float = 280.0,
               env: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """Run the named jobs of ``tests.workers.run_jobs`` in one spawned world; each job's per-rank results by name."""
    from tests.workers import run_jobs

    results = run_distributed(run_jobs, world_size, list(jobs.values()), timeout_s=timeout_s, env=env)
    return {name: [rank_results[j] for rank_results in results] for j, name in enumerate(jobs)}


def job_result(runs: dict[str, list[Any]], name: str) -> list[Any]:
    """The per-rank results of job ``name``; fails the calling test (only it) if the job raised on any rank."""
    import pytest

    failed = [(rank, res) for rank, res in enumerate(runs[name]) if isinstance(res, JobFailure)]
    if failed:
        rank, res = failed[0]
        last = res.traceback.strip().splitlines()[-1]
        pytest.fail(f"job {name!r} failed on rank {rank}: {last}\n{res.traceback}", pytrace=False)
    return runs[name]


def cpu_fp16_probe() -> bool:
    """What DeepSpeed's CPU accelerator answers to ``is_fp16_supported()`` here (it asks mkldnn)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def allow_cpu_fp16() -> bool:
    """Let DeepSpeed build fp16 engines on a CPU whose mkldnn lacks fp16 kernels; True if it had to.

    DeepSpeed's CPU accelerator refuses ``"fp16": {"enabled": true}`` when
    ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` is False (CPUs without AVX512-FP16/AMX-FP16).
    That probe asks whether mkldnn has fast fp16 kernels; torch computes fp16 tensors on every CPU
    (slower, through its reference kernels), and everything the fp16 tests check (loss scaling, the
    overflow decision, skipped steps, resume) is DeepSpeed's and ACCO's own logic on those tensors.
    Only the answer of this process's accelerator object changes; nothing else is patched.
    """
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu" or accel.is_fp16_supported():
        return False
    accel.is_fp16_supported = lambda: True
    return True
