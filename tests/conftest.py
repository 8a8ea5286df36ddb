"""Session-wide test settings: the header says which CPU ran the suite and how fp16 ran on it."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_report_header() -> list[str]:
    """CPU model, and DeepSpeed's answer to fp16 on it (the fp16 tests override a 'no', see the README)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from tests.dist_utils import cpu_fp16_probe
    except ImportError:
        from dist_utils import cpu_fp16_probe
    fp16 = cpu_fp16_probe()
    how = "fp16 jobs use DeepSpeed as is" if fp16 else \
        "fp16 jobs override the probe in their ranks (tests/dist_utils.py: allow_cpu_fp16)"
    return [f"cpu: {cpu_model()}", f"deepspeed cpu fp16 support: {fp16} ({how})"]
