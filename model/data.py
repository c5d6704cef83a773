"""Training pairs (tokens, targets) streamed from a built dataset's WebDataset shards (SPEC §3).

DATASET/dataset.json gives the layout ("frames", "frame_size", "tokens_h", "tokens_w", "text_slot") and
the tokenizers ({"image": {"id", "sha256", "path"}, "text": {...}}); DATASET/shards/train-*.tar hold the
samples (KEY.json meta with "rate", "span", "mode"; KEY.vtok.npy uint16 [T, h, w]; KEY.ttok.npy int32
caption ids). One sample becomes one sequence in the stage's layout (see model/gpt.py):

    tokens  (L,) int64: [text slot][boi, codes of frame f + text_vocab] for f in cfg.frame_order(stage)
    targets (L,) int64: targets[t] = image code of token t+1 when that token is a code, else -1
                        (the model keeps only its stage's loss frames)

The text slot is TextTokenizer.build_slot(ttok, meta["span"], text_slot): left padding, the time-span
prefix ("4.0 s"), <sep>, the caption. With probability `cond_drop` the caption is dropped (the slot keeps
its span prefix), which teaches the unconditional model that classifier-free guidance samples against.

Samples whose vtok shape is not (frames, tokens_h, tokens_w), whose codes exceed the codebook, or that do
not decode are skipped and counted in `stream.skipped` by reason; nothing raises mid-epoch.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from clipforge.model.gpt import CogVideoConfig
from clipforge.pipeline.storage.samples import decode_sample
from clipforge.tokenizer.text import TextTokenizer


def read_dataset_info(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{dataset_dir}: no dataset.json (is this a built clipforge dataset?)")
    info = json.loads(path.read_text(encoding="utf-8"))
    layout = info.get("layout") or {}
    missing = [k for k in ("frames", "tokens_h", "tokens_w", "text_slot") if k not in layout]
    if missing:
        raise ValueError(f"{path}: layout lacks {missing}")
    return info


def tokenizer_paths(dataset_dir: str | Path, info: dict) -> dict[str, Path]:
    """{"image": image tokenizer directory, "text": spm model file}; relative paths are taken relative to
    the dataset directory. Checks the files against the sha256 recorded in dataset.json when present."""
    from clipforge.tokenizer.image import WEIGHTS_FILE

    out = {}
    for kind in ("image", "text"):
        entry = (info.get("tokenizers") or {}).get(kind) or {}
        if "path" not in entry:
            raise ValueError(f"dataset.json names no {kind} tokenizer path")
        path = Path(entry["path"])
        if not path.is_absolute():
            path = Path(dataset_dir) / path
        blob_path = path / WEIGHTS_FILE if kind == "image" else path
        if not blob_path.exists():
            raise FileNotFoundError(f"{kind} tokenizer not found at {blob_path}")
        if entry.get("sha256"):
            digest = hashlib.sha256(blob_path.read_bytes()).hexdigest()
            if digest != entry["sha256"]:
                raise ValueError(f"{kind} tokenizer at {path} does not match the dataset "
                                 f"(sha256 {digest[:12]} != {entry['sha256'][:12]})")
        out[kind] = path
    return out


def shard_urls(dataset_dir: str | Path, split: str) -> list[str]:
    return [str(p) for p in sorted((Path(dataset_dir) / "shards").glob(f"{split}-*.tar"))]


def in_holdout(key: str, fraction: float) -> bool:
    """Deterministic held-out split by key hash (used when the dataset has no val-*.tar shards)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


class SequenceBuilder:
    """One decoded sample -> (tokens, targets) int64 arrays of the stage's layout."""

    def __init__(self, cfg: CogVideoConfig, text: TextTokenizer, stage: str):
        self.cfg, self.text, self.stage = cfg, text, stage
        self.order = cfg.frame_order(stage)

    def check(self, vtok: np.ndarray) -> str | None:
        """None if the codes fit the layout, else a skip reason."""
        cfg = self.cfg
        if vtok.ndim != 3 or tuple(vtok.shape) != (cfg.frames, cfg.tokens_h, cfg.tokens_w):
            return "shape"
        if vtok.size and int(vtok.max()) >= cfg.image_vocab:
            return "code_range"
        return None

    def __call__(self, vtok: np.ndarray, ttok: np.ndarray, span: float | None, drop_caption: bool = False):
        cfg = self.cfg
        caption = [] if drop_caption else [int(t) for t in ttok]
        slot, _ = self.text.build_slot(caption, span, cfg.text_slot)            # (text_slot,)
        parts = [slot]
        for f in self.order:
            parts += [np.array([cfg.boi_id], np.int64), vtok[f].reshape(-1).astype(np.int64) + cfg.text_vocab]
        tokens = np.concatenate(parts)                                          # (L,)
        is_code = (tokens >= cfg.text_vocab) & (tokens < cfg.text_vocab + cfg.image_vocab)
        targets = np.full_like(tokens, -1)
        targets[:-1] = np.where(is_code[1:], tokens[1:] - cfg.text_vocab, -1)
        return tokens, targets


class ShardStream(torch.utils.data.IterableDataset):
    """Iterates (tokens, targets) over shards; `repeat` loops over epochs, reshuffling each one.

    split="val" with holdout > 0 takes the held-out keys of the train shards, split="train" with
    holdout > 0 leaves them out. Works with DataLoader workers (shards are split by worker).
    """

    def __init__(self, urls: list[str], builder: SequenceBuilder, shuffle: bool = True, repeat: bool = True,
                 seed: int = 0, buffer: int = 256, cond_drop: float = 0.0, holdout: float = 0.0,
                 holdout_side: str = "exclude", modes: tuple | None = None):
        super().__init__()
        self.urls, self.builder = list(urls), builder
        self.shuffle, self.repeat, self.seed, self.buffer = shuffle, repeat, seed, buffer
        self.cond_drop, self.holdout, self.holdout_side = cond_drop, holdout, holdout_side
        self.modes = tuple(modes) if modes else None
        self.skipped: Counter = Counter()
        self.seen = 0
        self.spans: Counter = Counter()   # (mode, span) of the samples used, for the sampler's default span

    def _keep_key(self, sample: dict) -> bool:
        if self.holdout <= 0:
            return True
        held = in_holdout(sample.get("__key__", ""), self.holdout)
        return held if self.holdout_side == "only" else not held

    def _epoch(self, epoch: int) -> Iterator:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1000 + epoch).shuffle(urls)
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=wds.single_node_only,
                            workersplitter=wds.split_by_worker, handler=wds.warn_and_continue)
        ds = ds.select(self._keep_key)
        if self.shuffle:
            ds = ds.shuffle(self.buffer, rng=random.Random(self.seed * 1000 + epoch + 1))
        return iter(ds)

    def __iter__(self):
        if not wds.split_by_worker(list(self.urls)):  # a DataLoader worker that drew no shard
            return
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 7919 + (info.id if info else 0))
        epoch = 0
        while True:
            produced = 0
            for raw in self._epoch(epoch):
                try:
                    sample = decode_sample(raw)
                except (ValueError, KeyError, UnicodeDecodeError):  # incomplete or unreadable sample
                    self.skipped["decode"] += 1
                    continue
                meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
                mode = meta.get("mode")
                if self.modes and mode not in self.modes:
                    self.skipped["mode"] += 1
                    continue
                reason = self.builder.check(sample["vtok"])
                if reason:
                    self.skipped[reason] += 1
                    continue
                span = meta.get("span")
                span = float(span) if isinstance(span, (int, float)) else None
                drop = self.cond_drop > 0 and rng.random() < self.cond_drop
                tokens, targets = self.builder(sample["vtok"], sample["ttok"], span, drop)
                produced += 1
                self.seen += 1
                if span is not None and len(self.spans) < 10_000:
                    self.spans[(str(mode), round(span, 2))] += 1
                yield torch.from_numpy(tokens), torch.from_numpy(targets)
            if not self.repeat:
                return
            if produced == 0:
                raise ValueError(f"no usable sample in {len(self.urls)} shard(s); skipped: {dict(self.skipped)}")
            epoch += 1


def make_loader(stream: ShardStream, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=False)
