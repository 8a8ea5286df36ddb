"""Train a small causal language model with DeepSpeed ZeRO-1, with or without ACCO.

The main job of deepspeed-acco. It builds a GPT-2 (or Llama) style model from a transformers
config (nothing is downloaded), trains it on real text that exists on every machine (the .py
files of Python's standard library, byte-level tokens by default), evaluates the held-out loss on
the committed weights, and writes per-step metrics, a summary, and a loss plot.

Launch (2 ranks on CPU; the same command with a DeepSpeed config without "acco" is plain ZeRO-1)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_lm.py \\
        --deepspeed_config ds_configs/acco.json --max_steps 30 --output_dir runs/acco

    # baseline and the delayed-parameter-update variant, same data and model
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_lm.py \\
        --deepspeed_config ds_configs/zero1.json --max_steps 30 --output_dir runs/zero1
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_lm.py \\
        --deepspeed_config ds_configs/dpu.json --max_steps 30 --output_dir runs/dpu

    # GPUs: a bigger preset (drop DS_ACCELERATOR; --num_gpus defaults to all GPUs of the node)
    deepspeed examples/train_lm.py --deepspeed_config ds_configs/acco.json \\
        --preset gpt2-125m --tokenizer bpe --max_steps 2000 --output_dir runs/gpt2

    # several nodes (see hostfile.example)
    deepspeed --hostfile hostfile.example examples/train_lm.py --deepspeed_config ds_configs/acco.json ...

    # checkpoint every 10 steps, then continue from the latest checkpoint up to step 60
    deepspeed --num_gpus 2 examples/train_lm.py ... --max_steps 30 --save_every 10 --output_dir runs/a
    deepspeed --num_gpus 2 examples/train_lm.py ... --max_steps 60 --save_every 10 --output_dir runs/a --resume

    # ... or continue on 3 ranks: convert the checkpoint to a universal one first
    python -m deepspeed.checkpoint.ds_to_universal --input_folder runs/a/checkpoints/step30 \\
        --output_folder runs/a/checkpoints/step30_universal --inject_missing_state
    deepspeed --num_gpus 3 examples/train_lm.py ... --max_steps 60 --output_dir runs/a \\
        --resume runs/a/checkpoints/step30_universal

``torchrun --nproc_per_node 2 examples/train_lm.py --deepspeed_config ...`` works as well.

Outputs (rank 0 writes them into ``--output_dir``; see ``lm_metrics.py``):

- ``metrics.jsonl``: one JSON object per committed optimizer step (see ``STEP_FIELDS``);
- ``summary.json``: totals, throughput, initial/final held-out loss, communication figures;
- ``loss.png``: train and held-out loss against tokens and against wall-clock seconds.

Data (``lm_data.py``): each rank reads a disjoint shard of the training token stream (fixed-length
windows in a seeded order); the held-out set is whole files chosen by a hash of their path, so it
never overlaps the training text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

try:
    import deepspeed_acco
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import deepspeed_acco
sys.path.append(str(Path(__file__).resolve().parent))  # lm_data, lm_metrics: also when imported as examples.train_lm

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from lm_data import (
    BYTE_VOCAB,
    PRESETS,
    Corpus,
    ModelPreset,
    ShardedWindows,
    add_model_data_arguments,
    build_corpus,
    build_model,
    byte_tokenize,
    finish_model_data_arguments,
    heldout_batches,
    is_heldout,
    rank_zero_first,
    stdlib_documents,
)
from lm_metrics import STEP_FIELDS, MetricsLog, plot_losses, summarize, update_bar

__all__ = [
    "BYTE_VOCAB",
    "Corpus",
    "ModelPreset",
    "PRESETS",
    "STEP_FIELDS",
    "ShardedWindows",
    "add_model_data_arguments",
    "build_corpus",
    "build_model",
    "byte_tokenize",
    "evaluate",
    "finish_model_data_arguments",
    "heldout_batches",
    "is_heldout",
    "main",
    "is_universal_checkpoint",
    "quiet_known_warnings",
    "rank_zero_first",
    "resume_position",
    "share_cpu_cores",
    "stdlib_documents",
]


# ---------------------------------------------------------------------------------------- flags
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (DeepSpeed's ``--deepspeed_config`` included)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_data_arguments(p)
    p.add_argument("--max_steps", type=int, default=60, help="stop after this many committed optimizer steps")
    p.add_argument("--schedule_steps", type=int, default=None,
                   help="the decaying LR schedule's length (WarmupDecayLR/WarmupCosineLR total_num_steps; default "
                   "--max_steps): a run stopped early and resumed keeps its schedule")
    p.add_argument("--lr", type=float, default=None, help="override the config's optimizer lr (and warmup_max_lr)")
    p.add_argument("--eval_every", type=int, default=10, help="held-out loss every N steps (0: only first/last)")
    p.add_argument("--eval_batches", type=int, default=8, help="micro-batches in the fixed held-out set "
                   "(split over the ranks); 0 disables evaluation")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps into OUTPUT/checkpoints")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint: no value = the latest in OUTPUT/checkpoints; or a checkpoint "
                        "directory (with a 'latest' file) or one tag directory of it; at another world size, a tag "
                        "converted by deepspeed.checkpoint.ds_to_universal (load_universal is then set)")
    p.add_argument("--output_dir", default="runs/train_lm")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (e.g. ds_configs/acco.json)")
    return finish_model_data_arguments(args)


def load_ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed config dict, with ``--lr`` applied and a decaying LR schedule (``WarmupDecayLR``,
    ``WarmupCosineLR``) decaying over ``--schedule_steps`` (default ``--max_steps``): ACCO matches
    ZeRO-1 with an LR that decays after its warm-up (docs/convergence.md)."""
    with open(args.deepspeed_config) as fh:
        config: dict[str, Any] = json.load(fh)
    scheduler = config.get("scheduler", {})
    if scheduler.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        scheduler.setdefault("params", {})["total_num_steps"] = args.schedule_steps or args.max_steps
    if args.lr is not None:
        config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
        sched = config.get("scheduler", {}).get("params", {})
        for key in ("warmup_max_lr", "cycle_max_lr"):
            if key in sched:
                sched[key] = args.lr
    return config


# ---------------------------------------------------------------------------------- processes
def quiet_known_warnings() -> None:
    """Hide torch 2.13's deprecation notice for ``all_gather_into_tensor``/``reduce_scatter_tensor`` (harmless)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _local_env(names: tuple[str, ...], default: str) -> int:
    """The first of these environment variables that is set (DeepSpeed/torchrun, then Open MPI, then MPICH)."""
    return int(next((os.environ[n] for n in names if n in os.environ), default))


def share_cpu_cores() -> None:
    """On CPU, give each local rank its share of the cores (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = _local_env(("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"), "1")
        threads = max(1, (os.cpu_count() or 1) // max(local, 1))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _setup_distributed() -> None:
    """One process group for the job; on CPU, skip DeepSpeed's shm JIT build and oversubscription."""
    quiet_known_warnings()
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        deepspeed_acco.disable_cpu_shm_build()
        share_cpu_cores()
    else:
        accel.set_device(_local_env(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), "0"))
    deepspeed.init_distributed()


# -------------------------------------------------------------------------------- checkpoints
def _find_checkpoint(args: argparse.Namespace) -> tuple[str, str | None] | None:
    """(load_dir, tag) that ``--resume`` names, or None when 'auto' finds nothing."""
    target = Path(args.output_dir) / "checkpoints" if args.resume == "auto" else Path(args.resume)
    if (target / "latest").is_file():
        return str(target), None
    if target.is_dir() and any(target.glob("*model_states.pt")):
        return str(target.parent), target.name
    if args.resume == "auto":
        return None
    raise FileNotFoundError(f"--resume {args.resume}: neither a checkpoint directory with a 'latest' file nor a "
                            "checkpoint tag directory")


def is_universal_checkpoint(found: tuple[str, str | None] | None) -> bool:
    """Whether the checkpoint tag that ``--resume`` names was converted by ``ds_to_universal`` (a ``zero/`` folder)."""
    if found is None:
        return False
    load_dir, tag = found
    if tag is None:
        tag = (Path(load_dir) / "latest").read_text().strip()
    return (Path(load_dir) / tag / "zero").is_dir()


def _fresh_state() -> dict[str, Any]:
    """Running totals a checkpoint carries over (client_state), at the start of training."""
    return {"samples": 0, "wall_s": 0.0, "train_s": 0.0, "initial_eval_loss": None, "pending_rows": []}


def _resume(engine: Any, args: argparse.Namespace,
            found: tuple[str, str | None] | None) -> tuple[dict[str, Any], int, int | None]:
    """Load the ``--resume`` checkpoint: (running totals, this rank's micro-batch position, step), or a fresh start.

    Every rank's data position is in the checkpoint. At the world size it was saved with, each rank
    continues its own shard of the stream; at another one (a universal checkpoint) see ``resume_position``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if found is None:
        if rank == 0:
            print(f"--resume: no checkpoint under {Path(args.output_dir) / 'checkpoints'}; starting from scratch",
                  flush=True)
        return _fresh_state(), 0, None
    path, client = engine.load_checkpoint(found[0], tag=found[1])
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {found}")
    positions = client["data_position"]["micro_batches_per_rank"]
    local_micro = resume_position(positions, rank, world)
    state = {k: client.get(k, v) for k, v in _fresh_state().items()}
    if rank == 0:
        moved = "" if len(positions) == world else \
            f" (saved by {len(positions)} ranks at micro-batches {positions}; resuming every rank at {local_micro})"
        print(f"resumed from {path} at step {engine.global_steps}{moved}", flush=True)
    return state, local_micro, engine.global_steps


def resume_position(positions: list[int], rank: int, world: int) -> int:
    """This rank's micro-batch position after a resume; ``positions`` are the saving ranks' positions.

    Rank ``r``'s micro-batch ``i`` holds the stream's windows ``(i * world + r) * batch + j`` (see
    ``ShardedWindows``), so a job of ``W`` ranks that each read ``p`` micro-batches has read the first
    ``p * W`` micro-batches' worth of windows. At the same world size each rank continues at its own
    position. At another world size ``W'`` every rank continues at ``ceil(max(p) * W / W')``: no window
    of the epoch is read twice, and fewer than ``W'`` micro-batches' worth are skipped.
    """
    if len(positions) == world:
        return positions[rank]
    return -(-max(positions) * len(positions) // world)


def _save(engine: Any, save_dir: Path, local_micro: int, log: MetricsLog, totals: dict[str, Any]) -> None:
    """``engine.save_checkpoint`` with every rank's data position and the running totals in client_state.

    The save does not disturb training. The rows of steps whose ACCO record has not arrived yet (it comes
    with the step's commit round) go into the checkpoint, so a resumed run writes them when it gets them.
    """
    positions = [0] * dist.get_world_size()
    dist.all_gather_object(positions, local_micro)
    log.add_records(deepspeed_acco.pop_metrics(engine))
    client = {"data_position": {"micro_batches_per_rank": positions}, "samples": log.samples,
              "pending_rows": log.pending, **totals}
    engine.save_checkpoint(str(save_dir), tag=f"step{engine.global_steps}", client_state=client)


# ------------------------------------------------------------------------------- evaluation
def evaluate(engine: Any, batches: list[torch.Tensor], train_window: tuple[float, int]) -> tuple[float, float]:
    """Held-out loss of the committed weights, and the all-rank mean train loss since the last call.

    In eval mode the model holds the committed weights (with ACCO, see ``deepspeed_acco.committed``);
    back in train mode training goes on exactly as without the evaluation. Rank ``r`` evaluates
    batches ``r::world``; one all-reduce combines them, so every rank returns the same figures.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    model = engine.module
    was_training = engine.training
    engine.eval()
    total = torch.zeros(4, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for batch in batches[rank::world]:
            ids = batch.to(engine.device)
            total[0] += float(model(input_ids=ids, labels=ids).loss)
            total[1] += 1
    total[2], total[3] = train_window
    dist.all_reduce(total)
    engine.train(was_training)
    values = total.tolist()
    return values[0] / max(values[1], 1), (values[2] / values[3] if values[3] else float("nan"))


# ---------------------------------------------------------------------------------- training
def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job; return the summary (every rank computes it, rank 0 writes the files)."""
    # Setup: process group, data, model, engine; the checkpoint to resume from, if any.
    _setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with rank_zero_first(rank):
        corpus = build_corpus(args)
    model = build_model(args, corpus.vocab_size, corpus.eot_id)
    config = load_ds_config(args)
    found = _find_checkpoint(args) if args.resume else None
    if is_universal_checkpoint(found):  # resuming at another world size (README, "Checkpoints")
        config.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed_acco.initialize(model=model, model_parameters=model.parameters(), config=config)
    acco = deepspeed_acco.get_acco_config(config)
    micro_batch, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    n_params = sum(p.numel() for p in engine.module.parameters())

    state, local_micro, resumed_step = _resume(engine, args, found) if args.resume else (_fresh_state(), 0, None)
    windows = ShardedWindows(corpus.train, args.seq_len, micro_batch, rank, world, args.seed)
    eval_set = heldout_batches(corpus.heldout, args.eval_batches, micro_batch, args.seq_len) \
        if args.eval_batches > 0 else []
    log = MetricsLog(out / "metrics.jsonl" if rank == 0 else None, acco.enabled, micro_batch, args.seq_len, world,
                     state["samples"], resumed_step, state["pending_rows"])
    if acco.enabled and log.pending and not engine.optimizer.loaded_acco_state:
        log.emit(without_records=True)  # e.g. a universal checkpoint: ACCO's pipeline restarted
    if rank == 0:
        print(f"data: {corpus.description}; {len(corpus.train):,} train tokens, {len(corpus.heldout):,} held-out\n"
              f"model: {args.model or f'{args.arch} {args.preset}'}, {n_params:,} params, seq_len {args.seq_len}; "
              f"world {world}, micro-batch {micro_batch}, grad accumulation {ga}, "
              f"acco {'off' if not acco.enabled else acco.mode}", flush=True)
    start_step = engine.global_steps
    if eval_set and state["initial_eval_loss"] is None:
        state["initial_eval_loss"], _ = evaluate(engine, eval_set, (0.0, 0))
    last_eval: float | None = state["initial_eval_loss"]

    # The loop: one micro-batch per iteration; a committed optimizer step is logged, evaluated and saved.
    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0 or args.no_progress,
               desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    wall_base, train_base = state["wall_s"], state["train_s"]
    paused = 0.0  # seconds spent in evaluation and checkpoints during this run
    step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
    step_micro = 0
    window_loss, window_count = 0.0, 0  # train loss since the last evaluation
    engine.train()
    while engine.global_steps < args.max_steps:
        batch = windows[local_micro].to(engine.device)
        local_micro += 1
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        step_loss += loss.detach()
        step_micro += 1
        lr = engine.get_lr()[0]
        before = engine.global_steps
        engine.step()
        if engine.global_steps == before:
            continue

        step = engine.global_steps
        mean_loss = float(step_loss) / step_micro
        window_loss, window_count = window_loss + float(step_loss), window_count + step_micro
        wall = time.perf_counter() - t0
        grad_norm = None if acco.enabled else _as_float(engine.get_global_grad_norm())
        log.add_step(step, mean_loss, lr, step_micro, wall_base + wall, grad_norm)
        step_loss.zero_()
        step_micro = 0

        pause_start = time.perf_counter()
        events = [("Train/Samples/train_loss", mean_loss, engine.global_samples)]
        if eval_set and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            last_eval, window = evaluate(engine, eval_set, (window_loss, window_count))
            window_loss, window_count = 0.0, 0
            log.set_eval(step, last_eval, window)
            events.append(("Train/Samples/eval_loss", last_eval, engine.global_samples))
        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            _save(engine, out / "checkpoints", local_micro, log,
                  {"wall_s": wall_base + wall, "train_s": train_base + wall - paused,
                   "initial_eval_loss": state["initial_eval_loss"]})
        log.add_records(deepspeed_acco.pop_metrics(engine))
        paused += time.perf_counter() - pause_start

        if rank == 0:
            if engine.monitor.enabled:
                engine.monitor.write_events(events)
            update_bar(bar, log, mean_loss, wall - paused)
            bar.update(1)
    bar.close()

    # The summary: the last commit's figures, then summary.json and loss.png.
    deepspeed_acco.flush(engine)
    log.add_records(deepspeed_acco.pop_metrics(engine))
    wall = time.perf_counter() - t0
    train_s = wall - paused
    summary = summarize(args, engine, log, state, acco, n_params, start_step, wall, train_s, last_eval)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_losses(log.rows, state["initial_eval_loss"], out / "loss.png",
                    f"{summary['model']}, {Path(args.deepspeed_config).name} (acco: {summary['acco'] or 'off'}), "
                    f"{world} ranks, {summary['tokens_per_s']:,.0f} tokens/s")
        print(f"metrics: {out / 'metrics.jsonl'}\nsummary: {out / 'summary.json'}\nplot:    {out / 'loss.png'}",
              flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, print the per-rank success line, then tear the process group down."""
    args = parse_args(argv)
    summary = train(args)
    rank = dist.get_rank()
    print(f"[rank {rank}] train_lm done: {summary['steps']} steps, final held-out loss {summary['final_eval_loss']}",
          flush=True)
    dist.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
