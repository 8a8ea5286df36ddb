"""The ``acco`` block and the refusals at ``initialize``: each bad setting fails with a message
that names the key and the fix. Pure parsing tests run in-process; the table of refused
DeepSpeed configs runs every case through ``deepspeed_acco.initialize`` in one spawned rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspeed_acco import AccoConfig, AccoConfigError, get_acco_config
from deepspeed_acco.split import split_micro_batches
from tests.dist_utils import run_distributed
from tests.workers import base_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("block,needle", [
    ({"enabled": True, "mdoe": "acco"}, "acco.mdoe"),
    ({"enabled": True, "mdoe": "acco"}, "did you mean acco.mode"),
    ({"enabled": True, "round_timeout": 5}, "did you mean acco.round_timeout_s"),
    ({"enabled": True, "mode": "fast"}, "acco.mode"),
    ({"enabled": True, "adaptive_accumulation": "often"}, "acco.adaptive_accumulation"),
    ({"enabled": True, "max_micro_batches_per_round": 0}, "acco.max_micro_batches_per_round"),
    ({"enabled": True, "round_timeout_s": -1}, "acco.round_timeout_s"),
    ({"enabled": True, "grad_accum_dtype": "fp8"}, "acco.grad_accum_dtype"),
    ({"enabled": True, "estimate_fraction": 1.0}, "acco.estimate_fraction"),
    ({"enabled": True, "estimate_fraction": 0}, "acco.estimate_fraction"),
    ({"enabled": True, "sync_steps": -1}, "acco.sync_steps"),
    ({"enabled": True, "sync_steps": 2.5}, "acco.sync_steps"),
    ({"enabled": True, "mode": "dpu", "adaptive_accumulation": True}, "adaptive_accumulation"),
])
def test_block_refused(block: dict[str, Any], needle: str) -> None:
    """A typo, a bad type or value in the block fails naming the key."""
    with pytest.raises(AccoConfigError, match=needle.replace(".", r"\.")):
        get_acco_config({"acco": block})


def test_block_not_an_object() -> None:
    """A non-object block is refused with the expected shape in the message."""
    with pytest.raises(AccoConfigError, match="must be a JSON object"):
        get_acco_config({"acco": "on"})


def test_defaults() -> None:
    """No block means disabled; defaults are acco mode, fp32 accumulation, no adaptive accumulation, three quarters
    of a step in the estimate half."""
    cfg = get_acco_config({})
    assert (cfg.enabled, cfg.mode, cfg.adaptive_accumulation, cfg.grad_accum_dtype) == (False, "acco", False, "fp32")
    assert cfg.estimate_fraction == 0.75
    assert cfg.sync_steps == 0


@pytest.mark.parametrize(("ga", "fraction", "halves"), [
    (2, 0.75, (1, 1)), (3, 0.75, (2, 1)), (4, 0.75, (3, 1)), (6, 0.75, (5, 1)), (8, 0.75, (6, 2)),
    (16, 0.75, (12, 4)), (4, 0.5, (2, 2)), (8, 0.5, (4, 4)), (4, 0.1, (1, 3)), (4, 0.99, (3, 1))])
def test_split_micro_batches(ga: int, fraction: float, halves: tuple[int, int]) -> None:
    """A step's micro-batches split by the fraction, rounded half up, each half at least one."""
    assert split_micro_batches(ga, fraction) == halves


_FIELDS = {
    "enabled": st.one_of(st.booleans(), st.integers(), st.text(max_size=3)),
    "mode": st.one_of(st.sampled_from(["acco", "dpu"]), st.text(max_size=4)),
    "adaptive_accumulation": st.one_of(st.booleans(), st.floats(allow_nan=False)),
    "max_micro_batches_per_round": st.one_of(st.none(), st.integers(-3, 50)),
    "grad_accum_dtype": st.one_of(st.sampled_from(["fp32", "bf16"]), st.text(max_size=4)),
    "round_timeout_s": st.one_of(st.floats(-10, 1e4, allow_nan=False), st.integers(-5, 100)),
    "bogus_key": st.integers(),
}


def _valid(block: dict[str, Any]) -> bool:
    """An independent statement of what the block accepts."""
    def is_bool(v: Any) -> bool:
        return isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) or (
            isinstance(v, float) and v in (0.0, 1.0)) or (isinstance(v, str) and v.lower() in (
                "0", "1", "t", "f", "y", "n", "on", "off", "yes", "no", "true", "false"))
    rules = {
        "enabled": is_bool,
        "mode": lambda v: v in ("acco", "dpu"),
        "adaptive_accumulation": is_bool,
        "max_micro_batches_per_round": lambda v: v is None or (isinstance(v, int) and v >= 1),
        "grad_accum_dtype": lambda v: v in ("fp32", "bf16"),
        "round_timeout_s": lambda v: v > 0,
    }
    if any(k not in rules or not rules[k](v) for k, v in block.items()):
        return False
    adaptive = block.get("adaptive_accumulation", False)
    adaptive = adaptive if not isinstance(adaptive, str) else adaptive.lower() in ("1", "t", "y", "on", "yes", "true")
    return not (bool(adaptive) and block.get("mode", "acco") != "acco")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(_FIELDS)), st.none()).flatmap(
    lambda keys: st.fixed_dictionaries({k: _FIELDS[k] for k in keys})))
def test_property_nothing_invalid_accepted(block: dict[str, Any]) -> None:
    """Random blocks: every valid one parses, every invalid one is refused with AccoConfigError."""
    if _valid(block):
        assert isinstance(get_acco_config({"acco": block}), AccoConfig)
    else:
        with pytest.raises(AccoConfigError):
            get_acco_config({"acco": block})


ON = {"acco": {"enabled": True}}
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("stage 2", base_config(zero_optimization={"stage": 2}, **ON), "zero_optimization.stage=2"),
    ("stage 0", base_config(zero_optimization={"stage": 0}, **ON), "zero_optimization.stage=0"),
    ("optimizer offload", base_config(zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}, **ON),
     "zero_optimization.offload_optimizer"),
    ("GA 1", base_config(ga=1, **ON), "gradient_accumulation_steps must be at least 2"),
    ("1-bit Adam", base_config(optimizer={"type": "OneBitAdam", "params": {"lr": 1e-3}}, **ON), "onebitadam"),
    ("0/1 Adam", base_config(optimizer={"type": "ZeroOneAdam", "params": {"lr": 1e-3}}, **ON), "zerooneadam"),
    ("1-bit Lamb", base_config(optimizer={"type": "OneBitLamb", "params": {"lr": 1e-3}}, **ON), "onebitlamb"),
    ("cap below minimum", base_config(ga=8, acco={"enabled": True, "adaptive_accumulation": True,
                                                  "max_micro_batches_per_round": 2}),
     "max_micro_batches_per_round=2"),
    ("grad_accum_dtype", base_config(data_types={"grad_accum_dtype": "fp32"}, **ON), "data_types.grad_accum_dtype"),
    ("prescale", base_config(prescale_gradients=True, **ON), "prescale_gradients"),
    ("typo in block", base_config(acco={"enabled": True, "adaptive_acumulation": True}),
     "acco.adaptive_acumulation: Extra inputs are not permitted (got True; did you mean acco.adaptive_accumulation?)"),
    ("bad mode", base_config(acco={"enabled": True, "mode": "sync"}), "acco.mode"),
    ("bad type", base_config(acco={"enabled": True, "round_timeout_s": "soon"}), "acco.round_timeout_s"),
    ("dpu + adaptive", base_config(acco={"enabled": True, "mode": "dpu", "adaptive_accumulation": True}),
     "acco.adaptive_accumulation=true is only implemented for acco.mode='acco'"),
    ("lr_scaling without adaptive", base_config(acco={"enabled": True, "lr_scaling": "sqrt"}),
     "acco.lr_scaling='sqrt' scales the LR by how much a round's batch grew, which only adaptive accumulation "
     "does; set acco.adaptive_accumulation to true or acco.lr_scaling to 'none'"),
    ("param offload", base_config(zero_optimization={"stage": 1, "offload_param": {"device": "cpu"}}, **ON),
     "zero_optimization.offload_param"),
    # DeepSpeed 0.19 refuses amp itself, before ACCO's check, with its own fix ("Use DeepSpeed 'fp16', 'bf16'").
    ("amp", base_config(amp={"enabled": True}, **ON), "amp integration has been removed"),
    ("torch_autocast", base_config(torch_autocast={"enabled": True}, **ON), "does not support torch_autocast"),
    ("sparse_gradients", base_config(sparse_gradients=True, **ON), "sparse_gradients"),
    ("untested optimizer", base_config(optimizer={"type": "Adafactor", "params": {"lr": 1e-3}}, **ON),
     "allow_untested_optimizer"),
]


def _refusals(rank: int, world_size: int, cases: list[tuple[str, dict[str, Any], str]]) -> dict[str, str]:
    """In a spawned rank: initialize each case and return the error text (or 'ACCEPTED')."""
    import torch
    from deepspeed.runtime.pipe.module import PipelineModule

    import deepspeed_acco
    from tests.dist_utils import init_rank
    from tests.workers import WithLoss, make_model

    init_rank()
    out = {}
    for name, cfg, _ in cases:
        module = WithLoss(make_model())
        try:
            deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
            out[name] = "ACCEPTED"
        except Exception as err:  # noqa: BLE001 - the message is what we check
            out[name] = f"{type(err).__name__}: {err}"
    module = WithLoss(make_model())
    try:
        deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=base_config(**ON),
                                  optimizer=torch.optim.RMSprop(module.parameters(), lr=1e-3))
        out["client RMSprop"] = "ACCEPTED"
    except Exception as err:  # noqa: BLE001
        out["client RMSprop"] = f"{type(err).__name__}: {err}"
    try:
        pipe = PipelineModule(layers=[torch.nn.Linear(4, 4)], num_stages=1, loss_fn=torch.nn.functional.mse_loss)
        deepspeed_acco.initialize(model=pipe, model_parameters=pipe.parameters(), config=base_config(**ON))
        out["pipeline"] = "ACCEPTED"
    except Exception as err:  # noqa: BLE001
        out["pipeline"] = f"{type(err).__name__}: {err}"
    return out


@pytest.mark.timeout(240)
def test_refused_at_initialize() -> None:
    """Every unsupported combination is refused at initialize with a message naming the key and the fix."""
    got = run_distributed(_refusals, 1, REFUSED, timeout_s=220)[0]
    expected = {name: needle for name, _, needle in REFUSED}
    expected.update({"client RMSprop": "allow_untested_optimizer", "pipeline": "pipeline parallelism"})
    for name, needle in expected.items():
        print(f"{name}: {got[name]}")
        assert "Error" in got[name].split(":")[0], f"{name} was accepted"
        assert needle.lower() in got[name].lower(), f"{name}: {got[name]}"
    for name, _, _ in REFUSED:  # the message says what to do
        assert any(w in got[name].lower() for w in ("set ", "use ", "remove", "move", "raise", "valid keys")), got[name]


def test_ds_configs_differ_only_by_acco_block() -> None:
    """zero1.json, acco.json and dpu.json share batch, optimizer and precision: only the acco block differs."""
    cfgs = {name: json.loads((REPO / "ds_configs" / f"{name}.json").read_text()) for name in ("zero1", "acco", "dpu")}
    assert "acco" not in cfgs["zero1"]
    for name in ("acco", "dpu"):
        rest = {k: v for k, v in cfgs[name].items() if k != "acco"}
        assert rest == cfgs["zero1"], name
        assert get_acco_config(cfgs[name]).enabled
    assert get_acco_config(cfgs["dpu"]).mode == "dpu"


def _warmup(name: str | None, **params: Any) -> Any:
    from types import SimpleNamespace

    raw: dict[str, Any] = {} if name is None else {"scheduler": {"type": name, "params": params}}
    return SimpleNamespace(_param_dict=raw)


@pytest.mark.parametrize("ds_config,mode,client,needle", [
    (_warmup(None), "acco", None, "no LR scheduler: the full LR from the first step"),
    (_warmup("WarmupLR", warmup_num_steps=10), "acco", None, "scheduler.params.warmup_num_steps=10 reaches"),
    (_warmup("WarmupCosineLR", warmup_num_steps=99, total_num_steps=1000), "acco", None, "warmup_num_steps=99"),
    (_warmup("WarmupLR", warmup_num_steps=100), "acco", None, None),
    (_warmup("WarmupDecayLR", total_num_steps=5000), "acco", None, None),  # DeepSpeed's default: 1000 steps
    (_warmup("OneCycle"), "acco", None, None),  # no warm-up length to judge
    (_warmup("WarmupLR", warmup_num_steps="auto"), "acco", None, None),  # an unresolved "auto": not judged
    (_warmup(None), "dpu", None, None),  # no estimate round
    (_warmup(None), "acco", object(), None),  # the caller's scheduler (HF Trainer) is not inspected
])
def test_warmup_advice(ds_config: Any, mode: str, client: Any, needle: str | None) -> None:
    """A run whose LR reaches its full value within fewer than 100 steps gets a warning that says why and the fix."""
    from deepspeed_acco.config import warmup_advice

    advice = warmup_advice(ds_config, AccoConfig(enabled=True, mode=mode), client_lr_scheduler=client)
    if needle is None:
        assert advice is None
    else:
        assert advice is not None and needle in advice
        assert "warmup_num_steps >= 100" in advice and "acco.sync_steps" in advice, advice
        assert "\n" not in advice and len(advice) <= 300 and "docs/convergence.md" in advice, advice


@pytest.mark.parametrize("sync_steps,needle", [(0, "or acco.sync_steps to the warm-up's length"),
                                               (9, "or acco.sync_steps to the warm-up's length"),
                                               (10, None), (11, None)])
def test_warmup_advice_names_sync_steps(sync_steps: int, needle: str | None) -> None:
    """The short-warm-up warning offers acco.sync_steps as a fix; once it covers the warm-up, nothing is logged."""
    from deepspeed_acco.config import warmup_advice

    advice = warmup_advice(_warmup("WarmupLR", warmup_num_steps=10), AccoConfig(enabled=True, sync_steps=sync_steps))
    if needle is None:
        assert advice is None, advice
    else:
        assert advice is not None and needle in advice, advice


@pytest.mark.parametrize("ds_config,mode,client,needle", [
    (_warmup(None), "acco", None, "no LR scheduler: the LR stays constant"),
    (_warmup("WarmupLR", warmup_num_steps=200), "acco", None, "scheduler.type=WarmupLR holds the peak LR"),
    (_warmup("WarmupDecayLR", warmup_num_steps=10, total_num_steps=100), "acco", None, None),
    (_warmup("WarmupCosineLR", warmup_num_steps=10, total_num_steps=100), "acco", None, None),
    (_warmup("OneCycle"), "acco", None, None),
    (_warmup("WarmupLR", warmup_num_steps=200), "dpu", None, None),  # no estimate round
    (_warmup("WarmupLR", warmup_num_steps=200), "acco", object(), None),  # the caller's scheduler is not inspected
])
def test_constant_lr_advice(ds_config: Any, mode: str, client: Any, needle: str | None) -> None:
    """A run that holds its peak LR gets a warning that names the decaying schedulers; a decaying one gets none."""
    from deepspeed_acco.config import constant_lr_advice

    advice = constant_lr_advice(ds_config, AccoConfig(enabled=True, mode=mode, sync_steps=20),
                                client_lr_scheduler=client)
    if needle is None:
        assert advice is None, advice
    else:
        assert advice is not None and needle in advice, advice
        assert "WarmupDecayLR or WarmupCosineLR" in advice and "total_num_steps" in advice, advice
        assert "\n" not in advice and len(advice) <= 300 and "docs/convergence.md" in advice, advice


def _initialize_logs(rank: int, world_size: int, configs: list[dict[str, Any]]) -> list[list[str]]:
    """In a spawned rank: initialize each config; return the warnings DeepSpeed's logger printed."""
    import deepspeed_acco
    from tests.dist_utils import init_rank, logged_warnings
    from tests.workers import WithLoss, make_model

    init_rank()
    out = []
    for cfg in configs:
        module = WithLoss(make_model())
        with logged_warnings() as seen:
            engine, *_ = deepspeed_acco.initialize(model=module, model_parameters=module.parameters(), config=cfg)
        engine.destroy()
        out.append(seen)
    return out


@pytest.mark.timeout(120)
def test_initialize_warns_outside_the_regime() -> None:
    """initialize logs the warm-up warning for a 10-step warm-up and not for a 200-step one, the constant-LR
    warning for WarmupLR whatever its warm-up, and neither for a 200-step warm-up that then decays."""
    short = base_config(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}}, **ON)
    long = base_config(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 200}}, **ON)
    decay = base_config(scheduler={"type": "WarmupDecayLR",
                                   "params": {"warmup_num_steps": 200, "total_num_steps": 1000}}, **ON)
    logs = run_distributed(_initialize_logs, 1, [short, long, decay], timeout_s=100)[0]
    constant = "WarmupLR holds the peak LR"
    assert [m for m in logs[0] if "warmup_num_steps=10 reaches" in m], logs[0]
    assert [m for m in logs[0] if constant in m], logs[0]
    assert not [m for m in logs[1] if "warmup_num_steps" in m], logs[1]
    assert [m for m in logs[1] if constant in m], logs[1]
    assert not [m for m in logs[2] if "ACCO: " in m], logs[2]
