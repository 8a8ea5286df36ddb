"""The round's two Adam/AdamW steps on a flat fp32 master shard, each one fused kernel.

torch's fused Adam/AdamW kernels (``torch._fused_adam_``, ``torch._fused_adamw_``; CPU and CUDA) read the shard,
its gradient and both moments once and write them once, where the single-tensor step that DeepSpeed's
``torch_adam`` runs on CPU makes about ten passes. ``FusedAdam`` applies them to ACCO's rounds:

- ``commit``: the real step, in place on the master shard and the optimizer's state, as ``optimizer.step()``
  would (the step count, both moments, a first step's zero state), the gradient scale folded into the kernel.
- ``estimate``: the tentative step, into scratch copies of the moments that are kept between rounds, so the
  optimizer's state is only read. The extrapolated estimate's stretch ``s`` is folded into the learning rate
  (``Opt`` with ``s x lr`` is ``theta + s (Opt(theta) - theta)`` for Adam and AdamW alike), its carry
  ``k (theta~_t - theta)`` added in two in-place passes.

The results differ from the single-tensor step by float rounding only (within 1e-6; ``tests/test_adam.py``).
Other optimizers, and Adam with options these kernels do not cover, keep the generic path of ``pipeline.py``
(``optimizer.step()``, and snapshot / step / restore for an estimate; ``rollback.py``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FusedAdam"]

_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


class FusedAdam:
    """Fused Adam/AdamW steps of one optimizer's master shards (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, shards: list[torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.shards = shards
        self._scratch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def supports(optimizer: torch.optim.Optimizer, shards: list[torch.Tensor]) -> bool:
        """torch's own Adam or AdamW, float learning rates, none of amsgrad/maximize/capturable/differentiable,
        fp32 shards on CPU or CUDA, and a torch that has the fused kernels."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not hasattr(torch, "_fused_adamw_"):
            return False
        if any(group.get(flag, False) for group in optimizer.param_groups for flag in _UNSUPPORTED_FLAGS):
            return False
        if any(torch.is_tensor(group.get("lr")) for group in optimizer.param_groups):
            return False
        return all(s.dtype == torch.float32 and s.device.type in ("cpu", "cuda") for s in shards)

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", type(self.optimizer) is torch.optim.AdamW))

    def _kernel(self, params: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: float, group: dict[str, Any], lr: float, grad_scale: torch.Tensor | None) -> None:
        """One fused step of ``params``, ``exp_avg``, ``exp_avg_sq`` in place, at step count ``step`` (already
        counting this step). ``grad_scale``: the kernel divides ``grad`` by it, in place."""
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if self._decoupled(group) else torch._fused_adam_
        steps = torch.full((), float(step), dtype=torch.float32, device=params.device)
        kernel([params], [grad], [exp_avg], [exp_avg_sq], [], [steps], lr=float(lr), beta1=float(beta1),
               beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
               amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=None)

    def _state(self, shard: torch.Tensor) -> dict[str, Any]:
        """The shard's optimizer state, created as torch's Adam creates it before a first step."""
        state = self.optimizer.state[shard]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(shard, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(shard, memory_format=torch.preserve_format)
        return state

    def commit(self, sums: list[torch.Tensor], scale: float, hyperparams: list[dict[str, Any]]) -> None:
        """Step every master shard with the gradient ``sums[i] * scale`` (``sums`` are consumed: scaled in place)."""
        for shard, summed, group in zip(self.shards, sums, hyperparams):
            state = self._state(shard)
            step = state["step"]
            if torch.is_tensor(step):
                step.add_(1)
            else:
                state["step"] = step = step + 1
            inverse = torch.full((), 1.0 / scale, dtype=torch.float32, device=shard.device)
            self._kernel(shard.detach(), summed, state["exp_avg"], state["exp_avg_sq"], float(step), group,
                         group["lr"], inverse)

    def estimate(self, sums: list[torch.Tensor], scale: float, hyperparams: list[dict[str, Any]],
                 stretch: float = 1.0, carry: float = 0.0,
                 at: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The shards after one step with ``sums[i] * scale`` (``sums`` only read), stretched by ``stretch`` and
        carried ``carry`` of the way from the shard to ``at`` (theta~_t); the optimizer's state is only read.
        The returned tensors are scratch buffers, valid until the next call."""
        if self._scratch is None:
            self._scratch = [tuple(torch.empty_like(s) for _ in range(4)) for s in self.shards]  # type: ignore[misc]
        out = []
        for i, (shard, summed, group) in enumerate(zip(self.shards, sums, hyperparams)):
            params, grad, exp_avg, exp_avg_sq = self._scratch[i]
            state = self.optimizer.state.get(shard) or {}
            step = float(state["step"]) + 1 if "step" in state else 1.0
            params.copy_(shard.detach())
            torch.mul(summed, scale, out=grad)
            if "exp_avg" in state:
                exp_avg.copy_(state["exp_avg"])
                exp_avg_sq.copy_(state["exp_avg_sq"])
            else:
                exp_avg.zero_()
                exp_avg_sq.zero_()
            self._kernel(params, grad, exp_avg, exp_avg_sq, step, group, stretch * group["lr"], None)
            if carry and at is not None:
                params.add_(at[i], alpha=carry).sub_(shard.detach(), alpha=carry)
            out.append(params)
        return out
