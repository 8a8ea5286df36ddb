"""ACCO under the Hugging Face ``Trainer``: ``deepspeed_acco.install()`` and a DeepSpeed JSON config.

The Trainer builds the DeepSpeed engine through accelerate, which calls plain
``deepspeed.initialize``; ``install()`` makes that call honour the config's ``"acco"`` block. Nothing
else is ACCO-specific: evaluation runs on the committed weights (the model is in eval mode), and
``save_model`` and the ``checkpoint-N/model.safetensors`` files hold them (``state_dict`` reads them);
epochs that end with a short accumulation step are committed as under ZeRO-1.

Same model and data as examples/train_lm.py (tiny GPT-2, byte-level stdlib text). At the end the
script checks, and prints, that the Trainer's ``state.global_step`` equals the engine's committed
steps, that the logged training loss fell, that the engine runs ACCO iff the config asks for it,
and that the parameters are identical on every rank; it exits 1 if any check fails.

Launch::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/hf_trainer.py --max_steps 8
    deepspeed examples/hf_trainer.py --deepspeed_config ds_configs/acco.json --preset small --max_steps 200  # GPUs
    torchrun --nproc_per_node 2 examples/hf_trainer.py --max_steps 8
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402  (the example next to this file; it also makes deepspeed_acco importable)

import deepspeed_acco  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# (DeepSpeed config key, TrainingArguments field): the values HF fills when the config says "auto".
_AUTO_KEYS = (
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("gradient_clipping", "max_grad_norm"),
    ("optimizer.params.lr", "learning_rate"),
    ("optimizer.params.eps", "adam_epsilon"),
    ("optimizer.params.weight_decay", "weight_decay"),
    ("scheduler.params.warmup_max_lr", "learning_rate"),
    ("scheduler.params.warmup_num_steps", "warmup_steps"),
)


def hf_deepspeed_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An HF-flavoured copy of a DeepSpeed config, and the TrainingArguments that reproduce it.

    Every value the Trainer also controls becomes ``"auto"`` in the copy, and its original value
    becomes the matching TrainingArguments keyword, so the Trainer and DeepSpeed cannot disagree
    (HF refuses mismatching explicit values) and the run is the one the JSON describes.
    ``train_batch_size`` is dropped (DeepSpeed derives it); the ``acco`` block is kept untouched.
    """
    hf = copy.deepcopy(config)
    hf.pop("train_batch_size", None)
    kwargs: dict[str, Any] = {}
    for dotted, field in _AUTO_KEYS:
        *parents, leaf = dotted.split(".")
        node = hf
        for key in parents:
            node = node.get(key, {})
        if leaf in node and node[leaf] != "auto":
            kwargs[field] = node[leaf]
            node[leaf] = "auto"
    schedule = hf.get("scheduler", {}).get("params", {})
    if "total_num_steps" in schedule:  # a decaying LR: over the Trainer's steps (it fills "auto" with them)
        schedule["total_num_steps"] = "auto"
    betas = hf.get("optimizer", {}).get("params", {}).get("betas")
    if isinstance(betas, list):
        kwargs["adam_beta1"], kwargs["adam_beta2"] = betas
        hf["optimizer"]["params"]["betas"] = "auto"
    return hf, kwargs


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length windows of a token stream as causal-LM examples (labels = inputs)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def params_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_lm.add_model_data_arguments(p)
    p.add_argument("--deepspeed_config", default=str(REPO / "ds_configs" / "acco.json"))
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--eval_batches", type=int, default=8, help="held-out micro-batches per evaluation")
    p.add_argument("--output_dir", default="runs/hf_trainer")
    return train_lm.finish_model_data_arguments(p.parse_args(argv))


def run_checks(trainer: Any, engine: Any, acco_enabled: bool) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) of each end-of-run check; the checksum check is collective."""
    from deepspeed import comm as dist

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    sums = [""] * dist.get_world_size()
    dist.all_gather_object(sums, params_checksum(engine.module))
    is_acco = isinstance(engine.optimizer, deepspeed_acco.AccoZeroOptimizer)
    return [
        ("global_step == engine.global_steps", trainer.state.global_step == engine.global_steps,
         f"{trainer.state.global_step} vs {engine.global_steps}"),
        ("training loss fell", len(losses) >= 2 and losses[-1] < losses[0],
         f"first {losses[0]:.4f} -> last {losses[-1]:.4f}" if losses else "no loss logged"),
        ("optimizer is ACCO iff the config enables it", is_acco == acco_enabled,
         f"{type(engine.optimizer).__name__}, acco.enabled={acco_enabled}"),
        ("parameters identical on all ranks", len(set(sums)) == 1, ", ".join(s[:12] for s in sums)),
    ]


def main(argv: list[str] | None = None) -> int:
    """Train with the Trainer, run the checks, return 0 if all pass."""
    args = parse_args(argv)
    train_lm.quiet_known_warnings()
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        deepspeed_acco.disable_cpu_shm_build()  # before the Trainer initializes the process group
        train_lm.share_cpu_cores()
    deepspeed_acco.install()

    from transformers import Trainer, TrainingArguments

    with open(args.deepspeed_config) as fh:
        ds_config = json.load(fh)
    hf_config, config_args = hf_deepspeed_config(ds_config)
    acco = deepspeed_acco.get_acco_config(ds_config)
    eval_steps = max(1, args.max_steps // 2)
    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=hf_config, use_cpu=on_cpu, max_steps=args.max_steps, seed=args.seed,
        logging_steps=1, eval_strategy="steps", eval_steps=eval_steps, save_strategy="no", report_to="none",
        dataloader_drop_last=True, per_device_eval_batch_size=config_args.get("per_device_train_batch_size", 8),
        **config_args)

    import torch.distributed as torch_dist

    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    with train_lm.rank_zero_first(rank):
        corpus = train_lm.build_corpus(args)
    model = train_lm.build_model(args, corpus.vocab_size, corpus.eot_id)
    eval_tokens = np.concatenate([b.numpy().reshape(-1) for b in train_lm.heldout_batches(
        corpus.heldout, args.eval_batches, training_args.per_device_eval_batch_size, args.seq_len)])
    trainer = Trainer(model=model, args=training_args, train_dataset=WindowDataset(corpus.train, args.seq_len),
                      eval_dataset=WindowDataset(eval_tokens, args.seq_len))
    trainer.train()
    final_eval = trainer.evaluate()["eval_loss"]

    engine = trainer.model_wrapped
    checks = run_checks(trainer, engine, acco.enabled)
    if rank == 0:
        evals = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e][:-1]
        print(f"held-out loss by step: {', '.join(f'{s}: {x:.4f}' for s, x in evals)}; after training "
              f"{final_eval:.4f}", flush=True)
        for name, ok, detail in checks:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    failed = [name for name, ok, _ in checks if not ok]
    print(f"[rank {rank}] hf_trainer " + (f"FAILED: {', '.join(failed)}" if failed else "done: all checks passed"),
          flush=True)
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
