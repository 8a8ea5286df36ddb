"""End-to-end runs of the examples through the real ``deepspeed --num_gpus 2`` launcher on CPU (gloo).

Localizes: examples/train_lm.py (learning, metrics files, plot, checkpoint/resume, plain ZeRO-1),
examples/hf_trainer.py (ACCO under the HF Trainer), and hostfile.example (DeepSpeed's parser).
The DeepSpeed runner exits 0 when a rank dies from a signal, so every run also asserts each
rank's success line. About 3 minutes on 2 CPU cores, one 2-rank job at a time.

Run: ``python -m pytest -q tests/test_examples.py`` (``-m "not slow"`` keeps only the hostfile test).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.dist_utils import free_port
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from dist_utils import free_port

REPO = Path(__file__).resolve().parent.parent
ACCO_CONFIG = REPO / "ds_configs" / "acco.json"
ZERO1_CONFIG = REPO / "ds_configs" / "zero1.json"
MAIN_STEPS = 30
EVAL_EVERY = 10
# ds_configs/acco.json: 10 synchronous steps, then the automatic schedule tries 0.75 from step 11 and decides at
# step 14 at the earliest on measured times; the resumed steps compared with the uninterrupted run stay before it.
RESUME_FROM, RESUME_TO = 10, 13
STEP_FIELDS = ("step", "loss", "lr", "samples", "tokens", "wall_s")
ACCO_FIELDS = ("exposed_wait_s", "commit_round_s", "micro_batches_per_rank", "bytes_communicated", "schedule")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this interpreter's environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "deepspeed"
    found = str(local) if local.exists() else shutil.which("deepspeed")
    if found is None:
        pytest.fail("the deepspeed launcher is not installed (pip install deepspeed)")
    return found


def launch(script: str, *args: str, timeout_s: float = 300.0, ranks: int = 2) -> str:
    """Run ``deepspeed --num_gpus RANKS examples/<script> args`` on CPU; return stdout+stderr, fail on rc != 0."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the examples must find deepspeed_acco by themselves
    cmd = [_deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "examples" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def assert_ranks_done(output: str, tag: str, ranks: int = 2) -> None:
    """Every rank printed its success line (the runner's exit code alone can hide a killed rank)."""
    for rank in range(ranks):
        assert f"[rank {rank}] {tag}" in output, f"rank {rank} did not print '{tag}':\n{output[-6000:]}"


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_lm(out_dir: Path, config: Path, *extra: str, ranks: int = 2) -> str:
    """Launch the main job with the tiny preset, no progress bar, held-out loss every EVAL_EVERY steps."""
    return launch("train_lm.py", "--deepspeed_config", str(config), "--output_dir", str(out_dir),
                  "--eval_every", str(EVAL_EVERY), "--no_progress", *extra, ranks=ranks)


@pytest.fixture(scope="module")
def acco_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The main job with ACCO, MAIN_STEPS steps: (output dir, launcher output)."""
    out = tmp_path_factory.mktemp("acco")
    return out, train_lm(out, ACCO_CONFIG, "--max_steps", str(MAIN_STEPS))


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same job with plain DeepSpeed ZeRO-1 (no acco block): (output dir, launcher output)."""
    out = tmp_path_factory.mktemp("zero1")
    return out, train_lm(out, ZERO1_CONFIG, "--max_steps", str(MAIN_STEPS))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_job_heldout_loss_falls(acco_run: tuple[Path, str]) -> None:
    """With ACCO the held-out loss falls from ~ln(257) to well below it in 30 steps, on both ranks."""
    out, output = acco_run
    assert_ranks_done(output, "train_lm done")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == MAIN_STEPS
    assert abs(summary["initial_eval_loss"] - math.log(257)) < 0.5, summary["initial_eval_loss"]
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.5, summary
    evals = [r["eval_loss"] for r in read_metrics(out) if r.get("eval_loss") is not None]
    assert len(evals) == MAIN_STEPS // EVAL_EVERY and evals == sorted(evals, reverse=True), evals


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_job_logs_no_acco_warning(acco_run: tuple[Path, str]) -> None:
    """The main job runs in the regime the docs recommend (a decaying LR, sync_steps over the warm-up): no ACCO
    warning; the automatic schedule decided after its trials, in one log line with its figures, in metrics.jsonl."""
    out, output = acco_run
    warnings = [line for line in output.splitlines() if "WARNING" in line and "ACCO" in line]
    assert not warnings, warnings
    decisions = [r["decision"] for r in read_metrics(out) if r.get("decision")]
    assert decisions and decisions[0]["why"].startswith("after trying"), decisions
    assert "ACCO schedule from step" in output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_job_outputs(acco_run: tuple[Path, str]) -> None:
    """metrics.jsonl has a complete row per step, summary.json throughput and exposed-comm figures, a PNG plot."""
    out, output = acco_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MAIN_STEPS + 1))
    global_batch = 8 * 4 * 2  # micro-batch x gradient accumulation x ranks (ds_configs/acco.json, 2 ranks)
    for i, row in enumerate(rows, start=1):
        missing = [k for k in STEP_FIELDS + ACCO_FIELDS if row.get(k) is None]
        assert not missing, f"step {row['step']} lacks {missing}: {row}"
        assert row["samples"] == i * global_batch and row["tokens"] == row["samples"] * 128, row
        assert row["micro_batches_per_rank"] == [4, 4] and row["bytes_communicated"] > 0, row
        assert 0 <= row["exposed_wait_s"] and row["commit_round_s"] > 0, row
        # the automatic schedule: ZeRO-1's step has no estimate round, every ACCO schedule has one
        assert (row["estimate_round_s"] is None) == (row["schedule"] == "sync"), row
    assert all(a["wall_s"] < b["wall_s"] for a, b in zip(rows, rows[1:]))
    assert {r["step"] for r in rows if r.get("eval_loss") is not None} == {10, 20, 30}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == rows[-1]["tokens"] and summary["tokens_per_s"] > 0
    exposed_keys = [k for k in summary if "exposed" in k]
    assert exposed_keys and 0.0 <= summary["exposed_comm_share"] <= 1.0, summary
    assert summary["comm_overlap_share"] == pytest.approx(1.0 - summary["exposed_comm_share"])
    assert summary["exposed_comm_s_total"] == pytest.approx(sum(r["exposed_wait_s"] for r in rows))
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("metrics.jsonl", "summary.json", "loss.png"):
        assert str(out / name) in output, f"the job did not print where {name} is"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero1_config_runs_without_acco(zero1_run: tuple[Path, str], acco_run: tuple[Path, str]) -> None:
    """ds_configs/zero1.json (plain DeepSpeed) runs the same job: no ACCO figures, final loss within 0.25 of ACCO."""
    out, output = zero1_run
    assert_ranks_done(output, "train_lm done")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MAIN_STEPS + 1))
    assert all(r["exposed_wait_s"] is None and r["loss"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acco"] is None and summary["exposed_comm_share"] is None
    acco_summary = json.loads((acco_run[0] / "summary.json").read_text())
    assert summary["initial_eval_loss"] == pytest.approx(acco_summary["initial_eval_loss"], abs=1e-6)
    assert abs(summary["final_eval_loss"] - acco_summary["final_eval_loss"]) < 0.25, (summary, acco_summary)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_continues_steps_data_and_loss(tmp_path: Path, acco_run: tuple[Path, str]) -> None:
    """--save_every then --resume continues at step N+1 with its loss; steps N+1.. equal the uninterrupted run."""
    out = tmp_path / "resume"
    schedule = ("--schedule_steps", str(MAIN_STEPS))  # the uninterrupted run's LR schedule, stopped early
    first = train_lm(out, ACCO_CONFIG, "--max_steps", str(RESUME_FROM), "--save_every", str(RESUME_FROM), *schedule)
    assert_ranks_done(first, "train_lm done")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{RESUME_FROM}"
    second = train_lm(out, ACCO_CONFIG, "--max_steps", str(RESUME_TO), "--resume", *schedule)
    assert_ranks_done(second, "train_lm done")
    assert f"at step {RESUME_FROM}" in second

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, RESUME_TO + 1))
    before, after = rows[RESUME_FROM - 1], rows[RESUME_FROM]
    assert after["step"] == RESUME_FROM + 1
    assert abs(after["loss"] - before["loss"]) < 0.3 and after["loss"] < rows[0]["loss"] - 0.5, (before, after)
    assert after["samples"] == before["samples"] + 64, "the sample count continues"
    # The checkpoint holds everything the run depends on (weights, Adam state, LR schedule, data
    # position), and neither the save nor the evaluations disturb training: the resumed steps repeat the
    # uninterrupted run's steps.
    reference = {r["step"]: r for r in read_metrics(acco_run[0])}
    for row in rows[RESUME_FROM:]:
        assert row["loss"] == pytest.approx(reference[row["step"]]["loss"], rel=1e-5), (row, reference[row["step"]])
        assert row["lr"] == pytest.approx(reference[row["step"]]["lr"])
        assert row["schedule"] == reference[row["step"]]["schedule"] == "0.75", "the trial continues where it stopped"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_at_another_world_size(tmp_path: Path) -> None:
    """Saved by 2 ranks, converted with ds_to_universal, --resume on 3 ranks: the step count, the sample count and
    the LR schedule continue, every rank starts at micro-batch ceil(16 * 2 / 3) = 11, and the loss goes on falling."""
    out = tmp_path / "elastic"
    first = train_lm(out, ACCO_CONFIG, "--max_steps", "4", "--save_every", "4")
    assert_ranks_done(first, "train_lm done")
    ckpt = out / "checkpoints"
    conv = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt / "step4"), "--output_folder", str(ckpt / "step4_universal"),
                           "--inject_missing_state"], capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr[-3000:]
    second = train_lm(out, ACCO_CONFIG, "--max_steps", "6", "--resume", str(ckpt / "step4_universal"), ranks=3)
    assert_ranks_done(second, "train_lm done", ranks=3)
    assert "at step 4 (saved by 2 ranks at micro-batches [16, 16]; resuming every rank at 11)" in second, \
        second[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["samples"] == rows[3]["samples"] + 3 * 4 * 8, "3 ranks x GA 4 x micro-batch 8 per step"
    assert rows[4]["lr"] > 0 and rows[5]["loss"] < rows[0]["loss"], rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accelerate_example_under_both_launchers(tmp_path: Path) -> None:
    """examples/accelerate_train.py (install() + the JSON block only) under ``accelerate launch`` and under
    ``deepspeed``: 2 epochs of 22 micro-batches per rank (each ending with a short step), 12 steps, the held-out
    loss falls, the same figures under both launchers, the saved model's weights."""
    import re

    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file",
           str(REPO / "examples" / "accelerate_config.yaml"), "--main_process_port", str(free_port()),
           str(REPO / "examples" / "accelerate_train.py"), "--output_dir", str(tmp_path / "accelerate")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    by_accelerate = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{by_accelerate[-6000:]}"
    by_deepspeed = launch("accelerate_train.py", "--deepspeed_config", str(ACCO_CONFIG), "--output_dir",
                          str(tmp_path / "deepspeed"))
    figures = []
    for output in (by_accelerate, by_deepspeed):
        assert_ranks_done(output, "accelerate_train done")
        assert "2 processes, 22 micro-batches per process per epoch" in output, output[-3000:]
        done = re.search(r"\[rank 0\] accelerate_train done: held-out loss ([0-9.]+) -> ([0-9.]+), (\d+) steps", output)
        assert done is not None, output[-3000:]
        figures.append(done.groups())
    print(f"accelerate example (initial, final held-out loss, steps): accelerate launch {figures[0]}, "
          f"deepspeed {figures[1]}")
    assert figures[0] == figures[1] and figures[0][2] == "12" and float(figures[0][1]) < float(figures[0][0]) - 0.5
    assert (tmp_path / "accelerate" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hf_trainer_example(tmp_path: Path) -> None:
    """The HF Trainer example with install() and ds_configs/acco.json passes its own checks on both ranks."""
    output = launch("hf_trainer.py", "--max_steps", "8", "--deepspeed_config", str(ACCO_CONFIG),
                    "--output_dir", str(tmp_path / "hf"))
    assert_ranks_done(output, "hf_trainer done: all checks passed")
    for check in ("global_step == engine.global_steps: 8 vs 8", "optimizer is ACCO iff the config enables it: "
                  "AccoZeroOptimizer", "parameters identical on all ranks", "training loss fell"):
        assert f"[ok] {check}" in output, f"missing check {check!r}:\n{output[-4000:]}"


def test_hostfile_example_parses() -> None:
    """hostfile.example is valid for DeepSpeed's own hostfile parser (fetch_hostfile / _parse_hostfile)."""
    from deepspeed.launcher.runner import _parse_hostfile, fetch_hostfile

    path = REPO / "hostfile.example"
    pool = fetch_hostfile(str(path))
    assert pool == {"node1": 8, "node2": 8}
    assert _parse_hostfile(path.read_text().splitlines()) == pool
