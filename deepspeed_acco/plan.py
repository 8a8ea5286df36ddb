"""Will ACCO help my cluster? Predicted step time and tokens/s of each method, from C and M.

    python -m deepspeed_acco.plan --params 1.3e9 --world_size 32 --ranks_per_node 8 --link_gbit 100 \\
        --tokens_per_rank_per_step 65536 --flops 3e14
    python -m deepspeed_acco.plan --compute_s 1.9 --round_s 1.2 --world_size 32 --tokens_per_rank_per_step 65536
    python -m deepspeed_acco.plan --metrics runs/acco/metrics.jsonl --ranks_per_node 8
    python -m deepspeed_acco.plan --table          # the table of typical clusters in docs/when-it-helps.md

Two numbers decide it. ``C``: one rank's compute for one optimizer step (forward and backward of
``gradient_accumulation_steps`` micro-batches). ``M``: one ZeRO-1 round (reduce-scatter of the
gradients, the sharded optimizer step, all-gather of the parameters). Either measure them in a short
run (an ACCO run's per-step metrics hold ``compute_s`` and ``commit_round_s``: ``--metrics`` reads
them from ``examples/train_lm.py``'s ``metrics.jsonl`` or any JSON lines of ``StepMetrics``) or let the planner
estimate them: ``C = 6 x parameters x tokens / achieved FLOP/s`` and ``M`` from the bytes a ring
reduce-scatter and all-gather move through each node's link.

How each method composes them (the schedule in ``acco-algorithm.md``). An ACCO step has an estimate half
that computes ``f C`` (``f`` = ``acco.estimate_fraction`` as split into micro-batches, 0.75 by default) while
the previous step's commit round runs, and a commit half that computes ``(1 - f) C`` while the estimate round
runs:

- ZeRO-1: ``C + M``, nothing overlaps.
- ACCO: ``max(f C, M) + max((1 - f) C, M)``: two rounds per step, each behind one half of the step's compute.
- ACCO, int8 estimate: ``max(f C, M) + max((1 - f) C, M_est)``: the exact commit round behind the estimate
  half, the compressed estimate round behind the commit half.
- ACCO, int8 both (``acco.commit_compression="int8"``, opt-in, lossy): ``max(f C, M_est) + max((1 - f) C,
  M_est)``: the commit round compressed like the estimate's. Never recommended, only reported when it is
  predicted faster than the recommendation.
- ACCO, adaptive: each half computes ``n`` micro-batches, ``n`` = enough to cover the round in flight,
  between the half's minimum and the cap; a step then carries more tokens.
- DPU: ``max(C, M)``: one round per step, gradients one step stale.

The model assumes identical ranks, a ring over the nodes (each node's link carries ``(W-1)/W`` of the
buffer per collective) and no compute slowdown while a round runs. Where the round's own work shares a
core with compute (the CPU bed of ``benchmarks/run.py``), feed ``C`` as measured under ACCO. The
checks: ``benchmarks/plan_check.py`` compares the prediction with every cell of a benchmark run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from deepspeed_acco.split import split_micro_batches
from deepspeed_acco.topology import node_aware

__all__ = ["METHODS", "Cluster", "Timing", "Prediction", "half_step_s", "step_time_s", "timing_from_cluster",
           "int8_estimate_fraction", "quantize_s", "memory_per_rank", "predict", "recommend", "main"]

METHODS = ("zero1", "acco", "acco_int8", "acco_int8_commit", "acco_adaptive", "dpu")
LABELS = {"zero1": "ZeRO-1", "acco": "ACCO", "acco_int8": "ACCO, int8 estimate",
          "acco_int8_commit": "ACCO, int8 both (lossy)", "acco_adaptive": "ACCO, adaptive",
          "dpu": "DPU (stale gradients)"}
# A switch is recommended only when it is predicted this much faster: below it, the model's error and
# the round's fixed costs decide, not the link.
MIN_GAIN = 1.05


@dataclass(frozen=True)
class Cluster:
    """What a user knows about the job and the cluster."""

    params: float
    """Trainable parameters."""
    world_size: int
    """Data-parallel ranks (GPUs)."""
    ranks_per_node: int
    """Ranks sharing one node's link."""
    link_gbit: float
    """Each node's link to the others, Gbit/s."""
    tokens_per_rank_per_step: int
    """Tokens one rank computes per optimizer step (micro-batch x sequence length x accumulation steps)."""
    flops: float
    """Achieved FLOP/s of one rank on this model (not the peak)."""
    comm_bytes: int = 2
    """Bytes per value sent in a round: 2 (bf16/fp16), 4 (fp32)."""
    link_efficiency: float = 0.8
    """Share of the link's rate the collectives reach."""
    compression_block_size: int = 256
    """``acco.compression_block_size``: one fp32 scale per block of int8 values."""
    quantize_gbs: float = 400.0
    """fp32 GB of parameters per second the fused int8 kernels get through (``quantize_s``): 400 assumes a GPU's
    memory bandwidth over five passes; the CPU bed measures about 1.5 on one core."""


@dataclass(frozen=True)
class Timing:
    """C and M: measured, or estimated by ``timing_from_cluster``."""

    compute_s: float
    """C: one rank's compute for one optimizer step at ``micro_batches`` micro-batches."""
    round_s: float
    """M: one full-precision round (reduce-scatter, sharded step, all-gather)."""
    estimate_round_s: float
    """M_est: the round with the int8 estimate (compressed reduce-scatter and all-gather)."""
    micro_batches: int = 8
    """``gradient_accumulation_steps`` (micro-batches per rank per step)."""
    max_micro_batches_per_round: int | None = None
    """``acco.max_micro_batches_per_round`` (default 2 x ``micro_batches``)."""
    slowest_factor: float = 1.0
    """Ranks of two speeds, half of each (mixed GPU generations): the slow ranks' micro-batch time over
    the fast ones'. Every method but adaptive accumulation waits for the slow ranks' ``micro_batches``."""
    estimate_fraction: float = 0.75
    """``acco.estimate_fraction``: the estimate half's share of a step's micro-batches (0.5: the paper's halves)."""

    def halves(self) -> tuple[float, float]:
        """The estimate half's and the commit half's shares of a step's compute, as whole micro-batches."""
        estimate, commit = split_micro_batches(self.micro_batches, self.estimate_fraction)
        return estimate / self.micro_batches, commit / self.micro_batches


@dataclass(frozen=True)
class Prediction:
    """One method's predicted step."""

    method: str
    step_s: float
    micro_batches_per_step: float
    """Micro-batches per rank per step (more than nominal only with adaptive accumulation)."""

    def tokens_per_s(self, world_size: int, tokens_per_micro_batch: float) -> float:
        """Tokens all ranks process per second."""
        return world_size * self.micro_batches_per_step * tokens_per_micro_batch / self.step_s


def half_step_s(compute_half_s: float, round_s: float, micro_batch_s: float | None = None,
                cap: int | None = None) -> tuple[float, float]:
    """Seconds and micro-batches of one half-step whose round in flight takes ``round_s``.

    Without ``micro_batch_s`` the half computes its nominal micro-batches and waits for the round.
    With it (adaptive accumulation), the half keeps adding micro-batches of ``micro_batch_s`` each until
    the round has finished or the cap is reached.
    """
    if micro_batch_s is None or micro_batch_s <= 0:
        return max(compute_half_s, round_s), 0.0
    nominal = compute_half_s / micro_batch_s
    wanted = max(nominal, math.ceil(round_s / micro_batch_s - 1e-9))
    n = wanted if cap is None else min(float(cap), wanted)
    return max(n * micro_batch_s, round_s), n


def step_time_s(method: str, timing: Timing) -> tuple[float, float]:
    """Predicted (step seconds, mean micro-batches per rank per step) of ``method`` under ``timing``.

    With ``slowest_factor`` above 1 the slow ranks set every boundary: their compute replaces C. Under
    adaptive accumulation the slow ranks compute their minimum (or cover the round) and the fast ones
    add micro-batches until the boundary.
    """
    ga, m = timing.micro_batches, timing.round_s
    c = timing.compute_s * timing.slowest_factor
    if method == "zero1":
        return c + m, ga
    if method == "dpu":
        return max(c, m), ga
    f_est, f_commit = timing.halves()
    if method == "acco":  # the commit round behind the estimate half, the estimate round behind the commit half
        return half_step_s(f_est * c, m)[0] + half_step_s(f_commit * c, m)[0], ga
    if method == "acco_int8":
        return half_step_s(f_est * c, m)[0] + half_step_s(f_commit * c, timing.estimate_round_s)[0], ga
    if method == "acco_int8_commit":  # the compressed commit round is shaped like the compressed estimate round
        est = timing.estimate_round_s
        return half_step_s(f_est * c, est)[0] + half_step_s(f_commit * c, est)[0], ga
    if method == "acco_adaptive":
        cap = timing.max_micro_batches_per_round or 2 * ga
        t_slow = c / ga
        step, micro = 0.0, 0.0
        for share in (f_est, f_commit):  # both rounds are full-precision rounds of M
            half, n = half_step_s(share * c, m, t_slow, cap)
            if timing.slowest_factor > 1.0:  # the fast half of the ranks fill the half-step the slow half sets
                t = timing.compute_s / ga
                n_fast = min(cap, max(share * ga, math.floor(half / t + 1e-9)))
                n = (n + n_fast) / 2
            step, micro = step + half, micro + n
        return step, micro
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def int8_estimate_fraction(world_size: int, ranks_per_node: int, comm_bytes: int, block: int = 256) -> float:
    """Bytes through a node's link of the int8 estimate round over those of a full-precision round.

    Full round: a ring reduce-scatter and a ring all-gather, ``(W-1)/W`` of the buffer each through a
    node's link. Int8 round, with one fp32 scale per block of int8 values:

    - nodes of ``g > 1`` ranks (``W`` a multiple of ``g``): the node-aware round (``topology.py``) reduces inside
      the node at full precision, then exchanges int8 between the ``N = W / g`` nodes: ``(N-1)/N`` of the
      buffer for the all-to-all and ``(N-1)/N`` for the all-gather, whatever ``g``;
    - one rank per node, or nodes of unequal size: the flat round, an all-to-all in which a node's link
      carries ``g (W-g) / W`` of the buffer for its ``g`` ranks, and a ring all-gather.
    """
    w, g = world_size, min(ranks_per_node, world_size)
    if w <= 1:
        return 1.0
    per_value = 1.0 + 4.0 / block
    full = 2 * (w - 1) / w * comm_bytes
    if node_aware(w, g):
        nodes = w // g
        int8 = 2 * (nodes - 1) / nodes * per_value
    else:
        int8 = (g * (w - g) / w + (w - 1) / w) * per_value
    return int8 / full


def quantize_s(params: float, quantize_gbs: float) -> float:
    """Seconds one rank's fused int8 kernels add to a compressed round: a step's fp32 values over their rate.

    The kernels quantize the rank's whole buffer (the residual written back), sum what it receives, quantize its
    shard's update and rebuild the whole flat, each memory-bound: about five passes over ``4 x params`` bytes.
    ``quantize_gbs`` is that rate in fp32 GB of parameters per second (``benchmarks/round_profile.py`` measures
    it: about 1.5 on one core of the CPU bed; a GPU's kernels run at hundreds).
    """
    return 4.0 * params / (quantize_gbs * 1e9) if quantize_gbs > 0 else 0.0


def memory_per_rank(method: str, params: float, world_size: int, param_bytes: int = 2, accum_bytes: int = 4,
                    block: int = 256, ranks_per_node: int = 1) -> dict[str, float]:
    """Bytes one rank keeps for a method's parameters, gradients and optimizer between micro-batches, by part
    (activations and the framework's own buffers left out). P parameters, N ranks, b bytes per parameter value,
    a per accumulated gradient value (``acco.grad_accum_dtype``):

    - ZeRO-1: parameters P b, gradients P b, the fp32 gradient partition 4 P / N (only with 16-bit parameters:
      with fp32 ones DeepSpeed's partition is a view of the gradients), the optimizer shard (fp32 master weights
      and both Adam moments) 12 P / N;
    - ACCO: parameters P b, two accumulation buffers 2 P a, the shadow parameters the rounds all-gather into P b,
      the optimizer shard 12 P / N, the rounds' reduced gradient shards 2 x 4 P / N (the estimate's is carried
      into the commit) and the fused estimate's scratch copies of the shard, its gradient and both moments
      4 x 4 P / N; the int8 estimate adds its payload buffer, P (1 + 4 / block), and the int8 values and scales
      it sends, as much again (P / g with the node-aware round, nodes of g = ``ranks_per_node`` ranks), and the
      compressed commit also its residual, P a; DPU has one reduced shard and no estimate.
      ``benchmarks/round_profile.py`` checks this against the tensors' storages.
    """
    p, n, b, a = float(params), float(world_size), float(param_bytes), float(accum_bytes)
    parts = {"parameters": p * b, "optimizer shard": 12 * p / n}
    if method == "zero1":
        parts["gradients"] = p * b
        if param_bytes < 4:
            parts["fp32 gradient partition"] = 4 * p / n
        return parts
    parts.update({"accumulation buffers": 2 * p * a, "shadow parameters": p * b,
                  "reduced shards": (4 if method == "dpu" else 8) * p / n})
    if method != "dpu":
        parts["fused estimate scratch"] = 16 * p / n
    if method in ("acco_int8", "acco_int8_commit"):
        parts["int8 payload"] = p * (1 + 4 / block)
        g = ranks_per_node if node_aware(world_size, ranks_per_node) else 1
        parts["int8 send buffers"] = p / g * (1 + 4 / block)
    if method == "acco_int8_commit":
        parts["commit residual"] = p * a
    return parts


def timing_from_cluster(cluster: Cluster, micro_batches: int = 8) -> Timing:
    """Estimate C from FLOP/s and M from bytes over the link (see the module docstring)."""
    w = cluster.world_size
    compute = 6.0 * cluster.params * cluster.tokens_per_rank_per_step / cluster.flops
    link_bytes_s = cluster.link_gbit * 1e9 / 8 * cluster.link_efficiency
    if w <= cluster.ranks_per_node:
        round_s = 0.0  # one node: no inter-node link in the round (NVLink / PCIe is not modelled)
    else:
        round_s = 2 * (w - 1) / w * cluster.params * cluster.comm_bytes / link_bytes_s
    fraction = int8_estimate_fraction(w, cluster.ranks_per_node, cluster.comm_bytes, cluster.compression_block_size)
    estimate_s = round_s * fraction + (quantize_s(cluster.params, cluster.quantize_gbs) if round_s else 0.0)
    return Timing(compute, round_s, estimate_s, micro_batches)


def predict(timing: Timing) -> list[Prediction]:
    """Every method's predicted step, in ``METHODS`` order."""
    return [Prediction(m, *step_time_s(m, timing)) for m in METHODS]


def recommend(predictions: list[Prediction]) -> tuple[str, str]:
    """The method to use, and why, from the predicted steps.

    ZeRO-1 unless ACCO is predicted at least ``MIN_GAIN`` faster; the int8 estimate only when it beats
    plain ACCO by as much. DPU is never recommended (its gradients are a step stale), nor adaptive
    accumulation for identical ranks (it raises tokens per step, not progress per second; it pays off
    when ranks differ in speed), nor the compressed commit (lossy: opt-in; ``report`` names it where it is
    predicted faster).
    """
    by = {p.method: p for p in predictions}
    zero1, acco, int8 = by["zero1"].step_s, by["acco"].step_s, by["acco_int8"].step_s
    if zero1 < MIN_GAIN * min(acco, int8):
        return "zero1", (f"ACCO is not predicted {MIN_GAIN:.2f}x faster (ZeRO-1 {zero1:.3g} s, ACCO {acco:.3g} s, "
                         f"int8 estimate {int8:.3g} s per step): "
                         "an exact-commit overlap gains nothing here")
    if acco < MIN_GAIN * int8:
        return "acco", f"ACCO overlaps the rounds with compute: {zero1 / acco:.2f}x ZeRO-1's step rate"
    return "acco_int8", (f"a round is longer than the half of a step it hides behind; the int8 estimate shortens one: "
                         f"{zero1 / int8:.2f}x ZeRO-1's step rate (plain ACCO {zero1 / acco:.2f}x)")


def read_metrics(path: Path, skip: int = 2) -> dict[str, float]:
    """Medians of C, M (and the estimate round) per step from JSON lines of ACCO step metrics.

    Lines without ``compute_s`` (evaluation rows, ZeRO-1 runs) and the first ``skip`` steps (warm-up)
    are left out. Also returns the world size and micro-batches per rank per step the lines show, and
    tokens per rank per step where the lines carry cumulative ``tokens``.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("compute_s") is not None and r.get("commit_round_s") is not None]
    if not rows:
        raise ValueError(f"{path}: no line with compute_s and commit_round_s (metrics of a run with acco.enabled)")
    kept = rows[skip:] or rows
    out = {"compute_s": statistics.median(r["compute_s"] for r in kept),
           "round_s": statistics.median(r["commit_round_s"] for r in kept)}
    estimates = [r["estimate_round_s"] for r in kept if r.get("estimate_round_s") is not None]
    if estimates:
        out["estimate_round_s"] = statistics.median(estimates)
    per_rank = kept[-1].get("micro_batches_per_rank")
    if per_rank:
        out["world_size"] = len(per_rank)
        out["ga"] = statistics.median(statistics.mean(r["micro_batches_per_rank"]) for r in kept)
    tokens = [r["tokens"] for r in rows if r.get("tokens") is not None]
    if len(tokens) >= 2 and per_rank:
        out["tokens_per_rank_per_step"] = (tokens[-1] - tokens[0]) / (len(tokens) - 1) / len(per_rank)
    return out


def _fmt_s(x: float) -> str:
    return f"{x:.3g}"


def report(timing: Timing, world_size: int, tokens_per_rank_per_step: float, header: list[str],
           memory: dict[str, dict[str, float]] | None = None, gpu_mem_gb: float | None = None) -> str:
    """The printed plan: C, M, M/C, a row per method (with its memory per rank when ``memory`` is given, and
    whether it fits ``gpu_mem_gb``) and the recommendation."""
    per_micro = tokens_per_rank_per_step / timing.micro_batches
    preds = predict(timing)
    zero1 = preds[0]
    f_est, f_commit = timing.halves()
    lines = header + [
        f"C   compute per step      {_fmt_s(timing.compute_s)} s",
        f"M   one round             {_fmt_s(timing.round_s)} s   (int8 estimate round: "
        f"{_fmt_s(timing.estimate_round_s)} s)",
        f"M/C                       {timing.round_s / timing.compute_s:.2f}   (ACCO hides both rounds below "
        f"{min(f_est, f_commit):.2f}, the commit round below {f_est:.2f})",
        "",
        f"{'method':<24}{'step (s)':>10}{'tokens/s':>14}{'vs ZeRO-1':>11}" + (f"{'GB/rank':>10}" if memory else ""),
    ]
    for p in preds:
        tps = p.tokens_per_s(world_size, per_micro)
        ratio = tps / zero1.tokens_per_s(world_size, per_micro)
        note = "  (more tokens per step)" if p.micro_batches_per_step > timing.micro_batches + 1e-9 else ""
        gb = ""
        if memory:
            total = sum(memory[p.method].values()) / 1e9
            gb = f"{total:>10.1f}" + ("" if gpu_mem_gb is None else "" if total <= gpu_mem_gb else "  does not fit")
        lines.append(f"{LABELS[p.method]:<24}{p.step_s:>10.3g}{tps:>14,.0f}{ratio:>10.2f}x{gb}{note}")
    if memory:
        lines += ["", "memory per rank (parameters, gradients or accumulation buffers, optimizer shard, shadow; "
                  "activations not included" + (f"; fits {gpu_mem_gb:g} GB?" if gpu_mem_gb else "") + "):"]
        for method in ("zero1", "acco", "acco_int8"):
            parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in memory[method].items())
            lines.append(f"  {LABELS[method]}: {sum(memory[method].values()) / 1e9:.2f} GB = {parts}")
    method, why = recommend(preds)
    lines += ["", f"use: {LABELS[method]}: {why}."]
    lossy = next(p for p in preds if p.method == "acco_int8_commit")
    chosen = next(p for p in preds if p.method == method)
    if lossy.step_s * MIN_GAIN <= chosen.step_s:
        lines.append(f"opt-in: acco.commit_compression='int8' is predicted {zero1.step_s / lossy.step_s:.2f}x ZeRO-1's "
                     "step rate; its commit is no longer exact (error feedback), so check its loss on your model "
                     "first (docs/how-it-works.md#the-compressed-commit).")
    if memory and gpu_mem_gb is not None and sum(memory[method].values()) / 1e9 > gpu_mem_gb:
        parts = memory[method]
        bf16 = sum(parts.values()) - parts.get("accumulation buffers", 0.0) / 2
        lines.append(f"memory: it needs {sum(parts.values()) / 1e9:.1f} GB per rank, more than {gpu_mem_gb:g} GB"
                     + (f"; acco.grad_accum_dtype bf16 needs {bf16 / 1e9:.1f} GB" if "accumulation buffers" in parts
                        else "") + ".")
    lines.append("These are predictions from the model in deepspeed_acco/plan.py, not measurements; check them "
                 "with benchmarks/run.py on two of your nodes.")
    return "\n".join(lines)


# Typical clusters for the docs table: (GPUs, GPUs per node, Gbit/s per node, parameters). The global batch
# grows with the model as in the GPT-3 paper's table (0.5M tokens at 125M parameters, 1M at 1.3B, 2M at
# 6.7B); each rank computes its share. Achieved FLOP/s: 3e14 per GPU (an H100 at about a third of its
# bf16 peak).
TABLE_CLUSTERS = [(8, 1, 10, 125e6), (8, 8, 10, 125e6), (16, 8, 25, 1.3e9), (16, 2, 25, 1.3e9),
                  (32, 8, 100, 1.3e9), (64, 8, 100, 1.3e9), (32, 8, 100, 7e9), (64, 8, 100, 7e9),
                  (64, 8, 400, 7e9), (64, 8, 400, 1.3e9)]
TABLE_BATCH_TOKENS = {125e6: 2**19, 1.3e9: 2**20, 7e9: 2**21}
TABLE_FLOPS = 3e14


def table() -> str:
    """A Markdown table of predictions for a few typical clusters (the docs' "When it helps")."""
    rows = ["| GPUs (per node) | link Gbit/s | parameters | tokens per rank per step | C (s) | M (s) | M/C "
            "| ACCO | ACCO int8 | use |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for gpus, per_node, gbit, params in TABLE_CLUSTERS:
        tokens = TABLE_BATCH_TOKENS[params] // gpus
        timing = timing_from_cluster(Cluster(params, gpus, per_node, gbit, tokens, TABLE_FLOPS))
        preds = {p.method: p for p in predict(timing)}
        z = preds["zero1"].step_s
        ratio = f"{timing.round_s / timing.compute_s:.2f}" if timing.round_s else "0 (one node)"
        rows.append(f"| {gpus} ({per_node}) | {gbit:g} | {params / 1e9:g}B | {tokens:,} | {timing.compute_s:.2f} | "
                    f"{timing.round_s:.2f} | {ratio} | {z / preds['acco'].step_s:.2f}x | "
                    f"{z / preds['acco_int8'].step_s:.2f}x | {LABELS[recommend(list(preds.values()))[0]]} |")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepspeed_acco.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, help="trainable parameters, e.g. 1.3e9")
    p.add_argument("--world_size", type=int, help="data-parallel ranks (GPUs)")
    p.add_argument("--ranks_per_node", type=int, default=8, help="ranks sharing a node's link (default 8)")
    p.add_argument("--link_gbit", type=float, help="each node's link, Gbit/s")
    p.add_argument("--tokens_per_rank_per_step", type=int, help="micro-batch x seq len x accumulation steps")
    p.add_argument("--flops", type=float, help="achieved FLOP/s per rank on this model, e.g. 3e14")
    p.add_argument("--ga", type=int, help="gradient_accumulation_steps (default 8, or what --metrics shows)")
    p.add_argument("--estimate_fraction", type=float, default=0.75,
                   help="acco.estimate_fraction: the estimate half's share of a step (default 0.75; 0.5: equal halves)")
    p.add_argument("--comm_bytes", type=int, default=2, choices=(2, 4), help="bytes per value sent (default 2)")
    p.add_argument("--link_efficiency", type=float, default=0.8, help="share of the link reached (default 0.8)")
    p.add_argument("--param_bytes", type=int, default=2, choices=(2, 4),
                   help="bytes per parameter value: 2 (bf16/fp16), 4 (fp32) (default 2)")
    p.add_argument("--grad_accum_dtype", choices=("fp32", "bf16"), default="fp32", help="acco.grad_accum_dtype")
    p.add_argument("--gpu_mem_gb", type=float, default=None, help="say whether each method's memory per rank fits")
    p.add_argument("--quantize_gbs", type=float, default=400.0,
                   help="fp32 GB of parameters per second of the fused int8 kernels (default 400, a GPU; the CPU "
                   "bed: about 1.5); with --params it adds to the int8 estimate round")
    p.add_argument("--compute_s", type=float, help="measured C: compute per step, seconds")
    p.add_argument("--round_s", type=float, help="measured M: one full-precision round, seconds")
    p.add_argument("--estimate_round_s", type=float, help="measured int8 estimate round (default: M scaled by bytes)")
    p.add_argument("--metrics", type=Path, help="metrics.jsonl of a short ACCO run (examples/train_lm.py): "
                   "C, M, world size and tokens from it; flags given too take precedence")
    p.add_argument("--table", action="store_true", help="print the docs' table of typical clusters")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: print the plan (or ``--table``). Exit 2 on missing inputs."""
    parser = _parser()
    a = parser.parse_args(argv)
    if a.table:
        print(table())
        return 0
    if a.metrics is not None:
        try:
            found = read_metrics(a.metrics)
        except (OSError, ValueError) as err:
            parser.error(f"--metrics: {err}")
        for key, value in found.items():
            if key == "estimate_round_s":
                continue  # an uncompressed run's estimate round is a full round: scaled by bytes below
            if getattr(a, key) is None:
                setattr(a, key, int(round(value)) if key in ("world_size", "ga", "tokens_per_rank_per_step")
                        else value)
    a.ga = a.ga or 8
    if not 0.0 < a.estimate_fraction < 1.0:
        parser.error(f"--estimate_fraction must be between 0 and 1 (exclusive), got {a.estimate_fraction}")
    missing = [k for k in ("world_size", "tokens_per_rank_per_step") if getattr(a, k) is None]
    measured = a.compute_s is not None or a.round_s is not None
    if measured:
        missing += [k for k in ("compute_s", "round_s") if getattr(a, k) is None]
    else:
        missing += [k for k in ("params", "link_gbit", "flops") if getattr(a, k) is None]
    if missing:
        parser.error("missing " + ", ".join(f"--{k}" for k in missing) + " (give --params, --link_gbit and --flops "
                     "to estimate C and M, or --compute_s and --round_s measured in a short run)")
    if measured:
        est = a.estimate_round_s
        if est is None:
            est = a.round_s * int8_estimate_fraction(a.world_size, a.ranks_per_node, a.comm_bytes)
            est += quantize_s(a.params, a.quantize_gbs) if a.params else 0.0
        timing = Timing(a.compute_s, a.round_s, est, a.ga, estimate_fraction=a.estimate_fraction)
        header = [f"measured: C {a.compute_s:g} s, M {a.round_s:g} s; {a.world_size} ranks, "
                  f"{a.tokens_per_rank_per_step:,} tokens per rank per step"]
    else:
        cluster = Cluster(a.params, a.world_size, a.ranks_per_node, a.link_gbit, a.tokens_per_rank_per_step, a.flops,
                          a.comm_bytes, a.link_efficiency, quantize_gbs=a.quantize_gbs)
        timing = dataclasses.replace(timing_from_cluster(cluster, a.ga), estimate_fraction=a.estimate_fraction)
        nodes = math.ceil(a.world_size / a.ranks_per_node)
        header = [f"estimated: {a.params:.3g} parameters, {a.world_size} ranks ({nodes} nodes x {a.ranks_per_node}), "
                  f"{a.link_gbit:g} Gbit/s per node at {a.link_efficiency:.0%}, "
                  f"{a.tokens_per_rank_per_step:,} tokens per rank per step, {a.flops:.3g} FLOP/s per rank"]
        if a.world_size <= a.ranks_per_node:
            header.append("all ranks on one node: the round never crosses a node link, ZeRO-1 is enough")
    memory = None
    if a.params:
        accum = 4 if a.grad_accum_dtype == "fp32" else 2
        memory = {m: memory_per_rank(m, a.params, a.world_size, a.param_bytes, accum, ranks_per_node=a.ranks_per_node)
                  for m in METHODS}
    print(report(timing, a.world_size, a.tokens_per_rank_per_step, header, memory, a.gpu_mem_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
