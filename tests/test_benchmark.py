"""The benchmark harness end to end: ``benchmarks/run.py --smoke`` on two fake hosts over a shaped link.

Localizes: benchmarks/run.py (calibration, shaping, launches, the heterogeneous CPU quota),
benchmarks/worker.py (every method trains and reports), benchmarks/report.py (table and plots),
deepspeed_acco/plan.py (its step-time prediction from each cell's measured C and M: median error within 15 %,
every cell within 30 %).
It checks the output schema the README documents, not speed: timings on a shared 2-core machine
are the benchmark's business (``--quick``), not a test's. About 2 minutes; needs root for the
network namespaces, skipped with the reason otherwise (and required under ``.ci/run`` as root).

Run: ``python3 -m pytest -q tests/test_benchmark.py -rA``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.plan_check import check

REPO = Path(__file__).resolve().parent.parent
RUN_FIELDS = ("method", "bandwidth_mbit", "adaptive_accumulation", "heterogeneous", "step_time_s", "compute_s",
              "comm_s", "exposed_comm_s", "tokens_per_s", "final_loss", "bytes_per_step", "peak_rss_mb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(720)
def test_smoke_benchmark_writes_documented_schema(tmp_path: Path) -> None:
    """Every method runs over the shaped link and each run row carries the documented fields."""
    if os.geteuid() != 0 and not os.environ.get("ACCO_REQUIRE_MULTINODE"):
        pytest.skip("benchmarks/run.py needs root for network namespaces and tc")
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=450)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"benchmarks/run.py --smoke exited {proc.returncode}:\n{output[-6000:]}"

    result = json.loads(out.read_text())
    runs = result["runs"]
    homogeneous = [r for r in runs if not r["heterogeneous"]]
    assert {r["case"] for r in homogeneous} == {"zero1", "acco", "acco_int8", "dpu", "acco_adaptive", "acco_auto"}, \
        [r["case"] for r in runs]
    auto = next(r for r in homogeneous if r["case"] == "acco_auto")
    assert auto["auto_decisions"] and auto["auto_decisions"][0]["step"] in (7, 10), auto["auto_decisions"]
    assert auto["auto_schedule"] in ("sync", "0.75", "0.75+int8", "0.5", "0.5+int8")
    for row in runs:
        missing = [k for k in RUN_FIELDS if k not in row]
        assert not missing, f"{row['method']} lacks {missing}"
        for key in RUN_FIELDS[4:]:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0 or \
                (key == "exposed_comm_s" and row[key] == 0), f"{row['method']}.{key} = {row[key]!r}"
        assert row["bandwidth_mbit"] > 0 and row["step_time_s"] >= row["exposed_comm_s"]
    print("SMOKE", [(r["case"], r["heterogeneous"], round(r["step_time_s"], 3), round(r["exposed_comm_s"], 3),
                     int(r["bytes_per_step"])) for r in runs])
    zero1, acco, int8 = (next(r for r in homogeneous if r["case"] == c) for c in ("zero1", "acco", "acco_int8"))
    # ACCO sends two rounds per step, ZeRO-1 one: counted on the wire (eth0 of the fake host). The int8 estimate
    # round sends about a quarter of a round (int8 + scales, all-to-all and all-gather).
    assert 1.6 < acco["bytes_per_step"] / zero1["bytes_per_step"] < 2.4, (acco["bytes_per_step"],
                                                                          zero1["bytes_per_step"])
    assert 1.0 < int8["bytes_per_step"] / zero1["bytes_per_step"] < 1.5, (int8["bytes_per_step"],
                                                                          zero1["bytes_per_step"])
    # At this bandwidth (ZeRO-1 M/C ~ 0.5) ACCO hides most of its round time behind compute.
    assert acco["exposed_comm_s"] < 0.5 * acco["comm_s"], acco
    assert set(result["calibration"]) == {"tiny"} and "machine" in result
    assert any("ACCO int8" in t["target"] for t in result["targets"])
    for png in sorted(tmp_path.glob("*.png")):
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert len(list(tmp_path.glob("*.png"))) >= 3 and list(tmp_path.glob("*.md")), sorted(tmp_path.iterdir())
    # The planner (deepspeed_acco/plan.py) predicts each cell's step time from the cell's measured C and M. A
    # smoke cell has 3 timed steps: one disturbed by other load (its steps spread by more than 30 %) makes the
    # medians of C, M and the step disagree by themselves; such a cell is reported, not judged. The 15 % claim
    # is about the benchmark's full runs (tests/test_plan.py checks the committed ones); on smoke cells the
    # median error must be within 15 % and every cell within 30 %: single ACCO cells measured -14 to -23 % on
    # this bed in runs where every other cell was within 5 %, so 15 % per cell fails on noise, while a planner
    # that is wrong for a method (e.g. no overlap: ACCO's step as compute plus both rounds) is off by more.
    rows = check(result)
    steady = [r for r in rows if r["step_spread"] is not None and r["step_spread"] <= 0.30]
    print("PLAN", [(r["method"], r["heterogeneous"], round(r["error"], 3), round(r["step_spread"] or -1, 2))
                   for r in rows])
    assert len(steady) >= 4, f"fewer than 4 of {len(rows)} cells ran steadily enough to check the planner: {rows}"
    median = sorted(abs(r["error"]) for r in steady)[len(steady) // 2]
    assert median <= 0.15, f"planner's median error {median:.1%} > 15 %: {rows}"
    off = [(r["method"], r["heterogeneous"], r["measured_s"], r["predicted_s"]) for r in steady
           if abs(r["error"]) > 0.30]
    assert not off, f"planner off by more than 30 %: {off}"

    # --resume: every launch of that run finished, so a continuation reads them all back and runs none.
    log_dir = next(line.split("logs: ", 1)[1].strip() for line in output.splitlines() if line.startswith("logs: "))
    again = tmp_path / "resumed.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--resume", log_dir, "--out", str(again),
                           "--no_report"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads(again.read_text())
    assert [(r["case"], r["step_time_s"]) for r in resumed["runs"]] == [(r["case"], r["step_time_s"]) for r in runs]
    assert resumed["wall_s"] < 60, "nothing was run again"
    refused = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--reps", "2", "--resume", log_dir,
                              "--out", str(again)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "reps (was 1, now 2)" in refused.stderr, refused.stderr[-2000:]


TTT_FIELDS = ("seed", "reached", "lr_scaling", "time_to_target_s", "tokens_to_target", "target_loss")


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_time_to_target_smoke_writes_documented_fields(tmp_path: Path) -> None:
    """``--time_to_target --smoke``: ZeRO-1 sets the target, every method chases it; the documented fields."""
    if os.geteuid() != 0 and not os.environ.get("ACCO_REQUIRE_MULTINODE"):
        pytest.skip("benchmarks/run.py needs root for network namespaces and tc")
    out = tmp_path / "ttt.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--time_to_target", "--smoke", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=840)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"--time_to_target --smoke exited {proc.returncode}:\n{output[-6000:]}"
    result = json.loads(out.read_text())
    runs = {r["case"]: r for r in result["runs"]}
    assert set(runs) == {"zero1", "acco", "acco_int8", "dpu", "acco_adaptive", "acco_adaptive_sqrt", "acco_auto"}, \
        sorted(runs)
    assert [r["case"] for r in result["runs"]][0] == "zero1"  # it trains first: it sets the target
    zero1 = runs["zero1"]
    for case, row in runs.items():
        missing = [k for k in TTT_FIELDS if k not in row]
        assert not missing, f"{case} lacks {missing}"
        assert row["target_loss"] == zero1["target_loss"] and row["seed"] == 1, (case, row["target_loss"])
        walls = [e["wall_s"] for e in row["evals"]]
        assert walls == sorted(walls) and row["evals"][0]["step"] == 0, (case, walls)
        if row["reached"]:
            assert 0 <= row["time_to_target_s"] <= walls[-1] and row["evals"][-1]["loss"] <= row["target_loss"]
            assert 0 <= row["tokens_to_target"] <= row["evals"][-1]["tokens"]
        else:  # stopped by the cap (or the step limit), never below the target
            assert row["time_to_target_s"] is None and min(e["loss"] for e in row["evals"]) > row["target_loss"]
            assert walls[-1] >= row["cap_s"] or row["steps"] >= 4 * result["settings"]["steps"], (case, walls)
    # ZeRO-1 reaches its own final loss, by its last evaluation at the latest.
    assert zero1["reached"] and zero1["time_to_target_s"] <= zero1["train_wall_s"]
    assert zero1["evals"][-1]["step"] == result["settings"]["steps"]
    assert {runs["acco_adaptive"]["lr_scaling"], runs["acco_adaptive_sqrt"]["lr_scaling"]} == {"none", "sqrt"}
    assert zero1["lr_scaling"] is None and runs["acco"]["lr_scaling"] == "none"
    assert {s["case"] for s in result["summary"]} == set(runs) and len(result["targets"]) == 1
    png = tmp_path / "ttt_loss_time.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "Time to target" in (tmp_path / "ttt.md").read_text()
