"""ACCO as a drop-in under the real HF Trainer and accelerate, for ``tests/test_drop_in.py``.

Launched by the real launcher on CPU (2 ranks)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/drop_in.py --scenario hf --output_dir OUT
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/drop_in.py --scenario accelerate --output_dir OUT

User code does nothing ACCO-specific beyond ``deepspeed_acco.install()`` and the ``"acco"`` block: no
flush, no callback. Both scenarios train 3 epochs of 6 micro-batches per rank at
``gradient_accumulation_steps`` 4 (each epoch ends with a short step of 2) on the tiny GPT-2 of
``examples/train_lm.py``. Every rank writes ``OUT/result_rank{R}.json`` with what it measured; the
test asserts on it. The committed weights that reads are compared with come from DeepSpeed's own
``zero_to_fp32`` of the checkpoint saved at the same step, never from ACCO's code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import train_lm  # noqa: E402
from hf_trainer import WindowDataset  # noqa: E402

import deepspeed_acco  # noqa: E402
from tests.workers import PINNED_SCHEDULE  # noqa: E402

GA, MICRO, SEQ, WORLD = 4, 8, 64, 2
MICRO_PER_EPOCH = 6  # per rank: one step of 4, then a short step of 2 the caller forces
EPOCHS = 3
CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GA, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 2,
                                                 "warmup_type": "linear"}},
    "zero_optimization": {"stage": 1}, "steps_per_print": 10**9, "acco": {"enabled": True, **PINNED_SCHEDULE},
}


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("hf", "accelerate"), required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def corpus_windows() -> tuple[np.ndarray, np.ndarray]:
    """Training tokens for exactly 6 micro-batches per rank per epoch, and a held-out set."""
    args = train_lm.finish_model_data_arguments(_data_args())
    corpus = train_lm.build_corpus(args)
    train = corpus.train[: MICRO_PER_EPOCH * MICRO * WORLD * SEQ]
    held = np.concatenate([b.numpy().reshape(-1) for b in train_lm.heldout_batches(corpus.heldout, 2, MICRO, SEQ)])
    return train, held


def _data_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train_lm.add_model_data_arguments(p)
    return p.parse_args(["--preset", "tiny", "--seq_len", str(SEQ), "--seed", "1234"])


def fresh_model() -> torch.nn.Module:
    """The tiny GPT-2, same initialization every time; the global RNG (data order) is left as it was."""
    args = train_lm.finish_model_data_arguments(_data_args())
    with torch.random.fork_rng():
        return train_lm.build_model(args, train_lm.BYTE_VOCAB, train_lm.BYTE_VOCAB - 1)


def committed_from_checkpoint(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own conversion of a checkpoint: the fp32 master weights, i.e. the committed ones."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}


def max_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Max |diff| over the keys both hold (tied weights appear once in some formats)."""
    common = [k for k in ref if k in got]
    assert common, f"no common keys: {list(got)[:3]} vs {list(ref)[:3]}"
    return max(float((got[k].detach().float() - ref[k]).abs().max()) for k in common)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def trainer_eval_loss(weights: dict[str, torch.Tensor], held: np.ndarray, output_dir: Path) -> float:
    """The held-out loss a plain Trainer (no DeepSpeed, one process) reports for a fresh model with ``weights``."""
    from transformers import Trainer, TrainingArguments

    model = fresh_model()
    model.load_state_dict(weights)
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, per_device_eval_batch_size=MICRO,
                             report_to="none")
    return float(Trainer(model=model, args=args, eval_dataset=WindowDataset(held, SEQ)).evaluate()["eval_loss"])


def checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's tensors, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gathered(value: Any) -> list[Any]:
    """Every rank's ``value``."""
    from deepspeed import comm as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------------ HF Trainer
def run_hf(out: Path) -> dict[str, Any]:
    """Trainer A: eval every 3 steps, checkpoints every 3, save_model; B: no eval, no saves; C: resumes A's
    checkpoint-3. Checks every read path against zero_to_fp32 of the checkpoint of the same step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    train, held = corpus_windows()
    result: dict[str, Any] = {"epochs": [], "evals": []}

    class Probe(TrainerCallback):
        """Records the step counters at each epoch end and the live-vs-committed gap at each evaluation."""

        def __init__(self) -> None:
            self.trainer: Any = None

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            engine = self.trainer.model_wrapped
            result["epochs"].append([state.global_step, engine.global_steps])

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            optimizer = self.trainer.model_wrapped.optimizer
            backup = optimizer._live_backup  # the live (estimate) weights kept aside while evaluating
            gap = 0.0 if backup is None else max(float((a - b).abs().max())
                                                  for a, b in zip(backup, optimizer.bit16_groups_flat))
            result["evals"].append({"step": state.global_step, "eval_loss": metrics["eval_loss"],
                                    "live_minus_committed": gap})

    def trainer_for(name: str, evaluate: bool, save: bool) -> tuple[Any, Probe]:
        args = TrainingArguments(
            output_dir=str(out / name), deepspeed=CONFIG, use_cpu=True, num_train_epochs=EPOCHS, seed=7,
            per_device_train_batch_size=MICRO, per_device_eval_batch_size=MICRO, gradient_accumulation_steps=GA,
            learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
            warmup_steps=2, logging_steps=1, report_to="none", dataloader_drop_last=True,
            eval_strategy="steps" if evaluate else "no", eval_steps=3,
            save_strategy="steps" if save else "no", save_steps=3)
        probe = Probe()
        trainer = Trainer(model=fresh_model(), args=args, train_dataset=WindowDataset(train, SEQ),
                          eval_dataset=WindowDataset(held, SEQ), callbacks=[probe])
        probe.trainer = trainer
        return trainer, probe

    a, _ = trainer_for("a", evaluate=True, save=True)
    a.train()
    engine = a.model_wrapped
    result["engine"] = [type(engine).__name__, type(engine.optimizer).__name__]
    result["final"] = [a.state.global_step, engine.global_steps]
    a.save_model(str(out / "a" / "final"))
    result["final_eval"] = a.evaluate()["eval_loss"]
    committed = {k: v.float() for k, v in engine.module.state_dict().items()}
    result["final_checksum"] = gathered(checksum(committed))
    deepspeed_acco.flush(engine)  # an explicit flush still gives the same committed weights
    result["state_dict_vs_flush"] = max_diff(committed, {k: v.float() for k, v in engine.module.state_dict().items()})
    engine.destroy()

    b, _ = trainer_for("b", evaluate=False, save=False)
    b.train()
    result["no_eval_checksum"] = checksum({k: v.float() for k, v in b.model_wrapped.module.state_dict().items()})
    b.model_wrapped.destroy()

    result["epochs_resumed"] = []
    c, _ = trainer_for("c", evaluate=False, save=False)
    c.train(resume_from_checkpoint=str(out / "a" / "checkpoint-3"))
    result["resumed"] = [c.state.global_step, c.model_wrapped.global_steps]
    result["resumed_checksum"] = checksum({k: v.float() for k, v in c.model_wrapped.module.state_dict().items()})
    c.model_wrapped.destroy()

    # Reads against DeepSpeed's own conversion of the checkpoint of the same step (the test evaluates those
    # weights with a plain Trainer, in one process, for the evaluation figures).
    result["reads"] = {}
    for step in (3, 6):
        ckpt = out / "a" / f"checkpoint-{step}"
        ref = committed_from_checkpoint(ckpt, f"global_step{step}")
        result["reads"][f"checkpoint-{step}/model.safetensors"] = max_diff(load_safetensors(ckpt), ref)
    ref6 = committed_from_checkpoint(out / "a" / "checkpoint-6", "global_step6")
    result["reads"]["trainer.save_model"] = max_diff(load_safetensors(out / "a" / "final"), ref6)
    result["reads"]["engine.module.state_dict() after training"] = max_diff(committed, ref6)
    return result


# ------------------------------------------------------------------------------------------ accelerate
def run_accelerate(out: Path) -> dict[str, Any]:
    """An ordinary accelerate loop with accumulate(); save_state after epoch 2, then epoch 3; load_state and epoch 3
    again must repeat the first one exactly. Then get_state_dict, save_model and an eval-mode forward one step into
    epoch 4, against a checkpoint saved there."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin, DummyOptim, DummyScheduler, set_seed

    PartialState(cpu=True, backend="gloo")  # accelerate on CPU: without it, backend None and no sharding
    accelerator = Accelerator(gradient_accumulation_steps=GA, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=CONFIG),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(7)
    train, held = corpus_windows()
    model = fresh_model()
    loader = torch.utils.data.DataLoader(WindowDataset(train, SEQ), batch_size=MICRO, shuffle=True)
    optimizer = DummyOptim(model.parameters())
    scheduler = DummyScheduler(optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    result: dict[str, Any] = {"num_processes": accelerator.num_processes, "batches_per_epoch": len(loader),
                              "engine": [type(model).__name__, type(model.optimizer).__name__], "epochs": []}
    syncs = 0

    def one_epoch(epoch: int, stop_at_sync: int | None = None) -> None:
        nonlocal syncs
        model.train()
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                syncs += int(accelerator.sync_gradients)
            if stop_at_sync is not None and accelerator.sync_gradients and syncs == stop_at_sync:
                return
        result["epochs"].append([syncs, model.global_steps])

    for epoch in range(2):
        one_epoch(epoch)
    accelerator.save_state(str(out / "state"))
    one_epoch(2)
    final = checksum({k: v.float() for k, v in accelerator.get_state_dict(model).items()})
    accelerator.load_state(str(out / "state"))  # back to the end of epoch 2, in this same engine
    one_epoch(2)
    result["final_checksum"] = gathered(final)
    result["resumed_checksum"] = checksum({k: v.float() for k, v in accelerator.get_state_dict(model).items()})
    result["final"] = [syncs, model.global_steps]

    # Reads after the first step of an epoch (the commit of a 4-micro-batch step in flight, the model holding
    # the estimate), against a DeepSpeed checkpoint saved at that point.
    one_epoch(3, stop_at_sync=syncs + 1)
    accelerator.save_state(str(out / "mid"))
    ref = committed_from_checkpoint(out / "mid", (out / "mid" / "latest").read_text().strip())
    result["reads"] = {"accelerator.get_state_dict": max_diff(accelerator.get_state_dict(model), ref)}
    accelerator.save_model(model, str(out / "saved"))
    accelerator.wait_for_everyone()  # the main process writes the file
    result["reads"]["accelerator.save_model"] = max_diff(load_safetensors(out / "saved"), ref)
    live = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    result["live_minus_committed"] = max_diff(live, ref)
    model.eval()
    with torch.no_grad():  # evaluation in eval mode: the committed weights
        ids = torch.from_numpy(held[: MICRO * SEQ].astype(np.int64)).view(MICRO, SEQ)
        evaluated = float(model(input_ids=ids, labels=ids).loss)
    result["reads"]["forward in eval mode (loss, same batch)"] = abs(evaluated - _loss_on(ref, ids))
    return result


def _loss_on(weights: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    model = fresh_model()
    model.load_state_dict(weights, strict=False)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def main() -> int:
    """Run the scenario; write this rank's results."""
    args = parse_args()
    train_lm.quiet_known_warnings()
    deepspeed_acco.disable_cpu_shm_build()
    torch.set_num_threads(1)
    deepspeed_acco.install()
    out = Path(args.output_dir)
    result = run_hf(out) if args.scenario == "hf" else run_accelerate(out)
    from deepspeed import comm as dist

    rank = dist.get_rank()
    (out / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    bad = [k for k, v in result.get("reads", {}).items() if not (isinstance(v, float) and math.isfinite(v))]
    print(f"[rank {rank}] drop_in {args.scenario} done{' (non-finite: ' + str(bad) + ')' if bad else ''}",
          flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
