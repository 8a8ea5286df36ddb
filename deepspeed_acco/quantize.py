"""Block-wise symmetric int8 quantization for the compressed rounds, run as fused kernels.

A row is cut into blocks of ``block`` elements (the last one zero-padded); each block gets one fp32 scale
``s = max|x| / 127`` and int8 values ``q = round(x / s)`` (clamped to [-127, 127]); ``deQ(q) = q * s``. A block of
zeros has ``s = 0`` and dequantizes to zeros. A block holding a NaN or Inf gets a NaN scale, so its dequantized
values are NaN: the round's overflow decision (an all-reduced squared norm) still sees a non-finite gradient.
The error per element is at most ``s / 2`` of its block. Rows are quantized independently: a flat buffer viewed
as ``[ranks, chunk]`` gives each chunk its own blocks, so a chunk can be sent to the rank that owns it.

The functions are written once, in plain torch. Eagerly each is about ten passes over its buffer; ``Quantizer``
runs them through ``torch.compile`` instead (one fused kernel per call: inductor's C++ on CPU, triton on GPU),
compiled at ``initialize`` for the shapes the rounds use, and falls back to the eager functions where
compiling is not possible (no C++ compiler, no triton, any error), with one log line that says which path runs.
Both paths give bitwise-identical values and scales (``tests/test_quantize.py``). Figures: docs/performance.md.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["QMAX", "BLOCK_SIZES", "Quantizer", "apply_update_", "check_block_size", "quantize_rows",
           "quantize_rows_residual_", "quantize_residual_into_", "quantize_update", "dequantize_rows",
           "dequantize_sum", "dequantize_sum_", "rebuild_", "scales_per_row"]

QMAX = 127.0
BLOCK_SIZES = tuple(1 << k for k in range(4, 17))
"""Block sizes the fused kernels take: powers of two from 16 to 65536 (whole vector lanes on CPU, whole
triton tiles on GPU, and a scale overhead of 4 / block bytes per value between 25 % and 0.006 %)."""


def check_block_size(block: int) -> int:
    """``block`` if the fused kernels take it, else a ValueError that names the nearest valid sizes."""
    if block in BLOCK_SIZES:
        return block
    below = max((b for b in BLOCK_SIZES if b < block), default=BLOCK_SIZES[0])
    above = min((b for b in BLOCK_SIZES if b > block), default=BLOCK_SIZES[-1])
    raise ValueError(f"acco.compression_block_size={block}: must be a power of two from {BLOCK_SIZES[0]} to "
                     f"{BLOCK_SIZES[-1]} (the fused int8 kernels' block); use {below} or {above}")


def scales_per_row(row_len: int, block: int) -> int:
    """Blocks (one fp32 scale each) in a row of ``row_len`` elements."""
    return -(-row_len // block)


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (``[rows, n]``) as fp32 ``[rows, blocks, block]``, each row zero-padded at its end (for the per-block
    reductions: a zero changes neither a block's max |x| nor whether it is finite)."""
    rows, n = x.shape
    x = x.float()
    pad = scales_per_row(n, block) * block - n
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(rows, -1, block)


def _per_value(per_block: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """A ``[rows, blocks]`` tensor repeated over each block's values: ``[rows, n]``. (Values are never read from a
    padded tensor: inductor's CPU kernels have misread a padded row's last, partial block.)"""
    return per_block.repeat_interleave(block, dim=-1)[:, :n]


def quantize_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` (``[rows, n]``) in blocks: (int8 ``[rows, n]``, fp32 scales ``[rows, blocks]``)."""
    n = x.shape[-1]
    blocks = _blocked(x, block)
    finite = torch.isfinite(blocks).all(dim=-1)
    scales = torch.where(finite, blocks.abs().amax(dim=-1) / QMAX, torch.full_like(blocks[..., 0], float("nan")))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # zero and non-finite blocks: q = 0
    values = x.float()
    q = torch.where(_per_value(finite, block, n), torch.round(values / _per_value(safe, block, n)).clamp(-QMAX, QMAX),
                    torch.zeros_like(values))
    return q.to(torch.int8), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 ``[rows, n]`` of ``quantize_rows``' output (NaN where a block's scale is NaN). ``q`` may be
    ``[..., n]`` with any strides, ``scales`` ``[..., blocks]`` alike: the leading dims are the rows, in order."""
    n = q.shape[-1]
    return q.reshape(-1, n).float() * _per_value(scales.reshape(-1, scales.shape[-1]), block, n)


def quantize_rows_residual_(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(x)``, and ``x`` becomes what the quantization lost: ``x - deQ(Q(x))``, in its own dtype."""
    q, scales = quantize_rows(x, block)
    x.sub_(dequantize_rows(q, scales, block).to(x.dtype))
    return q, scales


def quantize_residual_into_(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """``quantize_rows_residual_(x)`` with its int8 values and scales written into ``q`` and ``scales``."""
    values, per_block = quantize_rows_residual_(x, block)
    q.copy_(values)
    scales.copy_(per_block)


def quantize_update(new: torch.Tensor, old: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` of ``new - old`` as one row: the estimate's update of a master shard."""
    return quantize_rows((new - old).reshape(1, -1), block)


def dequantize_sum(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """The fp32 sum over the rows of ``deQ(q)`` (``[rows, n]`` -> ``[n]``): an owner adding the chunks it received."""
    return dequantize_rows(q, scales, block).sum(dim=0)


def dequantize_sum_(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """``out = dequantize_sum(q, scales, block)``: the sum written into a buffer the caller keeps."""
    out.copy_(dequantize_sum(q, scales, block))


def rebuild_(out: torch.Tensor, base: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """``out = base + deQ(q)`` in fp32, cast to ``out``'s dtype: ``out`` and ``base`` are ``[rows, n]`` (they may not
    alias), ``q`` ``[..., n]`` and ``scales`` ``[..., blocks]`` whose leading dims are those rows, in order."""
    update = dequantize_rows(q, scales, block).reshape(out.shape)
    out.copy_((base.float() + update).to(out.dtype))


def apply_update_(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """``out = out + deQ(q)`` in fp32, cast to ``out``'s dtype (``rebuild_`` in place; ``out`` is ``[rows, n]``)."""
    update = dequantize_rows(q, scales, block).reshape(out.shape)
    out.copy_((out.float() + update).to(out.dtype))


_KERNELS: dict[str, Callable[..., Any]] = {
    "quantize_residual": quantize_residual_into_, "quantize_update": quantize_update,
    "dequantize_sum": dequantize_sum_, "rebuild": rebuild_, "apply_update": apply_update_}


def _signature(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a compiled kernel specializes on: each tensor's shape, strides, dtype and device."""
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device.type) if torch.is_tensor(a) else a for a in args)


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: torch.compile keeps its compiled shapes per code object, at most 8,
    so each quantizer (an optimizer, one per engine in a process) gets its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Quantizer:
    """The int8 kernels of one optimizer's rounds: compiled at ``prepare`` for the shapes given, eager otherwise.

    Compiled kernels only ever see whole blocks: a row whose length is not a multiple of ``block`` runs its
    last, partial block eagerly (inductor's CPU kernels have mis-indexed such a block in torch 2.13). ``path``
    says which runs ("compiled" or "eager") and ``reason`` why. A call whose shapes were not prepared runs
    eagerly (same values), so a round never waits for a compiler; a compiled kernel that raises at run time
    sends this quantizer to the eager path for good, with one line to ``warn``.
    """

    def __init__(self, block: int, warn: Callable[[str], None] | None = None) -> None:
        self.block = check_block_size(block)
        self.path = "eager"
        self.reason = "not prepared"
        self.warn = warn
        self._compiled: dict[str, Callable[..., Any]] = {}
        self._ready: set[tuple[str, tuple[Any, ...]]] = set()
        self._preparing = False

    def prepare(self, examples: Sequence[tuple[str, tuple[Any, ...]]], compile_kernels: bool = True) -> str:
        """Compile every kernel for its example call (``(method name, args)``, e.g. ``("quantize_update", (new,
        old))``) and run it once; returns one line saying which path runs, with the compile time or the error.

        Any error (no C++ compiler, no triton, an unsupported device) leaves every kernel eager.
        """
        start = time.perf_counter()
        if not compile_kernels:
            self.reason = "compiling disabled"
        else:
            self._preparing = True
            try:
                with torch.no_grad():
                    for name, args in examples:
                        getattr(self, name)(*args)
                self.path, self.reason = "compiled", f"torch.compile, {len(self._ready)} kernels"
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                self._compiled.clear()
                self._ready.clear()
                text = str(err).strip()
                self.path = "eager"
                self.reason = f"compiling failed: {type(err).__name__}: {text.splitlines()[0][:100] if text else ''}"
            finally:
                self._preparing = False
        device = examples[0][1][0].device.type if examples else "cpu"
        line = (f"ACCO: int8 quantizer: {self.path} ({self.reason}; {device}, block {self.block}, "
                f"{time.perf_counter() - start:.1f} s)")
        if self.path == "eager" and compile_kernels:
            line += "; same values, slower: install a C++ compiler (CPU) or triton (GPU); see docs/how-it-works.md"
        return line

    def _whole(self, n: int) -> int:
        """The length of a row's whole blocks."""
        return n - n % self.block

    def _call(self, name: str, *args: Any) -> Any:
        """Kernel ``name`` on whole blocks: compiled if prepared for these shapes (compiled now in ``prepare``)."""
        key = (name, _signature(args))
        if self._preparing:
            fn = self._compiled.get(name)
            if fn is None:
                fn = self._compiled[name] = torch.compile(_own_copy(_KERNELS[name]), dynamic=False, fullgraph=True)
            result = fn(*args, self.block)
            self._ready.add(key)
            return result
        fn = self._compiled.get(name)
        if fn is not None and key in self._ready:
            try:
                return fn(*args, self.block)
            except Exception as err:  # noqa: BLE001 - a kernel that fails at run time: eager from now on
                self._compiled.clear()
                self.path, self.reason = "eager", f"compiled kernel failed: {type(err).__name__}"
                if self.warn is not None:
                    self.warn(f"ACCO: int8 quantizer: the compiled {name} kernel raised {type(err).__name__} "
                              f"({str(err).strip()[:100]}); eager from now on (same values, slower); see "
                              "docs/how-it-works.md")
        return _KERNELS[name](*args, self.block)

    def _eager(self) -> bool:
        return not self._preparing and not self._compiled

    def quantize_residual_(self, x: torch.Tensor, q: torch.Tensor | None = None,
                           scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_rows_residual_(x, block)`` of ``x`` (``[rows, n]``): ``x`` becomes the residual. The int8
        values and scales go into ``q`` (int8 ``[rows, n]``) and ``scales`` (fp32 ``[rows, blocks]``) when given:
        buffers the round keeps (why: ``ShardedRound._send_buffers``)."""
        n = x.shape[-1]
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device) if q is None else q
        scales = torch.empty(x.shape[0], scales_per_row(n, self.block), device=x.device) if scales is None else scales
        whole = self._whole(n)
        if whole == n or self._eager():
            if whole:
                self._call("quantize_residual", x, q, scales)
            else:
                quantize_residual_into_(x, q, scales, self.block)
            return q, scales
        if whole:
            self._call("quantize_residual", x[:, :whole], q[:, :whole], scales[:, :-1])
        quantize_residual_into_(x[:, whole:], q[:, whole:], scales[:, -1:], self.block)
        return q, scales

    def quantize_update(self, new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_update(new, old, block)`` of two flat shards: one row of int8 and its scales."""
        n = new.numel()
        whole = self._whole(n)
        if whole == n or self._eager():
            return self._call("quantize_update", new, old) if whole else quantize_update(new, old, self.block)
        q = torch.empty(1, n, dtype=torch.int8, device=new.device)
        scales = torch.empty(1, scales_per_row(n, self.block), device=new.device)
        if whole:
            q[:, :whole], scales[:, :-1] = self._call("quantize_update", new[:whole], old[:whole])
        q[:, whole:], scales[:, -1:] = quantize_update(new[whole:], old[whole:], self.block)
        return q, scales

    def dequantize_sum(self, q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``dequantize_sum(q, scales, block)``: the fp32 sum over the rows of ``deQ(q)``, written into ``out`` (fp32
        ``[n]``) when given: a buffer the round keeps (why: ``ShardedRound._send_buffers``)."""
        n = q.shape[-1]
        out = torch.empty(n, device=q.device) if out is None else out
        whole = self._whole(n)
        if whole == n or self._eager():
            if whole:
                self._call("dequantize_sum", out, q, scales)
            else:
                dequantize_sum_(out, q, scales, self.block)
            return out
        if whole:
            self._call("dequantize_sum", out[:whole], q[:, :whole], scales[:, :-1])
        dequantize_sum_(out[whole:], q[:, whole:], scales[:, -1:], self.block)
        return out

    def rebuild_(self, out: torch.Tensor, base: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
        """``out = base + deQ(q)``: flat ``out`` and ``base``, whose chunks are the rows of ``q`` (``[..., chunk]``)."""
        n = q.shape[-1]
        whole = self._whole(n)
        rows_out, rows_base = out.view(-1, n), base.view(-1, n)
        if whole == n or self._eager():
            self._call("rebuild", rows_out, rows_base, q, scales) if whole else \
                rebuild_(rows_out, rows_base, q, scales, self.block)
            return
        if whole:
            self._call("rebuild", rows_out[:, :whole], rows_base[:, :whole], q[..., :whole], scales[..., :-1])
        rebuild_(rows_out[:, whole:], rows_base[:, whole:], q[..., whole:], scales[..., -1:], self.block)

    def apply_update_(self, out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
        """``out += deQ(q)`` in fp32, then cast: ``rebuild_`` with ``base`` = ``out`` (a kernel may not alias)."""
        n = q.shape[-1]
        whole = self._whole(n)
        rows_out = out.view(-1, n)
        if whole == n or self._eager():
            self._call("apply_update", rows_out, q, scales) if whole else \
                apply_update_(rows_out, q, scales, self.block)
            return
        if whole:
            self._call("apply_update", rows_out[:, :whole], q[..., :whole], scales[..., :-1])
        apply_update_(rows_out[:, whole:], q[..., whole:], scales[..., -1:], self.block)
