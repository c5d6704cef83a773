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
disjoint samples. Every sample carries its reader's position; a checkpoint keeps the position of the last
sample each reader gave, and a resumed stream starts there (`ShardStream.resume_from`): it reads nothing
it already gave, and gives exactly what the uninterrupted stream would have.
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


def open_pinned_tokenizers(dataset_dir: str | Path, info: dict, image: str | None = None,
                           text: str | None = None, kinds: tuple = ("image", "text")) -> tuple[dict, dict]:
    """({kind: spec}, {kind: tokenizer}) of a dataset (`clipforge.tokenizer.sources`): `image`/`text` when
    given, else what dataset.json names (relative paths are taken relative to the dataset directory); a
    remote tokenizer is copied to the cache first and its spec names the copy. Each tokenizer's sha256
    must be the one dataset.json pins, so a dataset is never read with other tokenizers."""
    from clipforge.tokenizer.sources import localised, open_image_tokenizer, open_text_tokenizer, relative_to

    specs, opened = {}, {}
    for kind, given in (("image", image), ("text", text)):
        if kind not in kinds:
            continue
        entry = (info.get("tokenizers") or {}).get(kind) or {}
        if given is None and "path" not in entry:
            raise ClipforgeError(f"dataset.json names no {kind} tokenizer path; pass the {kind} tokenizer the "
                                 f"dataset was built with (--{kind}-tokenizer)")
        spec = localised(str(given) if given is not None else relative_to(entry["path"], str(dataset_dir)), kind)
        tok = open_image_tokenizer(spec, device="cpu") if kind == "image" else open_text_tokenizer(spec)
        if entry.get("sha256") and tok.sha256 != entry["sha256"]:
            raise ClipforgeError(f"{kind} tokenizer at {spec} does not match the dataset "
                                 f"(sha256 {tok.sha256[:12]} != {entry['sha256'][:12]})")
        specs[kind], opened[kind] = spec, tok
    return specs, opened


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


def unit_float(*parts) -> float:
    """A float in [0, 1) that depends only on `parts`: the stream's draws are functions of where they are,
    not of a generator's history, so a stream can start anywhere and draw what it would have drawn."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def parsed_positions(positions: dict) -> dict[int, dict]:
    """{reader: position} from a checkpoint's {reader: JSON string} (or already parsed positions)."""
    return {int(r): json.loads(p) if isinstance(p, str) else dict(p) for r, p in positions.items()}


class ShardStream(torch.utils.data.IterableDataset):
    """Iterates (tokens, targets, key, position) over shards; `repeat` loops over epochs.

    An epoch of one reader (a rank and DataLoader worker, see the module docstring): its shards in an
    order drawn for the epoch; `open_shards` of them are open at a time, each read in an order drawn for
    it, and every sample comes from an open shard drawn at random, so consecutive samples come from
    several shards. Every draw is a function of (seed, epoch, reader, position): the reader's position
    after a sample (`position`, a JSON string: epoch, next shard, open shards with the samples taken from
    each, draws) is all it takes to continue. `resume_from(positions)` starts each reader there: nothing
    before it is read or decoded again, and what follows is what the uninterrupted stream would give.

    holdout > 0: holdout_side="only" keeps the held-out source videos, "exclude" leaves them out.
    """

    def __init__(self, urls: list[str], builder: SequenceBuilder, shuffle: bool = True, repeat: bool = True,
                 seed: int = 0, open_shards: int = 4, cond_drop: float = 0.0, holdout: float = 0.0,
                 holdout_side: str = "exclude", modes: tuple | None = None, rank: int = 0, world_size: int = 1,
                 memory_mb: float = 256, endpoint: str | None = None):
        super().__init__()
        # shards' raw bytes kept in memory after their first read, up to memory_mb (per rank and worker):
        # reading was a third of a demo-sized image-phase step
        self.memory_bytes = memory_mb * 2**20
        self.in_memory: dict[str, list] = {}
        self.bytes_in_memory = 0
        self.urls, self.builder, self.endpoint = list(urls), builder, endpoint
        self.shuffle, self.repeat, self.seed = shuffle, repeat, seed
        self.open_shards = max(1, open_shards) if shuffle else 1
        self.cond_drop, self.holdout, self.holdout_side = cond_drop, holdout, holdout_side
        self.modes = tuple(modes) if modes else None
        self.rank, self.world_size = rank, world_size
        self.start: dict[int, dict] = {}
        self.skipped: Counter = Counter()
        self.seen = 0
        self.decoded_keys: list[str] = []   # the first 100k samples this process decoded (a resume decodes
                                            # none that came before its position)
        self.spans: Counter = Counter()   # (mode, span) of the samples used, for the sampler's default span

    def resume_from(self, positions: dict) -> None:
        """Continue each reader from its position ({reader: position}, as the stream gave them); readers
        without one start at the beginning. Call before the DataLoader starts its workers."""
        self.start = parsed_positions(positions)

    def _reader(self) -> tuple[int, int]:
        """(reader, readers) of this rank and DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _epoch_shards(self, epoch: int, reader: int, readers: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:  # the same order on every rank and worker (same seed), so the split is a partition
            random.Random(self.seed * 1000 + epoch).shuffle(urls)
        return urls[reader::readers] if len(urls) >= readers else urls

    def _shard_order(self, url: str, epoch: int, reader: int, readers: int) -> list:
        """This reader's raw samples of one shard, in the order drawn for (epoch, shard). With fewer shards
        than readers, every reader reads every shard and keeps every n-th sample."""
        raw = self._raw_samples(url)
        mine = raw if len(self.urls) >= readers else raw[reader::readers]
        if self.shuffle:
            mine = list(mine)
            # by the shard's name, not its URL or attempt: the same data gives the same order wherever it lives
            shard = url.rsplit("/", 1)[-1].split(".", 1)[0]
            random.Random(f"{self.seed}:{epoch}:{shard}").shuffle(mine)
        return mine

    def _raw_samples(self, url: str) -> list[dict]:
        """One shard's samples as webdataset gives them (member name -> bytes), from memory after the
        first read while the budget lasts."""
        if url in self.in_memory:
            return self.in_memory[url]
        ds = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None,
                            workersplitter=None, handler=wds.warn_and_continue)
        kept = list(ds)
        size = sum(len(v) for raw in kept for v in raw.values() if isinstance(v, bytes))
        if self.bytes_in_memory + size <= self.memory_bytes:
            self.in_memory[url] = kept
            self.bytes_in_memory += size
        return kept

    def _walk(self, reader: int, readers: int) -> Iterator[tuple[dict, dict]]:
        """(raw sample, position after it) from this reader's start position on, epoch after epoch."""
        position = self.start.get(reader) or {"epoch": 0, "next": 0, "open": [], "draws": 0}
        while True:
            epoch, nxt, draws = position["epoch"], position["next"], position["draws"]
            opened = [list(o) for o in position["open"]]        # [shard number in the epoch, samples taken]
            shards = self._epoch_shards(epoch, reader, readers)
            orders: dict[int, list] = {}
            while True:
                while len(opened) < self.open_shards and nxt < len(shards):
                    opened.append([nxt, 0])
                    nxt += 1
                if not opened:
                    break
                pick = int(unit_float(self.seed, epoch, reader, draws) * len(opened)) if self.shuffle else 0
                draws += 1
                number, taken = opened[pick]
                if number not in orders:
                    orders[number] = self._shard_order(shards[number], epoch, reader, readers)
                order = orders[number]
                if taken >= len(order):
                    opened.pop(pick)
                    orders.pop(number)
                    continue
                opened[pick][1] = taken + 1
                yield order[taken], {"reader": reader, "epoch": epoch, "next": nxt, "draws": draws,
                                     "open": [list(o) for o in opened]}
            if not self.repeat:
                return
            position = {"epoch": epoch + 1, "next": 0, "open": [], "draws": 0}

    def _usable(self, raw: dict) -> dict | None:
        """The decoded sample, or None (counted in `skipped`) when it does not decode, falls on the other
        side of the held-out split, is of another clip mode or does not fit the layout."""
        try:
            sample = decode_sample(raw)
        except (ValueError, KeyError, UnicodeDecodeError):  # incomplete or unreadable sample
            self.skipped["decode"] += 1
            return None
        if len(self.decoded_keys) < 100_000:
            self.decoded_keys.append(sample["key"])
        if self.holdout > 0 and in_holdout(video_id_of(sample), self.holdout) != (self.holdout_side == "only"):
            return None
        meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
        if self.modes and meta.get("mode") not in self.modes:
            self.skipped["mode"] += 1
            return None
        reason = self.builder.check(sample["vtok"])
        if reason:
            self.skipped[reason] += 1
            return None
        return sample

    def __iter__(self):
        from clipforge.pipeline.storage.fs import register_webdataset_schemes

        register_webdataset_schemes(self.endpoint)   # in each DataLoader worker: shards on s3:// and gs://
        reader, readers = self._reader()
        produced, epoch, whole = 0, None, reader not in self.start   # whole: the epoch was read from its start
        for raw, position in self._walk(reader, readers):
            if position["epoch"] != epoch:
                if epoch is not None and whole and produced == 0:
                    raise ClipforgeError(f"no usable sample in {len(self.urls)} shard(s); skipped: "
                                         f"{dict(self.skipped)}")
                whole = whole or epoch is not None
                epoch, produced = position["epoch"], 0
            sample = self._usable(raw)
            if sample is None:
                continue
            meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
            span = meta.get("span")
            span = float(span) if isinstance(span, (int, float)) else None
            drop = self.cond_drop > 0 and unit_float(self.seed, "drop", epoch, sample["key"]) < self.cond_drop
            produced += 1
            self.seen += 1
            if span is not None and len(self.spans) < 10_000:
                self.spans[(str(meta.get("mode")), round(span, 2))] += 1
            tokens, targets = self.builder(sample["vtok"], sample["ttok"], span, drop)
            yield torch.from_numpy(tokens), torch.from_numpy(targets), sample["key"], json.dumps(position)


class MixtureStream(torch.utils.data.IterableDataset):
    """Samples from several `ShardStream`s (one per dataset) in proportion to `weights`: each draw picks a
    stream by a function of (seed, reader, draw), so a mixture, like a stream, continues from a position
    (its draws and each stream's position) without reading anything before it."""

    def __init__(self, streams: list[ShardStream], weights: list[float], seed: int = 0):
        super().__init__()
        if len(streams) != len(weights) or not streams or min(weights) < 0 or sum(weights) <= 0:
            raise ClipforgeError(f"need one non-negative weight per dataset, not all zero; got {weights} for "
                                 f"{len(streams)} dataset(s)")
        self.streams, self.seed = streams, seed
        total = float(sum(weights))
        self.bounds = list(np.cumsum([w / total for w in weights]))
        self.start: dict[int, dict] = {}

    @property
    def skipped(self) -> Counter:
        return sum((s.skipped for s in self.streams), Counter())

    @property
    def spans(self) -> Counter:
        return sum((s.spans for s in self.streams), Counter())

    @property
    def seen(self) -> int:
        return sum(s.seen for s in self.streams)

    @property
    def decoded_keys(self) -> list[str]:
        return [k for s in self.streams for k in s.decoded_keys]

    def resume_from(self, positions: dict) -> None:
        self.start = parsed_positions(positions)
        for i, stream in enumerate(self.streams):
            stream.resume_from({r: p["parts"][str(i)] for r, p in self.start.items() if str(i) in p["parts"]})

    def __iter__(self):
        iters = [iter(s) for s in self.streams]
        reader = self.streams[0]._reader()[0]
        start = self.start.get(reader, {"draws": 0, "parts": {}})
        draws, parts = start["draws"], dict(start["parts"])
        while True:
            u = unit_float(self.seed, "mixture", reader, draws)
            draws += 1
            i = min(int(np.searchsorted(self.bounds, u, side="right")), len(iters) - 1)
            tokens, targets, key, position = next(iters[i])
            parts[str(i)] = json.loads(position)
            yield tokens, targets, key, json.dumps({"reader": reader, "draws": draws, "parts": parts})


def make_loader(stream: ShardStream, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=False)
