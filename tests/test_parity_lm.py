"""Parity at a scale where the schedule's effects show: the main job's GPT-2 against the reference.

Two gloo ranks train ``examples/train_lm.py``'s tiny GPT-2 (446k parameters, sequences of 64 byte tokens,
micro-batches of 8, its data shards and initialization) with ``ds_configs/acco.json`` (AdamW betas 0.9/0.95,
weight decay 0.1, gradient clipping 1.0, the LR's warm-up; without its ``sync_steps``, which would make these 6
steps ZeRO-1's, on the pinned default schedule) for 6 committed steps; the single-process
reference (``tests/acco_reference.py``) computes the same schedule from the same inputs. A change that
breaks the schedule beyond toy MLPs (which half a gradient is computed at, how the estimate is formed, the
LR of a round, clipping) shows here. About 30 s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from studies.estimate_study import LogitsOf, lm_loss
from tests.acco_reference import reference_train
from tests.dist_utils import job_result, run_distributed, run_jobs_isolated
from tests.workers import DEFAULT_ESTIMATE_HALF, DEFAULT_ESTIMATE_SHIFT, ds_config, tiny_lm, train_tiny_lm

STEPS, SEQ = 6, 64


def _config(method: str) -> dict[str, Any]:
    """ds_configs/<method>.json, ACCO's block without sync_steps (6 synchronous steps would be ZeRO-1's)."""
    config = ds_config(f"{method}.json")
    config.get("acco", {}).pop("sync_steps", None)
    return config


def lm_worker(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Train the tiny GPT-2 for STEPS committed steps through the public API; return its parameters."""
    engine, model, _, _, micro_batches = train_tiny_lm(rank, world, config, STEPS, SEQ)
    out = {"params": [p.detach().clone() for p in model.parameters()], "micro_batches": micro_batches}
    engine.destroy()
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, list[Any]]:
    jobs = {"acco": _config("acco"), "zero1": _config("zero1")}
    results = run_distributed(run_jobs_isolated, 2, lm_worker, [(c,) for c in jobs.values()], timeout_s=280)
    return {name: [r[j] for r in results] for j, name in enumerate(jobs)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method,mode", [("acco", "acco"), ("zero1", "sync")])
def test_gpt2_matches_reference(runs: dict[str, list[Any]], method: str, mode: str) -> None:
    """The tiny GPT-2 with ds_configs/{acco,zero1}.json equals the reference after 6 steps (< 1e-5); ACCO and
    ZeRO-1 differ from each other by far more than that."""
    result = job_result(runs, method)
    train_lm, args = tiny_lm(SEQ)
    corpus = train_lm.build_corpus(args)
    config = _config(method)
    micro, ga = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    shards = [train_lm.ShardedWindows(corpus.train, SEQ, micro, r, 2, args.seed) for r in range(2)]
    batches = [[(shard[i], shard[i]) for i in range(result[0]["micro_batches"])] for shard in shards]
    opt, sched = config["optimizer"]["params"], config["scheduler"]["params"]

    def lr(t: int) -> float:  # WarmupCosineLR's linear warm-up from 0 to the optimizer's lr; 6 steps < warm-up
        return opt["lr"] * min(1.0, max(0, t - 1) / sched["warmup_num_steps"])

    model = LogitsOf(train_lm.build_model(args, corpus.vocab_size, corpus.eot_id))
    expected = reference_train(model, batches, lm_loss, mode=mode, num_steps=STEPS, gradient_accumulation_steps=ga,
                               lr=lr, betas=tuple(opt["betas"]), weight_decay=opt["weight_decay"],
                               max_grad_norm=config["gradient_clipping"], estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                               estimate_micro_batches=DEFAULT_ESTIMATE_HALF[ga])
    diff = max(float((a - b).abs().max()) for a, b in zip(result[0]["params"], expected.values(), strict=True))
    moved = max(float((a - b.detach()).abs().max())
                for a, b in zip(result[0]["params"], model.model.parameters(), strict=True))
    print(f"PARITY gpt2-tiny {method} vs reference {mode}, {STEPS} steps: max |diff| = {diff:.3e} "
          f"(parameters moved by up to {moved:.3e})")
    other = job_result(runs, "zero1" if method == "acco" else "acco")[0]["params"]
    apart = max(float((a - b).abs().max()) for a, b in zip(result[0]["params"], other, strict=True))
    print(f"  ACCO and ZeRO-1 end {apart:.3e} apart")
    assert diff < 1e-5 and moved > 1e-3 and apart > 100 * diff
    assert all(torch.equal(a, b) for a, b in zip(result[0]["params"], result[1]["params"]))
