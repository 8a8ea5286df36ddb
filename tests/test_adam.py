"""The round's fused Adam/AdamW steps (``deepspeed_acco/adam.py``) against torch's single-tensor optimizer.

- ``commit`` equals ``optimizer.step()`` (weights, both moments, the step count) within 1e-6 over several steps,
  from a first step (no state) on, for AdamW (decoupled decay) and Adam (L2 decay);
- ``estimate`` equals stepping, reading and rolling back, within 1e-6, leaves the optimizer's state and the
  shard bitwise untouched, and its stretch / carry equal theta + s (Opt - theta) + k (at - theta);
- optimizers and options the kernels do not cover are refused (``supports``), so they keep the generic path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deepspeed_acco.adam import FusedAdam

TOL = 1e-6
N = 4099


def _optimizer(kind: type[torch.optim.Optimizer], **options: object) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    shard = torch.nn.Parameter(torch.randn(N, generator=torch.Generator().manual_seed(0)))
    return kind([shard], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **options), shard


def _grad(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 + seed)) * 3.0


def _hyperparams(optimizer: torch.optim.Optimizer) -> list[dict[str, object]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.Adam])
def test_commit_equals_optimizer_step(kind: type[torch.optim.Optimizer]) -> None:
    """Five commits from no state: the fused kernel against torch's step on a copy, scale folded in."""
    fused_opt, fused_shard = _optimizer(kind)
    ref_opt, ref_shard = _optimizer(kind)
    fused = FusedAdam(fused_opt, [fused_shard])
    assert FusedAdam.supports(fused_opt, [fused_shard])
    scale = 0.25
    for t in range(5):
        ref_shard.grad = _grad(t) * scale
        ref_opt.step()
        fused.commit([_grad(t)], scale, _hyperparams(fused_opt))
    state, ref_state = fused_opt.state[fused_shard], ref_opt.state[ref_shard]
    assert float(state["step"]) == float(ref_state["step"]) == 5.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert float((state[key] - ref_state[key]).abs().max()) < TOL
    diff = float((fused_shard.detach() - ref_shard.detach()).abs().max())
    print(f"fused commit vs single-tensor {kind.__name__}: max |diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("first", [True, False])
def test_estimate_leaves_no_trace(first: bool) -> None:
    """The estimate equals step-then-rollback (within 1e-6) and the state and shard are bitwise unchanged."""
    opt, shard = _optimizer(torch.optim.AdamW)
    fused = FusedAdam(opt, [shard])
    if not first:
        for t in range(3):
            fused.commit([_grad(t)], 1.0, _hyperparams(opt))
    before_state = copy.deepcopy(opt.state[shard]) if shard in opt.state else None
    before = shard.detach().clone()
    ref_opt = copy.deepcopy(opt)
    ref_shard = ref_opt.param_groups[0]["params"][0]
    ref_shard.grad = _grad(9) * 0.5
    ref_opt.step()
    summed = _grad(9)
    estimate = fused.estimate([summed], 0.5, _hyperparams(opt))[0]
    assert float((estimate - ref_shard.detach()).abs().max()) < TOL
    assert torch.equal(shard.detach(), before) and torch.equal(summed, _grad(9))
    if before_state is None:
        assert shard not in opt.state or not opt.state[shard]
    else:
        assert all(torch.equal(torch.as_tensor(opt.state[shard][k]), torch.as_tensor(v))
                   for k, v in before_state.items())
    stretch, carry = 1.1, 0.2
    at = before + torch.randn(N) * 1e-3
    shifted = fused.estimate([summed], 0.5, _hyperparams(opt), stretch, carry, [at])[0]
    expected = before + stretch * (ref_shard.detach() - before) + carry * (at - before)
    assert float((shifted - expected).abs().max()) < TOL


def test_unsupported_optimizers_keep_the_generic_path() -> None:
    """amsgrad, maximize, a tensor LR or another optimizer: not fused."""
    shard = torch.nn.Parameter(torch.randn(8))
    assert not FusedAdam.supports(torch.optim.AdamW([shard], amsgrad=True), [shard])
    assert not FusedAdam.supports(torch.optim.Adam([shard], maximize=True), [shard])
    assert not FusedAdam.supports(torch.optim.AdamW([shard], lr=torch.tensor(0.01)), [shard])
    assert not FusedAdam.supports(torch.optim.SGD([shard], lr=0.1), [shard])
    double = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    assert not FusedAdam.supports(torch.optim.AdamW([double]), [double])
