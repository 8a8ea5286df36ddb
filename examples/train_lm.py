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

Outputs (rank 0 writes them into ``--output_dir``):

- ``metrics.jsonl``: one JSON object per committed optimizer step (see ``STEP_FIELDS``);
- ``summary.json``: totals, throughput, initial/final held-out loss, communication figures;
- ``loss.png``: train and held-out loss against tokens and against wall-clock seconds.

Data: each rank reads a disjoint shard of the training token stream (fixed-length windows in a
seeded order); the held-out set is whole files chosen by a hash of their path, so it never
overlaps the training text.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import deepspeed_acco
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import deepspeed_acco

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

__all__ = [
    "Corpus",
    "ModelPreset",
    "PRESETS",
    "STEP_FIELDS",
    "ShardedWindows",
    "add_model_data_arguments",
    "build_corpus",
    "build_model",
    "byte_tokenize",
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

EOT = "<|endoftext|>"
BYTE_VOCAB = 256 + 1
"""Byte-level vocabulary: the 256 byte values plus one end-of-document token (id 256)."""

STEP_FIELDS = ("step", "loss", "lr", "samples", "tokens", "wall_s")
"""Keys present in every line of metrics.jsonl. ACCO runs add ``ACCO_FIELDS`` (null without ACCO),
evaluation steps add ``eval_loss`` and ``train_loss_window`` (mean train loss over all ranks'
micro-batches since the previous evaluation)."""

ACCO_FIELDS = ("exposed_wait_s", "commit_round_s", "estimate_round_s", "compute_s", "micro_batches_per_rank",
               "micro_batches", "bytes_communicated", "overflow", "grad_norm", "round_phases_s")


# --------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """Transformer dimensions of a size preset."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    """Default ``--seq_len`` for this preset."""


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(n_layer=2, d_model=128, n_head=4, seq_len=128),  # ~0.4 M params: 2 CPU cores, minutes
    "mid": ModelPreset(n_layer=4, d_model=256, n_head=4, seq_len=256),  # ~3.3 M: between tiny and small
    "dense": ModelPreset(n_layer=2, d_model=512, n_head=8, seq_len=64),  # ~6.5 M, short sequences: matmul-bound
    "small": ModelPreset(n_layer=6, d_model=384, n_head=6, seq_len=256),  # ~11 M: a laptop or one GPU
    "gpt2-125m": ModelPreset(n_layer=12, d_model=768, n_head=12, seq_len=1024),  # GPT-2 small shape: GPUs
}


def build_model(args: argparse.Namespace, vocab_size: int, eot_id: int) -> torch.nn.Module:
    """The causal LM: ``--model`` via ``from_pretrained``, else a fresh ``--arch`` model of ``--preset`` size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    preset = PRESETS[args.preset]
    if args.arch == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_positions=args.seq_len, n_embd=preset.d_model,
            n_layer=preset.n_layer, n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eot_id, eos_token_id=eot_id)
    else:
        config = AutoConfig.for_model(
            "llama", vocab_size=vocab_size, max_position_embeddings=args.seq_len, hidden_size=preset.d_model,
            intermediate_size=4 * preset.d_model, num_hidden_layers=preset.n_layer,
            num_attention_heads=preset.n_head, num_key_value_heads=preset.n_head, tie_word_embeddings=True,
            bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    if getattr(args, "perturb_init", 0.0):
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.0 + args.perturb_init)
    return model


# ---------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Corpus:
    """Token streams of the training and held-out documents (documents end with ``eot_id``)."""

    train: np.ndarray
    heldout: np.ndarray
    vocab_size: int
    eot_id: int
    description: str


def is_heldout(key: str, heldout_pct: float) -> bool:
    """Whether the document named ``key`` (a relative path) belongs to the held-out split (stable hash)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % 10_000
    return bucket < heldout_pct * 100


def stdlib_documents(root: str | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, sorted; site-packages excluded."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    docs: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and (here / d).resolve() not in skip)
        docs += [((here / f).relative_to(base).as_posix(), here / f) for f in sorted(filenames) if f.endswith(".py")]
    if not docs:
        raise RuntimeError(f"no .py files found under the standard library at {base}; pass --dataset")
    return docs


def _dataset_documents(spec: str, config_name: str | None, text_column: str) -> list[tuple[str, str]]:
    """(key, text) documents of an HF dataset name or of local .txt/.jsonl/.json files (comma separated)."""
    from datasets import load_dataset

    files = [f for f in spec.split(",") if f]
    if all(Path(f).is_file() for f in files):
        kind = "json" if files[0].endswith((".jsonl", ".json")) else "text"
        data = load_dataset(kind, data_files=files, split="train")
    else:
        data = load_dataset(spec, config_name, split="train")
    texts = [t for t in data[text_column] if t]
    return [(f"{i}:{hashlib.sha1(t.encode()).hexdigest()}", t) for i, t in enumerate(texts)]


def byte_tokenize(texts: Iterable[bytes]) -> np.ndarray:
    """Concatenate documents as byte ids, each followed by the end-of-document id 256."""
    parts: list[np.ndarray] = []
    eot = np.array([BYTE_VOCAB - 1], dtype=np.uint16)
    for data in texts:
        parts += [np.frombuffer(data, dtype=np.uint8).astype(np.uint16), eot]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _cache_dir(args: argparse.Namespace) -> Path:
    path = Path(args.cache_dir or Path.home() / ".cache" / "deepspeed_acco")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``path`` (tokenizers JSON)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)


def _encode_with(encode: Any, texts: list[str], eot_id: int) -> np.ndarray:
    """Concatenate ``encode(texts)`` id lists, each document followed by ``eot_id``."""
    ids: list[int] = []
    for doc in encode(texts):
        ids += doc
        ids.append(eot_id)
    return np.asarray(ids, dtype=np.uint16 if max(ids, default=0) < 2**16 else np.int32)


def build_corpus(args: argparse.Namespace) -> Corpus:
    """Read the documents, split them by hash of their key, and tokenize both splits.

    Byte-level tokens are computed on the fly (a fraction of a second for the standard library).
    BPE (``--tokenizer bpe``) trains a tokenizer on the training split once and caches it, and the
    token streams, under ``--cache_dir``; call this on rank 0 first (see ``rank_zero_first``).
    """
    if args.dataset:
        texts = dict(_dataset_documents(args.dataset, args.dataset_config, args.text_column))
        source, keys, version = args.dataset, list(texts), ""  # keys hash the text already

        def raw(key: str) -> bytes:
            return texts[key].encode("utf-8")
    else:
        paths = dict(stdlib_documents(args.stdlib_root))
        source = f"python stdlib {args.stdlib_root or sysconfig.get_paths()['stdlib']}"
        keys, version = list(paths), str([p.stat().st_size for p in paths.values()])

        def raw(key: str) -> bytes:
            return paths[key].read_bytes()

    def read(key: str) -> str:
        return raw(key).decode("utf-8", errors="replace")

    train_keys = [k for k in keys if not is_heldout(k, args.heldout_pct)]
    held_keys = [k for k in keys if is_heldout(k, args.heldout_pct)]
    if not train_keys or not held_keys:
        raise RuntimeError(f"--heldout_pct {args.heldout_pct} leaves an empty split of {len(keys)} documents")

    if args.tokenizer == "byte":
        train = byte_tokenize(raw(k) for k in train_keys)
        held = byte_tokenize(raw(k) for k in held_keys)
        return Corpus(train, held, BYTE_VOCAB, BYTE_VOCAB - 1,
                      f"{source}: {len(train_keys)} train / {len(held_keys)} held-out docs, byte-level")

    fingerprint = hashlib.sha1(json.dumps([source, keys, version, args.heldout_pct, args.tokenizer,
                                           args.bpe_vocab_size, args.model]).encode()).hexdigest()[:12]
    cache = _cache_dir(args)
    streams = cache / f"tokens-{args.tokenizer}-{fingerprint}.npz"
    if args.tokenizer == "bpe":
        from tokenizers import Tokenizer

        tok_path = cache / f"bpe-{args.bpe_vocab_size}-{fingerprint}.json"
        if not tok_path.exists():
            _train_bpe([read(k) for k in train_keys], args.bpe_vocab_size, tok_path)
        tokenizer = Tokenizer.from_file(str(tok_path))
        eot_id, vocab = tokenizer.token_to_id(EOT), tokenizer.get_vocab_size()

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tokenizer.encode_batch(texts)]
    else:  # "hf": the tokenizer that comes with --model
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(args.model)
        eot_id, vocab = hf_tok.eos_token_id, len(hf_tok)

        def encode(texts: list[str]) -> list[list[int]]:
            return hf_tok(texts, add_special_tokens=False)["input_ids"]
    if not streams.exists():
        arrays = {name: _encode_with(encode, [read(k) for k in ks], eot_id)
                  for name, ks in (("train", train_keys), ("heldout", held_keys))}
        tmp = streams.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        tmp.replace(streams)
    with np.load(streams) as loaded:
        train, held = loaded["train"], loaded["heldout"]
    return Corpus(train, held, vocab, eot_id,
                  f"{source}: {len(train_keys)} train / {len(held_keys)} held-out docs, {args.tokenizer} "
                  f"vocab {vocab}")


class ShardedWindows:
    """Micro-batches of fixed-length windows of the training stream, a disjoint shard per rank.

    The stream is cut into ``len // seq_len`` windows, visited in a seeded random order that is
    redrawn every epoch. The ``i``-th micro-batch of rank ``r`` holds global windows
    ``(i * world + r) * batch + j``, so ranks never share a window within an epoch, and a rank's
    position in the stream is just its micro-batch counter (what a checkpoint stores).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, rank: int, world: int, seed: int) -> None:
        self.tokens, self.seq_len, self.batch, self.rank, self.world, self.seed = \
            tokens, seq_len, batch, rank, world, seed
        self.num_windows = len(tokens) // seq_len
        if self.num_windows < batch * world:
            raise RuntimeError(f"{len(tokens)} training tokens give {self.num_windows} windows of {seq_len}; "
                               f"need at least {batch * world}")
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._order[pos])

    def __getitem__(self, index: int) -> torch.Tensor:
        """The ``index``-th micro-batch of this rank: int64 ids of shape (batch, seq_len)."""
        first = (index * self.world + self.rank) * self.batch
        rows = [self.tokens[w * self.seq_len:(w + 1) * self.seq_len]
                for w in (self._window(first + j) for j in range(self.batch))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_batches(tokens: np.ndarray, num_batches: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """A fixed evaluation set: ``num_batches`` micro-batches of windows evenly spaced over the held-out stream."""
    count = num_batches * batch
    if len(tokens) < seq_len:
        raise RuntimeError(f"the held-out split has {len(tokens)} tokens, fewer than --seq_len {seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len, count).astype(np.int64)
    windows = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)
    return [torch.from_numpy(windows[i * batch:(i + 1) * batch]) for i in range(num_batches)]


@contextlib.contextmanager
def rank_zero_first(rank: int) -> Iterator[None]:
    """Run the body on rank 0, then on the other ranks (so they read rank 0's caches); no-op without a group."""
    distributed = torch.distributed.is_initialized()
    if distributed and rank != 0:
        torch.distributed.barrier()
    yield
    if distributed and rank == 0:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------ config & args
def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """The model, tokenizer and data flags (shared with examples/hf_trainer.py)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="architecture of a fresh model")
    p.add_argument("--model", default=None, help="local path or hub name of a pretrained causal LM "
                   "(from_pretrained; its own tokenizer is used); overrides --preset/--arch")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                   help="byte: 256 byte ids + end-of-document; bpe: a ByteLevel BPE trained locally and cached")
    p.add_argument("--bpe_vocab_size", type=int, default=4096)
    p.add_argument("--dataset", default=None, help="HF dataset name, or local .txt/.jsonl files (comma "
                   "separated); default: the Python standard library's .py files")
    p.add_argument("--dataset_config", default=None, help="HF dataset configuration name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--stdlib_root", default=None, help="read .py files from this directory instead of the stdlib")
    p.add_argument("--heldout_pct", type=float, default=5.0, help="percent of documents held out (by hash)")
    p.add_argument("--cache_dir", default=None, help="tokenizer/token cache (default ~/.cache/deepspeed_acco)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--perturb_init", type=float, default=0.0,
                   help="multiply the initial weights by (1 + this): a rounding-level twin of a run, which measures "
                        "how far two runs that should be equal drift apart (the noise floor of a paired comparison)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher; unused")


def finish_model_data_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags (tokenizer of --model, the preset's seq_len)."""
    if args.model and args.tokenizer == "byte":
        args.tokenizer = "hf"
    if args.seq_len is None:
        args.seq_len = PRESETS[args.preset].seq_len
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (DeepSpeed's ``--deepspeed_config`` included)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_data_arguments(p)
    p.add_argument("--max_steps", type=int, default=60, help="stop after this many committed optimizer steps")
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
    """The DeepSpeed config dict, with ``--lr`` applied."""
    with open(args.deepspeed_config) as fh:
        config: dict[str, Any] = json.load(fh)
    if args.lr is not None:
        config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
        sched = config.get("scheduler", {}).get("params", {})
        for key in ("warmup_max_lr", "cycle_max_lr"):
            if key in sched:
                sched[key] = args.lr
    return config


# ---------------------------------------------------------------------------- train helpers
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


def _acco_fields(record: Any | None) -> dict[str, Any]:
    if record is None:
        return dict.fromkeys(ACCO_FIELDS)
    data = record.as_dict()
    return {k: data.get(k) for k in ACCO_FIELDS}


class MetricsLog:
    """Per-step rows: held until their ACCO record arrives (one boundary later), then appended to metrics.jsonl."""

    def __init__(self, path: Path | None, acco: bool, micro_batch: int, seq_len: int, world: int,
                 samples: int, resumed_step: int | None, pending: list[dict[str, Any]] | None = None) -> None:
        self.path, self.acco, self.micro_batch, self.seq_len, self.world = path, acco, micro_batch, seq_len, world
        self.samples = self.start_samples = samples
        self.pending: list[dict[str, Any]] = list(pending or [])  # from a checkpoint: their records come later
        self.records: list[Any] = []
        self.rows: list[dict[str, Any]] = []
        self.new_rows: list[dict[str, Any]] = []
        if path is not None and resumed_step is not None and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            last = self.pending[0]["step"] - 1 if self.pending else resumed_step
            self.rows = [r for r in kept if r["step"] <= last]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path is not None:
            path.write_text("")

    def add_step(self, step: int, loss: float, lr: float, local_micro: int, wall_s: float,
                 grad_norm: float | None) -> None:
        """Queue the row of a committed step (ACCO figures are filled when the record arrives)."""
        self.pending.append({"step": step, "loss": loss, "lr": lr, "wall_s": round(wall_s, 4),
                             "_micro_all_ranks": local_micro * self.world, "_grad_norm": grad_norm})

    def add_records(self, records: Iterable[Any]) -> None:
        """Attach ACCO step records (from ``deepspeed_acco.pop_metrics``) and write what became complete.

        Records come one per committed step, in commit order, so they are matched to the queued rows
        by position (the optimizer numbers them from 1 again after a checkpoint is loaded).
        """
        self.records.extend(records)
        self.emit()

    def emit(self, without_records: bool = False) -> None:
        """Write every queued row whose ACCO record is in (all of them when ACCO is off, or ``without_records``:
        after a load that restarted ACCO's pipeline, the queued rows' records will never come)."""
        while self.pending and (not self.acco or self.records or without_records):
            row = self.pending.pop(0)
            record = self.records.pop(0) if self.acco and self.records else None
            micro = record.micro_batches if record is not None else row["_micro_all_ranks"]
            self.samples += micro * self.micro_batch
            grad_norm = row.pop("_grad_norm")
            row.pop("_micro_all_ranks")
            row.update(samples=self.samples, tokens=self.samples * self.seq_len, **_acco_fields(record))
            if record is None:
                row["grad_norm"] = grad_norm
            self.rows.append(row)
            self.new_rows.append(row)
            if self.path is not None:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")

    def set_eval(self, step: int, eval_loss: float, train_window: float) -> None:
        """Attach a held-out loss to a step's row (still queued: call before ``add_records``)."""
        for row in self.pending:
            if row["step"] == step:
                row.update(eval_loss=eval_loss, train_loss_window=None if math.isnan(train_window) else train_window)
                return
        raise RuntimeError(f"step {step} has no queued row to attach its evaluation to")

    def comm_totals(self) -> dict[str, float]:
        """This rank's ACCO totals over the rows written by this run."""
        rows = [r for r in self.new_rows if r.get("commit_round_s") is not None]
        rounds = sum(r["commit_round_s"] + (r["estimate_round_s"] or 0.0) for r in rows)
        exposed = sum(r["exposed_wait_s"] for r in rows)
        return {"comm_round_s_total": rounds, "exposed_comm_s_total": exposed,
                "compute_s_total": sum(r["compute_s"] for r in rows),
                "bytes_communicated_total": float(sum(r["bytes_communicated"] for r in rows))}


def plot_losses(rows: list[dict[str, Any]], initial_eval: float | None, path: Path, title: str = "") -> None:
    """Two panels: train and held-out loss against tokens, and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    evals = [r for r in rows if r.get("eval_loss") is not None]
    for ax, key, label in ((axes[0], "tokens", "tokens"), (axes[1], "wall_s", "wall-clock seconds")):
        ax.plot([r[key] for r in rows], [r["loss"] for r in rows], label="train (rank 0)", lw=1)
        ex = ([0.0] if initial_eval is not None else []) + [r[key] for r in evals]
        ey = ([initial_eval] if initial_eval is not None else []) + [r["eval_loss"] for r in evals]
        ax.plot(ex, ey, "o-", label="held-out", ms=4)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def is_universal_checkpoint(found: tuple[str, str | None] | None) -> bool:
    """Whether the checkpoint tag that ``--resume`` names was converted by ``ds_to_universal`` (a ``zero/`` folder)."""
    if found is None:
        return False
    load_dir, tag = found
    if tag is None:
        tag = (Path(load_dir) / "latest").read_text().strip()
    return (Path(load_dir) / tag / "zero").is_dir()


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


# ------------------------------------------------------------------------------------- main
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job; return the summary (every rank computes it, rank 0 writes the files)."""
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
    window_loss, window_count = 0.0, 0

    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0 or args.no_progress,
               desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    wall_base, train_base = state["wall_s"], state["train_s"]
    paused = 0.0  # seconds spent in evaluation and checkpoints during this run
    step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
    step_micro = 0
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
            _update_bar(bar, log, mean_loss, wall - paused)
            bar.update(1)
    bar.close()

    deepspeed_acco.flush(engine)
    log.add_records(deepspeed_acco.pop_metrics(engine))
    wall = time.perf_counter() - t0
    train_s = wall - paused
    summary = _summarize(args, engine, log, state, acco, n_params, start_step, wall, train_s, last_eval)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_losses(log.rows, state["initial_eval_loss"], out / "loss.png",
                    f"{summary['model']}, {Path(args.deepspeed_config).name} (acco: {summary['acco'] or 'off'}), "
                    f"{world} ranks, {summary['tokens_per_s']:,.0f} tokens/s")
        print(f"metrics: {out / 'metrics.jsonl'}\nsummary: {out / 'summary.json'}\nplot:    {out / 'loss.png'}",
              flush=True)
    return summary


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def _update_bar(bar: Any, log: MetricsLog, loss: float, train_s: float) -> None:
    """tqdm postfix: rank-0 loss, tokens/s over training time, exposed share of the communication so far."""
    totals = log.comm_totals()
    tokens = (log.samples - log.start_samples) * log.seq_len
    postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens / max(train_s, 1e-9):,.0f}"}
    if totals["comm_round_s_total"] > 0:
        postfix["exposed"] = f"{totals['exposed_comm_s_total'] / totals['comm_round_s_total']:.0%}"
    bar.set_postfix(postfix, refresh=False)


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


def _summarize(args: argparse.Namespace, engine: Any, log: MetricsLog, state: dict[str, Any], acco: Any,
               n_params: int, start_step: int, wall: float, train_s: float,
               last_eval: float | None) -> dict[str, Any]:
    """Totals of this run; communication figures gathered from every rank (after the final flush)."""
    world = dist.get_world_size()
    totals = log.comm_totals()
    per_rank: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(per_rank, totals)
    run_rows = [r for r in log.rows if r["step"] > start_step] if dist.get_rank() == 0 else []
    tokens_run = (log.samples - log.start_samples) * args.seq_len
    summary: dict[str, Any] = {
        "steps": engine.global_steps,
        "steps_this_run": engine.global_steps - start_step,
        "samples": log.samples,
        "tokens": log.samples * args.seq_len,
        "tokens_this_run": tokens_run,
        "wall_s": wall,
        "train_s": train_s,
        "tokens_per_s": tokens_run / train_s if train_s > 0 else None,
        "tokens_per_s_wall": tokens_run / wall if wall > 0 else None,
        "initial_eval_loss": state["initial_eval_loss"],
        "final_eval_loss": last_eval,
        "final_train_loss": run_rows[-1]["loss"] if run_rows else None,
        "acco": acco.mode if acco.enabled else None,
        "world_size": world,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "seq_len": args.seq_len,
        "n_params": n_params,
        "model": args.model or f"{args.arch}-{args.preset}",
        "tokenizer": args.tokenizer,
        "deepspeed_config": args.deepspeed_config,
    }
    if acco.enabled:
        rounds, exposed = totals["comm_round_s_total"], totals["exposed_comm_s_total"]
        share = exposed / rounds if rounds > 0 else None
        summary.update(totals)
        summary.update({
            "exposed_comm_share": share,
            "comm_overlap_share": 1.0 - share if share is not None else None,
            "exposed_comm_share_per_rank": [r["exposed_comm_s_total"] / r["comm_round_s_total"]
                                            if r["comm_round_s_total"] > 0 else None for r in per_rank],
            "exposed_comm_s_per_rank": [r["exposed_comm_s_total"] for r in per_rank],
            "comm_round_s_per_rank": [r["comm_round_s_total"] for r in per_rank],
        })
    else:
        summary.update({"comm_round_s_total": None, "exposed_comm_s_total": None, "exposed_comm_share": None,
                        "comm_overlap_share": None})
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
