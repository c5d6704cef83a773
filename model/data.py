"""Training pairs (tokens, targets) streamed from a built dataset's WebDataset shards (docs/format.md).

DATASET/dataset.json gives the layout ("frames", "frame_size", "tokens_h", "tokens_w", "text_slot") and
the tokenizers ({"image": {"id", "sha256", "path"}, "text": {...}}); DATASET/shards/train-*.tar hold the
samples (KEY.json meta with "rate", "span", "mode"; KEY.vtok.npy uint16 [T, h, w]; KEY.ttok.npy int32
caption ids). One sample becomes one sequence in the phase's layout (see model/gpt.py):

    tokens  (L,) int64: [text slot][boi, codes of frame f + text_vocab] for f in cfg.frame_order(phase)
    targets (L,) int64: targets[t] = image code of token t+1 when that token is a code, else -1
                        (the model keeps only its phase's loss frames)

The text slot is TextTokenizer.build_slot(ttok, meta["span"], text_slot): left padding, the time-span
prefix ("4.0 s"), <sep>, the caption. With probability `cond_drop` the caption is dropped (the slot keeps
its span prefix), which teaches the unconditional model that classifier-free guidance samples against.

Samples whose vtok shape is not (frames, tokens_h, tokens_w), whose codes exceed the codebook, or that do
not decode are skipped and counted in `stream.skipped` by reason; nothing raises mid-epoch.

Data parallelism: every (rank, DataLoader worker) pair is one "reader" of world_size * num_workers. With at
least as many shards as readers, each reader reads its own shards; with fewer, every reader reads all shards
and keeps every n-th sample, so small datasets still split without overlap. Either way the readers see
disjoint samples. Resuming replays a stream up to a batch count (`resume_at`): the shuffle and the
caption-dropout draws are seeded, so the replayed stream continues exactly where the killed one stopped.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from clipforge.model.config import CogVideoConfig
from clipforge.pipeline.storage.samples import decode_sample
from clipforge.tokenizer.text import TextTokenizer
from clipforge.pipeline.errors import ClipforgeError


def read_dataset_info(dataset_dir: str | Path) -> dict:
    from clipforge.pipeline.storage.dataset import DatasetInfo

    if not DatasetInfo.exists(str(dataset_dir)):
        raise FileNotFoundError(f"{dataset_dir}: no dataset.json (is this a built clipforge dataset?)")
    info = DatasetInfo.read(str(dataset_dir), validate=False)
    layout = info.layout or {}
    missing = [k for k in ("frames", "tokens_h", "tokens_w", "text_slot") if k not in layout]
    if missing:
        raise ClipforgeError(f"{Path(dataset_dir) / 'dataset.json'}: layout lacks {missing}")
    return {**info.data, "layout": layout, "tokenizers": info.tokenizers}


def tokenizer_paths(dataset_dir: str | Path, info: dict, image: str | None = None, text: str | None = None
                    ) -> dict[str, Path]:
    """{"image": image tokenizer directory, "text": spm model file}: `image`/`text` when given, else the
    paths dataset.json names (relative ones are taken relative to the dataset directory). Checks the
    files against the sha256 recorded in dataset.json, so a dataset is never read with other tokenizers."""
    from clipforge.tokenizer.image import WEIGHTS_FILE

    out = {}
    for kind, given in (("image", image), ("text", text)):
        entry = (info.get("tokenizers") or {}).get(kind) or {}
        if given is None and "path" not in entry:
            raise ClipforgeError(f"dataset.json names no {kind} tokenizer path; pass the {kind} tokenizer the "
                             f"dataset was built with (--{kind}-tokenizer)")
        path = Path(given if given is not None else entry["path"])
        if given is None and not path.is_absolute():
            path = Path(dataset_dir) / path
        blob_path = path / WEIGHTS_FILE if kind == "image" else path
        if not blob_path.exists():
            raise FileNotFoundError(f"{kind} tokenizer not found at {blob_path}")
        if entry.get("sha256"):
            digest = hashlib.sha256(blob_path.read_bytes()).hexdigest()
            if digest != entry["sha256"]:
                raise ClipforgeError(f"{kind} tokenizer at {path} does not match the dataset "
                                 f"(sha256 {digest[:12]} != {entry['sha256'][:12]})")
        out[kind] = path
    return out


def shard_urls(dataset_dir: str | Path, split: str) -> list[str]:
    """The committed tars of `split`, as the shards' commit records name them (local path or URL); for a
    local dataset without commit records (older builds, shards written by other tools), every
    shards/SPLIT-*.tar."""
    from clipforge.pipeline.storage.shards import shard_urls as committed_shard_urls

    from clipforge.pipeline.storage.commits import ATTEMPT_PART

    urls = committed_shard_urls(str(dataset_dir), split)
    if not urls and Path(dataset_dir, "shards").is_dir():   # never an attempt part no record names
        urls = [str(p) for p in sorted(Path(dataset_dir, "shards").glob(f"{split}-*.tar"))
                if not ATTEMPT_PART.match(p.name)]
    return urls


def in_holdout(video_id: str, fraction: float) -> bool:
    """Deterministic held-out split by the source video's id (used when the dataset has no val-*.tar
    shards). By video, not by clip key: the clips and captions of one video must all fall on one side,
    or the held-out loss would score frames the model trained on."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(video_id.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def video_id_of(sample: dict) -> str:
    """The sample's source video id from its KEY.json (`video_id`); the clip key for samples without one."""
    meta = sample.get("meta") if isinstance(sample.get("meta"), dict) else {}
    return str(meta.get("video_id") or sample.get("__key__", ""))


class SequenceBuilder:
    """One decoded sample -> (tokens, targets) int64 arrays of the phase's layout."""

    def __init__(self, cfg: CogVideoConfig, text: TextTokenizer, phase: str):
        self.cfg, self.text, self.phase = cfg, text, phase
        self.order = cfg.frame_order(phase)
        self.captions = 0        # captions built into slots in this process, and how many of them were cut
        self.captions_cut = 0

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
        slot, cut = self.text.build_slot(caption, span, cfg.text_slot)          # (text_slot,)
        if caption:
            self.captions += 1
            self.captions_cut += bool(cut)
        parts = [slot]
        for f in self.order:
            parts += [np.array([cfg.boi_id], np.int64), vtok[f].reshape(-1).astype(np.int64) + cfg.text_vocab]
        tokens = np.concatenate(parts)                                          # (L,)
        is_code = (tokens >= cfg.text_vocab) & (tokens < cfg.text_vocab + cfg.image_vocab)
        targets = np.full_like(tokens, -1)
        targets[:-1] = np.where(is_code[1:], tokens[1:] - cfg.text_vocab, -1)
        return tokens, targets


class ShardStream(torch.utils.data.IterableDataset):
    """Iterates (tokens, targets, key) over shards; `repeat` loops over epochs, reshuffling each one.

    split="val" with holdout > 0 takes the held-out videos of the train shards, split="train" with
    holdout > 0 leaves them out. rank/world_size split the data between data-parallel processes, and
    DataLoader workers split each rank's share again (see the module docstring).
    """

    def __init__(self, urls: list[str], builder: SequenceBuilder, shuffle: bool = True, repeat: bool = True,
                 seed: int = 0, buffer: int = 256, cond_drop: float = 0.0, holdout: float = 0.0,
                 holdout_side: str = "exclude", modes: tuple | None = None, rank: int = 0, world_size: int = 1,
                 memory_mb: float = 256):
        super().__init__()
        # decoded shards kept in memory after their first read, up to memory_mb of shard bytes (per rank
        # and worker): reading and decoding was a third of a demo-sized image-phase step
        self.memory_bytes = memory_mb * 2**20
        self.in_memory: dict[str, list] = {}
        self.bytes_in_memory = 0
        self.urls, self.builder = list(urls), builder
        self.shuffle, self.repeat, self.seed, self.buffer = shuffle, repeat, seed, buffer
        self.cond_drop, self.holdout, self.holdout_side = cond_drop, holdout, holdout_side
        self.modes = tuple(modes) if modes else None
        self.rank, self.world_size = rank, world_size
        self.skip_batches, self.batch_size = 0, 1
        self.skipped: Counter = Counter()
        self.seen = 0
        self.spans: Counter = Counter()   # (mode, span) of the samples used, for the sampler's default span

    def resume_at(self, batches: int, batch_size: int) -> None:
        """Continue after `batches` batches of `batch_size` (per rank) were consumed: iteration replays
        and drops them. Call before the DataLoader starts its workers."""
        self.skip_batches, self.batch_size = batches, batch_size

    def _reader(self) -> tuple[int, int, int]:
        """(reader, readers, worker id) of this rank and DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker

    def _epoch(self, epoch: int, reader: int, readers: int) -> Iterator:
        urls = list(self.urls)
        if self.shuffle:  # the same order on every rank and worker (same seed), so the split is a partition
            random.Random(self.seed * 1000 + epoch).shuffle(urls)
        by_shard = len(urls) >= readers
        if by_shard:
            urls = urls[reader::readers]
        i = 0
        for url in urls:
            for sample in self._shard(url):
                if by_shard or i % readers == reader:
                    yield sample
                i += 1

    def _shard(self, url: str) -> Iterator[dict | None]:
        """One shard's decoded samples in order (None for one that does not decode), from memory after
        the first complete read while the budget lasts."""
        if url in self.in_memory:
            yield from self.in_memory[url]
            return
        ds = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None,
                            workersplitter=None, handler=wds.warn_and_continue)
        kept, size = [], 0
        for raw in ds:
            try:
                sample = decode_sample(raw)
            except (ValueError, KeyError, UnicodeDecodeError):  # incomplete or unreadable sample
                sample = None
            size += sum(len(v) for v in raw.values() if isinstance(v, bytes))
            kept.append(sample)
            yield sample
        if self.bytes_in_memory + size <= self.memory_bytes:
            self.in_memory[url] = kept
            self.bytes_in_memory += size

    def _samples(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        """Decoded samples of one epoch that pass the checks and the held-out split, shuffled."""
        def decoded():
            for sample in self._epoch(epoch, reader, readers):
                if sample is None:
                    self.skipped["decode"] += 1
                    continue
                if self.holdout > 0:
                    held = in_holdout(video_id_of(sample), self.holdout)
                    if held != (self.holdout_side == "only"):
                        continue
                yield sample

        samples = decoded()
        if self.shuffle:
            rng = random.Random(self.seed * 1000 + epoch + 1 + 7 * reader)
            samples = wds.filters.shuffle(self.buffer, rng=rng)(samples)
        return samples

    def __iter__(self):
        reader, readers, worker = self._reader()
        workers = readers // self.world_size
        # batch j of this rank comes from worker j % workers (the DataLoader's round robin)
        skip = max(0, (self.skip_batches - worker + workers - 1) // workers) * self.batch_size
        rng = random.Random(self.seed * 7919 + reader)
        epoch = 0
        while True:
            produced = 0
            for sample in self._samples(epoch, reader, readers):
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
                produced += 1
                self.seen += 1
                if span is not None and len(self.spans) < 10_000:
                    self.spans[(str(mode), round(span, 2))] += 1
                if skip:  # replaying up to the resume point: every draw above happened, nothing is yielded
                    skip -= 1
                    continue
                tokens, targets = self.builder(sample["vtok"], sample["ttok"], span, drop)
                yield torch.from_numpy(tokens), torch.from_numpy(targets), sample["key"]
            if not self.repeat:
                return
            if produced == 0:
                raise ClipforgeError(f"no usable sample in {len(self.urls)} shard(s); skipped: {dict(self.skipped)}")
            epoch += 1


def make_loader(stream: ShardStream, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=False)
