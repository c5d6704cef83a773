"""Tokenization stage: clip frames → VQ codes, clean caption → text ids.

Frames are encoded in batches across rows (one GPU call per batch, not per clip); the frames are dropped
from the row afterwards, so only tokens (a few KB a sample) travel on to the writer. With an encoder that
answers later (GPU workers), several batches are in flight while the rows behind them are decoded, up to
`inflight_bytes` of frames: decoding and encoding overlap, and a slow GPU holds back its callers instead
of queueing without bound.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np

from clipforge.pipeline.schema import is_ok, mark_error
from clipforge.pipeline.stages import Stage

STAGE = "tokenize"
MAX_PENDING_BATCHES = 8


class EncoderUnavailable(RuntimeError):
    """No image encoder answered (GPU workers gone, pending or hung): infrastructure, not the sample."""


def image_error_reason(err: BaseException) -> str:
    """`tokenize_transient` for device trouble (CUDA errors, out of memory: another batch, a freed GPU or
    another node may succeed), `tokenize_error` for everything else (the sample itself is the problem)."""
    if isinstance(err, (MemoryError, EncoderUnavailable, TimeoutError)):
        return "tokenize_transient"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        device_errors = tuple(getattr(torch, name) for name in ("OutOfMemoryError", "AcceleratorError")
                              if isinstance(getattr(torch, name, None), type))
        if isinstance(err, (torch.cuda.OutOfMemoryError, *device_errors)):
            return "tokenize_transient"
    text = f"{type(err).__name__}: {err}".lower()
    if "out of memory" in text or "cuda" in text or "cudnn" in text or "cublas" in text:
        return "tokenize_transient"
    return "tokenize_error"


class TokenizeClips(Stage):
    """Input keys: frames (uint8 [T,S,S,3]), caption. Output keys: vtok (uint16 [T,h,w]), ttok (int32),
    caption_tokens, caption_cut, tokenizers. Reasons: tokenize_error, tokenize_transient (device errors,
    no encoder answering)."""

    name = STAGE

    def __init__(self, image_tokenizer_dir: str | None, text_tokenizer_path: str, text_slot: int = 64,
                 batch_size: int = 32, device: str | None = None, dtype: str = "float32",
                 image_encoder=None, inflight_bytes: int = 256 << 20):
        """`image_encoder`, when given, replaces the local image tokenizer: an `ImageEncoder`
        (`clipforge.pipeline.stages`); one with `submit`/`result` is called asynchronously."""
        from clipforge.tokenizer.sources import open_image_tokenizer, open_text_tokenizer

        super().__init__()
        if image_encoder is not None:
            self.image = image_encoder
        else:
            if device is None:
                import torch
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.image = open_image_tokenizer(image_tokenizer_dir, device=device, dtype=dtype)
        self.text = open_text_tokenizer(text_tokenizer_path)
        self.text_slot, self.batch_size, self.inflight_bytes = text_slot, batch_size, inflight_bytes
        self.ids = {"image": {"id": self.image.tokenizer_id, "sha256": self.image.sha256},
                    "text": {"id": self.text.tokenizer_id, "sha256": self.text.sha256}}

    @property
    def encode_settings(self) -> dict:
        return self.image.encode_settings

    def __call__(self, rows: Iterable[dict]) -> Iterator[dict]:
        pending: deque = deque()   # (batch, handle or exception, frame bytes), oldest first
        inflight = 0
        batch: list[dict] = []
        for row in rows:
            if not is_ok(row):
                yield self.passthrough(row)
                continue
            batch.append(row)
            if len(batch) >= self.batch_size:
                item = self._submit(batch)
                pending.append(item)
                inflight += item[2]
                batch = []
                while pending and (inflight > self.inflight_bytes or len(pending) > MAX_PENDING_BATCHES):
                    done = pending.popleft()
                    inflight -= done[2]
                    yield from self._finish(done)
        if batch:
            pending.append(self._submit(batch))
        while pending:
            yield from self._finish(pending.popleft())

    def _submit(self, batch: list[dict]) -> tuple:
        self.counts["clips"] += len(batch)
        frames = None
        try:
            frames = np.concatenate([r["frames"] for r in batch])          # (B*T, S, S, 3)
            submit = getattr(self.image, "submit", None)
            handle = submit(frames) if submit is not None else self.image.encode(frames)
        except Exception as err:   # noqa: BLE001 — settled in _finish
            handle = err
        return batch, handle, 0 if frames is None else frames.nbytes

    def _finish(self, item: tuple) -> Iterator[dict]:
        batch, handle, _ = item
        try:
            if isinstance(handle, Exception):
                raise handle
            codes = self.image.result(handle) if hasattr(self.image, "result") else handle   # (B*T, h, w)
        except Exception as err:   # noqa: BLE001 — one bad batch must not kill the job: retry one by one
            yield from self._encode_one_by_one(batch, err)
            return
        yield from self._rows_with_codes(batch, codes)

    def _encode_one_by_one(self, batch: list[dict], err: Exception) -> Iterator[dict]:
        if len(batch) == 1 or isinstance(err, EncoderUnavailable):
            for row in batch:
                self.counts[f"dropped_{image_error_reason(err)}"] += 1
                yield mark_error(row, STAGE, image_error_reason(err), f"image tokenizer: {type(err).__name__}: {err}")
            return
        for row in batch:
            try:
                codes = self.image.encode(row["frames"])
            except Exception as one_err:   # noqa: BLE001
                self.counts[f"dropped_{image_error_reason(one_err)}"] += 1
                yield mark_error(row, STAGE, image_error_reason(one_err),
                                 f"image tokenizer: {type(one_err).__name__}: {one_err}")
                continue
            yield from self._rows_with_codes([row], codes)

    def _rows_with_codes(self, batch: list[dict], codes: np.ndarray) -> Iterator[dict]:
        start = 0
        for row in batch:
            n = len(row["frames"])
            out = {k: v for k, v in row.items() if k != "frames"}
            out["vtok"] = codes[start:start + n].astype(np.uint16)
            start += n
            if row.get("roundtrip_qa"):   # a few clips per shard go back to pictures: a bad tokenizer shows early
                out["roundtrip_psnr"] = self._roundtrip_psnr(out["vtok"], row["frames"])
            try:
                # the slot also holds the span prefix and a separator; measure the cut against the
                # whole slot here, the model decides the exact room when it builds the prefix
                ttok, cut = self.text.encode_caption(str(row.get("caption") or ""), self.text_slot)
            except Exception as err:   # noqa: BLE001
                self.counts["dropped_tokenize_error"] += 1
                yield mark_error(out, STAGE, "tokenize_error", f"text tokenizer: {type(err).__name__}: {err}")
                continue
            out.update(ttok=ttok, caption_tokens=int(len(ttok)), caption_cut=bool(cut), tokenizers=self.ids)
            self.counts["kept"] += 1
            yield out

    def _roundtrip_psnr(self, codes: np.ndarray, frames: np.ndarray) -> float:
        from clipforge.tokenizer.metrics import psnr

        try:
            return psnr(np.asarray(self.image.decode(codes.astype(np.int64))), frames)
        except Exception:   # noqa: BLE001 — quality figures must never fail a sample
            return -1.0
