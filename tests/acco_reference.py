"""Single-process reference for the ACCO, DPU and ZeRO-1 (sync) training schedules.

This module is an independent, pure-PyTorch statement of the schedules described in
``docs/acco-algorithm.md`` (ACCO, arXiv 2406.02613). It simulates ``N`` data-parallel ranks
in one process, without ``torch.distributed`` and without DeepSpeed, so that the distributed
implementation can be checked against it to fp32 rounding.

Conventions shared by every mode:

* The optimizer is ``torch.optim.AdamW`` on a full fp32 copy of the parameters (sharding Adam
  is elementwise, so the full-vector optimizer is the reference for the sharded one).
* Every micro-batch gradient is ``torch.autograd.grad(loss_fn(m(x), y), params)`` evaluated at
  the parameters the schedule says the ranks hold at that moment (all ranks hold the same).
* Gradients are accumulated in fp32 as sums; a round's gradient is the sum over ranks and
  micro-batches divided by the global number of micro-batches in it.
* Optional clipping by global L2 norm uses DeepSpeed ZeRO's formula: with
  ``clip = (norm + 1e-6) / max_grad_norm``, the gradient is scaled by ``1 / clip`` when
  ``clip > 1``. It applies to every optimizer step, ACCO estimates included.
* Every round that belongs to committed step ``t`` uses the learning rate ``lr(t)``.

Schedules (``T = num_steps``, ``GA = gradient_accumulation_steps``):

* ``sync``: plain ZeRO-1 with gradient accumulation. Per step each rank computes ``GA``
  micro-batches at ``theta_t`` and ``theta_{t+1} = Opt(theta_t, G_t / (N * GA))``.
* ``acco``: ``k~ + k = GA`` micro-batches per rank, ``k~`` of the estimate half
  (``estimate_micro_batches``, default ``GA // 2``, the paper's equal halves) and ``k`` of the
  commit half. Step ``t`` has an estimate round (round ``2t``) and a commit round (round
  ``2t + 1``). ``G~_t`` is computed at ``theta~_t`` (``theta~_0 = theta_0``),
  ``theta~_{t+1} = Opt(theta_t, G~_t / c~)`` after which master weights and optimizer state
  are restored exactly; ``G_t`` is computed at ``theta_t`` and
  ``theta_{t+1} = Opt(theta_t, (G~_t + G_t) / (c~ + c))``. Each rank consumes its
  micro-batches in the order ``G~_0, G_0, G~_1, G_1, ...``; nothing is consumed after the
  last commit.
* ``dpu``: one round per step (round ``t``), ``GA`` micro-batches per round, round ``t``'s
  gradients computed at ``theta_{t-1}`` (``theta_{-1} = theta_0``):
  ``theta_{t+1} = Opt(theta_t, G(theta_{t-1}))``.

With ``counts`` (adaptive accumulation), rank ``rank`` contributes ``counts[r][rank]``
micro-batches to round ``r`` and the divisor of a round is ``sum(counts[r])`` (for an ACCO
commit, ``sum(counts[2t]) + sum(counts[2t + 1])``).

Caller-forced boundaries (short steps) are given per step with ``step_rounds``: a short step
has fewer micro-batches; an ACCO step that the caller ends inside its estimate half has a single
round, which commits the micro-batches of that half (computed at ``theta~_t``) with no estimate,
and the next step computes its first half at ``theta_{t+1}``, as at the start of training.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal

import torch

__all__ = ["ESTIMATES", "Mode", "Simulator", "estimate_gradient", "int8_roundtrip", "reference_train",
           "rounds_per_step"]

Mode = Literal["sync", "acco", "dpu"]

_CLIP_EPS = 1e-6


def rounds_per_step(mode: Mode) -> int:
    """Return the number of communication rounds per committed optimizer step.

    ACCO runs an estimate round and a commit round per step (2); DPU and sync run one.
    """
    if mode == "acco":
        return 2
    if mode in ("sync", "dpu"):
        return 1
    raise ValueError(f"unknown mode {mode!r}")


class Simulator:
    """State of the simulated data-parallel job: the model, the master weights, AdamW."""

    def __init__(
        self,
        model: torch.nn.Module,
        batches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lr: float | Callable[[int], float],
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        max_grad_norm: float,
    ) -> None:
        self.work = copy.deepcopy(model).float()
        named = list(self.work.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.master = [p.detach().clone().float() for p in self.params]
        self.lr = lr
        self.opt = torch.optim.AdamW(
            self.master,
            lr=self._lr_at(0),
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        self.loss_fn = loss_fn
        self.max_grad_norm = max_grad_norm
        self.num_ranks = len(batches)
        self.iters: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] = [
            iter(rank_batches) for rank_batches in batches
        ]
        self.consumed = [0] * self.num_ranks
        self._losses: list[float] = []

    def _lr_at(self, step: int) -> float:
        """Learning rate of committed step ``step``."""
        return float(self.lr(step)) if callable(self.lr) else float(self.lr)

    def snapshot_params(self) -> list[torch.Tensor]:
        """Return a copy of the current master weights."""
        return [m.detach().clone() for m in self.master]

    def _micro_grad(
        self, at: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> list[torch.Tensor]:
        """Gradient of one micro-batch's loss at parameters ``at`` (fp32, zeros if unused)."""
        with torch.no_grad():
            for p, value in zip(self.params, at, strict=True):
                p.copy_(value)
        loss = self.loss_fn(self.work(x), y)
        self._losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [
            torch.zeros_like(p, dtype=torch.float32)
            if g is None
            else g.detach().float()
            for p, g in zip(self.params, grads, strict=True)
        ]

    def accumulate(
        self, at: list[torch.Tensor], per_rank: list[int]
    ) -> tuple[list[torch.Tensor], int]:
        """Sum the gradients of ``per_rank[rank]`` next micro-batches of every rank at ``at``.

        Returns the fp32 sums and the global number of micro-batches summed.
        """
        sums = [torch.zeros_like(m, dtype=torch.float32) for m in self.master]
        for rank, n in enumerate(per_rank):
            for _ in range(n):
                try:
                    x, y = next(self.iters[rank])
                except StopIteration:
                    raise ValueError(
                        f"rank {rank} ran out of micro-batches after {self.consumed[rank]}"
                    ) from None
                self.consumed[rank] += 1
                for s, g in zip(sums, self._micro_grad(at, x, y), strict=True):
                    s.add_(g)
        return sums, sum(per_rank)

    def accumulate_each(
        self, at: list[torch.Tensor], per_rank: list[int]
    ) -> list[torch.Tensor]:
        """Like ``accumulate``, but every rank's sum kept apart, each as one flat fp32 vector."""
        out = []
        for rank, n in enumerate(per_rank):
            sums, _ = self.accumulate(at, [n if r == rank else 0 for r in range(self.num_ranks)])
            out.append(torch.cat([x.reshape(-1) for x in sums]))
        return out

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter tensors (master shapes) from a flat vector in parameter order (padding ignored)."""
        sizes = [m.numel() for m in self.master]
        return [piece.view_as(m).clone() for piece, m in zip(torch.split(flat[:sum(sizes)], sizes), self.master)]

    def load_flat_state(self, state: dict[str, Any]) -> None:
        """Set the master weights and AdamW's moments and step count from flat vectors (parameter order)."""
        sizes = [m.numel() for m in self.master]
        pieces = {k: torch.split(state[k].float(), sizes) for k in ("flat", "exp_avg", "exp_avg_sq")}
        with torch.no_grad():
            for i, m in enumerate(self.master):
                m.copy_(pieces["flat"][i].view_as(m))
                self.opt.state[m] = {"step": torch.tensor(float(state["step"])),
                                     "exp_avg": pieces["exp_avg"][i].view_as(m).clone(),
                                     "exp_avg_sq": pieces["exp_avg_sq"][i].view_as(m).clone()}

    def last_losses_mean(self) -> float:
        """Mean micro-batch loss since the previous call (nan if none)."""
        losses, self._losses = self._losses, []
        return sum(losses) / len(losses) if losses else float("nan")

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Clip by global L2 norm with DeepSpeed ZeRO's formula."""
        if self.max_grad_norm <= 0.0:
            return grads
        norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        clip = (float(norm) + _CLIP_EPS) / self.max_grad_norm
        if clip > 1.0:
            return [g * (1.0 / clip) for g in grads]
        return grads

    def step(self, sums: list[torch.Tensor], count: int, step_index: int, lr_factor: float = 1.0) -> None:
        """One AdamW step on the master weights with gradient ``sums / count`` at ``lr(step) * lr_factor``."""
        if count <= 0:
            raise ValueError("a round needs at least one micro-batch")
        grads = self._clip([s / count for s in sums])
        for m, g in zip(self.master, grads, strict=True):
            m.grad = g.clone()
        lr_t = self._lr_at(step_index) * lr_factor
        for group in self.opt.param_groups:
            group["lr"] = lr_t
        self.opt.step()
        for m in self.master:
            m.grad = None

    def tentative_step(
        self, sums: list[torch.Tensor], count: int, step_index: int, lr_factor: float = 1.0
    ) -> list[torch.Tensor]:
        """An ACCO estimate: step, read the result, restore weights and AdamW state exactly."""
        saved_master = self.snapshot_params()
        saved_state: dict[torch.Tensor, dict[str, Any]] = {
            p: {
                k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                for k, v in s.items()
            }
            for p, s in self.opt.state.items()
        }
        self.step(sums, count, step_index, lr_factor)
        estimate = self.snapshot_params()
        with torch.no_grad():
            for m, saved in zip(self.master, saved_master, strict=True):
                m.copy_(saved)
        self.opt.state = defaultdict(dict, saved_state)
        return estimate

    def result(self) -> dict[str, torch.Tensor]:
        """The committed parameters, name -> fp32 tensor."""
        return {
            name: m.detach().clone()
            for name, m in zip(self.names, self.master, strict=True)
        }


def int8_roundtrip(x: torch.Tensor, block: int) -> torch.Tensor:
    """deQ(Q(x)) of the compressed estimate (acco-algorithm.md): per block of ``block`` elements from
    the start of ``x``, scale = max|x| / 127, q = round(x / scale) in [-127, 127], deQ = q * scale; a
    zero block stays zero; a block with a NaN or Inf dequantizes to NaN."""
    out = torch.empty_like(x, dtype=torch.float32)
    for start in range(0, x.numel(), block):
        piece = x[start:start + block].float()
        if not bool(torch.isfinite(piece).all()):
            out[start:start + block] = float("nan")
            continue
        scale = float(piece.abs().max()) / 127.0
        if scale == 0.0:
            out[start:start + block] = 0.0
            continue
        out[start:start + block] = torch.clamp(torch.round(piece / scale), -127, 127) * scale
    return out


def _padded(flat: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """DeepSpeed ZeRO's flat layout: parameters in order, zero-padded to a multiple of 2 * world size."""
    align = 2 * num_ranks
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % align))


def _chunkwise(flat: torch.Tensor, num_ranks: int, block: int) -> torch.Tensor:
    """``int8_roundtrip`` of each rank's chunk of a padded flat vector, blocks counted from the chunk's start."""
    return torch.cat([int8_roundtrip(c, block) for c in flat.chunk(num_ranks)])


def _bias_corrected_momentum(sim: Simulator) -> list[torch.Tensor] | None:
    """AdamW's first moment, bias-corrected (an estimate of the averaged gradient); None before step 1."""
    beta1 = sim.opt.param_groups[0]["betas"][0]
    out = []
    for m in sim.master:
        state = sim.opt.state.get(m)
        if not state:
            return None
        step = float(state["step"])
        out.append(state["exp_avg"] / (1.0 - beta1 ** step))
    return out


def _estimate_paper(sim: Simulator, sums: list[torch.Tensor], count: int, step: int) -> tuple[list[torch.Tensor], int]:
    return sums, count


def _estimate_momentum_half(sim: Simulator, sums: list[torch.Tensor], count: int,
                            step: int) -> tuple[list[torch.Tensor], int]:
    """The unseen half of the batch predicted by the momentum: 0.5 * clip(G~ mean) + 0.5 * m_hat."""
    momentum = _bias_corrected_momentum(sim)
    if momentum is None:
        return sums, count
    half = sim._clip([s / count for s in sums])
    return [(0.5 * h + 0.5 * m) * count for h, m in zip(half, momentum, strict=True)], count


def _estimate_momentum(sim: Simulator, sums: list[torch.Tensor], count: int,
                       step: int) -> tuple[list[torch.Tensor], int]:
    """No gradient: the next step's gradient predicted by the bias-corrected momentum alone."""
    momentum = _bias_corrected_momentum(sim)
    if momentum is None:
        return sums, count
    return [m * count for m in momentum], count


ESTIMATES: dict[str, Callable[..., tuple[list[torch.Tensor], int]]] = {
    "paper": _estimate_paper,
    "momentum_half": _estimate_momentum_half,
    "momentum": _estimate_momentum,
}
"""How the estimate round forms its gradient from G~_t (sum, count); see ``estimate_gradient``."""


def estimate_gradient(name: str, sim: Simulator, sums: list[torch.Tensor], count: int,
                      step: int) -> tuple[list[torch.Tensor], int]:
    """The (sums, count) the estimate round of committed step ``step`` steps with, under rule ``name``."""
    return ESTIMATES[name](sim, sums, count, step)


def _check_counts(
    counts: list[list[int]] | None, num_rounds: int, num_ranks: int
) -> None:
    """Validate the shape and values of an adaptive ``counts`` table."""
    if counts is None:
        return
    if len(counts) != num_rounds:
        raise ValueError(f"counts has {len(counts)} rounds, expected {num_rounds}")
    for r, row in enumerate(counts):
        if len(row) != num_ranks:
            raise ValueError(f"counts[{r}] has {len(row)} ranks, expected {num_ranks}")
        if any(c < 0 for c in row):
            raise ValueError(f"counts[{r}] has a negative entry")


def _check_step_rounds(
    step_rounds: list[list[list[int]]], mode: Mode, num_steps: int, num_ranks: int
) -> None:
    """Validate ``step_rounds``: one entry per step, 1 or 2 rounds (2 only in acco), counts per rank."""
    if len(step_rounds) != num_steps:
        raise ValueError(f"step_rounds has {len(step_rounds)} steps, expected {num_steps}")
    for t, rounds in enumerate(step_rounds):
        if not 1 <= len(rounds) <= rounds_per_step(mode):
            raise ValueError(f"step {t} has {len(rounds)} rounds; {mode} allows 1..{rounds_per_step(mode)}")
        _check_counts(rounds, len(rounds), num_ranks)
        if sum(sum(r) for r in rounds) < 1:
            raise ValueError(f"step {t} has no micro-batch")


def reference_train(
    model: torch.nn.Module,
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    mode: Mode,
    num_steps: int,
    gradient_accumulation_steps: int,
    lr: float | Callable[[int], float],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    counts: list[list[int]] | None = None,
    step_rounds: list[list[list[int]]] | None = None,
    initial_state: dict[str, Any] | None = None,
    estimate_compression: Literal["none", "int8"] = "none",
    block: int = 256,
    ranks_per_node: int = 1,
    compressed_steps: Collection[int] | None = None,
    restart_after: Collection[int] = (),
    lr_scaling: Literal["none", "sqrt"] = "none",
    lr_factors: list[float] | None = None,
    estimate_shift: tuple[float, float] = (1.0, 0.0),
    estimate_micro_batches: int | None = None,
    sync_steps: int = 0,
    commit_compression: Literal["none", "int8"] = "none",
    held_out: list[list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Simulate ``len(batches)`` data-parallel ranks and return the committed parameters.

    Args:
        model: fp32 model whose parameters are ``theta_0``. It is deep-copied, never mutated.
        batches: ``batches[rank][i] = (x, y)``, micro-batch ``i`` of that rank, consumed in
            order.
        loss_fn: ``loss_fn(model(x), y)`` gives the scalar mean loss of one micro-batch.
        mode: ``"sync"`` (ZeRO-1), ``"acco"`` or ``"dpu"``.
        num_steps: number ``T`` of committed optimizer steps.
        gradient_accumulation_steps: ``GA``. sync: ``GA`` micro-batches per rank per step;
            acco: ``estimate_micro_batches`` for the estimate round, the rest for the commit round;
            dpu: ``GA`` per round.
        lr: constant learning rate, or ``lr(t)``, the learning rate of every round of
            committed step ``t``.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW (decoupled) weight decay.
        max_grad_norm: global-norm clipping threshold; ``0`` disables clipping.
        counts: adaptive accumulation, ``counts[r][rank]`` micro-batches contributed by
            ``rank`` to round ``r`` (acco rounds are ``E0, C0, E1, C1, ...``); overrides
            ``k`` / ``GA``.
        step_rounds: the rounds of every committed step, each a list of per-rank micro-batch
            counts; overrides ``counts``. acco: ``[estimate, commit]``, or ``[commit]`` alone
            for a step that the caller ended inside its estimate half (it commits those
            micro-batches, computed at theta~_t, and the next step starts again from
            theta_{t+1}, as at the start of training); dpu and sync: ``[round]``. A short step
            (caller-forced boundary) is a step with fewer micro-batches.
        initial_state: start from a saved run instead of ``model``'s weights and a fresh AdamW:
            ``{"flat": fp32 parameters, "exp_avg": ..., "exp_avg_sq": ...}`` (flat vectors in
            ``model.named_parameters()`` order) and ``"step"`` (AdamW steps taken). The learning
            rate stays indexed by the steps of this call.
        estimate_compression: ``"int8"``: the compressed estimate round with an exact commit
            (acco-algorithm.md): each rank's estimate gradient is quantized chunk by chunk (the
            chunk each rank owns in ZeRO's padded flat layout), the owners sum the dequantized
            chunks, each rank's quantization residual joins its commit-half gradients, and
            theta~ = theta_t + deQ(Q(Opt(theta_t, S~) - theta_t)) per chunk. One parameter group.
        block: elements per quantization block.
        ranks_per_node: ``g``; with ``estimate_compression="int8"`` and ``g > 1`` the node-aware round
            (acco-algorithm.md, "Node-aware compressed rounds"): ranks ``n g .. n g + g - 1`` form node ``n``;
            each node's estimate gradients are summed exactly, that node sum is what is quantized chunk by
            chunk (blocks counted from each chunk's start, as in the flat round), and each node's residual
            (node sum minus its quantized value) joins the commit. The update's quantization is unchanged.
        compressed_steps: with ``estimate_compression="int8"``, the steps (0-based) whose estimate round is
            compressed; None: every step. The automatic schedule switches compression between steps.
        restart_after: steps (0-based) after which the pipeline restarts from the committed weights: the next
            step's first half is computed at theta_{t+1}, not at the estimate (the automatic schedule's switches;
            with ``step_rounds`` for each step's halves, ``[GA]`` alone for ZeRO-1's synchronous step).
        lr_scaling: ``"sqrt"`` (acco, adaptive accumulation): a round of ``c`` micro-batches over
            all ranks, summing ``h`` halves of a step (2 for a commit with its estimate half, else 1),
            runs at ``lr(t) * sqrt(c / (N * n))``, ``n`` the nominal micro-batches per rank of the halves it
            sums (``k~`` for an estimate round or a commit of an estimate half alone, ``GA`` for a commit
            with its estimate half): a batch kappa times the nominal one gets sqrt(kappa) times the LR.
        lr_factors: if given, a list the factor of every round is appended to (in round order).
        estimate_shift: ``(s, k)``: the estimate is theta_t + s (Opt(theta_t, G~_t) - theta_t)
            + k (theta~_t - theta_t), theta~_t being where G~_t was computed (theta_t itself at the start
            and after a restart); ``(1, 0)`` is the paper's estimate, ``acco.estimate="extrapolated"``
            is ``(1.1, 0.2)``. Compressed: the quantized update is this whole shift.
        estimate_micro_batches: acco: ``k~``, the estimate half's micro-batches per rank (``1 .. GA - 1``);
            ``None``: ``GA // 2`` (``GA`` must then be even). ``acco.estimate_fraction=0.75`` with ``GA = 4``
            is 3.
        sync_steps: acco: the first ``sync_steps`` steps are ZeRO-1's: one round of ``GA`` micro-batches per rank
            at theta_t (nominal count ``GA`` for ``lr_scaling``); the pipeline then starts from the committed
            weights as at the start of training.
        commit_compression: ``"int8"``: the compressed commit with error feedback (acco-algorithm.md): every
            rank (every node's exact sum where ``ranks_per_node > 1``) quantizes, chunk by chunk, its commit
            gradients plus the estimate's residual plus its own commit residual c from the step before; the owners
            sum the dequantized chunks (and the estimate's sums); c becomes what this quantization lost (dropped
            when the step's sum is non-finite). The ranks then hold theta_{t+1} = theta_t + deQ(Q(master_{t+1} -
            theta_t)) per chunk, theta_t being the weights they held (not the fp32 master), and compute there;
            an estimate is rebuilt from them too. The returned parameters are the fp32 master.
        held_out: with ``commit_compression``, a list the weights the ranks hold after each step are appended to
            (flat, padded), to compare with the master.

    Returns:
        ``theta_T`` as ``name -> fp32 tensor`` in ``model.named_parameters()`` order.
    """
    if mode not in ("sync", "acco", "dpu"):
        raise ValueError(f"unknown mode {mode!r}")
    if lr_scaling != "none" and mode != "acco":
        raise ValueError("lr_scaling applies to acco's adaptive accumulation only")
    if num_steps < 0:
        raise ValueError("num_steps must be >= 0")
    num_ranks = len(batches)
    if num_ranks < 1:
        raise ValueError("need at least one rank")
    ga = gradient_accumulation_steps
    if counts is None and step_rounds is None:
        if ga < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if mode == "acco" and estimate_micro_batches is None and ga % 2 != 0:
            raise ValueError("acco with equal halves needs an even gradient_accumulation_steps")
        if mode == "acco" and estimate_micro_batches is not None and not 1 <= estimate_micro_batches < ga:
            raise ValueError("estimate_micro_batches must be in 1 .. gradient_accumulation_steps - 1")
    if sync_steps and mode != "acco":
        raise ValueError("sync_steps applies to acco only")
    if ranks_per_node < 1 or num_ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must divide the {num_ranks} ranks into equal nodes")
    if step_rounds is None and sync_steps == 0:
        _check_counts(counts, rounds_per_step(mode) * num_steps, num_ranks)

    k_est = (estimate_micro_batches or ga // 2) if mode == "acco" else ga
    per_round = [k_est, ga - k_est] if mode == "acco" else [ga]
    if step_rounds is None:
        per_step = rounds_per_step(mode)
        step_rounds = [
            [list(counts[per_step * t + r]) if counts is not None else [per_round[r]] * num_ranks
             for r in range(per_step)]
            for t in range(num_steps - min(sync_steps, num_steps))
        ]
        step_rounds = [[[ga] * num_ranks]] * min(sync_steps, num_steps) + step_rounds
    _check_step_rounds(step_rounds, mode, num_steps, num_ranks)

    sim = Simulator(
        model, batches, loss_fn, lr, betas, eps, weight_decay, max_grad_norm
    )
    if initial_state is not None:
        sim.load_flat_state(initial_state)

    # Where the first (or only) round of the next step computes its gradients: theta_0 at the
    # start; then theta~_{t+1} (acco), theta_t (dpu: one step stale) or theta_{t+1} (sync, and
    # acco after a step the caller ended inside its estimate half: the pipeline restarts there).
    def factor(count: int, nominal_per_rank: int) -> float:
        if lr_scaling == "none":
            f = 1.0
        else:
            f = (count / (num_ranks * nominal_per_rank)) ** 0.5
        if lr_factors is not None:
            lr_factors.append(f)
        return f

    cc = commit_compression == "int8"
    units = num_ranks // ranks_per_node  # who quantizes a commit: each rank, or each node's exact sum
    held = _padded(torch.cat([m.detach().reshape(-1) for m in sim.master]), num_ranks)  # what the ranks hold
    carry = [torch.zeros_like(held) for _ in range(units)]  # c^u, each quantizer's commit residual

    def committed() -> list[torch.Tensor]:
        """theta_t as the ranks hold it: the fp32 master, or with a compressed commit what the int8 updates built."""
        return sim.unflatten(held) if cc else sim.snapshot_params()

    def commit(grads_each: list[torch.Tensor] | None, exact: list[torch.Tensor], count: int, t: int,
               lr_factor: float) -> None:
        """Commit round: ``exact`` sums go in as they are (uncompressed: everything); with a compressed commit each
        unit's flat ``grads_each[u]`` (a rank's, or a node's sum) is quantized with its residual carried, then the
        ranks rebuild theta_{t+1} from what they held."""
        nonlocal held
        if not cc:
            sim.step(exact, count, t, lr_factor)
            return
        assert grads_each is not None
        per_unit = [x + c for x, c in zip(grads_each, carry, strict=True)]
        quantized = [_chunkwise(x, num_ranks, block) for x in per_unit]
        total = sum(quantized)
        finite = bool(torch.isfinite(total).all())
        for u in range(units):
            carry[u] = per_unit[u] - quantized[u] if finite else torch.zeros_like(held)
        sums = [a + b for a, b in zip(exact, sim.unflatten(total), strict=True)]
        sim.step(sums, count, t, lr_factor)
        master = _padded(torch.cat([m.detach().reshape(-1) for m in sim.master]), num_ranks)
        held = held + _chunkwise(master - held, num_ranks, block)
        if held_out is not None:
            held_out.append(held.clone())

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros_like(m) for m in sim.master]

    def gradients(at: list[torch.Tensor], per_rank: list[int]) -> tuple[list[torch.Tensor] | None,
                                                                       list[torch.Tensor], int]:
        """A round's gradients: for a compressed commit per rank, or per node's exact sum (flat, padded), else
        their sum."""
        if cc:
            each = [_padded(x, num_ranks) for x in sim.accumulate_each(at, per_rank)]
            return [sum(each[u * ranks_per_node:(u + 1) * ranks_per_node]) for u in range(units)], zeros(), \
                sum(per_rank)
        sums, count = sim.accumulate(at, per_rank)
        return None, sums, count

    compute_at = committed()
    for t, rounds in enumerate(step_rounds):
        compressed = mode == "acco" and len(rounds) == 2 and estimate_compression == "int8" and \
            (compressed_steps is None or t in compressed_steps)
        est_residual: list[torch.Tensor] | None = None  # per rank (or node) of a compressed estimate
        if compressed:
            per_rank = [_padded(x, num_ranks) for x in sim.accumulate_each(compute_at, rounds[0])]
            if ranks_per_node > 1:  # what is quantized is each node's exact sum
                per_rank = [sum(per_rank[n:n + ranks_per_node]) for n in range(0, num_ranks, ranks_per_node)]
            quantized = [_chunkwise(x, num_ranks, block) for x in per_rank]
            est_residual = [x - q for x, q in zip(per_rank, quantized, strict=True)]
            first_sums, first_count = sim.unflatten(sum(quantized)), sum(rounds[0])
            first_each = None
        elif mode == "acco" and len(rounds) == 2:
            first_sums, first_count = sim.accumulate(compute_at, rounds[0])
            first_each = None
        else:  # the step's only round: the commit
            first_each, first_sums, first_count = gradients(compute_at, rounds[0])
        if mode == "acco" and len(rounds) == 2:
            # Estimate round: theta~_{t+1} = Opt(theta_t, G~_t), then exact rollback.
            # Meanwhile the compute side accumulates G_t at theta_t (as the ranks hold it).
            theta_t = sim.snapshot_params()
            theta_held = committed()
            theta_est = sim.tentative_step(first_sums, first_count, t, factor(first_count, k_est))
            if estimate_shift != (1.0, 0.0):
                scale, carry_k = estimate_shift  # not k: that name is the micro-batches per round
                theta_est = [x + scale * (e - x) + carry_k * (c - x)
                             for e, x, c in zip(theta_est, theta_t, compute_at, strict=True)]
            if compressed:
                flat_t = _padded(torch.cat([x.reshape(-1) for x in theta_t]), num_ranks)
                flat_held = _padded(torch.cat([x.reshape(-1) for x in theta_held]), num_ranks)
                update = _padded(torch.cat([x.reshape(-1) for x in theta_est]), num_ranks) - flat_t
                theta_est = sim.unflatten(flat_held + _chunkwise(update, num_ranks, block))
            each, sums, count = gradients(theta_held, rounds[1])
            if est_residual is not None:
                # The residuals join the commit: the commit sums exactly the gradients computed.
                if each is not None:  # each rank's (node's) residual joins its commit buffer, then is quantized
                    each = [x + r for x, r in zip(each, est_residual, strict=True)]
                else:
                    first_sums = [a + b for a, b in zip(first_sums, sim.unflatten(sum(est_residual)), strict=True)]
            # Commit round: theta_{t+1} = Opt(theta_t, (G~_t + G_t) / (c~ + c)); meanwhile the
            # compute side accumulates G~_{t+1} at theta~_{t+1}.
            total = [a + b for a, b in zip(first_sums, sums, strict=True)]
            commit(each, total, first_count + count, t, factor(first_count + count, ga))
            compute_at = theta_est
        elif mode == "dpu":
            compute_at = committed()  # theta_t, loaded at this boundary
            commit(first_each, first_sums, first_count, t, factor(first_count, ga))  # Opt(theta_t, G(theta_{t-1}))
        else:
            # sync; or acco's commit of an estimate half alone (no estimate round), then restart.
            commit(first_each, first_sums, first_count, t, factor(first_count, ga if t < sync_steps else k_est))
            compute_at = committed()
        if t in restart_after:
            compute_at = committed()
    return sim.result()
