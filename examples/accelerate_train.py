"""An ordinary accelerate training loop, with ACCO: ``deepspeed_acco.install()`` and the DeepSpeed JSON block.

Nothing else in the loop knows about ACCO: ``accelerator.accumulate``, ``accelerator.backward``, the
optimizer and scheduler wrappers, ``get_state_dict`` / ``save_model`` (they read the committed weights) and
evaluation in ``model.eval()`` (it runs on the committed weights) work as with plain DeepSpeed ZeRO-1,
also across epochs whose batch count is not a multiple of the accumulation steps (accelerate then ends
the epoch with a short step, which ACCO commits as ZeRO-1 does).

Launch (CPU, 2 processes; the same commands on GPUs without ``--cpu`` / ``DS_ACCELERATOR``)::

    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_train.py
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/accelerate_train.py --deepspeed_config ds_configs/acco.json

On CPU, accelerate 1.15 picks no process-group backend under DeepSpeed (every rank then believes it is
alone and trains on all the data); ``PartialState(cpu=True, backend="gloo")`` before ``Accelerator`` fixes
that, and this script does it when it runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402  (the example next to this file; it also makes deepspeed_acco importable)
from hf_trainer import WindowDataset  # noqa: E402

import deepspeed_acco  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_lm.add_model_data_arguments(p)
    p.add_argument("--deepspeed_config", default=str(REPO / "ds_configs" / "acco.json"),
                   help="under the deepspeed launcher; accelerate launch takes it from its config file")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches_per_epoch", type=int, default=22, help="micro-batches per process per epoch")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--output_dir", default="runs/accelerate")
    return train_lm.finish_model_data_arguments(p.parse_args())


def main() -> int:
    """Train, evaluate the held-out loss after every epoch, save the model; print the figures."""
    args = parse_args()
    train_lm.quiet_known_warnings()
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, set_seed
    from deepspeed.accelerator import get_accelerator

    deepspeed_acco.install()  # the one ACCO call: plain deepspeed.initialize (inside accelerate) honours "acco"
    if get_accelerator().device_name() == "cpu":
        deepspeed_acco.disable_cpu_shm_build()
        PartialState(cpu=True, backend="gloo")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # accelerate launch: DeepSpeed config from its yaml
        accelerator = Accelerator()
    else:  # deepspeed / torchrun launcher
        with open(args.deepspeed_config) as fh:
            ds_config = json.load(fh)
        accelerator = Accelerator(gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
                                  deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    set_seed(args.seed)
    with accelerator.main_process_first():
        corpus = train_lm.build_corpus(args)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    windows = args.batches_per_epoch * micro * accelerator.num_processes
    train = WindowDataset(corpus.train[: windows * args.seq_len], args.seq_len)
    held = torch.stack(train_lm.heldout_batches(corpus.heldout, args.eval_batches, micro, args.seq_len))
    model = train_lm.build_model(args, corpus.vocab_size, corpus.eot_id)
    loader = torch.utils.data.DataLoader(train, batch_size=micro, shuffle=True)
    optimizer, scheduler = DummyOptim(model.parameters()), None
    if "scheduler" in ds_config:
        scheduler = DummyScheduler(optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=b.to(accelerator.device), labels=b.to(accelerator.device)).loss for b in held]
        return float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))

    first = evaluate()
    accelerator.print(f"{accelerator.num_processes} processes, {len(loader)} micro-batches per process per epoch, "
                      f"gradient accumulation {accelerator.gradient_accumulation_steps}; held-out loss {first:.4f}")
    for epoch in range(args.epochs):
        model.train()
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
        held_out = evaluate()
        accelerator.print(f"epoch {epoch + 1}: held-out loss {held_out:.4f}, optimizer steps {model.global_steps}")
    accelerator.save_model(model, args.output_dir)
    accelerator.wait_for_everyone()
    ok = math.isfinite(held_out) and held_out < first
    print(f"[rank {accelerator.process_index}] accelerate_train done: held-out loss {first:.4f} -> {held_out:.4f}, "
          f"{model.global_steps} steps, saved to {args.output_dir}{'' if ok else ' (loss did not fall)'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
