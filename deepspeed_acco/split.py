"""How one ACCO step's micro-batches split between its estimate half and its commit half.

The estimate half computes its gradients at theta~_t while the previous step's commit round runs; the commit
half computes at theta_t while the estimate round runs (``acco-algorithm.md``). ``acco.estimate_fraction``
sets the split; the paper's is 0.5. Kept free of DeepSpeed so that the planner (``plan.py``) imports it alone.
"""

from __future__ import annotations

import math

__all__ = ["split_micro_batches"]


def split_micro_batches(ga: int, estimate_fraction: float) -> tuple[int, int]:
    """Micro-batches per rank of the estimate half and of the commit half of one ACCO step.

    ``estimate_fraction x ga`` rounded to the nearest whole micro-batch (halves up), kept within
    ``[1, ga - 1]`` so that each half has at least one; the commit half has the rest. With 0.75:
    ``ga`` 2 -> (1, 1), 4 -> (3, 1), 6 -> (5, 1), 8 -> (6, 2).

    Args:
        ga: ``gradient_accumulation_steps``, at least 2.
        estimate_fraction: ``acco.estimate_fraction``, in (0, 1).
    """
    estimate = min(ga - 1, max(1, math.floor(estimate_fraction * ga + 0.5)))
    return estimate, ga - estimate
