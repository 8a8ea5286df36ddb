"""The int8 kernels of the compressed rounds (``deepspeed_acco/quantize.py``), in this process.

- compiled (``torch.compile``) and eager give bitwise-identical int8 values, scales, residuals, sums and
  rebuilt parameters on random, zero, non-finite and padded rows (row lengths that are not a multiple of the
  block), and both equal the reference quantizer written from the algorithm page (``int8_roundtrip``);
- a compiler that is not there (``torch._inductor.config.cpp.cxx`` pointing nowhere) or a ``torch.compile`` that
  raises leaves the quantizer eager, with one line that says so, and it still computes the same values;
- a block size the kernels cannot take is refused at config time, naming the key and valid sizes.
"""

from __future__ import annotations

import pytest
import torch

from deepspeed_acco.config import AccoConfigError, get_acco_config
from deepspeed_acco.quantize import (
    Quantizer,
    check_block_size,
    dequantize_rows,
    dequantize_sum,
    quantize_rows,
    quantize_rows_residual_,
    quantize_update,
    rebuild_,
)
from tests.acco_reference import int8_roundtrip

SHAPES = [(2, 96, 16), (2, 106, 16), (3, 37, 16), (1, 4099, 256), (4, 1000, 64), (1, 10, 16)]
"""(rows, row length, block): whole blocks, padded last blocks, a row shorter than one block."""


def _rows(rows: int, n: int, block: int, seed: int = 0) -> torch.Tensor:
    """Random rows over four orders of magnitude, the first block of row 0 zero, a NaN and an Inf in others."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen) * torch.logspace(-3, 1, n)
    x[0, :block] = 0.0
    if rows > 1:
        x[1, n // 2] = float("nan")
        x[-1, n - 1] = float("inf")
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where NaN (NaN != NaN otherwise)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and \
        torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _prepared(block: int, x: torch.Tensor) -> Quantizer:
    rows, n = x.shape
    q, s = quantize_rows(x, block)
    out = torch.empty(rows * n)
    quantizer = Quantizer(block)
    line = quantizer.prepare([("quantize_residual_", (x.clone(),)), ("quantize_update", (x[0].clone(), x[-1].clone())),
                              ("dequantize_sum", (q, s)), ("rebuild_", (out, torch.zeros(rows * n), q, s))])
    assert quantizer.path == "compiled", line
    return quantizer


@pytest.mark.parametrize("rows,n,block", SHAPES)
def test_compiled_equals_eager_bitwise(rows: int, n: int, block: int) -> None:
    """Every kernel, compiled against eager: the same bits (values, scales, residual, sums, rebuilt flats)."""
    x = _rows(rows, n, block)
    quantizer = _prepared(block, x)
    x_eager, x_compiled = x.clone(), x.clone()
    q, s = quantize_rows_residual_(x_eager, block)
    qc, sc = quantizer.quantize_residual_(x_compiled)
    assert _same(q, qc) and _same(s, sc) and _same(x_eager, x_compiled)
    x_kept, q_kept, s_kept = x.clone(), torch.zeros_like(q), torch.full_like(s, 7.0)  # a round's send buffers
    assert all(a is b for a, b in zip(quantizer.quantize_residual_(x_kept, q_kept, s_kept), (q_kept, s_kept)))
    assert _same(q, q_kept) and _same(s, s_kept) and _same(x_eager, x_kept)
    assert _same(quantize_update(x[0], x[-1], block)[0], quantizer.quantize_update(x[0], x[-1])[0])
    assert _same(quantize_update(x[0], x[-1], block)[1], quantizer.quantize_update(x[0], x[-1])[1])
    assert _same(dequantize_sum(q, s, block), quantizer.dequantize_sum(q, s))
    kept = torch.full((n,), 7.0)  # a round's buffer: written in place, every value
    assert quantizer.dequantize_sum(q, s, kept) is kept and _same(dequantize_sum(q, s, block), kept)
    base = torch.randn(rows * n)
    out_eager, out_compiled = torch.empty(rows * n), torch.empty(rows * n)
    rebuild_(out_eager.view(rows, n), base.view(rows, n), q, s, block)
    quantizer.rebuild_(out_compiled, base, q, s)
    assert _same(out_eager, out_compiled)


@pytest.mark.parametrize("rows,n,block", SHAPES)
def test_kernels_match_the_reference_quantizer(rows: int, n: int, block: int) -> None:
    """deQ(Q(x)) row by row equals the page's quantizer; zero blocks have scale 0; a block with NaN/Inf gives NaN."""
    x = _rows(rows, n, block, seed=1)
    q, s = quantize_rows(x, block)
    expected = torch.stack([int8_roundtrip(row, block) for row in x])
    assert _same(dequantize_rows(q, s, block), expected)
    assert float(s[0, 0]) == 0.0 and bool((q[0, : min(n, 16)] == 0).all())
    if rows > 1:
        assert torch.isnan(s[1, (n // 2) // block]) and torch.isnan(s[-1, -1])
    residual = x.clone()
    quantize_rows_residual_(residual, block)
    finite = torch.isfinite(expected)
    assert torch.equal(residual[finite], (x - expected)[finite])


def test_missing_compiler_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler where inductor looks for one: eager, one line naming the error, the same values."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/acco-test-g++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    x = _rows(2, 200, 32)
    quantizer = Quantizer(32)
    line = quantizer.prepare([("quantize_update", (x[0].clone(), x[1].clone()))])
    print(line)
    assert quantizer.path == "eager" and "compiling failed" in line and "C++ compiler" in line
    assert line.count("\n") == 0
    q, s = quantizer.quantize_update(x[0], x[1])
    assert _same(q, quantize_update(x[0], x[1], 32)[0]) and _same(s, quantize_update(x[0], x[1], 32)[1])


def test_compile_error_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error from torch.compile (an unsupported device, a backend missing) leaves the kernels eager."""
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("backend unavailable on this device")

    monkeypatch.setattr(torch, "compile", broken)
    x = _rows(3, 64, 16)
    quantizer = Quantizer(16)
    line = quantizer.prepare([("quantize_residual_", (x.clone(),))])
    assert quantizer.path == "eager" and "RuntimeError: backend unavailable" in line
    eager, via = x.clone(), x.clone()
    assert _same(quantize_rows_residual_(eager, 16)[0], quantizer.quantize_residual_(via)[0]) and _same(eager, via)
    assert "compiling disabled" in Quantizer(16).prepare([("quantize_residual_", (x.clone(),))], compile_kernels=False)


def test_block_size_the_kernels_cannot_take() -> None:
    """acco.compression_block_size must be a power of two from 16 to 65536: the error names the key and a fix."""
    assert check_block_size(256) == 256
    with pytest.raises(AccoConfigError, match=r"acco.compression_block_size=100: must be a power of two .* use 64 "
                                              r"or 128"):
        get_acco_config({"acco": {"enabled": True, "compression_block_size": 100}})
    for bad in (8, 1 << 17):
        with pytest.raises(AccoConfigError, match=f"compression_block_size={bad}"):
            get_acco_config({"acco": {"enabled": True, "compression_block_size": bad}})
    assert get_acco_config({"acco": {"enabled": True, "compression_block_size": 1024}}).compression_block_size == 1024
