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
    """Turn ACCO on. When false, the engine is exactly DeepSpeed's own ZeRO-1. ``{"enabled": true}`` alone lets ACCO
    choose its schedule from what it measures (see ``automatic_schedule``; docs/how-it-works.md)."""

    mode: Literal["acco", "dpu"] = "acco"
    """``"acco"``: an estimate round then a commit round per optimizer step, so no gradient is stale.
    ``"dpu"``: delayed parameter update, one round per step, gradients one step stale (the ACCO paper's baseline,
    for comparisons; docs/convergence.md)."""

    adaptive_accumulation: bool = False
    """Keep accumulating micro-batches while the round in flight runs, instead of waiting for it: fast ranks then
    contribute more micro-batches than slow ones, each weighing the same. For ranks of different speeds; mode
    ``"acco"`` only; pins the schedule (docs/how-it-works.md)."""

    max_micro_batches_per_round: int | None = Field(None, ge=1)
    """With ``adaptive_accumulation``: the most micro-batches one rank accumulates in one round (default 2 x
    ``gradient_accumulation_steps``; at least the larger half's minimum)."""

    lr_scaling: Literal["none", "sqrt"] = "none"
    """With ``adaptive_accumulation``: ``"sqrt"`` multiplies a round's LR by the square root of how much its batch
    grew over the nominal one, the square-root rule for Adam-type optimizers (``acco-algorithm.md``, "Learning rate
    under adaptive accumulation"); ``"none"``: the scheduler's LR."""

    estimate_compression: Literal["none", "int8"] = "none"
    """``"int8"``: send the estimate round as block-wise int8, the commit exact (what quantization loses joins the
    commit): about 1.25x ZeRO-1's bytes per step instead of 2x, node-aware where ranks share a node. Setting this key
    (or ``estimate_fraction``) pins the schedule; left out, the automatic schedule may pick it. Mode ``"acco"`` only.
    How and figures: docs/how-it-works.md, "The compressed estimate round"."""

    commit_compression: Literal["none", "int8"] = "none"
    """``"int8"`` (opt-in, lossy, for links where one ZeRO-1 round outlasts a step's compute): the commit round too is
    sent as block-wise int8, and what its quantization loses is carried into the next step's commit (error feedback),
    so no gradient mass is lost, part of it arrives a step late. The weights are rebuilt from an int8 update against
    the committed weights every rank holds, so they stay within half a quantization step of the fp32 master. About
    half of ZeRO-1's bytes with ``estimate_compression="int8"``; the commit is no longer ZeRO-1's exact update.
    Nothing automatic turns it on. When to use it and figures: docs/how-it-works.md, "The compressed commit"."""

    estimate_fraction: float = Field(0.75, gt=0.0, lt=1.0)
    """Share of each step's micro-batches computed at the estimate (rounded half up, at least 1 and leaving 1: 3 of
    4 at 0.75); the rest are computed at theta_t, and the commit is exact either way. 0.75 converges closer to
    ZeRO-1 than the paper's equal halves (0.5) but hides the estimate round behind a quarter of a step only.
    Setting this key (or ``estimate_compression``) pins the schedule; left out, the automatic schedule picks 0.75
    or 0.5. Mode ``"acco"`` only. Figures: docs/convergence.md, "A larger estimate half"."""

    sync_steps: int = Field(0, ge=0)
    """Run the first ``sync_steps`` optimizer steps as ZeRO-1's synchronous steps, then start ACCO from the
    committed weights: for a short LR warm-up, where ACCO's estimate can spike and ZeRO-1 does not. It costs the
    overlap of those steps. Mode ``"acco"`` only. Figures: docs/convergence.md, "Synchronous first steps"."""

    estimate: Literal["paper", "extrapolated"] = "extrapolated"
    """Where the estimate half's gradients are computed: ``"extrapolated"`` (default) theta_t + 1.1 (Opt(theta_t,
    G~_t) - theta_t) + 0.2 (theta~_t - theta_t), whose curvature cancels part of the estimate's gradient noise;
    ``"paper"`` Opt(theta_t, G~_t), the ACCO paper's. The commit is exact either way. Mode ``"acco"`` only.
    Why and figures: docs/how-it-works.md, "Below the edge"."""

    compression_block_size: int = 256
    """Elements per int8 block, each with one fp32 scale (``4 / block`` bytes per element of overhead): a power of
    two from 16 to 65536, the blocks the fused quantization kernels take."""

    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the flat buffers that accumulate micro-batch gradients: fp32, since long accumulations drift in
    bf16."""

    round_timeout_s: float = Field(600.0, gt=0)
    """Seconds a round may take before the training thread raises instead of waiting (a dead or stalled peer);
    also the timeout of ACCO's own process group (docs/failures-and-checkpoints.md)."""

    allow_untested_optimizer: bool = False
    """Run an optimizer ACCO has not checked (its estimate step is rolled back by copying the optimizer's state:
    checked for DeepSpeed's and torch's Adam/AdamW/SGD/Adagrad and DeepSpeed's Lamb/Lion), after checking that its
    whole state lives in ``optimizer.state`` and ``param_groups``."""

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


def ignored_keys_advice(ds_config: Any, acco: AccoConfig, *, client_lr_scheduler: Any = None) -> str | None:
    """The estimate round's keys set in mode ``"dpu"``, which has no estimate round (logged at ``initialize``)."""
    if acco.mode == "acco":
        return None
    keys = [k for k in ("estimate_compression", "estimate", "estimate_fraction", "sync_steps")
            if getattr(acco, k) != AccoConfig.model_fields[k].default]
    if not keys:
        return None
    return (f"ACCO: {', '.join(f'acco.{k}={getattr(acco, k)!r}' for k in keys)} ignored in acco.mode="
            f"{acco.mode!r}, which has no estimate round: remove them; see docs/configuration.md")


def _judged_scheduler(ds_config: Any, acco: AccoConfig, client_lr_scheduler: Any) -> dict[str, Any] | None:
    """The config's ``scheduler`` block ({} without one) for the LR-schedule advice, or None when it is not judged:
    no estimate round (DPU), or a scheduler passed to ``initialize`` (the HF Trainer's)."""
    if acco.mode != "acco" or client_lr_scheduler is not None:
        return None
    return (getattr(ds_config, "_param_dict", {}) or {}).get("scheduler") or {}


def warmup_advice(ds_config: Any, acco: AccoConfig, *, client_lr_scheduler: Any = None) -> str | None:
    """Why this run may end behind ZeRO-1 and what to change, or None (logged as a warning at ``initialize``).

    ACCO's estimate lowers the largest stable step below ZeRO-1's (``studies/estimate_stability.py``: to
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
        what = "no LR scheduler: the full LR from the first step"
    elif name in WARMUP_SCHEDULERS:
        steps = (scheduler.get("params") or {}).get("warmup_num_steps", 1000)
        if not isinstance(steps, int) or steps >= MIN_WARMUP_STEPS:
            return None
        what = f"scheduler.params.warmup_num_steps={steps} reaches the full LR within {steps} steps"
    else:
        return None
    if name is not None and acco.sync_steps >= steps:
        return None  # the warm-up already runs as ZeRO-1's steps: nothing to advise
    return (f"ACCO: {what}: ACCO's loss can spike there where ZeRO-1's does not. Set warmup_num_steps >= "
            f"{MIN_WARMUP_STEPS}, or acco.sync_steps to the warm-up's length; figures: docs/convergence.md")


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
        what = "no LR scheduler: the LR stays constant"
    elif name == CONSTANT_AFTER_WARMUP:
        what = f"scheduler.type={name} holds the peak LR after its warm-up"
    else:
        return None
    return (f"ACCO: {what}: at a held peak LR ACCO ends behind ZeRO-1. Decay the LR after the warm-up (scheduler "
            "WarmupDecayLR or WarmupCosineLR, total_num_steps = the run's steps); figures: docs/convergence.md")
