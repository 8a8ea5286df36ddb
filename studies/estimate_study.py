"""Where ACCO's estimate costs convergence: a single-process simulation on the main job's model and data.

The schedules of ``tests/acco_reference.py`` (ZeRO-1, ACCO, DPU, every rank simulated in one
process, plain ``torch.optim.AdamW``) run on ``examples/train_lm.py``'s model, data shards, LR
warm-up and clipping, with the same seed, so their held-out losses can be compared with the
package's, paired by seed. On top of the reference this script varies how ACCO's estimate
theta~_{t+1} is formed (``--estimate``), and logs per committed step how far theta~_{t+1} lands from
theta_{t+1}, relative to the step theta_{t+1} - theta_t, and the gradient norms of both halves.

    python studies/estimate_study.py --preset small --world 2 --seed 1234 --steps 25 \\
        --method acco --estimate paper --out runs/study/small_w2_acco.jsonl

One JSON line per committed step: ``step, lr, train_loss, est_dist_rel, est_cos, gnorm_first,
gnorm_second, clip`` (+ ``eval_loss`` at evaluation steps). ``--oracle_lambda L`` replaces the
estimate by theta_{t+1} + L * (paper estimate - theta_{t+1}) (it computes the commit first, which the
real schedule cannot): it measures how the gap scales with the estimate's error. ``--shift S,K1,K2``
scales the estimate's update by S and adds K1 (K2) times the offset theta~ - theta of the previous
(second previous) estimate: ``1,K,0`` is the carry K that raises the edge of stability, ``S > 1`` an
extrapolated (look-ahead) estimate (``studies/estimate_stability.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.train_lm import (  # noqa: E402
    PRESETS,
    ShardedWindows,
    add_model_data_arguments,
    build_corpus,
    build_model,
    finish_model_data_arguments,
    heldout_batches,
)
from tests.acco_reference import ESTIMATES, Simulator, estimate_gradient  # noqa: E402

__all__ = ["LogitsOf", "lm_loss", "main", "parse_args", "run_study"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_data_arguments(p)
    p.add_argument("--method", choices=("zero1", "acco", "dpu"), default="acco")
    p.add_argument("--estimate", choices=sorted(ESTIMATES), default="paper", help="how ACCO forms theta~")
    p.add_argument("--shift", type=_shift, default=(1.0, 0.0, 0.0), metavar="S,K1,K2",
                   help="theta~_{t+1} = theta_t + S (Opt(theta_t, G~_t) - theta_t) + K1 (theta~_t - theta_t) "
                        "+ K2 (theta~_{t-1} - theta_{t-1}), theta~_t being where G~_t was computed; 1,0,0 is the "
                        "paper's, 1,K,0 the carry K of studies/estimate_stability.py")
    p.add_argument("--oracle_lambda", type=float, default=None,
                   help="theta~ = theta_{t+1} + L * (paper estimate - theta_{t+1}); needs the commit first")
    p.add_argument("--world", type=int, default=2, help="simulated data-parallel ranks")
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--ga", type=int, default=4, help="gradient_accumulation_steps (ACCO: k = ga / 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10, help="DeepSpeed WarmupLR linear warm-up steps")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON lines, one per committed step")
    args = p.parse_args(argv)
    return finish_model_data_arguments(args)


def _shift(text: str) -> tuple[float, float, float]:
    """Parse ``S,K1,K2`` (``--shift``)."""
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--shift takes S,K1,K2 (three numbers), got {text!r}")
    return values  # type: ignore[return-value]


def warmup_lr(max_lr: float, warmup: int) -> Callable[[int], float]:
    """The LR of committed step t under DeepSpeed's WarmupLR (linear, min 0), stepped once per step."""
    return lambda t: max_lr * min(1.0, max(0, t - 1) / warmup) if warmup > 0 else max_lr


class LogitsOf(torch.nn.Module):
    """``model(x)`` gives the logits (the reference's ``loss_fn(model(x), x)`` shape)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The HF causal-LM loss (next-token cross-entropy, mean over tokens)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                             ids[:, 1:].reshape(-1))


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _dist(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return _norm([x - y for x, y in zip(a, b, strict=True)])


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
    return dot / max(_norm(a) * _norm(b), 1e-30)


def run_study(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Simulate ``args.steps`` committed steps; yield one record per step."""
    torch.set_num_threads(args.threads)
    corpus = build_corpus(args)
    model = LogitsOf(build_model(args, corpus.vocab_size, corpus.eot_id))
    shards = [ShardedWindows(corpus.train, args.seq_len, args.micro_batch, r, args.world, args.seed)
              for r in range(args.world)]
    batches = [(shard[i] for i in range(10**9)) for shard in shards]
    data = [((x, x) for x in rank) for rank in batches]
    eval_set = heldout_batches(corpus.heldout, args.eval_batches, args.micro_batch, args.seq_len)
    lr = warmup_lr(args.lr, args.warmup)
    sim = Simulator(model, data, lm_loss, lr, tuple(args.betas), 1e-8, args.weight_decay, args.clip)
    k = args.ga // 2 if args.method == "acco" else args.ga
    per_round = [k] * args.world

    def evaluate() -> float:
        with torch.no_grad():
            for p, m in zip(sim.params, sim.master, strict=True):
                p.copy_(m)
            return sum(float(lm_loss(sim.work(x), x)) for x in eval_set) / len(eval_set)

    def record(t: int, theta_t: list[torch.Tensor], first: tuple[list[torch.Tensor], int],
               second: tuple[list[torch.Tensor], int], est: list[torch.Tensor] | None) -> dict[str, Any]:
        theta_next = sim.snapshot_params()
        step = [a - b for a, b in zip(theta_next, theta_t, strict=True)]
        total = _norm([(a + b) / (first[1] + second[1]) for a, b in zip(first[0], second[0], strict=True)])
        rec: dict[str, Any] = {"step": t + 1, "lr": lr(t), "train_loss": sim.last_losses_mean(),
                               "gnorm_first": _norm([g / first[1] for g in first[0]]),
                               "gnorm_second": _norm([g / second[1] for g in second[0]]),
                               "gnorm": total, "clip": total > args.clip > 0, "step_len": _norm(step)}
        if est is not None:
            rec["est_dist_rel"] = _dist(est, theta_next) / max(rec["step_len"], 1e-30)
            rec["est_cos"] = _cos([e - a for e, a in zip(est, theta_t, strict=True)], step)
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            rec["eval_loss"] = evaluate()
        return rec

    if args.method == "zero1":
        for t in range(args.steps):
            theta_t = sim.snapshot_params()
            first = sim.accumulate(theta_t, per_round[:] if args.ga % 2 else [args.ga // 2] * args.world)
            second = sim.accumulate(theta_t, [args.ga - args.ga // 2] * args.world)
            sim.step([a + b for a, b in zip(first[0], second[0], strict=True)], first[1] + second[1], t)
            yield record(t, theta_t, first, second, None)
        return
    if args.method == "dpu":
        compute_at = sim.snapshot_params()
        for t in range(args.steps):
            first = sim.accumulate(compute_at, per_round)
            theta_t = sim.snapshot_params()
            compute_at = theta_t
            sim.step(first[0], first[1], t)
            yield record(t, theta_t, first, first, None)
        return
    computed_at = sim.snapshot_params()
    est_sums = sim.accumulate(computed_at, per_round)
    scale, carry, carry2 = args.shift
    offset_prev = [torch.zeros_like(m) for m in sim.master]  # theta~_{t-1} - theta_{t-1}
    for t in range(args.steps):
        theta_t = sim.snapshot_params()
        if args.oracle_lambda is None:
            estimate = sim.tentative_step(*estimate_gradient(args.estimate, sim, *est_sums, t), t)
            if args.shift != (1.0, 0.0, 0.0):
                offset = [p - x for p, x in zip(computed_at, theta_t, strict=True)]
                estimate = [x + scale * (e - x) + carry * o + carry2 * q
                            for e, x, o, q in zip(estimate, theta_t, offset, offset_prev, strict=True)]
                offset_prev = offset
            second = sim.accumulate(theta_t, per_round)
        else:  # needs G_t before theta~: only a simulation can do this
            second = sim.accumulate(theta_t, per_round)
            paper = sim.tentative_step(*est_sums, t)
            exact = sim.tentative_step([a + b for a, b in zip(est_sums[0], second[0], strict=True)],
                                       est_sums[1] + second[1], t)
            estimate = [x + args.oracle_lambda * (p - x) for x, p in zip(exact, paper, strict=True)]
        sim.step([a + b for a, b in zip(est_sums[0], second[0], strict=True)], est_sums[1] + second[1], t)
        yield record(t, theta_t, est_sums, second, estimate)
        if t + 1 < args.steps:
            computed_at = estimate
            est_sums = sim.accumulate(estimate, per_round)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and write one JSON line per step."""
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with out.open("w") as fh:
        fh.write(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "out"},
                             "n_params": None, "preset": PRESETS[args.preset].__dict__}) + "\n")
        for rec in run_study(args):
            rec["wall_s"] = round(time.perf_counter() - start, 1)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            if "eval_loss" in rec:
                print(f"step {rec['step']}: eval {rec['eval_loss']:.4f} train {rec['train_loss']:.4f} "
                      f"({rec['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
