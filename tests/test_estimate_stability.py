"""The edge-of-stability analysis behind docs/how-it-works.md, "Why ACCO can trail ZeRO-1".

``benchmarks/estimate_stability.py`` finds each estimate rule's edge numerically (spectral radius of the
linearized step); these tests hold it to the closed forms derived independently, for several beta1, and to
the ordering the docs state. A few seconds.
"""

from __future__ import annotations

import pytest

from benchmarks.estimate_stability import RULES, edge_of_stability, main


@pytest.mark.parametrize("b", [0.5, 0.8, 0.9, 0.95])
def test_edges_match_closed_forms(b: float) -> None:
    """ZeRO-1 (momentum SGD): 2(1+b)/(1-b); ACCO's paper estimate: 2/(1-b), i.e. 1/(1+b) of ZeRO-1's;
    carry k: 2(1+k)/(1-b) up to ZeRO-1's; a stale half: 2; DPU below 2."""
    zero1 = edge_of_stability("zero1", b)
    assert zero1 == pytest.approx(2 * (1 + b) / (1 - b), rel=1e-4)
    assert edge_of_stability("paper", b) == pytest.approx(2 / (1 - b), rel=1e-4)
    for k in (0.25, 0.5):
        assert edge_of_stability(f"carry {k}", b) == pytest.approx(min(2 * (1 + k) / (1 - b), zero1), rel=1e-4)
    assert edge_of_stability("none (stale half)", b) == pytest.approx(2.0, rel=1e-4)
    assert edge_of_stability("dpu", b) < 2.0


def test_the_issues_two_variants_have_lower_edges_than_the_paper() -> None:
    """Damping the estimate and adding the previous commit's half both lower the edge (both trained worse)."""
    paper = edge_of_stability("paper", 0.9)
    for rule in ("damped 0.5", "G~_t + G_(t-1)", "momentum"):
        assert edge_of_stability(rule, 0.9) < paper / 1.5, rule


def test_table_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """The script's table (quoted in docs/how-it-works.md) has one row per rule, ZeRO-1 at fraction 1.00."""
    assert main(["--beta1", "0.9"]) == 0
    out = capsys.readouterr().out
    for rule in RULES:
        assert f"| {rule} |" in out
    assert "| zero1 | 38.00 | 1.00 |" in out and "| paper | 20.00 | 0.53 |" in out
