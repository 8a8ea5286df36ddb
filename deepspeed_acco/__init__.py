"""deepspeed-acco: ACCO (Accumulate While You Communicate, arXiv 2406.02613) for DeepSpeed ZeRO-1.

Turn it on with a top-level ``"acco": {"enabled": true}`` block next to ``"zero_optimization":
{"stage": 1}``, then either call ``deepspeed_acco.initialize(...)`` instead of
``deepspeed.initialize(...)``, or call ``deepspeed_acco.install()`` once so that plain
``deepspeed.initialize`` (HF Trainer, accelerate) honours the block. Importing this package
patches nothing.
"""

from deepspeed_acco.config import AccoConfig, AccoConfigError, get_acco_config
from deepspeed_acco.integration import (
    AccoEngine,
    disable_cpu_shm_build,
    flush,
    initialize,
    install,
    is_installed,
    pop_metrics,
    uninstall,
)
from deepspeed_acco.metrics import StepMetrics
from deepspeed_acco.optimizer import AccoNonFiniteGradients, AccoZeroOptimizer
from deepspeed_acco.pipeline import AccoRoundError, AccoRoundTimeout
from deepspeed_acco.signals import AccoTerminated

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
