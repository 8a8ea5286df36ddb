"""GPU only: ACCO's round work runs on its own CUDA stream, concurrently with compute kernels.

Runs ACCO at world size 1 (NCCL) under the torch profiler, reads the Chrome trace, and checks
that kernels on ACCO's stream overlap in time with kernels on the compute stream. Run on a GPU
machine with ``python -m pytest tests/gpu -m gpu``; skipped (with the reason) without CUDA.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA-stream path)")]


def _overlap_ms(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total = 0.0
    b = sorted(b)
    for s, e in sorted(a):
        for s2, e2 in b:
            if s2 >= e:
                break
            total += max(0.0, min(e, e2) - max(s, s2))
    return total / 1000.0


def test_round_overlaps_compute_on_its_own_stream(tmp_path: Path) -> None:
    """Kernels of the background round and of forward/backward run on different, overlapping streams."""
    import deepspeed

    import deepspeed_acco

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    width, depth = 4096, 8
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    cfg = {"train_micro_batch_size_per_gpu": 8192, "gradient_accumulation_steps": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "acco": {"enabled": True},
           "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(8192, width, device="cuda", dtype=torch.bfloat16)

    def micro() -> None:
        out = engine(x)
        loss = out.float().pow(2).mean()
        engine.backward(loss)
        engine.step()

    for _ in range(8):
        micro()
    torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            micro()
        deepspeed_acco.flush(engine)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    out_dir = os.environ.get("OUT")
    if out_dir:
        shutil.copy(trace, os.path.join(out_dir, "acco_cuda_trace.json"))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    # With ACCO the optimizer's multi-tensor kernels run only inside rounds, and matrix products
    # only in forward/backward: their streams are the round's stream and the compute stream.
    round_streams = {int(k["args"]["stream"]) for k in kernels if "multi_tensor" in k["name"]}
    compute_streams = {int(k["args"]["stream"]) for k in kernels
                       if any(t in k["name"] for t in ("gemm", "nvjet", "cutlass", "sm90_xmma"))}
    print(f"round streams {round_streams}, compute streams {compute_streams}")
    assert round_streams and compute_streams, "kernels of both kinds are needed"
    assert not round_streams & compute_streams, "round kernels ran on the compute stream"

    def spans(streams: set[int]) -> list[tuple[float, float]]:
        return [(float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels
                if int(k["args"]["stream"]) in streams]

    overlap = _overlap_ms(spans(round_streams), spans(compute_streams))
    busy = sum(e - s for s, e in spans(round_streams)) / 1000.0
    print(f"round-stream kernel time {busy:.2f} ms, of which concurrent with compute-stream kernels "
          f"{overlap:.2f} ms ({100 * overlap / busy:.0f}%)")
    assert overlap > 0.25 * busy, "round kernels did not run concurrently with compute kernels"
    engine.destroy()
