"""ACCO's process groups: its own group for the rounds, and, where ranks share a node, those of a node-aware round.

The rounds run on a process group of their own (``acco_process_group``), so that the worker's collectives never
interleave with the engine's.

A compressed round sent as one flat all-to-all carries ``g (W - g) / W`` of a buffer through each node's link
for its ``g`` ranks, more than a bf16 round once ``g`` reaches 8. The node-aware round (``acco-algorithm.md``,
"Node-aware compressed rounds") reduces inside the node first, at full precision, and compresses only what
crosses the link: about ``(N - 1) / N`` of a buffer per node in int8, whatever ``g``. It needs two kinds of
groups: the ``g`` ranks of each node, and the ``N`` ranks of equal local index across the nodes.

Ranks per node come from the launcher: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (the DeepSpeed launcher),
``OMPI_COMM_WORLD_LOCAL_SIZE`` (Open MPI) or ``MPI_LOCALNRANKS`` (MPICH), with ranks numbered node by node as
every launcher does. Every rank must report the same ``g``, dividing the world size, and there must be at least
two nodes of at least two ranks; otherwise the round stays flat.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["GROUP_SETUP_TIMEOUT_S", "LOCAL_SIZE_VARIABLES", "NodeLayout", "acco_process_group", "acco_node_layout",
           "local_size_from_env", "node_aware", "node_layout"]

GROUP_SETUP_TIMEOUT_S = 300.0
"""Seconds ACCO's process group may take to connect its ranks (more than a round on a loaded machine)."""


def acco_process_group(ranks: list[int], timeout_s: float) -> Any:
    """A process group of these global ranks for ACCO's rounds (every rank calls it, member or not).

    torch.distributed directly, because ``deepspeed.comm.new_group`` takes no timeout. gloo connects the ranks
    when the group is created, within the group's timeout: that setup gets at least ``GROUP_SETUP_TIMEOUT_S``
    (4 s were not enough for 2 ranks on a loaded 2-core machine), then the collectives get ``timeout_s``
    (``acco.round_timeout_s``: a worker blocked by a dead peer gives up then).
    """
    import torch.distributed as torch_dist

    setup_s = max(timeout_s, GROUP_SETUP_TIMEOUT_S)
    group = torch_dist.new_group(ranks=ranks, timeout=timedelta(seconds=setup_s))
    set_timeout = getattr(torch_dist.distributed_c10d, "_set_pg_timeout", None)
    member = group not in (None, torch_dist.GroupMember.NON_GROUP_MEMBER)
    if set_timeout is not None and setup_s != timeout_s and member:
        set_timeout(timedelta(seconds=timeout_s), group)
    return group

LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
"""Environment variables launchers set to the number of ranks on this node, in the order they are read."""


@dataclass(frozen=True)
class NodeLayout:
    """This rank's place among ``nodes`` nodes of ``per_node`` ranks each (ranks numbered node by node)."""

    nodes: int
    per_node: int
    node: int
    local: int
    intra_group: Any = None
    """The ``per_node`` ranks of this node."""
    inter_group: Any = None
    """The ``nodes`` ranks of local index ``local``, one per node."""


def local_size_from_env(env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Ranks on this node as the launcher set it, and the variable it came from (``(None, "")`` if none is set)."""
    env = os.environ if env is None else env
    for name in LOCAL_SIZE_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    return None, ""


def node_aware(world_size: int, ranks_per_node: int) -> bool:
    """Whether the compressed rounds run node-aware: nodes of more than one rank, of equal size, and more than one
    node. Otherwise they are flat (``node_layout`` says why)."""
    return 1 < ranks_per_node < world_size and world_size % ranks_per_node == 0


def node_layout(ranks: list[int], rank: int, agree: Callable[[int], tuple[int, int]],
                new_group: Callable[[list[int]], Any], log: Callable[[str], None]) -> NodeLayout | None:
    """The node layout of a node-aware round over the data-parallel ``ranks`` (global ranks, ``rank`` = this one's
    index in them), or None (a flat round) with the reason logged once.

    ``agree(g)``: a collective giving the smallest and largest ``g`` over the ranks (every rank calls it).
    ``new_group(ranks)``: a process group of those global ranks (every rank creates every group, in order).
    """
    world = len(ranks)
    mine, source = local_size_from_env()
    low, high = agree(mine or 0)
    if low != high or low <= 0:
        log("ACCO: compressed rounds are flat: the launcher's ranks per node "
            f"({', '.join(LOCAL_SIZE_VARIABLES)}) are unset or differ between ranks ({low}..{high})")
        return None
    g = low
    if not node_aware(world, g):
        why = ("one rank per node" if g == 1 else "all ranks on one node" if g >= world
               else f"nodes of unequal size ({world} ranks, {g} per node)")
        log(f"ACCO: compressed rounds are flat: {why} ({source}={g}, world size {world})")
        return None
    nodes = world // g
    intra = inter = None
    for n in range(nodes):
        group = new_group(ranks[n * g:(n + 1) * g])
        if n == rank // g:
            intra = group
    for local in range(g):
        group = new_group(ranks[local::g])
        if local == rank % g:
            inter = group
    log(f"ACCO: compressed rounds are node-aware: {nodes} nodes x {g} ranks ({source}); full precision inside a "
        "node, int8 between nodes")
    return NodeLayout(nodes=nodes, per_node=g, node=rank // g, local=rank % g, intra_group=intra, inter_group=inter)


def acco_node_layout(ranks: list[int], rank: int, group: Any, device: Any, timeout_s: float) -> NodeLayout | None:
    """``node_layout`` over the data-parallel ``ranks``, agreeing through ``group`` (ACCO's) with a tensor on
    ``device``, its groups made by ``acco_process_group``; the line goes to rank 0's log."""
    import torch
    import torch.distributed as torch_dist

    from deepspeed_acco import log as acco_log

    def agree(g: int) -> tuple[int, int]:
        values = torch.tensor([g, -g], dtype=torch.int64, device=device)
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MIN, group=group)
        return int(values[0]), -int(values[1])

    def log(line: str) -> None:
        if rank == 0:
            acco_log.info(line)

    return node_layout(ranks, rank, agree, lambda members: acco_process_group(members, timeout_s), log)
