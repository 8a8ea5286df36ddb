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

import weakref
from typing import Any

import torch

from deepspeed_acco.optimizer import AccoZeroOptimizer

__all__ = ["install_committed_reads"]


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
