"""A tentative (estimate) optimizer step on this rank's shard that leaves no trace, for any optimizer.

An estimate round computes the step from theta_t, publishes the result, and must leave the
master weights, every state tensor (moments, step counts) and every scalar as they were, state
created by the step (a first step) included. torch's Adam and AdamW compute it out of place in one
fused kernel (``adam.py``); any other optimizer is stepped in place between a snapshot of the shards
and their state and its restore (``snapshot_state``/``restore_state``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardSnapshot", "snapshot_state", "restore_state"]


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
