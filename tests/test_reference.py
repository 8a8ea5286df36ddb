"""Self-checks of the single-process ACCO / DPU / sync reference (tests/acco_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

try:
    from tests.acco_reference import reference_train, rounds_per_step
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from acco_reference import reference_train, rounds_per_step

IN, HIDDEN, OUT = 8, 16, 4
MICRO = 3  # samples per micro-batch
LR = 1e-2
BETAS = (0.9, 0.999)
# Adam is invariant to a constant gradient scale up to eps: a large eps makes the tests
# sensitive to wrong divisors (micro-batch counts) as well as to wrong directions.
EPS = 0.1
WD = 0.01

Batches = list[list[tuple[torch.Tensor, torch.Tensor]]]
Params = list[torch.Tensor]


def make_model(seed: int = 0) -> torch.nn.Module:
    """A tiny 8-16-4 MLP with seeded initialization."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    )


def make_batches(num_ranks: int, per_rank: int, seed: int = 1) -> Batches:
    """Random regression micro-batches from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.randn(MICRO, IN, generator=gen),
                torch.randn(MICRO, OUT, generator=gen),
            )
            for _ in range(per_rank)
        ]
        for _ in range(num_ranks)
    ]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one micro-batch."""
    return torch.nn.functional.mse_loss(pred, target)


def run(model: torch.nn.Module, batches: Batches, **kwargs: object) -> Params:
    """Run the reference with the module defaults and return the parameters as a list."""
    kwargs.setdefault("lr", LR)
    kwargs.setdefault("weight_decay", WD)
    kwargs.setdefault("eps", EPS)
    out = reference_train(model, batches, mse, **kwargs)  # type: ignore[arg-type]
    return list(out.values())


def close(a: Params, b: Params, atol: float = 1e-6) -> bool:
    """All tensors equal to fp32 rounding."""
    return all(
        torch.allclose(x, y, rtol=1e-5, atol=atol) for x, y in zip(a, b, strict=True)
    )


def distance(a: Params, b: Params) -> float:
    """Global L2 distance between two parameter lists."""
    return math.sqrt(
        sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True))
    )


def max_diff(a: Params, b: Params) -> float:
    """Largest elementwise absolute difference."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# --- A hand-written, functional AdamW and gradient helper, independent of torch.optim. ---


def grad_sum(
    model: torch.nn.Module, at: Params, micro: list[tuple[torch.Tensor, torch.Tensor]]
) -> Params:
    """Sum of the micro-batch gradients of ``micro`` at parameters ``at``."""
    fn = torch.func.functional_call
    names = [n for n, _ in model.named_parameters()]
    sums = [torch.zeros_like(p) for p in at]
    for x, y in micro:
        leaves = [p.detach().clone().requires_grad_(True) for p in at]
        loss = mse(fn(model, dict(zip(names, leaves, strict=True)), (x,)), y)
        for s, g in zip(sums, torch.autograd.grad(loss, leaves), strict=True):
            s.add_(g)
    return sums


def adamw(
    params: Params,
    state: tuple[Params, Params, int],
    grad: Params,
    lr: float,
    max_norm: float = 0.0,
) -> tuple[Params, tuple[Params, Params, int]]:
    """One AdamW step written out by hand, with DeepSpeed-style clipping; returns new copies."""
    if max_norm > 0:
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grad))
        clip = (norm + 1e-6) / max_norm
        if clip > 1:
            grad = [g / clip for g in grad]
    exp_avg, exp_avg_sq, step = state
    step += 1
    b1, b2 = BETAS
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grad, exp_avg, exp_avg_sq, strict=True):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        new_p.append(p * (1 - lr * WD) - lr * m_hat / (v_hat.sqrt() + EPS))
        new_m.append(m)
        new_v.append(v)
    return new_p, (new_m, new_v, step)


def initial(model: torch.nn.Module) -> tuple[Params, tuple[Params, Params, int]]:
    """theta_0 and a fresh AdamW state."""
    theta = [p.detach().clone() for p in model.parameters()]
    zeros = [torch.zeros_like(p) for p in theta]
    return theta, ([z.clone() for z in zeros], [z.clone() for z in zeros], 0)


# --- Tests. ---


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_sync_single_rank_matches_hand_written_adamw(max_norm: float) -> None:
    """sync with 1 rank and GA=2 equals a hand-written AdamW loop on averaged gradients."""
    model, batches, steps, ga = make_model(), make_batches(1, 6), 3, 2
    got = run(
        model,
        batches,
        mode="sync",
        num_steps=steps,
        gradient_accumulation_steps=ga,
        max_grad_norm=max_norm,
    )
    theta, state = initial(model)
    for t in range(steps):
        g = [s / ga for s in grad_sum(model, theta, batches[0][t * ga : (t + 1) * ga])]
        theta, state = adamw(theta, state, g, LR, max_norm)
    assert close(got, theta)


def test_acco_two_steps_match_hand_written_schedule() -> None:
    """acco with N=2, k=2, T=2 equals the spec's schedule written out with a functional AdamW."""
    model, k, n = make_model(), 2, 2
    batches = make_batches(n, 4 * k)
    got = run(
        model, batches, mode="acco", num_steps=2, gradient_accumulation_steps=2 * k
    )

    def grads(at: Params, lo: int) -> Params:
        """Sum over ranks of micro-batches lo..lo+k-1 at ``at``."""
        per_rank = [grad_sum(model, at, batches[r][lo : lo + k]) for r in range(n)]
        return [sum(gs) for gs in zip(*per_rank, strict=True)]

    theta0, state0 = initial(model)
    g_est0 = grads(theta0, 0)  # G~_0 at theta~_0 = theta_0
    theta_est1, _ = adamw(
        theta0, state0, [g / (n * k) for g in g_est0], LR
    )  # discarded state
    g0 = grads(theta0, k)  # G_0 at theta_0
    theta1, state1 = adamw(
        theta0,
        state0,
        [(a + b) / (2 * n * k) for a, b in zip(g_est0, g0, strict=True)],
        LR,
    )
    g_est1 = grads(theta_est1, 2 * k)  # G~_1 at theta~_1
    g1 = grads(theta1, 3 * k)  # G_1 at theta_1
    theta2, _ = adamw(
        theta1,
        state1,
        [(a + b) / (2 * n * k) for a, b in zip(g_est1, g1, strict=True)],
        LR,
    )
    assert close(got, theta2)


def test_acco_sync_steps_match_hand_written_schedule() -> None:
    """acco with sync_steps=1, N=2, k=2, T=3: step 0 is ZeRO-1's (all 2k micro-batches at theta_0), then the
    pipeline starts from theta_1 as at the start of training (theta~_1 = theta_1), the estimate first used in
    step 2; written out with a functional AdamW."""
    model, k, n = make_model(), 2, 2
    batches = make_batches(n, 6 * k)
    got = run(model, batches, mode="acco", num_steps=3, gradient_accumulation_steps=2 * k, sync_steps=1)

    def grads(at: Params, lo: int, count: int = k) -> Params:
        per_rank = [grad_sum(model, at, batches[r][lo : lo + count]) for r in range(n)]
        return [sum(gs) for gs in zip(*per_rank, strict=True)]

    def mean(a: Params, b: Params) -> Params:
        return [(x + y) / (2 * n * k) for x, y in zip(a, b, strict=True)]

    theta0, state0 = initial(model)
    theta1, state1 = adamw(theta0, state0, [g / (2 * n * k) for g in grads(theta0, 0, 2 * k)], LR)  # ZeRO-1's step
    g_est1 = grads(theta1, 2 * k)  # the restart: G~_1 at theta~_1 = theta_1
    theta_est2, _ = adamw(theta1, state1, [g / (n * k) for g in g_est1], LR)
    theta2, state2 = adamw(theta1, state1, mean(g_est1, grads(theta1, 3 * k)), LR)
    g_est2 = grads(theta_est2, 4 * k)  # G~_2 at theta~_2
    theta3, _ = adamw(theta2, state2, mean(g_est2, grads(theta2, 5 * k)), LR)
    assert close(got, theta3)
    plain = run(model, batches, mode="acco", num_steps=3, gradient_accumulation_steps=2 * k)
    assert max_diff(got, plain) > 1e-4  # sync_steps changed the run
    with pytest.raises(ValueError, match="sync_steps applies to acco only"):
        run(model, batches, mode="dpu", num_steps=1, gradient_accumulation_steps=2, sync_steps=1)


def test_acco_sync_steps_are_sync_steps() -> None:
    """While every step is synchronous (sync_steps >= T), acco is the reference's ZeRO-1 mode bit for bit."""
    model, batches = make_model(), make_batches(2, 8)
    sync = run(model, batches, mode="sync", num_steps=2, gradient_accumulation_steps=4)
    acco = run(model, batches, mode="acco", num_steps=2, gradient_accumulation_steps=4, sync_steps=2)
    assert max_diff(sync, acco) == 0.0


def test_dpu_matches_hand_written_stale_schedule() -> None:
    """dpu with T=3 equals theta_{t+1} = Opt(theta_t, G(theta_{t-1})) written out by hand."""
    model, n, ga, steps = make_model(), 2, 2, 3
    batches = make_batches(n, ga * steps)
    got = run(
        model, batches, mode="dpu", num_steps=steps, gradient_accumulation_steps=ga
    )
    theta, state = initial(model)
    prev = theta
    for t in range(steps):
        per_rank = [
            grad_sum(model, prev, batches[r][t * ga : (t + 1) * ga]) for r in range(n)
        ]
        g = [sum(gs) / (n * ga) for gs in zip(*per_rank, strict=True)]
        prev = theta
        theta, state = adamw(theta, state, g, LR)
    assert close(got, theta)


def test_sync_n_ranks_equals_one_rank_with_all_micro_batches() -> None:
    """sync with N ranks equals sync with 1 rank that sees all N*GA micro-batches of each step."""
    model, n, ga, steps = make_model(), 3, 2, 3
    batches = make_batches(n, ga * steps)
    multi = run(
        model, batches, mode="sync", num_steps=steps, gradient_accumulation_steps=ga
    )
    merged = [
        [
            b
            for t in range(steps)
            for r in range(n)
            for b in batches[r][t * ga : (t + 1) * ga]
        ]
    ]
    single = run(
        model, merged, mode="sync", num_steps=steps, gradient_accumulation_steps=n * ga
    )
    assert close(multi, single)


def test_modes_give_different_parameters() -> None:
    """acco, dpu and sync give pairwise different final parameters on the same data."""
    model, n, ga, steps = make_model(), 2, 2, 3
    batches = make_batches(n, ga * steps)
    out = {
        m: run(model, batches, mode=m, num_steps=steps, gradient_accumulation_steps=ga)
        for m in ("sync", "acco", "dpu")
    }
    for a, b in (("sync", "acco"), ("sync", "dpu"), ("acco", "dpu")):
        assert max_diff(out[a], out[b]) > 1e-4, (a, b)


def test_dpu_first_step_equals_sync_first_step() -> None:
    """dpu's first step equals sync's (G_0 is computed at theta_0 in both)."""
    model, batches = make_model(), make_batches(2, 4)
    sync = run(model, batches, mode="sync", num_steps=1, gradient_accumulation_steps=4)
    dpu = run(model, batches, mode="dpu", num_steps=1, gradient_accumulation_steps=4)
    assert close(sync, dpu)
    assert max_diff(sync, [p.detach() for p in model.parameters()]) > 1e-4


def test_acco_one_step_equals_sync_so_the_estimate_leaves_no_trace() -> None:
    """acco with T=1 equals sync: all 2k micro-batches are at theta_0 and the estimate is rolled back."""
    model, batches = make_model(), make_batches(2, 4)
    sync = run(
        model,
        batches,
        mode="sync",
        num_steps=1,
        gradient_accumulation_steps=4,
        max_grad_norm=0.1,
    )
    acco = run(
        model,
        batches,
        mode="acco",
        num_steps=1,
        gradient_accumulation_steps=4,
        max_grad_norm=0.1,
    )
    assert close(sync, acco)


def test_acco_lr_schedule_applies_per_committed_step() -> None:
    """With lr(1) = 0, acco's second commit (and its estimate) leaves theta_1 unchanged."""
    model, batches = make_model(), make_batches(2, 8)
    one = run(model, batches, mode="acco", num_steps=1, gradient_accumulation_steps=4)
    two = run(
        model,
        batches,
        mode="acco",
        num_steps=2,
        gradient_accumulation_steps=4,
        lr=lambda t: LR if t == 0 else 0.0,
    )
    assert close(one, two, atol=0.0)


def test_counts_homogeneous_equal_default_and_uneven_weigh_each_micro_batch() -> None:
    """Homogeneous counts reproduce the default; uneven counts weigh every micro-batch equally."""
    model, batches = make_model(), make_batches(2, 8)
    default = run(
        model, batches, mode="acco", num_steps=2, gradient_accumulation_steps=4
    )
    counted = run(
        model,
        batches,
        mode="acco",
        num_steps=2,
        gradient_accumulation_steps=4,
        counts=[[2, 2]] * 4,
    )
    assert close(default, counted, atol=0.0)
    uneven = run(
        model,
        batches,
        mode="sync",
        num_steps=1,
        gradient_accumulation_steps=1,
        counts=[[1, 3]],
    )
    merged = [[batches[0][0], *batches[1][:3]]]
    single = run(model, merged, mode="sync", num_steps=1, gradient_accumulation_steps=4)
    assert close(uneven, single)
    # An acco commit divides by the micro-batches of both its rounds: 1+2 and 3+1 here.
    acco = run(
        model,
        batches,
        mode="acco",
        num_steps=1,
        gradient_accumulation_steps=2,
        counts=[[1, 2], [3, 1]],
    )
    sync = run(
        model,
        batches,
        mode="sync",
        num_steps=1,
        gradient_accumulation_steps=1,
        counts=[[4, 3]],
    )
    assert close(acco, sync)


def test_estimate_shift_moves_only_the_estimate() -> None:
    """estimate_shift changes where the estimate half is computed, nothing else: with adaptive counts and the sqrt
    LR rule, every round's LR factor is the same as with the paper's estimate (they depend on the counts alone),
    and the first commit, computed before any shifted estimate is used, is the same too."""
    model, batches = make_model(), make_batches(2, 24)
    counts = [[2, 2], [6, 2], [3, 2], [6, 4]]
    common = {"mode": "acco", "gradient_accumulation_steps": 4, "counts": counts, "lr_scaling": "sqrt"}
    paper: list[float] = []
    shifted: list[float] = []
    unshifted = run(model, batches, num_steps=2, lr_factors=paper, **common)
    moved = run(model, batches, num_steps=2, lr_factors=shifted, estimate_shift=(1.1, 0.2), **common)
    # Equal halves of 2 per rank: an estimate's nominal batch is 4, a commit's (both halves) 8.
    assert paper == pytest.approx([1.0, math.sqrt(12 / 8), math.sqrt(5 / 4), math.sqrt(15 / 8)], rel=1e-12)
    assert shifted == paper
    one_step = {**common, "counts": counts[:2]}
    assert close(run(model, batches, num_steps=1, **one_step),
                 run(model, batches, num_steps=1, estimate_shift=(1.1, 0.2), **one_step), atol=0.0)
    assert max_diff(moved, unshifted) > 1e-6  # the shift is in effect


def test_clipping_reduces_the_update() -> None:
    """A tiny max_grad_norm shrinks the update well below the unclipped one (Adam eps dominates)."""
    model, batches = make_model(), make_batches(2, 4)
    theta0 = [p.detach().clone() for p in model.parameters()]
    for mode in ("sync", "acco", "dpu"):
        free = run(
            model,
            batches,
            mode=mode,
            num_steps=1,
            gradient_accumulation_steps=4,
            weight_decay=0.0,
        )
        clipped = run(
            model,
            batches,
            mode=mode,
            num_steps=1,
            gradient_accumulation_steps=4,
            weight_decay=0.0,
            max_grad_norm=1e-8,
        )
        assert distance(clipped, theta0) < 0.6 * distance(free, theta0), mode


def test_model_not_mutated_and_bad_inputs_rejected() -> None:
    """The input model is untouched; odd acco GA and too few micro-batches raise ValueError."""
    model, batches = make_model(), make_batches(2, 4)
    before = [p.detach().clone() for p in model.parameters()]
    run(model, batches, mode="acco", num_steps=1, gradient_accumulation_steps=4)
    assert close(before, [p.detach() for p in model.parameters()], atol=0.0)
    assert (
        rounds_per_step("acco") == 2
        and rounds_per_step("dpu") == rounds_per_step("sync") == 1
    )
    with pytest.raises(ValueError):
        run(model, batches, mode="acco", num_steps=1, gradient_accumulation_steps=3)
    with pytest.raises(ValueError):
        run(model, batches, mode="sync", num_steps=2, gradient_accumulation_steps=4)
