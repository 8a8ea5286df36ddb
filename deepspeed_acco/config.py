"""The ``"acco"`` block of a DeepSpeed JSON config, and the checks that refuse what cannot work.

The block sits at the top level of the DeepSpeed config, next to an unchanged ZeRO-1 config::

    {"zero_optimization": {"stage": 1}, "acco": {"enabled": true}}

DeepSpeed keeps unknown top-level keys, so the block survives ``deepspeed.initialize`` and the
HF Trainer untouched. ``AccoConfig`` validates the block itself (unknown keys, types, bounds);
``check_deepspeed_config`` validates its combination with the rest of the DeepSpeed config.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, ValidationError, field_validator, model_validator

from deepspeed_acco.quantize import check_block_size
from deepspeed_acco.split import split_micro_batches

__all__ = [
    "ACCO_KEY",
    "AccoConfig",
    "AccoConfigError",
    "ESTIMATE_SHIFTS",
    "ONEBIT_OPTIMIZERS",
    "TESTED_OPTIMIZERS",
    "get_acco_config",
    "check_deepspeed_config",
    "check_raw_config",
    "constant_lr_advice",
    "warmup_advice",
]

ACCO_KEY = "acco"

# DeepSpeed optimizer names (lower-cased "optimizer.type") whose state is plain per-tensor
# tensors and scalars, so that an estimate round can be rolled back by copying them.
TESTED_OPTIMIZERS = frozenset({"adam", "adamw", "sgd", "adagrad", "lamb", "lion"})
# Optimizer classes (by name) that a client may pass to ``initialize(optimizer=...)``.
TESTED_OPTIMIZER_CLASSES = frozenset({"Adam", "AdamW", "SGD", "Adagrad", "FusedAdam", "FusedLamb", "FusedLion",
                                      "DeepSpeedCPUAdam"})
ONEBIT_OPTIMIZERS = frozenset({"onebitadam", "zerooneadam", "onebitlamb"})
# DeepSpeed schedulers that warm the LR up over ``warmup_num_steps`` (their default: 1000).
WARMUP_SCHEDULERS = frozenset({"WarmupLR", "WarmupDecayLR", "WarmupCosineLR"})
# Of those, the one that holds the peak LR after its warm-up (the others decay it).
CONSTANT_AFTER_WARMUP = "WarmupLR"
MIN_WARMUP_STEPS = 100
"""Below this many warm-up steps ``warmup_advice`` warns (docs/how-it-works.md, "Why ACCO can trail ZeRO-1")."""
ESTIMATE_SHIFTS: dict[str, tuple[float, float]] = {"paper": (1.0, 0.0), "extrapolated": (1.1, 0.2)}
"""``acco.estimate`` -> (scale s, carry k): theta~_{t+1} = theta_t + s (Opt(theta_t, G~_t) - theta_t)
+ k (theta~_t - theta_t), theta~_t being where G~_t was computed (docs/how-it-works.md)."""


class AccoConfigError(ValueError):
    """A DeepSpeed config that ACCO cannot run. The message names the key and the fix."""


class AccoConfig(DeepSpeedConfigModel):
    """The ``"acco"`` block. Unknown keys are refused, so a typo fails at ``initialize``."""

    enabled: bool = False
    """Turn ACCO on. When false, the engine is exactly DeepSpeed's own ZeRO-1."""

    mode: Literal["acco", "dpu"] = "acco"
    """``"acco"``: an estimate round then a commit round per optimizer step, the step's micro-batches split
    between them by ``estimate_fraction``, so no gradient is stale.
    ``"dpu"``: delayed parameter update, one round per step over ``gradient_accumulation_steps``
    micro-batches, gradients one step stale (the baseline of the ACCO paper)."""

    adaptive_accumulation: bool = False
    """After the minimum number of micro-batches of a round, keep accumulating micro-batches
    until the round in flight has finished, instead of waiting for it. Fast ranks then contribute
    more micro-batches than slow ones; every micro-batch weighs the same. Mode ``"acco"`` only."""

    max_micro_batches_per_round: int | None = Field(None, ge=1)
    """With ``adaptive_accumulation``: the most micro-batches one rank accumulates in one round;
    past it the rank waits for the round in flight. Default: 2 x ``gradient_accumulation_steps``. Must be at
    least the larger half's minimum (see ``estimate_fraction``)."""

    lr_scaling: Literal["none", "sqrt"] = "none"
    """With ``adaptive_accumulation``: ``"sqrt"`` multiplies each round's learning rate by ``sqrt(kappa)``, kappa =
    the round's global micro-batch count over its nominal count (``world_size`` x the minimum micro-batches of
    the halves it sums: the estimate half's for an estimate round, ``gradient_accumulation_steps`` for a commit),
    at most ``max_micro_batches_per_round`` over a half's minimum: the square-root rule for Adam-type optimizers
    when a batch grows kappa times (see ``acco-algorithm.md``, "Learning rate under adaptive accumulation").
    ``"none"``: every round uses the scheduler's LR."""

    estimate_compression: Literal["none", "int8"] = "none"
    """``"int8"``: send the estimate round compressed, the commit exact (see ``acco-algorithm.md``,
    "Compressed estimate round with an exact commit"): block-wise int8 gradients in an all-to-all,
    summed in fp32 by their owner, the quantization residual added to the commit half's gradients,
    and the estimate's all-gather as an int8 update from theta_t. About 1.25x ZeRO-1's bytes per step instead
    of 2x. Where the launcher puts several ranks on a node the round is node-aware (full precision inside the
    node, int8 between nodes), so a node's link carries about one int8 buffer whatever the ranks per node.
    The quantizer runs as fused compiled kernels (eager where compiling fails; ``initialize`` logs which). Only
    where theta~ lands changes (by at most half a quantization step per element). Mode ``"acco"`` only (dpu has
    no estimate round). Figures: docs/how-it-works.md, "The compressed estimate round"."""

    estimate_fraction: float = Field(0.75, gt=0.0, lt=1.0)
    """Share of each step's micro-batches computed at the estimate theta~_t (the estimate half); the rest (the
    commit half) are computed at theta_t. Per rank the estimate half has ``estimate_fraction x
    gradient_accumulation_steps`` micro-batches, rounded half up, at least 1 and leaving at least 1: with the
    default 0.75, 3 of 4, 6 of 8, 1 of 2. ``0.5`` is the ACCO paper's equal halves. The commit is exact either
    way, over the same micro-batches as ZeRO-1's step. Why 0.75: the estimate's error feeds back into the commit
    with weight ``1 - estimate_fraction`` instead of 1/2, which lifts ACCO's edge of stability, and the estimate
    is built from more samples; at the 10.8M-parameter ``small`` preset with a 100-step warm-up it ended closer
    to ZeRO-1 than equal halves in every cell measured (docs/convergence.md, "A larger estimate half"). The cost:
    the estimate round hides behind the commit half's compute only (a quarter of a step at 0.75), so a
    full-precision round longer than that is exposed; ``estimate_compression="int8"`` makes that round the short
    one (``python -m deepspeed_acco.plan``). Mode ``"acco"`` only."""

    sync_steps: int = Field(0, ge=0)
    """The first ``sync_steps`` optimizer steps run as ZeRO-1 runs them: all ``gradient_accumulation_steps``
    micro-batches at theta_t, then one round (reduce-scatter, step, all-gather) that the next step waits for, so
    its time is exposed. ACCO's two overlapped rounds start after them, from the committed weights, as at the
    start of training; a checkpoint resumes inside them exactly. For a short LR warm-up: the first steps, where
    the loss falls fastest and the LR climbs, are where ACCO's estimate spikes and ZeRO-1 does not (its edge of
    stability is lower); running them synchronously takes that out. Measured on the 10.8M-parameter ``small``
    preset with a 10-step warm-up, 100 steps, ``sync_steps=10``: -0.85 / -0.17 / +1.31 / +0.29 % from ZeRO-1's
    held-out loss (world sizes 1 and 2, seeds 1234 and 7) instead of -1.97 / +3.90 / +3.51 / +0.75 % without
    (docs/convergence.md, "Synchronous first steps"). It costs the overlap of those steps only. 0 (default):
    ACCO from the first step, as the paper. Mode ``"acco"`` only."""

    estimate: Literal["paper", "extrapolated"] = "extrapolated"
    """Where the estimate half's gradients are computed. ``"extrapolated"`` (default): theta_t + 1.1 (Opt(theta_t,
    G~_t) - theta_t) + 0.2 (theta~_t - theta_t), the update stretched by 10 % plus a fifth of the previous
    estimate's offset: half of every step's gradients then come from a point slightly ahead, whose curvature
    cancels part of the gradient noise the estimate took (on a noisy quadratic it leaves less excess loss than the
    paper's estimate, and than ZeRO-1, below the edge of stability; see docs/how-it-works.md). ``"paper"``:
    theta~_{t+1} = Opt(theta_t, G~_t), the ACCO paper's estimate. Measured in docs/convergence.md: closer to
    ZeRO-1 than the paper's estimate in every cell measured but one (0.08 points behind it), on models up to 10.8M
    parameters. The commit is exact either way and no gradient is stale. Mode ``"acco"`` only (dpu has no
    estimate round)."""

    compression_block_size: int = 256
    """Elements per int8 block (one fp32 scale each, ``4 / block`` bytes per element of overhead): a power of two
    from 16 to 65536, the blocks the fused quantization kernels take."""

    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the flat buffers that accumulate micro-batch gradients. fp32 by default: long
    adaptive accumulations drift in bf16."""

    round_timeout_s: float = Field(600.0, gt=0)
    """Seconds a round may take before the training thread raises instead of waiting (a dead or
    stalled peer). Also the timeout of ACCO's own process group."""

    allow_untested_optimizer: bool = False
    """ACCO rolls back an estimate step by copying the optimizer's per-parameter state. That is
    checked for DeepSpeed's Adam/AdamW/SGD/Adagrad/Lamb/Lion and torch's Adam/AdamW/SGD/Adagrad.
    Set this to run another optimizer, after checking that its whole state lives in
    ``optimizer.state`` and ``param_groups``."""

    @property
    def automatic_schedule(self) -> bool:
        """ACCO picks its schedule itself (``schedule.py``): mode ``"acco"`` without adaptive accumulation, and
        the block sets neither ``estimate_fraction`` nor ``estimate_compression`` (a block that sets one runs
        exactly as configured, reproducibly)."""
        return self.mode == "acco" and not self.adaptive_accumulation and \
            not {"estimate_fraction", "estimate_compression"} & self.model_fields_set

    @field_validator("compression_block_size")
    @classmethod
    def _block_the_kernels_take(cls, block: int) -> int:
        return check_block_size(block)

    @model_validator(mode="after")
    def _adaptive_needs_acco_mode(self) -> AccoConfig:
        if self.adaptive_accumulation and self.mode != "acco":
            raise ValueError("acco.adaptive_accumulation=true is only implemented for acco.mode='acco'; "
                             "set acco.mode to 'acco' or acco.adaptive_accumulation to false")
        if self.lr_scaling != "none" and not self.adaptive_accumulation:
            raise ValueError(f"acco.lr_scaling={self.lr_scaling!r} scales the LR by how much a round's batch grew, "
                             "which only adaptive accumulation does; set acco.adaptive_accumulation to true "
                             "or acco.lr_scaling to 'none'")
        return self


def get_acco_config(param_dict: dict[str, Any]) -> AccoConfig:
    """Parse the ``"acco"`` block of a DeepSpeed config dict (missing block: disabled).

    Raises:
        AccoConfigError: the block is not a JSON object, or a key is unknown, mistyped or out of range.
    """
    block = param_dict.get(ACCO_KEY, {})
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise AccoConfigError(f"'acco' must be a JSON object such as {{\"enabled\": true}}, got {block!r}")
    try:
        return AccoConfig(**block)
    except ValidationError as err:
        problems = "; ".join(f"acco.{'.'.join(str(p) for p in e['loc']) or '<block>'}: {e['msg']}"
                             f" (got {e.get('input')!r}{_did_you_mean(e)})" for e in err.errors())
        raise AccoConfigError(f"invalid 'acco' block: {problems}. Valid keys: "
                              f"{', '.join(AccoConfig.model_fields)}") from None


def _did_you_mean(error: Any) -> str:
    """For an unknown key of the block, the closest valid key (a typo's likely intent), else ''."""
    if error.get("type") != "extra_forbidden" or not error.get("loc"):
        return ""
    close = difflib.get_close_matches(str(error["loc"][0]), list(AccoConfig.model_fields), n=1, cutoff=0.6)
    return f"; did you mean acco.{close[0]}?" if close else ""


def check_raw_config(param_dict: dict[str, Any]) -> None:
    """Refusals that must happen before DeepSpeed parses the config (it may fail first, less clearly).

    Raises:
        AccoConfigError: a 1-bit optimizer is configured.
    """
    name = str((param_dict.get("optimizer") or {}).get("type", ""))
    if name.lower() in ONEBIT_OPTIMIZERS:
        raise AccoConfigError(f"optimizer.type={name!r} compresses its own communication and cannot run inside "
                              "ACCO's rounds; use \"Adam\" or \"AdamW\"")


def _offload_device(zero: Any, name: str) -> str:
    offload = getattr(zero, name, None)
    device = getattr(offload, "device", None) if offload is not None else None
    return str(getattr(device, "value", device) or "none")


def check_deepspeed_config(ds_config: Any, acco: AccoConfig, *, client_optimizer: Any = None) -> None:
    """Refuse DeepSpeed settings that ACCO cannot honour. Called at ``initialize``.

    Args:
        ds_config: the engine's parsed ``DeepSpeedConfig``.
        acco: the parsed ``"acco"`` block (enabled).
        client_optimizer: the ``optimizer=`` argument of ``initialize``, if any.

    Raises:
        AccoConfigError: naming the offending key and the fix.
    """
    zero = ds_config.zero_config
    stage = int(getattr(zero, "stage", 0))
    if not ds_config.zero_enabled or stage != 1:
        raise AccoConfigError(f"acco.enabled=true needs ZeRO stage 1, got zero_optimization.stage={stage}; "
                              "set \"zero_optimization\": {\"stage\": 1} or acco.enabled to false")
    for name in ("offload_optimizer", "offload_param"):
        if _offload_device(zero, name) != "none":
            raise AccoConfigError(f"acco.enabled=true does not support zero_optimization.{name} "
                                  f"(device={_offload_device(zero, name)}); remove zero_optimization.{name}")
    if getattr(zero, "zenflow", None) is not None:
        raise AccoConfigError("acco.enabled=true cannot be combined with zero_optimization.zenflow; remove one")
    ga = int(ds_config.gradient_accumulation_steps)
    if acco.mode == "acco" and ga < 2:
        raise AccoConfigError(f"acco.mode='acco' splits every optimizer step's micro-batches between an estimate "
                              f"round and a commit round, so gradient_accumulation_steps must be at least 2, got "
                              f"{ga}; set it to 2 or more (or acco.mode='dpu')")
    minimum = max(split_micro_batches(ga, acco.estimate_fraction)) if acco.mode == "acco" else ga
    cap = acco.max_micro_batches_per_round
    if cap is not None and cap < minimum:
        raise AccoConfigError(f"acco.max_micro_batches_per_round={cap} is below the {minimum} micro-batches "
                              f"every round needs (gradient_accumulation_steps={ga}); raise it to >= {minimum}")
    opt_name = (ds_config.optimizer_name or "").lower()
    if opt_name in ONEBIT_OPTIMIZERS:
        raise AccoConfigError(f"optimizer.type={ds_config.optimizer_name!r} compresses its own communication and "
                              "cannot run inside ACCO's rounds; use \"Adam\" or \"AdamW\"")
    if not acco.allow_untested_optimizer:
        if client_optimizer is not None:
            cls_name = type(client_optimizer).__name__
            if not callable(client_optimizer) or hasattr(client_optimizer, "param_groups"):
                if cls_name not in TESTED_OPTIMIZER_CLASSES:
                    raise AccoConfigError(
                        f"optimizer {cls_name} is not known to roll back exactly after an estimate round; "
                        "use Adam/AdamW/SGD, or set acco.allow_untested_optimizer=true once you have checked "
                        "that its whole state lives in optimizer.state")
        elif opt_name and opt_name not in TESTED_OPTIMIZERS:
            raise AccoConfigError(
                f"optimizer.type={ds_config.optimizer_name!r} is not known to roll back exactly after an "
                "estimate round; use Adam/AdamW/SGD, or set acco.allow_untested_optimizer=true")
    raw = getattr(ds_config, "_param_dict", {}) or {}
    if raw.get("hybrid_engine", {}).get("enabled", False):
        raise AccoConfigError("acco.enabled=true does not support hybrid_engine; set hybrid_engine.enabled=false")
    if raw.get("data_types", {}).get("grad_accum_dtype") is not None:
        raise AccoConfigError("data_types.grad_accum_dtype is replaced by acco.grad_accum_dtype when ACCO is on "
                              "(ACCO accumulates into its own flat buffers); move the setting to the acco block")
    if raw.get("sparse_gradients", False):
        raise AccoConfigError("acco.enabled=true does not support sparse_gradients; set sparse_gradients=false")
    if raw.get("prescale_gradients", False):
        raise AccoConfigError("acco.enabled=true divides gradients by the global micro-batch count itself; "
                              "set prescale_gradients=false")
    if raw.get("amp", {}).get("enabled", False):
        raise AccoConfigError("acco.enabled=true does not support amp; use \"bf16\" or \"fp16\" instead")
    if raw.get("torch_autocast", {}).get("enabled", False):
        raise AccoConfigError("acco.enabled=true does not support torch_autocast; use \"bf16\" or \"fp16\"")
    if not getattr(ds_config, "managed_gradient_accumulation", True):
        raise AccoConfigError("acco.enabled=true decides the accumulation boundaries itself; "
                              "remove managed_gradient_accumulation=false")
    if raw.get("compile", {}).get("deepcompile", False):
        raise AccoConfigError("acco.enabled=true does not support compile.deepcompile; set it to false")


def _judged_scheduler(ds_config: Any, acco: AccoConfig, client_lr_scheduler: Any) -> dict[str, Any] | None:
    """The config's ``scheduler`` block ({} without one) for the LR-schedule advice, or None when it is not judged:
    no estimate round (DPU), or a scheduler passed to ``initialize`` (the HF Trainer's)."""
    if acco.mode != "acco" or client_lr_scheduler is not None:
        return None
    return (getattr(ds_config, "_param_dict", {}) or {}).get("scheduler") or {}


def warmup_advice(ds_config: Any, acco: AccoConfig, *, client_lr_scheduler: Any = None) -> str | None:
    """Why this run may end behind ZeRO-1 and what to change, or None (logged as a warning at ``initialize``).

    ACCO's estimate lowers the largest stable step below ZeRO-1's (``benchmarks/estimate_stability.py``: to
    ``1 / (1 + beta1)`` of it with the paper's equal halves, about 3/4 with the default split). A run that
    reaches its full LR within a few steps meets that edge early, while the weights still change fast: ACCO's
    loss spikes where ZeRO-1's does not and stays behind. Nothing is refused; the fix is a longer warm-up (or a
    lower LR), or ``acco.sync_steps`` over the warm-up (with that set, nothing is logged). Only DeepSpeed's own
    warm-up schedulers (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``) and a config with no scheduler at all
    can be judged; a scheduler passed to ``initialize`` (the HF Trainer's) is not inspected.
    """
    scheduler = _judged_scheduler(ds_config, acco, client_lr_scheduler)
    if scheduler is None:
        return None
    name = scheduler.get("type")
    if name is None:
        what = "no LR scheduler is configured, so the full LR applies from the first step"
    elif name in WARMUP_SCHEDULERS:
        steps = (scheduler.get("params") or {}).get("warmup_num_steps", 1000)
        if not isinstance(steps, int) or steps >= MIN_WARMUP_STEPS:
            return None
        what = f"scheduler.params.warmup_num_steps={steps} reaches the full LR within {steps} optimizer steps"
    else:
        return None
    if name is not None and acco.sync_steps >= steps:
        return None  # the warm-up already runs as ZeRO-1's steps: nothing to advise
    sync = (f"; or set acco.sync_steps to the warm-up length (now {acco.sync_steps}) so that ACCO starts after "
            "it (on that model, 10-step warm-up, sync_steps=10: -0.85 to +1.31 %)")
    return (f"ACCO: {what}. ACCO's estimate lowers the largest stable step below ZeRO-1's (to about 3/4 of it "
            "with the default acco.estimate_fraction=0.75, to 1/(1+beta1) of it with the paper's equal halves), so "
            "with a short warm-up its loss can spike where ZeRO-1's does not and end behind it (measured on a "
            "10.8M-parameter GPT-2 with a 10-step warm-up, 100 steps: from 2 % ahead to 3.9 % behind ZeRO-1's "
            f"held-out loss, by seed). Set scheduler.params.warmup_num_steps >= {MIN_WARMUP_STEPS} or lower the "
            "peak LR to keep the run away from that edge (on that model, with a 100-step warm-up, ACCO ended "
            f"-0.27 to +0.62 % from ZeRO-1){sync}; see docs/how-it-works.md, 'Why ACCO can trail ZeRO-1'.")


def constant_lr_advice(ds_config: Any, acco: AccoConfig, *, client_lr_scheduler: Any = None) -> str | None:
    """Why a run that holds its peak LR may settle behind ZeRO-1 and what to change, or None (logged at ``initialize``).

    With the LR held at its peak, ACCO's held-out loss levels off above ZeRO-1's late in the run (which fits the
    estimate's noise excess growing as the LR nears the estimate's edge of stability, docs/how-it-works.md); an
    LR that decays after the warm-up, as LLM schedules do, removed it over five seeds (docs/convergence.md,
    "Five seeds at world size 2, and ACCO's own twin").
    Judged for DeepSpeed's ``WarmupLR`` (constant after its warm-up) and for a config without a scheduler; a
    scheduler passed to ``initialize`` (the HF Trainer's) is not inspected. Nothing is refused.
    """
    scheduler = _judged_scheduler(ds_config, acco, client_lr_scheduler)
    if scheduler is None:
        return None
    name = scheduler.get("type")
    if name is None:
        what = "no LR scheduler is configured, so the LR stays constant"
    elif name == CONSTANT_AFTER_WARMUP:
        what = f"scheduler.type={name} holds the peak LR after its warm-up"
    else:
        return None
    return (f"ACCO: {what}. At a constant peak LR ACCO's loss levels off above ZeRO-1's late in a run (measured "
            "on a 10.8M-parameter GPT-2, world size 2, 100 steps at LR 1e-3 after a 10-step warm-up, "
            "acco.sync_steps=10: +0.78 % behind ZeRO-1's held-out loss on average over five seeds, up to +1.72 %; "
            "with the LR decaying linearly to 0 after the warm-up the same seeds ended +0.04 % on average, -0.27 to "
            "+0.51 %; at 3/4 of that LR, held, four seeds ended -0.44 %). Use a scheduler that decays the LR after "
            "the warm-up (scheduler.type WarmupDecayLR or WarmupCosineLR, total_num_steps the run's length) or "
            "lower the peak LR; see docs/convergence.md, "
            "'Five seeds at world size 2, and ACCO's own twin'.")
