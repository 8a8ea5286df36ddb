"""ACCO's information lines: which kernels and which round run, and each decision of the automatic schedule.

DeepSpeed's logger prints warnings only (its handler's level), so these lines have a logger of their own,
``logging.getLogger("deepspeed_acco")``, printed to stdout at INFO as ``[time] [INFO] ACCO ...``. Silence it with
``logging.getLogger("deepspeed_acco").setLevel(logging.WARNING)``; warnings stay on DeepSpeed's logger.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["info"]

_logger = logging.getLogger("deepspeed_acco")
if not _logger.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter("[%(asctime)s] [INFO] %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def info(line: str) -> None:
    """One information line (callers log it on one rank)."""
    _logger.info(line)
