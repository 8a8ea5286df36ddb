"""Why ACCO's estimate can trail ZeRO-1: the largest stable step of each estimate rule, on a quadratic.

Along one direction of curvature ``h``, a momentum optimizer with a frozen preconditioner (Adam's
``1 / sqrt(v)`` once ``v`` has settled) is linear in the weights. Write ``a = lr * h / sqrt(v)`` for the
preconditioned step and keep the momentum in units of the step (``m`` below is ``lr * m / sqrt(v)``):

- ZeRO-1:        ``m' = b m + (1 - b) a x``;                  ``x' = x - m'``
- ACCO's commit: ``m' = b m + (1 - b) a (x~ + x) / 2``;       ``x' = x - m'`` (half the batch at x~)
- ACCO's estimate ``x~'`` (where the next half-batch is computed), one rule per row of the table.

Each rule is a linear map on ``(x, m, x~, x_prev)``. The largest ``a`` with spectral radius <= 1 is the
edge of stability: past it, that direction oscillates and grows (a loss spike) until the optimizer's
own feedback (Adam's ``v``, clipping) shrinks the step. Adam-type training runs close to that edge
(Cohen et al., "Adaptive gradient methods at the edge of stability", 2022), so a rule with a lower edge
spikes earlier, at a smaller learning rate or earlier in a warm-up.

Closed forms (checked by ``tests/test_estimate_stability.py``): ZeRO-1 ``2 (1 + b) / (1 - b)``; the
paper's estimate ``2 / (1 - b)``, i.e. ``1 / (1 + b)`` of ZeRO-1's (0.53 at b = 0.9); ``carry(k)``
``2 (1 + k) / (1 - b)`` up to ZeRO-1's. Why the paper's edge is lower: the estimate error
``d = x~ - x`` obeys ``d' = -(1 - b) (a / 2) d``, because the estimate weighs the gradient at x~ fully
where the commit weighs it by half; it flips sign and grows once ``(1 - b) a / 2 > 1``.

    python studies/estimate_stability.py            # the table for beta1 = 0.9
    python studies/estimate_stability.py --beta1 0.95
    python studies/estimate_stability.py --search 0.75   # every (s, k) of a grid at the default split
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

__all__ = ["RULES", "edge_of_stability", "main", "shift_search", "step_matrix"]

# x~' as a row over (x, m, x~, x_prev), for step size a and momentum b.
Row = Callable[[float, float], list[float]]

RULES: dict[str, Row | None] = {
    "zero1": None,  # no estimate: both halves at x
    "dpu": None,  # delayed parameter update (step_matrix's own case), not an estimate rule
    "paper": lambda a, b: [1.0, -b, -(1 - b) * a, 0.0],  # Opt(theta_t, G~_t)
    "damped 0.5": lambda a, b: [1.0, -0.5 * b, -0.5 * (1 - b) * a, 0.0],  # halfway from theta_t
    "G~_t + G_(t-1)": lambda a, b: [1.0, -b, -(1 - b) * a / 2, -(1 - b) * a / 2],  # previous commit's 2nd half
    "momentum": lambda a, b: [1.0, -1.0, 0.0, 0.0],  # gradient predicted by the momentum alone
    "none (stale half)": lambda a, b: [1.0, 0.0, 0.0, 0.0],  # next half computed at theta_t: one step stale
}
"""Estimate rules: how the point of the next half-batch's gradients is formed (None: ZeRO-1)."""

SHIFTS: dict[str, tuple[float, float]] = {"carry 0.25": (1.0, 0.25), "carry 0.5": (1.0, 0.5), "carry 0.9": (1.0, 0.9),
                                          "shift 1.1, 0.2": (1.1, 0.2), "shift 1.1, 0.5": (1.1, 0.5),
                                          "shift 1.2, 0.5": (1.2, 0.5)}
"""x~' = x + s (Opt(x, G~) - x) + k (x~ - x), as (s, k): the paper's update scaled by s plus a carry k of the
offset (``acco.estimate="extrapolated"`` is s 1.1, k 0.2)."""


FRACTIONS = (0.5, 0.625, 0.75, 0.875)
"""``acco.estimate_fraction`` values of the split table (0.5: the paper's halves; 0.75: the default)."""


def _shift_row(s: float, k: float) -> Row:
    return lambda a, b: [1.0 - k, -s * b, -s * (1 - b) * a + k, 0.0]


def _shift_noise(s: float) -> Callable[[float], float]:
    return lambda b: -s * (1 - b)


RULES.update({name: _shift_row(s, k) for name, (s, k) in SHIFTS.items()})

NOISE: dict[str, Callable[[float], float]] = {
    "paper": lambda b: -(1 - b),
    "damped 0.5": lambda b: -0.5 * (1 - b),
    "momentum": lambda b: 0.0,
    "none (stale half)": lambda b: 0.0,
    **{name: _shift_noise(s) for name, (s, _) in SHIFTS.items()},
}
"""How much of the first half-batch's gradient noise each rule's x~' takes (rules that also take older noise,
``G~_t + G_(t-1)``, are left out of the noise table)."""


def step_matrix(rule: str, a: float, b: float, f: float = 0.5) -> np.ndarray:
    """One optimizer step of ``rule`` as a 4x4 map on ``(x, m, x~, x_prev)``; ``f`` is the share of the step's
    micro-batches computed at x~ (``acco.estimate_fraction``; 0.5 the paper's halves)."""
    if rule == "dpu":  # whole step one step stale: G_t at theta_(t-1)
        m_row = [0.0, b, 0.0, (1 - b) * a]
        x_row = [1.0, -b, 0.0, -(1 - b) * a]
        return np.array([x_row, m_row, x_row, [1.0, 0.0, 0.0, 0.0]])
    estimate = RULES[rule]
    if estimate is None:
        m_row = [(1 - b) * a, b, 0.0, 0.0]
        x_row = [1 - m_row[0], -b, 0.0, 0.0]
        return np.array([x_row, m_row, x_row, [1.0, 0.0, 0.0, 0.0]])
    m_row = [(1 - b) * a * (1 - f), b, (1 - b) * a * f, 0.0]
    x_row = [1 - m_row[0], -b, -m_row[2], 0.0]
    return np.array([x_row, m_row, estimate(a, b), [1.0, 0.0, 0.0, 0.0]])


def noise_matrix(rule: str, b: float, f: float = 0.5) -> np.ndarray:
    """How the two halves' gradient noises ``(n1, n2)`` (unit normal) enter ``(x, m, x~, x_prev)``.

    A half of share ``f`` of the step's micro-batches has a mean gradient whose noise has variance
    ``1 / (2 f)`` (1 for the paper's halves). The commit (and ZeRO-1, and DPU's single round) weighs the halves
    by their shares: ``m`` takes ``(1 - b) f`` of the first half's noise and ``(1 - b) (1 - f)`` of the second's,
    ``x`` minus that; the estimate takes ``NOISE[rule]`` of the first half's noise, the one it computed.
    """
    first, second = (1 / (2 * f)) ** 0.5, (1 / (2 * (1 - f))) ** 0.5
    m_row = [(1 - b) * f * first, (1 - b) * (1 - f) * second]
    x_row = [-m_row[0], -m_row[1]]
    est = x_row if RULES[rule] is None else [NOISE[rule](b) * first, 0.0]
    return np.array([x_row, m_row, est, [0.0, 0.0]])


def stationary_excess(rule: str, a: float, b: float, f: float = 0.5) -> float:
    """E[x^2] once steady, with gradient noise, in the direction of step ``a``: the excess loss it leaves (inf if
    unstable). ``Sigma = A Sigma A^T + N N^T`` solved as a linear system in ``vec(Sigma)``."""
    A, N = step_matrix(rule, a, b, f), noise_matrix(rule, b, f)
    if float(max(abs(np.linalg.eigvals(A)))) >= 1.0 - 1e-9:
        return float("inf")
    n = A.shape[0]
    sigma = np.linalg.solve(np.eye(n * n) - np.kron(A, A), (N @ N.T).reshape(-1)).reshape(n, n)
    return float(sigma[0, 0])


def edge_of_stability(rule: str, b: float, a_max: float = 200.0, tol: float = 1e-6, f: float = 0.5) -> float:
    """The smallest step ``a`` (scanned, then bisected) past which ``rule`` has spectral radius > 1."""
    def unstable(a: float) -> bool:
        return float(max(abs(np.linalg.eigvals(step_matrix(rule, a, b, f))))) > 1 + 1e-9

    grid = np.linspace(1e-3, a_max, 20001)
    hi = next((float(a) for a in grid if unstable(float(a))), None)
    if hi is None:
        return float("inf")
    lo = hi - float(grid[1] - grid[0])
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if unstable(mid) else (mid, hi)
    return hi


SEARCH_S, SEARCH_K = tuple(np.round(np.arange(0.8, 1.61, 0.05), 2)), tuple(np.round(np.arange(-0.4, 0.91, 0.1), 2))
SEARCH_STEPS = (5.0, 10.0, 20.0, 25.0, 30.0, 35.0)


def shift_search(b: float, f: float, scales: tuple[float, ...] = SEARCH_S, carries: tuple[float, ...] = SEARCH_K,
                 steps: tuple[float, ...] = SEARCH_STEPS) -> list[tuple[float, float, float, list[float]]]:
    """Every shift rule (s, k) of a grid at share ``f``: (s, k, edge over ZeRO-1's, E[x^2] over ZeRO-1's at
    ``steps``), the trade-off between raising the edge and keeping the noise excess low."""
    zero1 = edge_of_stability("zero1", b)
    out = []
    for s in scales:
        for k in carries:
            name = f"_search {s:g}, {k:g}"  # a name of its own: the table's rules stay as they are
            RULES[name], NOISE[name] = _shift_row(float(s), float(k)), _shift_noise(float(s))
            try:
                edge = edge_of_stability(name, b, a_max=80.0, f=f) / zero1
                ratios = [stationary_excess(name, a, b, f) / stationary_excess("zero1", a, b) for a in steps]
            finally:
                del RULES[name], NOISE[name]
            out.append((float(s), float(k), edge, ratios))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print each rule's edge of stability and its ratio to ZeRO-1's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--search", type=float, default=None, metavar="F",
                   help="instead: every shift rule (s in 0.8..1.6, k in -0.4..0.9) at estimate_fraction F, by edge")
    args = p.parse_args(argv)
    if args.search is not None:
        rows = sorted(shift_search(args.beta1, args.search), key=lambda r: (-round(r[2], 2), max(r[3])))
        print(f"| s | k | edge over ZeRO-1's (f = {args.search:g}) | E[x^2] over ZeRO-1's, a = "
              + " / ".join(f"{a:g}" for a in SEARCH_STEPS) + " |\n|---:|---:|---:|---|")
        for s, k, edge, ratios in rows:
            excess = " / ".join("unstable" if r == float("inf") else f"{r:.2f}" for r in ratios)
            print(f"| {s:g} | {k:g} | {edge:.2f} | {excess} |")
        return 0
    zero1 = edge_of_stability("zero1", args.beta1)
    print(f"| estimate rule (beta1 = {args.beta1}) | edge of stability lr*h/sqrt(v) | fraction of ZeRO-1's |")
    print("|---|---:|---:|")
    for rule in RULES:
        edge = edge_of_stability(rule, args.beta1)
        print(f"| {rule} | {edge:.2f} | {edge / zero1:.2f} |")
    steps = (2.0, 5.0, 10.0, 15.0, 18.0, 22.0)
    print(f"\n| estimate rule (beta1 = {args.beta1}) | E[x^2] under gradient noise relative to ZeRO-1's, a = "
          + " / ".join(f"{a:g}" for a in steps) + " |\n|---|---|")
    for rule in ("zero1", "dpu", *NOISE):
        ratios = [stationary_excess(rule, a, args.beta1) / stationary_excess("zero1", a, args.beta1) for a in steps]
        print(f"| {rule} | " + " / ".join("unstable" if r == float("inf") else f"{r:.2f}" for r in ratios) + " |")
    steps = (2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0)
    print(f"\n| estimate rule, estimate_fraction f (beta1 = {args.beta1}) | edge of stability | E[x^2] relative to "
          "ZeRO-1's, a = " + " / ".join(f"{a:g}" for a in steps) + " |\n|---|---:|---|")
    for rule in ("paper", "shift 1.1, 0.2"):
        for f in FRACTIONS:
            edge = edge_of_stability(rule, args.beta1, f=f)
            ratios = [stationary_excess(rule, a, args.beta1, f) / stationary_excess("zero1", a, args.beta1)
                      for a in steps]
            print(f"| {rule}, f = {f:g} | {edge:.2f} | "
                  + " / ".join("unstable" if r == float("inf") else f"{r:.2f}" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
