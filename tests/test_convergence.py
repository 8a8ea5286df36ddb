"""Convergence regression: ACCO's held-out loss against ZeRO-1's and DPU's, paired, on a GPT-2.

Two gloo ranks train ``examples/train_lm.py``'s tiny GPT-2 (446k parameters, its data shards,
initialization and held-out set) for 100 committed steps with ``ds_configs/{zero1,acco,dpu}.json`` under the
conditions these figures were measured in (AdamW, LR 1e-3 held after a 10-step warm-up (``WarmupLR``), clipping
1.0, GA 4; ACCO on the pinned default schedule, the ``"extrapolated"`` estimate on a 3 + 1 split, no
``sync_steps``), and ``acco.json`` with the paper's schedule (``"estimate": "paper"``,
``"estimate_fraction": 0.5``). Measured (AMD EPYC, 2 cores): held-out ZeRO-1 2.4642, ACCO 2.4555 (-0.35 %), the
paper's schedule 2.4709 (+0.27 %), DPU 2.9371 (+19.2 %); the
single-process simulation of the same setting gives the paper's estimate +0.48 %, and the map's cells at LR 1e-3
range from -0.65 % to +1.01 % (docs/convergence.md).

The test fails when ACCO ends more than ``TOLERANCE`` behind ZeRO-1, so a change that moves ACCO's
estimate towards a stale or damped one (both lower the edge of stability: docs/how-it-works.md, "Why ACCO can
trail ZeRO-1") is caught; DPU, one step stale, must fail the same bound, which shows the bound separates a
stale optimizer from ACCO. Why not a higher LR, where ACCO's gap is larger: at LR 3e-3, after the warm-up
spike, the same ZeRO-1 run ends at 2.4898 here and 2.6458 in the simulation, so a bound there would test that
implementation-level difference, not the schedule. About 7 minutes on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from examples.train_lm import heldout_batches
from studies.convergence import with_study_lr
from tests.dist_utils import job_result, run_distributed, run_jobs_isolated
from tests.workers import ds_config, train_tiny_lm

STEPS, EVAL_BATCHES = 100, 8
TOLERANCE = 0.02
"""ACCO's held-out loss may end at most 2 % above ZeRO-1's (measured today: -0.35 %, the paper's schedule +0.27 %)."""


def convergence_worker(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Train STEPS committed steps through the public API; return the held-out loss of the committed weights."""
    engine, model, corpus, args, micro_batches = train_tiny_lm(rank, world, config, STEPS, init_timeout_s=600)
    model.eval()
    with torch.no_grad():
        batches = heldout_batches(corpus.heldout, EVAL_BATCHES, config["train_micro_batch_size_per_gpu"], args.seq_len)
        heldout = sum(float(model(input_ids=x, labels=x).loss) for x in batches) / len(batches)
    engine.destroy()
    return {"heldout": heldout, "micro_batches": micro_batches}


def _as_recorded(config: dict[str, Any]) -> dict[str, Any]:
    """The config under the conditions the figures above were measured in: LR 1e-3 held after a 10-step warm-up
    (the study's, ``with_study_lr``; the shipped configs decay it over a run's steps) and ACCO from the first step
    (no sync_steps)."""
    with_study_lr(config)
    config.get("acco", {}).pop("sync_steps", None)
    return config


@pytest.fixture(scope="module")
def runs() -> dict[str, list[Any]]:
    jobs = {name: _as_recorded(ds_config(f"{name}.json")) for name in ("zero1", "acco", "dpu")}
    # The paper's schedule: its estimate and equal halves.
    paper = {"estimate": "paper", "estimate_fraction": 0.5}
    jobs["acco_paper"] = {**jobs["acco"], "acco": {**jobs["acco"]["acco"], **paper}}
    results = run_distributed(run_jobs_isolated, 2, convergence_worker, [(c,) for c in jobs.values()],
                              timeout_s=1500)
    return {name: [r[j] for r in results] for j, name in enumerate(jobs)}


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_acco_within_tolerance_of_zero1_and_dpu_outside(runs: dict[str, list[Any]]) -> None:
    """ACCO ends within TOLERANCE of ZeRO-1's held-out loss, paired by seed; DPU (stale) ends beyond it."""
    loss = {name: job_result(runs, name)[0]["heldout"] for name in runs}
    for name in runs:
        ranks = job_result(runs, name)
        assert ranks[0]["heldout"] == ranks[1]["heldout"], f"{name}: ranks evaluated different weights"
    gap = {name: loss[name] / loss["zero1"] - 1 for name in ("acco", "acco_paper", "dpu")}
    print(f"CONVERGENCE tiny GPT-2, 2 ranks, ds_configs, {STEPS} steps: held-out ZeRO-1 {loss['zero1']:.4f}, "
          f"ACCO {loss['acco']:.4f} ({gap['acco']:+.2%}), ACCO paper's estimate {loss['acco_paper']:.4f} "
          f"({gap['acco_paper']:+.2%}), DPU {loss['dpu']:.4f} ({gap['dpu']:+.2%}); tolerance {TOLERANCE:.0%}")
    for name in ("acco", "acco_paper"):
        assert gap[name] <= TOLERANCE, (
            f"{name} ends {gap[name]:+.2%} behind ZeRO-1 (held-out {loss[name]:.4f} against {loss['zero1']:.4f}), "
            f"beyond the {TOLERANCE:.0%} tolerance: a change made ACCO's estimate worse (see docs/how-it-works.md)")
    assert gap["dpu"] > TOLERANCE, (
        f"DPU ends only {gap['dpu']:+.2%} behind ZeRO-1: this setting no longer separates a stale optimizer "
        "from ACCO, so the tolerance proves nothing")


def test_seed_noise_table() -> None:
    """The study's summary: mean +- std over seeds, and whether a method's mean is within one ZeRO-1 std."""
    from studies.convergence import seed_noise_table

    def run(method: str, seed: int, loss: float) -> dict[str, Any]:
        return {"preset": "tiny", "world": 1, "steps": 600, "seed": seed, "method": method,
                "eval": {"300": 9.0, "600": loss}}

    runs = [run("zero1", 1, 2.0), run("zero1", 2, 2.2), run("zero1", 3, 2.4),  # mean 2.2, std 0.2
            run("acco", 1, 2.1), run("acco", 2, 2.3), run("acco", 3, 2.5),  # +0.1: within
            run("dpu", 1, 2.5), run("dpu", 2, 2.6), run("dpu", 3, 2.7)]  # +0.4: outside
    rows = {line.split(" | ")[3]: line for line in seed_noise_table(runs).splitlines() if line.startswith("| tiny")}
    assert "2.3000 +- 0.2000 | +0.1000 | +0.50 | yes" in rows["acco"], rows["acco"]
    assert "2.6000 +- 0.1000 | +0.4000 | +2.00 | no" in rows["dpu"], rows["dpu"]
    assert "2.2000 +- 0.2000 | +0.0000 | +0.00 | yes" in rows["zero1"], rows["zero1"]


def test_estimate_map_seed_summary() -> None:
    """The screen's summary: each seed's gap to the ZeRO-1 run of the same seed, their mean and std."""
    from studies.estimate_map import seed_summary

    def run(variant: str, seed: int, loss: float, estimate: str = "paper") -> dict[str, Any]:
        return {"cell": "tiny,2,4,1e-3,10", "variant": variant, "seed": seed, "steps": 100, "estimate": estimate,
                "records": [{"step": 50, "gnorm": 3.0, "eval_loss": 9.0},
                            {"step": 100, "gnorm": 2.0, "eval_loss": loss}]}

    runs = [run("zero1", 1, 2.0), run("zero1", 2, 2.5),
            run("acco", 1, 2.02), run("acco", 2, 2.55),  # +1 %, +2 %: mean 1.5 %, std 0.71 %
            run("acco", 1, 1.98, "paper+shift1.1,0.2,0")]  # -1 %, one seed: no std
    rows = {line.split(" | ")[2]: line for line in seed_summary(runs).splitlines() if line.startswith("| tiny")}
    assert rows["ACCO, paper estimate"].endswith("| 1: +1.00% (3.0), 2: +2.00% (3.0) | +1.50% | 0.71% |")
    assert rows["ACCO, paper+shift1.1,0.2,0 estimate"].endswith("| 1: -1.00% (3.0) | -1.00% |  |")


def test_study_config_overrides(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The study's overrides: ``--decay`` swaps WarmupLR for WarmupDecayLR with the same warm-up, ending at ``--steps``;
    a ``_twin`` method keeps its method's ``acco`` block; every override is recorded for the pairing; an unknown
    method is refused when the arguments are parsed."""
    import json

    from studies.convergence import OVERRIDES, _config, parse_args

    args = parse_args(["--decay", "--steps", "50", "--warmup", "20", "--out", str(tmp_path / "x.json")])
    config = json.loads(_config("acco_sync10_twin", args, tmp_path).read_text())
    assert config["scheduler"]["type"] == "WarmupDecayLR", config["scheduler"]
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 20,
                                             "warmup_type": "linear", "total_num_steps": 50}
    assert config["acco"]["sync_steps"] == 10
    plain = json.loads(_config("zero1", parse_args(["--out", "x"]), tmp_path).read_text())
    assert plain["scheduler"]["type"] == "WarmupLR" and "acco" not in plain
    assert "decay" in OVERRIDES
    with pytest.raises(SystemExit):
        parse_args(["--methods", "zero1,acco_sync_10", "--out", "x"])  # a typo fails before any run starts
    assert "unknown method(s) ['acco_sync_10']" in capsys.readouterr().err


def test_paired_table_summary_has_std() -> None:
    """The paired summary: each method's final gaps to the ZeRO-1 run of the same seed, their mean, std and max."""
    from studies.convergence import paired_table

    def run(method: str, seed: int, loss: float) -> dict[str, Any]:
        return {"preset": "small", "world": 2, "steps": 100, "seed": seed, "method": method, "eval": {"100": loss}}

    runs = [run("zero1", 1, 2.0), run("zero1", 2, 2.5), run("acco", 1, 2.02), run("acco", 2, 2.55),  # +1 %, +2 %
            run("dpu", 1, 2.2)]  # +10 %, one seed: no std
    rows = {line.split(" | ")[0]: line for line in paired_table(runs).splitlines() if line.startswith("| acco |")
            or line.startswith("| dpu |")}
    assert rows["| acco"] == "| acco | +1.00%, +2.00% | +1.50% | 0.71% | 2.00% |", rows
    assert rows["| dpu"] == "| dpu | +10.00% | +10.00% |  | 10.00% |", rows
