"""deepspeed-acco: ACCO (Accumulate While You Communicate, arXiv 2406.02613) for DeepSpeed ZeRO-1.

Turn it on with a top-level ``"acco": {"enabled": true}`` block next to ``"zero_optimization":
{"stage": 1}``, then either call ``deepspeed_acco.initialize(...)`` instead of
``deepspeed.initialize(...)``, or call ``deepspeed_acco.install()`` once so that plain
``deepspeed.initialize`` (HF Trainer, accelerate) honours the block. Importing this package
patches nothing and imports neither torch nor DeepSpeed until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``python -m deepspeed_acco.plan`` and other DeepSpeed-free modules start without importing DeepSpeed.
_EXPORTS = {
    "AccoConfig": "config", "AccoConfigError": "config", "get_acco_config": "config",
    "AccoEngine": "integration", "disable_cpu_shm_build": "integration", "flush": "integration",
    "initialize": "integration", "install": "integration", "is_installed": "integration",
    "pop_metrics": "integration", "uninstall": "integration",
    "StepMetrics": "metrics",
    "AccoNonFiniteGradients": "nonfinite", "AccoZeroOptimizer": "optimizer",
    "AccoRoundError": "pipeline", "AccoRoundTimeout": "pipeline",
    "AccoTerminated": "signals",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepspeed_acco' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deepspeed_acco.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.2.0"

__all__ = [
    "AccoConfig",
    "AccoConfigError",
    "AccoEngine",
    "AccoNonFiniteGradients",
    "AccoRoundError",
    "AccoRoundTimeout",
    "AccoTerminated",
    "AccoZeroOptimizer",
    "StepMetrics",
    "__version__",
    "disable_cpu_shm_build",
    "flush",
    "get_acco_config",
    "initialize",
    "install",
    "is_installed",
    "pop_metrics",
    "uninstall",
]
