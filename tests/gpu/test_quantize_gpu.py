"""GPU only: the int8 kernels compiled with triton give eager's bits, and how long they take for 100M values.

Run on a GPU machine with ``python -m pytest tests/gpu -m gpu -s``; skipped (with the reason) without CUDA.
Prints the compiled and eager times of quantizing 100M bf16 values (rows of a flat buffer, block 256, the
residual written back), the figure ``docs/performance.md`` asks for.
"""

from __future__ import annotations

import pytest
import torch

from deepspeed_acco.quantize import Quantizer, quantize_rows_residual_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the triton kernels)")]

VALUES, ROWS, BLOCK = 100_000_000, 8, 256


def _time_ms(fn: object, reps: int = 5) -> float:
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_compiled_kernels_on_gpu_equal_eager_and_their_time() -> None:
    """Bitwise equal int8 values, scales and residuals (random, zero and non-finite blocks, a padded row length),
    then the time of 100M bf16 values compiled against eager."""
    x = torch.randn(ROWS, VALUES // ROWS + 37, device="cuda", dtype=torch.bfloat16)
    x[0, :BLOCK] = 0
    x[1, 1000] = float("nan")
    quantizer = Quantizer(BLOCK)
    line = quantizer.prepare([("quantize_residual_", (x.clone(),))])
    print(line)
    assert quantizer.path == "compiled", line
    eager, compiled = x.clone(), x.clone()
    with torch.no_grad():
        q, s = quantize_rows_residual_(eager, BLOCK)
        qc, sc = quantizer.quantize_residual_(compiled)
    assert torch.equal(q, qc) and torch.equal(s.nan_to_num(7.0), sc.nan_to_num(7.0))
    assert torch.equal(eager.float().nan_to_num(7.0), compiled.float().nan_to_num(7.0))
    with torch.no_grad():
        compiled_ms = _time_ms(lambda: quantizer.quantize_residual_(x.clone()))
        eager_ms = _time_ms(lambda: quantize_rows_residual_(x.clone(), BLOCK))
    print(f"GPU {torch.cuda.get_device_name()}: quantize with residual, {x.numel():,} bf16 values, block {BLOCK}: "
          f"compiled {compiled_ms:.2f} ms, eager {eager_ms:.2f} ms (each includes a clone of the input)")
    assert compiled_ms < eager_ms
