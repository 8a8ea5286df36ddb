"""ACCO as a drop-in: the real HF Trainer and a real accelerate loop, with ``install()`` and the JSON block only.

Each scenario is one launch of ``tests/drop_in.py`` through ``deepspeed --num_gpus 2`` on CPU (about a
minute each): 3 epochs of 6 micro-batches per rank at ``gradient_accumulation_steps`` 4, so every epoch
ends with a step the caller forces (the Trainer and accelerate sync at the last batch of an epoch).
What is checked, against DeepSpeed's own ``zero_to_fp32`` of a checkpoint saved at the same step:

- HF Trainer: ``checkpoint-N/model.safetensors``, ``trainer.save_model`` and ``engine.module.state_dict()``
  hold the committed weights; ``trainer.evaluate()`` during and after training reports what a plain
  Trainer reports for those weights; an evaluation does not change training (same final weights as a run
  without evaluation); ``global_step`` equals ``engine.global_steps`` at every epoch end;
  ``resume_from_checkpoint`` of the mid-run checkpoint ends with the same weights; ranks identical.
- accelerate: ``get_state_dict``, ``save_model`` and an eval-mode forward give the committed weights while
  the model holds the estimate; the sync count equals ``global_steps``; ``save_state``/``load_state``
  resume exactly; the data is sharded over the 2 processes; ranks identical.

Every comparison prints its measured difference. Run: ``python -m pytest -q tests/test_drop_in.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.dist_utils import free_port
from tests.test_examples import _deepspeed_launcher

REPO = Path(__file__).resolve().parent.parent


def _launch(scenario: str, out: Path) -> list[dict[str, Any]]:
    import subprocess

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [_deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "drop_in.py"), "--scenario", scenario, "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}"
    for rank in (0, 1):
        assert f"[rank {rank}] drop_in {scenario} done" in output, output[-6000:]
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("hf")
    return out, _launch("hf", out)


@pytest.fixture(scope="module")
def accel(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _launch("accelerate", tmp_path_factory.mktemp("accelerate"))


def _print_reads(name: str, reads: dict[str, float]) -> None:
    for path, diff in reads.items():
        print(f"READ {name}: {path}: max |diff| vs committed (zero_to_fp32) = {diff:.3e}")


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_hf_trainer_reads_committed_weights(hf: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Saved and evaluated weights under the HF Trainer are the committed ones (zero_to_fp32 of the same step)."""
    sys.path.insert(0, str(REPO / "tests"))
    from drop_in import committed_from_checkpoint, corpus_windows, trainer_eval_loss

    out, results = hf
    res = results[0]
    assert res["engine"] == ["AccoEngine", "AccoZeroOptimizer"]
    _print_reads("HF", res["reads"])
    assert all(diff == 0.0 for diff in res["reads"].values()), res["reads"]
    _, held = corpus_windows()
    evals = {e["step"]: e for e in res["evals"]}
    for step in (3, 6):
        ref = trainer_eval_loss(committed_from_checkpoint(out / "a" / f"checkpoint-{step}", f"global_step{step}"),
                                held, tmp_path / f"eval{step}")
        print(f"READ HF: trainer.evaluate at step {step}: {evals[step]['eval_loss']:.6f}, plain Trainer on the "
              f"committed weights {ref:.6f} (the model held the estimate, max |live - committed| = "
              f"{evals[step]['live_minus_committed']:.3e})")
        assert abs(evals[step]["eval_loss"] - ref) < 1e-6
        if step == 6:
            assert abs(res["final_eval"] - ref) < 1e-6
    assert evals[3]["live_minus_committed"] > 1e-4, "the evaluation must have had something to swap"
    assert res["state_dict_vs_flush"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_hf_trainer_short_steps_resume_and_undisturbed_training(hf: tuple[Path, list[dict[str, Any]]]) -> None:
    """Epoch-end short steps counted like the Trainer's; evaluation does not change training; resume is exact."""
    _, results = hf
    res = results[0]
    print(f"HF epochs (Trainer global_step, engine global_steps): {res['epochs'][:3]}; final {res['final']}; "
          f"resumed {res['resumed']}")
    assert res["epochs"][:3] == [[2, 2], [4, 4], [6, 6]]
    assert res["final"] == [6, 6] and res["resumed"] == [6, 6]
    assert len(set(res["final_checksum"])) == 1, "ranks differ"
    assert res["no_eval_checksum"] == res["final_checksum"][0], "evaluating changed the training"
    assert res["resumed_checksum"] == res["final_checksum"][0], "resume_from_checkpoint did not end the same"
    assert all(r["final_checksum"] == res["final_checksum"] for r in results)


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_accelerate_loop(accel: list[dict[str, Any]]) -> None:
    """accelerate's accumulate() loop: sharded data, sync count = global_steps through short epoch-end steps,
    committed weights from get_state_dict / save_model / eval-mode forward, exact save_state/load_state."""
    res = accel[0]
    _print_reads("accelerate", res["reads"])
    print(f"accelerate: processes {res['num_processes']}, batches per epoch {res['batches_per_epoch']}, "
          f"(syncs, global_steps) per epoch {res['epochs']}, max |live - committed| at the reads "
          f"{res['live_minus_committed']:.3e}")
    assert res["engine"] == ["AccoEngine", "AccoZeroOptimizer"]
    assert res["num_processes"] == 2 and res["batches_per_epoch"] == 6
    assert res["epochs"][:3] == [[2, 2], [4, 4], [6, 6]]
    assert all(diff == 0.0 for diff in res["reads"].values()), res["reads"]
    assert res["live_minus_committed"] > 1e-4, "the reads must have had something to swap"
    assert len(set(res["final_checksum"])) == 1 and res["resumed_checksum"] == res["final_checksum"][0]
