"""Committed weights wherever the model is read from outside a training step.

During ACCO training the model's parameters are the *live* ones: the estimate theta~_{t+1} in an
estimate half, so that the next gradients are computed there. Code that reads the model from
outside a training step wants the last committed step theta_t instead: an evaluation, a
``state_dict`` for ``save_pretrained``, ``trainer.save_model`` or ``accelerator.get_state_dict``.
Two hooks on the engine's module give it that, with no ACCO call in user code:

- ``state_dict()`` (of the module or of any submodule, in train or eval mode) returns the committed
  values, as copies (a post-hook on every submodule replaces its own parameters' entries);
- a forward in eval mode runs on the committed weights: the first eval-mode forward puts them into
  the model (``AccoZeroOptimizer.enter_committed``), the next train-mode forward puts the live ones
  back, so training continues bit for bit as if the evaluation had not happened
  (``AccoEngine.train``/``eval`` do the same eagerly).

What still sees the live weights: a direct read of a parameter tensor in train mode (a user's loop
over ``model.parameters()``, ``named_parameters()``) and ``state_dict(keep_vars=True)``, which
returns the parameter objects themselves.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from deepspeed_acco.pipeline import RoundKind

if TYPE_CHECKING:
    from deepspeed_acco.optimizer import AccoZeroOptimizer

__all__ = ["CommittedWeights", "install_committed_reads"]


class CommittedWeights:
    """``AccoZeroOptimizer``'s reads of the committed weights: where they are, and putting them into the model.

    A finished commit round holds them in the shadow flats (the live ones are then the next estimate, or the
    previous step in dpu mode); otherwise the live flats are the committed ones. Uses the optimizer's
    ``bit16_groups_flat`` (live), ``_shadows``, ``_in_flight`` and ``_timeout_s``.
    """

    bit16_groups_flat: list[torch.Tensor]
    _shadows: list[torch.Tensor]
    _in_flight: Any
    _timeout_s: float
    _live_backup: list[torch.Tensor] | None = None
    _committed_in_model: bool = False
    _entered_at: float | None = None
    _half_start: float
    _last_commit_at: float

    def drain(self) -> None:
        """Wait for the round in flight without consuming it; training is not disturbed.

        The next boundary finishes the round as it would have (loads its parameters, accounts it).
        Afterwards the master shards and the base optimizer state are the committed ones and
        ``committed_flats()`` holds the committed bit16 parameters.

        Raises:
            AccoRoundError: the round in flight failed or timed out.
        """
        if self._in_flight is not None:
            start = time.perf_counter()
            self._in_flight.wait(self._timeout_s)
            waited = time.perf_counter() - start  # a wait for a read from outside training: not the step's time
            self._half_start += waited
            self._last_commit_at += waited

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
        self._entered_at = time.perf_counter()
        committed = self.committed_flats()
        if committed is not self.bit16_groups_flat:
            self._live_backup = [flat.clone() for flat in self.bit16_groups_flat]
            for live, src in zip(self.bit16_groups_flat, committed):
                live.copy_(src)
        self._committed_in_model = True

    def leave_committed(self) -> None:
        """Put the live weights back (after ``enter_committed``); training continues bit for bit, and the time
        in between (an evaluation, a save) is left out of the step's compute and duration (``StepMetrics``)."""
        if not self._committed_in_model:
            return
        if self._live_backup is not None:
            for live, backup in zip(self.bit16_groups_flat, self._live_backup):
                live.copy_(backup)
            self._live_backup = None
        self._committed_in_model = False
        if self._entered_at is not None:  # an evaluation is not training: the step's clocks skip it
            paused = time.perf_counter() - self._entered_at
            self._half_start += paused
            self._last_commit_at += paused
            self._entered_at = None

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


class _StateDictHook:
    """``state_dict`` post-hook of one submodule: its own parameters' entries become committed copies."""

    def __init__(self, optimizer: AccoZeroOptimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # a weakref: deepcopy/pickle of the module stays cheap

    def __call__(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str,
                 local_metadata: Any) -> None:
        optimizer = self._optimizer()
        if optimizer is None:
            return
        for name, param in module._parameters.items():
            key = prefix + name
            if param is None or key not in state_dict:
                continue
            committed = optimizer.committed_copy(state_dict[key])
            if committed is not None:
                state_dict[key] = committed


class _EvalForwardHook:
    """Forward pre-hook of the root module: eval mode runs on the committed weights, train mode on the live."""

    def __init__(self, optimizer: AccoZeroOptimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        optimizer = self._optimizer()
        if optimizer is None:
            return
        if module.training:
            optimizer.leave_committed()
        else:
            optimizer.enter_committed()


def install_committed_reads(module: torch.nn.Module, optimizer: AccoZeroOptimizer) -> None:
    """Install the state_dict and eval-forward hooks on ``module`` (the engine's module), once."""
    if getattr(module, "_acco_committed_reads", False):
        return
    for sub in module.modules():
        sub.register_state_dict_post_hook(_StateDictHook(optimizer))
    module.register_forward_pre_hook(_EvalForwardHook(optimizer))
    module._acco_committed_reads = True
