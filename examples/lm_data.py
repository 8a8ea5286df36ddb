"""The model and the data of ``train_lm.py``: size presets, corpus, per-rank micro-batches, held-out set.

Shared by ``train_lm.py``, ``hf_trainer.py``, ``accelerate_train.py``, the tests and the benchmarks
(all import these names from ``train_lm``, which re-exports them). The model is built from a
transformers config (nothing is downloaded); the text is the .py files of Python's standard
library by default (byte-level tokens), or an HF dataset / local files with ``--dataset``.

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
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BYTE_VOCAB",
    "Corpus",
    "EOT",
    "ModelPreset",
    "PRESETS",
    "ShardedWindows",
    "add_model_data_arguments",
    "build_corpus",
    "build_model",
    "byte_tokenize",
    "finish_model_data_arguments",
    "heldout_batches",
    "is_heldout",
    "rank_zero_first",
    "stdlib_documents",
]

EOT = "<|endoftext|>"
BYTE_VOCAB = 256 + 1
"""Byte-level vocabulary: the 256 byte values plus one end-of-document token (id 256)."""


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
        noise = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.0 + args.perturb_init * torch.randn(param.shape, generator=noise))
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


# ---------------------------------------------------------------------------------------- flags
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
                   help="multiply each initial weight by (1 + this x a standard normal draw): a rounding-level "
                        "twin of a run in a random direction, which measures how far two runs that should be "
                        "equal drift apart (the noise floor of a paired comparison)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher; unused")


def finish_model_data_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags (tokenizer of --model, the preset's seq_len)."""
    if args.model and args.tokenizer == "byte":
        args.tokenizer = "hf"
    if args.seq_len is None:
        args.seq_len = PRESETS[args.preset].seq_len
    return args
