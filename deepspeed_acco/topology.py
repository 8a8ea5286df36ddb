"""Which ranks share a node, and the process groups of a node-aware compressed round.

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
from typing import Any

__all__ = ["LOCAL_SIZE_VARIABLES", "NodeLayout", "local_size_from_env", "node_layout"]

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
    if g == 1 or g >= world or world % g:
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
