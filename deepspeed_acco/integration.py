"""The only module that touches DeepSpeed internals: ``initialize``, ``install``, the engine subclass.

DeepSpeed 0.19 has no registry for a custom ZeRO optimizer. ``initialize`` therefore builds the
engine with ``AccoEngine`` (``deepspeed.initialize`` looks ``DeepSpeedEngine`` up in its module at
call time), and ``AccoEngine._configure_zero_optimizer`` swaps the ZeRO-1 class the engine
module names for ``AccoZeroOptimizer`` for the duration of that call. Both swaps are undone before
``initialize`` returns. ``install()`` replaces ``deepspeed.initialize`` by ``initialize`` so that
code calling DeepSpeed itself (HF Trainer, accelerate) picks ACCO up from the JSON block.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import deepspeed
import deepspeed.runtime.engine as ds_engine_module
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.zero.utils import ZeRORuntimeException
from deepspeed.utils import log_dist, logger

from deepspeed_acco.committed import install_committed_reads
from deepspeed_acco.config import (
    AccoConfig,
    AccoConfigError,
    check_deepspeed_config,
    check_raw_config,
    constant_lr_advice,
    get_acco_config,
    ignored_keys_advice,
    warmup_advice,
)
from deepspeed_acco.metrics import StepMetrics
from deepspeed_acco.optimizer import AccoZeroOptimizer
from deepspeed_acco.signals import install_sigterm_handler

__all__ = ["AccoEngine", "initialize", "install", "uninstall", "is_installed", "flush", "pop_metrics",
           "disable_cpu_shm_build", "SUPPORTED_DEEPSPEED"]

SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))
"""DeepSpeed versions (major, minor) whose internals this module was written against, [low, high)."""

_original_initialize = deepspeed.initialize
_install_lock = threading.Lock()
_live_optimizers: weakref.WeakSet[AccoZeroOptimizer] = weakref.WeakSet()


def _check_version() -> None:
    parts = tuple(int(x) for x in deepspeed.__version__.split(".")[:2] if x.isdigit())
    low, high = SUPPORTED_DEEPSPEED
    if not (low <= parts < high):
        raise RuntimeError(f"deepspeed_acco supports deepspeed >={'.'.join(map(str, low))},<"
                           f"{'.'.join(map(str, high))}; found {deepspeed.__version__}. Install a supported version.")


class AccoEngine(DeepSpeedEngine):
    """A ``DeepSpeedEngine`` whose ZeRO-1 optimizer runs ACCO and whose boundaries ACCO decides.

    ``global_steps`` counts committed optimizer steps and the LR scheduler steps once per commit,
    because the engine's accumulation boundary is the micro-batch that launches a commit round.
    """

    _acco: AccoConfig

    def _do_sanity_check(self) -> None:
        super()._do_sanity_check()
        self._acco = get_acco_config(self._config._param_dict)
        check_deepspeed_config(self._config, self._acco, client_optimizer=self.client_optimizer)
        for advise in (warmup_advice, constant_lr_advice, ignored_keys_advice):
            advice = advise(self._config, self._acco, client_lr_scheduler=self.client_lr_scheduler)
            if advice is not None:
                log_dist(advice, ranks=[0], level=logging.WARNING)
        if self.mpu is not None:
            raise AccoConfigError("acco.enabled=true does not support model parallelism (an mpu was passed); "
                                  "drop mpu or set acco.enabled to false")

    def _configure_zero_optimizer(self, optimizer: Any) -> Any:
        acco = self._acco
        factory = functools.partial(AccoZeroOptimizer, acco_config=acco)
        with _swapped(ds_engine_module, "DeepSpeedZeroOptimizer", factory):
            built = super()._configure_zero_optimizer(optimizer)
        if not isinstance(built, AccoZeroOptimizer):
            raise RuntimeError(f"ACCO expected DeepSpeed to build AccoZeroOptimizer, got {type(built).__name__}; "
                               "this DeepSpeed version is not supported")
        _live_optimizers.add(built)
        return built

    def _acco_finish_init(self) -> None:
        # DeepSpeed's throughput timer synchronizes the whole device on every micro-batch, which
        # would wait for the background round's stream and serialize it behind compute.
        timer_config = getattr(self.tput_timer, "config", None)
        if timer_config is not None and getattr(timer_config, "synchronized", False):
            timer_config.synchronized = False
            logger.info("ACCO: timers.throughput.synchronized set to false (a device-wide synchronize per "
                        "micro-batch would serialize the background round)")
        install_committed_reads(self.module, self.acco_optimizer)

    @property
    def acco_optimizer(self) -> AccoZeroOptimizer:
        """The engine's ACCO optimizer."""
        assert isinstance(self.optimizer, AccoZeroOptimizer), "an AccoEngine always has an AccoZeroOptimizer"
        return self.optimizer

    def is_gradient_accumulation_boundary(self) -> bool:
        """True while the micro-batch that launches a commit round is being stepped."""
        if not isinstance(getattr(self, "optimizer", None), AccoZeroOptimizer):
            return super().is_gradient_accumulation_boundary()
        return self.acco_optimizer.commit_pending or getattr(self, "_acco_stepping_commit", False)

    def train(self, mode: bool = True) -> AccoEngine:
        """``nn.Module.train``; in eval mode the model holds the committed weights (see ``committed.py``)."""
        super().train(mode)
        optimizer = getattr(self, "optimizer", None)
        if isinstance(optimizer, AccoZeroOptimizer):
            if mode:
                optimizer.leave_committed()
            else:
                optimizer.enter_committed()
        return self

    def backward(self, loss: Any, retain_graph: bool = False, scale_wrt_gas: bool = True) -> Any:
        """DeepSpeed's backward, with DeepSpeed's meaning of ``scale_wrt_gas`` and of a caller's boundary.

        ``scale_wrt_gas=False`` (the HF Trainer divides the loss by its accumulation steps itself)
        gives the same gradients as under ZeRO-1: the rounds multiply the accumulated sum by what
        the caller divided by (``gradient_accumulation_steps``, or the micro-batch count of a step
        the caller ended early) and divide by the global micro-batch count. The boundary set with
        ``set_gradient_accumulation_boundary`` (None unless the caller manages it) decides where the
        optimizer step ends (see ``AccoZeroOptimizer.backward_epilogue``).

        Raises:
            RuntimeError: the model is in eval mode and holds the committed weights (put it back in
                train mode before training on it).
        """
        optimizer = self.acco_optimizer
        if optimizer.committed_in_model:
            raise RuntimeError("ACCO: backward() while the model is in eval mode: in eval mode the model holds the "
                               "committed weights, for evaluation and export. Call model.train() (or engine.train()) "
                               "before the forward pass you train on.")
        optimizer.caller_normalized_loss = not scale_wrt_gas
        optimizer.caller_boundary = self._is_gradient_accumulation_boundary
        return super().backward(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)

    def step(self, lr_kwargs: Any = None) -> None:
        """DeepSpeed's step. A boundary the caller set (``set_gradient_accumulation_boundary(True)``) ends the
        optimizer step here, as under ZeRO-1, also before ACCO's own boundary (a short step). At a commit
        boundary it also sends ACCO's figures to the monitor."""
        optimizer = self.acco_optimizer
        if self._is_gradient_accumulation_boundary:
            optimizer.end_step_early()
        commit = optimizer.commit_pending
        self._acco_stepping_commit = commit
        try:
            super().step(lr_kwargs)
        finally:
            self._acco_stepping_commit = False
        if commit and self.monitor.enabled and self.global_rank == 0:
            history = optimizer.metrics.history
            events = [(name, value, history[-1].step) for name, value in history[-1].monitor_events()] \
                if history else []
            if events:
                self.monitor.write_events(events)

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> Any:
        """DeepSpeed's save of the committed state plus ACCO's pipeline state; training is not disturbed.

        Waits for the round in flight, saves with the committed parameters in the model (the module
        weights then match the fp32 master shards, so plain ZeRO-1 and ``zero_to_fp32`` read the
        committed model), and puts the live parameters back: training after a save continues bit for
        bit as without it. ACCO's counters, the estimate parameters and any partial accumulation go
        into each rank's optimizer-states file (see ``AccoZeroOptimizer.state_dict``).

        ``latest`` is written by rank 0 only after every rank has written all its files (DeepSpeed
        writes it once rank 0's own files are done, before the final barrier), and atomically
        (temporary file, fsync, ``os.replace``): a save that fails part-way leaves ``latest`` on the
        previous tag.
        """
        optimizer = self.acco_optimizer
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        decoupled = self.checkpoint_engine is not None and self.checkpoint_engine.is_decoupled()
        optimizer._engine_micro_steps = self.micro_steps
        try:
            with optimizer.committed_parameters_loaded():
                saved = super().save_checkpoint(save_dir, tag=tag, client_state=client_state or {},
                                                save_latest=save_latest and decoupled,
                                                exclude_frozen_parameters=exclude_frozen_parameters)
        finally:
            optimizer._engine_micro_steps = None
        if save_latest and not decoupled:
            # super() ended with a barrier: every rank's files of this tag are complete.
            if self.global_rank == 0:
                _write_latest_atomically(save_dir, tag)
            dist.barrier()
        return saved

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """DeepSpeed's load; ACCO's pipeline resumes where the checkpoint's run was.

        With an ACCO checkpoint (same mode, GA and world size) training continues exactly as the
        run that saved it. With a plain ZeRO-1 checkpoint, a universal checkpoint (another world
        size) or ``load_module_only`` the pipeline restarts from the loaded parameters and the
        committed-step count follows ``global_steps``.

        Raises:
            RuntimeError: the checkpoint was saved at another world size and is not universal; the
                message gives the conversion command.
        """
        optimizer = self.acco_optimizer
        optimizer.before_checkpoint_load()
        try:
            load_path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        except ZeRORuntimeException as err:
            if "world size" not in str(err):
                raise
            latest = os.path.join(load_dir, "latest")
            shown = tag or (open(latest).read().strip() if os.path.isfile(latest) else "TAG")
            raise RuntimeError(
                f"{err} To resume at another world size, convert the checkpoint to a universal one and load that: "
                f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {load_dir}/{shown} --output_folder "
                f"{load_dir}/{shown}_universal --inject_missing_state, then set \"checkpoint\": "
                f"{{\"load_universal\": true}} in the DeepSpeed config and load tag {shown}_universal "
                "(README, Checkpoints).") from err
        if load_path is not None:
            optimizer.after_checkpoint_load(self.global_steps)
            if optimizer.loaded_engine_micro_steps is not None:
                self.micro_steps = optimizer.loaded_engine_micro_steps
        return load_path, client_state


def _write_latest_atomically(save_dir: str, tag: str) -> None:
    """Point ``save_dir/latest`` at ``tag``: write a temporary file, fsync it, ``os.replace`` it.

    A reader sees the old content or the new one, never a truncated file.
    """
    path = os.path.join(save_dir, "latest")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable where directories can be fsynced
        fd = os.open(save_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _resolve_config(args: Any, config: Any, config_params: Any) -> dict[str, Any] | None:
    """The config dict ``deepspeed.initialize`` would read (dict, JSON path, or args.deepspeed_config)."""
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if isinstance(source, (str, os.PathLike)):
        with open(source) as fh:
            return json.load(fh)
    return source if isinstance(source, dict) else None


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Drop-in for ``deepspeed.initialize``: same arguments, same 4-tuple.

    With ``"acco": {"enabled": true}`` in the config, the engine is an ``AccoEngine``; otherwise
    this is exactly ``deepspeed.initialize``.

    Raises:
        AccoConfigError: the ``acco`` block or its combination with the DeepSpeed config is invalid.
        RuntimeError: the installed DeepSpeed version is not supported.
    """
    bound = _bind_initialize(args, kwargs)
    cfg = _resolve_config(bound.get("args"), bound.get("config"), bound.get("config_params"))
    acco = get_acco_config(cfg or {})
    if not acco.enabled:
        return _original_initialize(*args, **kwargs)
    _check_version()
    check_raw_config(cfg or {})
    if isinstance(bound.get("model"), PipelineModule):
        raise AccoConfigError("acco.enabled=true does not support pipeline parallelism (model is a "
                              "PipelineModule); use a plain nn.Module or set acco.enabled to false")
    if cfg is not None and cfg.get("hybrid_engine", {}).get("enabled", False):
        raise AccoConfigError("acco.enabled=true does not support hybrid_engine; set hybrid_engine.enabled=false")
    with _swapped(deepspeed, "DeepSpeedEngine", AccoEngine):
        result = _original_initialize(*args, **kwargs)
    result[0]._acco_finish_init()
    install_sigterm_handler(_any_live_worker)
    return result


def _bind_initialize(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    import inspect

    return dict(inspect.signature(_original_initialize).bind_partial(*args, **kwargs).arguments)


def install() -> None:
    """Make plain ``deepspeed.initialize`` honour the ``acco`` block (idempotent, see ``uninstall``).

    Raises:
        RuntimeError: the installed DeepSpeed version is not supported.
    """
    _check_version()
    with _install_lock:
        deepspeed.initialize = initialize


def uninstall() -> None:
    """Restore DeepSpeed's own ``deepspeed.initialize`` (idempotent). Engines already built keep ACCO."""
    with _install_lock:
        deepspeed.initialize = _original_initialize


def is_installed() -> bool:
    """Whether ``deepspeed.initialize`` is ACCO's."""
    return deepspeed.initialize is initialize


def _acco_optimizer_of(engine: Any) -> AccoZeroOptimizer | None:
    optimizer = getattr(engine, "optimizer", engine)
    return optimizer if isinstance(optimizer, AccoZeroOptimizer) else None


def flush(engine: Any) -> None:
    """Wait for the round in flight and load the last committed parameters into ``engine.module``.

    Call it at the end of training and before evaluating. Training may go on afterwards: the
    pipeline restarts from the committed parameters. A no-op for an engine without ACCO.

    Raises:
        AccoRoundError: the round in flight failed or timed out.
    """
    optimizer = _acco_optimizer_of(engine)
    if optimizer is not None:
        optimizer.flush()


def pop_metrics(engine: Any) -> list[StepMetrics]:
    """ACCO's records of the steps committed since the last call (empty without ACCO)."""
    optimizer = _acco_optimizer_of(engine)
    return optimizer.pop_metrics() if optimizer is not None else []


def disable_cpu_shm_build() -> None:
    """Skip the JIT build of DeepSpeed's CPU shared-memory all-reduce op (inference only).

    Call before ``deepspeed.init_distributed``; saves a ~30 s compile on a fresh CPU machine.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _any_live_worker() -> bool:
    """Whether an ACCO optimizer of this process still has its worker (SIGTERM then stops cleanly)."""
    return any(not optimizer._worker._closed for optimizer in list(_live_optimizers))


@atexit.register
def _shutdown_workers() -> None:
    for optimizer in list(_live_optimizers):
        optimizer._worker.shutdown(timeout_s=2.0)

