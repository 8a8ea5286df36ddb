"""Block-wise symmetric int8 quantization, for the compressed estimate round.

A vector is cut into blocks of ``block`` elements; each block gets one fp32 scale
``s = max|x| / 127`` and int8 values ``q = round(x / s)`` (clamped to [-127, 127]); ``deQ(q) = q * s``.
A block of zeros has ``s = 0`` and dequantizes to zeros. A block holding a NaN or Inf gets a NaN
scale, so its dequantized values are NaN: the round's overflow decision (an all-reduced squared
norm) still sees a non-finite gradient. The error per element is at most ``s / 2`` of its block.

Rows are quantized independently (``quantize_rows``): a flat buffer viewed as ``[world, chunk]``
gives each rank's chunk its own blocks, so a chunk can be sent to the rank that owns it.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "quantize_rows", "dequantize_rows", "scales_per_row"]

QMAX = 127.0


def scales_per_row(row_len: int, block: int) -> int:
    """Blocks (one fp32 scale each) in a row of ``row_len`` elements."""
    return -(-row_len // block)


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` of shape [rows, n] as [rows, blocks, block], zero-padded at the end of each row."""
    rows, n = x.shape
    pad = scales_per_row(n, block) * block - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(rows, -1, block)


def quantize_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D fp32 tensor in blocks of ``block``: (int8 [rows, n], fp32 scales [rows, blocks])."""
    rows, n = x.shape
    blocks = _blocked(x.float(), block)
    amax = blocks.abs().amax(dim=-1)
    finite = torch.isfinite(blocks).all(dim=-1)
    scales = torch.where(finite, amax / QMAX, torch.full_like(amax, float("nan")))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # zero and non-finite blocks: q = 0
    q = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8).view(rows, -1)[:, :n].contiguous(), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 [rows, n] values of ``quantize_rows``' output (NaN where a block's scale is NaN)."""
    rows, n = q.shape
    values = _blocked(q.float(), block) * scales.unsqueeze(-1)
    return values.view(rows, -1)[:, :n]
