"""The planner (``deepspeed_acco/plan.py``): its formulas, the int8 estimate's bytes, the command line,
the benchmark check (``benchmarks/plan_check.py``) on the committed results, and the docs' table.

Fast: no DeepSpeed, no processes beyond the command-line runs. The check on a fresh benchmark run's
output is in ``tests/test_benchmark.py`` (the smoke run).

Run: ``python3 -m pytest -q tests/test_plan.py``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.plan_check import check
from deepspeed_acco.plan import (
    Cluster,
    Timing,
    int8_estimate_fraction,
    main,
    predict,
    quantize_s,
    recommend,
    step_time_s,
    table,
    timing_from_cluster,
)

REPO = Path(__file__).resolve().parent.parent


def test_schedule_formulas() -> None:
    """The paper's equal halves: ZeRO-1 adds M to C; ACCO hides two rounds of M behind C until M passes C/2;
    DPU one round."""
    short, long = Timing(2.0, 0.6, 0.2, 8, estimate_fraction=0.5), Timing(2.0, 1.5, 0.5, 8, estimate_fraction=0.5)
    assert step_time_s("zero1", short)[0] == pytest.approx(2.6)
    assert step_time_s("acco", short)[0] == pytest.approx(2.0)
    assert step_time_s("acco", long)[0] == pytest.approx(3.0)
    assert step_time_s("acco_int8", long)[0] == pytest.approx(1.0 + 1.5)
    assert step_time_s("dpu", long)[0] == pytest.approx(2.0)
    # Adaptive: each half computes until the round in flight ends (whole micro-batches of 0.25 s), so it
    # takes 6 instead of 4 micro-batches per half and the step carries 12, not 8.
    step, micro = step_time_s("acco_adaptive", long)
    assert step == pytest.approx(3.0) and micro == pytest.approx(12)
    # The cap (4 x 4 = 16 per half by default) stops the filling; the half then waits for the round.
    step, micro = step_time_s("acco_adaptive", Timing(2.0, 10.0, 10.0, 8, estimate_fraction=0.5))
    assert step == pytest.approx(20.0) and micro == pytest.approx(32)


def test_default_split_formulas() -> None:
    """The default split (6 + 2 of 8 micro-batches): the commit round hides behind 3/4 of C, the estimate round
    behind 1/4, so a full-precision estimate round longer than C/4 is exposed and the int8 one is not."""
    short, long = Timing(2.0, 0.6, 0.2, 8), Timing(2.0, 1.5, 0.5, 8)
    assert step_time_s("acco", short)[0] == pytest.approx(1.5 + 0.6)
    assert step_time_s("acco_int8", short)[0] == pytest.approx(1.5 + 0.5)
    assert step_time_s("acco", long)[0] == pytest.approx(1.5 + 1.5)
    assert step_time_s("acco_int8", long)[0] == pytest.approx(1.5 + 0.5)
    # Adaptive: the estimate half computes its 6 (1.5 s, as long as the commit round), the commit half fills
    # 1.5 s with 0.25 s micro-batches (6 instead of 2).
    step, micro = step_time_s("acco_adaptive", long)
    assert step == pytest.approx(3.0) and micro == pytest.approx(12)


def test_slow_ranks_set_the_pace_except_under_adaptive_accumulation() -> None:
    """Half the ranks 3x slower: every boundary waits for them; adaptive lets the fast ones fill the wait."""
    mixed = Timing(2.0, 2.0, 2.0, 8, slowest_factor=3.0, estimate_fraction=0.5)
    assert step_time_s("zero1", mixed)[0] == pytest.approx(8.0)
    assert step_time_s("acco", mixed)[0] == pytest.approx(6.0)
    step, micro = step_time_s("acco_adaptive", mixed)
    assert step == pytest.approx(6.0)
    # slow ranks: 4 per half; fast ranks fill 3 s per half with 0.25 s micro-batches, up to the cap 16
    assert micro == pytest.approx((4 + 12) / 2 * 2)


def test_int8_estimate_bytes() -> None:
    """One rank per node: a quarter of an fp32 round (plus scales). Eight per node: the node-aware round sends
    (N-1)/N of the buffer in int8 each way between the N nodes, whatever g; nodes of unequal size keep the
    flat all-to-all, which costs more than a bf16 ring round."""
    per_value = 1 + 4 / 256
    assert int8_estimate_fraction(2, 1, 4) == pytest.approx((0.5 + 0.5) * per_value / 4)
    assert int8_estimate_fraction(64, 8, 2) == pytest.approx(2 * 7 / 8 * per_value / (2 * 63 / 64 * 2))
    assert int8_estimate_fraction(4, 2, 4) == pytest.approx(2 * 1 / 2 * per_value / (2 * 3 / 4 * 4))
    assert int8_estimate_fraction(60, 8, 2) > 1.0  # 60 ranks, 8 per node: unequal nodes, the flat round
    assert int8_estimate_fraction(64, 1, 2) < 0.6


def test_quantizer_cost_joins_the_estimate_round() -> None:
    """The fused kernels' time (five passes over the fp32 parameters at --quantize_gbs) lengthens M_est."""
    assert quantize_s(1e9, 400.0) == pytest.approx(0.01)
    cluster = Cluster(1.3e9, 32, 8, 100, 32768, 3e14)
    slow_kernels = timing_from_cluster(dataclasses.replace(cluster, quantize_gbs=1.5))
    fast_kernels = timing_from_cluster(cluster)
    assert slow_kernels.estimate_round_s - fast_kernels.estimate_round_s == pytest.approx(4 * 1.3e9 / 1.5e9 - 0.013)
    assert slow_kernels.round_s == fast_kernels.round_s


def test_recommendation() -> None:
    """ZeRO-1 on a fast link, ACCO when it hides the rounds, int8 when only it does; never DPU."""
    assert recommend(predict(Timing(2.0, 0.05, 0.02, 8)))[0] == "zero1"
    assert recommend(predict(Timing(2.0, 0.8, 0.8, 8)))[0] == "acco"
    assert recommend(predict(Timing(2.0, 2.0, 0.5, 8)))[0] == "acco_int8"
    assert recommend(predict(Timing(2.0, 4.0, 4.0, 8)))[0] == "zero1"


def test_command_line(tmp_path: Path) -> None:
    """Both input modes print every method and a recommendation; a missing input names the flags."""
    run = [sys.executable, "-m", "deepspeed_acco.plan"]
    out = subprocess.run(run + ["--params", "1.3e9", "--world_size", "32", "--link_gbit", "100",
                                "--tokens_per_rank_per_step", "65536", "--flops", "3e14"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for label in ("ZeRO-1", "ACCO", "ACCO, int8 estimate", "ACCO, adaptive", "DPU", "use: ", "M/C"):
        assert label in out.stdout, out.stdout
    imported = subprocess.run([sys.executable, "-c", "import sys, deepspeed_acco.plan; "
                               "print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]", "the planner must start without torch and DeepSpeed: " + imported.stdout
    measured = subprocess.run(run + ["--compute_s", "1.5", "--round_s", "2.5", "--world_size", "2",
                                     "--tokens_per_rank_per_step", "4096"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert measured.returncode == 0 and "use: ACCO, int8 estimate" in measured.stdout, measured.stdout
    # --metrics: C and M are the medians over the steps after the first two (warm-up), world size and
    # tokens per rank per step from the lines themselves (an examples/train_lm.py metrics.jsonl).
    lines = [{"step": s, "tokens": 8192 * s, "compute_s": c, "commit_round_s": m, "estimate_round_s": m,
              "micro_batches_per_rank": [4, 4]} for s, c, m in
             [(1, 9.0, 9.0), (2, 9.0, 9.0), (3, 1.0, 0.3), (4, 1.2, 0.4), (5, 1.1, 0.5)]]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + json.dumps({"step": 5, "eval_loss": 3.0}))
    from_file = subprocess.run(run + ["--metrics", str(metrics), "--ranks_per_node", "1"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    assert from_file.returncode == 0, from_file.stderr
    assert "measured: C 1.1 s, M 0.4 s; 2 ranks, 4,096 tokens per rank per step" in from_file.stdout, from_file.stdout
    bad = subprocess.run(run + ["--world_size", "8"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--tokens_per_rank_per_step" in bad.stderr and "--params" in bad.stderr


@pytest.mark.parametrize("name", ["quick.json", "time_to_target.json"])
def test_prediction_within_15_percent_of_every_committed_benchmark_cell(name: str) -> None:
    """The committed benchmark runs: every cell's step time within 15 % of the planner's prediction."""
    rows = check(json.loads((REPO / "benchmarks" / "results" / name).read_text()))
    assert len(rows) >= 30
    off = [(r["method"], r["preset"], r["target_ratio"], r["rep"], round(r["error"], 3)) for r in rows
           if abs(r["error"]) > 0.15]
    assert not off, off


def test_docs_table_is_current() -> None:
    """docs/when-it-helps.md shows ``python -m deepspeed_acco.plan --table``'s output, verbatim."""
    page = (REPO / "docs" / "when-it-helps.md").read_text()
    assert table() in page, "docs/when-it-helps.md is stale: paste `python -m deepspeed_acco.plan --table` into it"


def test_memory_per_rank() -> None:
    """The formula of ``memory_per_rank``: ZeRO-1 P b + P b + 16 P / N (12 P / N with fp32 parameters); ACCO
    P b + 2 P a + P b + 36 P / N; the int8 estimate adds (1 + 1 / g) P (1 + 4 / block) on nodes of g ranks; and the
    plan prints it and says what does not fit."""
    from deepspeed_acco.plan import memory_per_rank

    p, n = 1e9, 8
    assert sum(memory_per_rank("zero1", p, n, 2, 4).values()) == pytest.approx(2 * p * 2 + 16 * p / n)
    # fp32 parameters (the CPU bed): DeepSpeed's fp32 gradient partition is a view; 90.6 MB measured, dense preset
    assert sum(memory_per_rank("zero1", 6470144, 2, 4, 4).values()) == pytest.approx(90_582_016)
    assert sum(memory_per_rank("acco", p, n, 2, 4).values()) == pytest.approx(2 * p * 2 + 2 * p * 4 + 36 * p / n)
    assert sum(memory_per_rank("acco", p, n, 2, 2).values()) == pytest.approx(2 * p * 2 + 2 * p * 2 + 36 * p / n)
    int8 = memory_per_rank("acco_int8", p, n, 2, 4, block=256)
    assert int8["int8 payload"] == int8["int8 send buffers"] == pytest.approx(p * (1 + 4 / 256))
    node_aware = memory_per_rank("acco_int8", p, n, 2, 4, block=256, ranks_per_node=4)  # 2 nodes of 4: P / 4 sent
    assert node_aware["int8 send buffers"] == pytest.approx(p / 4 * (1 + 4 / 256))
    assert sum(memory_per_rank("dpu", p, n, 2, 4).values()) == pytest.approx(2 * p * 2 + 2 * p * 4 + 16 * p / n)


def test_plan_prints_memory_and_what_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    """7B on 64 ranks at 100 Gbit/s: ACCO with fp32 accumulation needs more than an 80 GB GPU; bf16 fits."""
    assert main(["--params", "7e9", "--world_size", "64", "--link_gbit", "100", "--tokens_per_rank_per_step", "32768",
                 "--flops", "3e14", "--gpu_mem_gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "GB/rank" in out and "does not fit" in out and "ZeRO-1: 29.75 GB" in out
    assert "acco.grad_accum_dtype bf16 needs" in out
