"""A tentative (estimate) optimizer step on this rank's shard that leaves no trace.

An estimate round computes the step from theta_t, publishes the result, and must leave the
master weights, every state tensor (moments, step counts) and every scalar as they were, state
created by the step (a first step) included. For torch's Adam and AdamW, ``adam_estimate``
computes the step out of place from the state, with the same operations as torch's
single-tensor implementation, and writes nothing. For any other optimizer the shards and
their state are snapshotted, stepped in place and restored (``snapshot_state``/``restore_state``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardSnapshot", "adam_estimate", "snapshot_state", "restore_state"]


@dataclass
class ShardSnapshot:
    """Copies of the master shards and of their optimizer state, taken before a tentative step."""

    weights: list[torch.Tensor]
    states: list[dict[str, Any] | None]


def snapshot_state(optimizer: torch.optim.Optimizer, shards: list[torch.Tensor]) -> ShardSnapshot:
    """Copy the shards and their per-parameter optimizer state (tensors cloned, scalars deep-copied)."""
    states: list[dict[str, Any] | None] = []
    for shard in shards:
        state = optimizer.state.get(shard)
        if state is None:
            states.append(None)
        else:
            states.append({k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()})
    return ShardSnapshot(weights=[s.detach().clone() for s in shards], states=states)


def restore_state(optimizer: torch.optim.Optimizer, shards: list[torch.Tensor], snapshot: ShardSnapshot) -> None:
    """Put the shards and their optimizer state back exactly as ``snapshot`` saw them."""
    for shard, weights, saved in zip(shards, snapshot.weights, snapshot.states):
        shard.data.copy_(weights)
        if saved is None:
            optimizer.state.pop(shard, None)
            continue
        state = optimizer.state[shard]
        for key in list(state):
            if key not in saved:
                del state[key]
        for key, value in saved.items():
            current = state.get(key)
            if torch.is_tensor(value) and torch.is_tensor(current) and current.shape == value.shape:
                current.copy_(value)  # in place: optimizers may hold references to their state tensors
            else:
                state[key] = value


def _plain_adam(optimizer: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW with the options ``adam_estimate`` reproduces (no amsgrad, maximize, capturable...)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    return all(not group.get(flag, False) for group in optimizer.param_groups
               for flag in ("amsgrad", "maximize", "capturable", "differentiable"))


def adam_estimate(optimizer: torch.optim.Optimizer, shards: list[torch.Tensor], grads: list[torch.Tensor],
                  hyperparams: list[dict[str, Any]]) -> list[torch.Tensor] | None:
    """The shards after one Adam/AdamW step with ``grads``, computed out of place; None for other optimizers.

    Follows ``torch.optim.adam._single_tensor_adam`` (not capturable) operation by operation, so the
    result equals stepping, reading and rolling back, bit for bit; the state is only read.
    """
    if not _plain_adam(optimizer):
        return None
    out = []
    for shard, grad, group in zip(shards, grads, hyperparams):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = optimizer.state.get(shard) or {}
        step = float(state["step"]) + 1 if "step" in state else 1.0
        exp_avg = state.get("exp_avg", torch.zeros_like(shard))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(shard))
        decoupled = group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
        if wd != 0 and decoupled:
            param = shard.detach().mul(1 - lr * wd)
        else:
            if wd != 0:
                grad = grad.add(shard.detach(), alpha=wd)
            param = shard.detach().clone()
        exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        out.append(param.addcdiv_(exp_avg, denom, value=-step_size))
    return out
