"""Tokenization stage: clip frames → VQ codes, clean caption → text ids.

Frames are encoded in batches across rows (one GPU call per batch, not per clip); the frames are dropped
from the row afterwards, so only tokens (a few KB a sample) travel on to the writer.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from clipforge.pipeline.schema import is_ok, mark_error

STAGE = "tokenize"


def image_error_reason(err: BaseException) -> str:
    """`tokenize_transient` for device trouble (CUDA errors, out of memory: another batch, a freed GPU or
    another node may succeed), `tokenize_error` for everything else (the sample itself is the problem)."""
    if isinstance(err, MemoryError):
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


class TokenizeClips:
    """Input keys: frames (uint8 [T,S,S,3]), caption. Output keys: vtok (uint16 [T,h,w]), ttok (int32),
    caption_tokens, caption_cut, tokenizers. Reasons: tokenize_error, tokenize_transient (device errors)."""

    def __init__(self, image_tokenizer_dir: str, text_tokenizer_path: str, text_slot: int = 64,
                 batch_size: int = 32, device: str | None = None, dtype: str = "float32",
                 image_encoder=None):
        """`image_encoder`, when given, replaces the local image tokenizer: any object with `encode`,
        `decode`, `tokenizer_id` and `sha256` (the build passes one that sends frames to GPU workers)."""
        from clipforge.tokenizer.image import ImageTokenizer
        from clipforge.tokenizer.text import TextTokenizer

        if image_encoder is not None:
            self.image = image_encoder
        else:
            if device is None:
                import torch
                device = "cuda" if torch.cuda.is_available() else "cpu"
            # float32 is the default everywhere; only ask for another dtype explicitly
            options = {"dtype": dtype} if dtype != "float32" else {}
            self.image = ImageTokenizer.load(image_tokenizer_dir, device=device, **options)
        self.text = TextTokenizer(text_tokenizer_path)
        self.text_slot, self.batch_size = text_slot, batch_size
        self.ids = {"image": {"id": self.image.tokenizer_id, "sha256": self.image.sha256},
                    "text": {"id": self.text.tokenizer_id, "sha256": self.text.sha256}}

    def __call__(self, rows: Iterable[dict]) -> Iterator[dict]:
        batch: list[dict] = []
        for row in rows:
            if not is_ok(row):
                yield row
                continue
            batch.append(row)
            if len(batch) >= self.batch_size:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    def _encode(self, batch: list[dict]) -> Iterator[dict]:
        try:
            frames = np.concatenate([r["frames"] for r in batch])          # (B*T, S, S, 3)
            codes = self.image.encode(frames)                                # (B*T, h, w)
        except Exception as err:   # noqa: BLE001 — one bad batch must not kill the job: retry one by one
            if len(batch) > 1:
                for row in batch:
                    yield from self._encode([row])
                return
            yield mark_error(batch[0], STAGE, image_error_reason(err), f"image tokenizer: {type(err).__name__}: {err}")
            return
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
                yield mark_error(out, STAGE, "tokenize_error", f"text tokenizer: {type(err).__name__}: {err}")
                continue
            out.update(ttok=ttok, caption_tokens=int(len(ttok)), caption_cut=bool(cut), tokenizers=self.ids)
            yield out

    def _roundtrip_psnr(self, codes: np.ndarray, frames: np.ndarray) -> float:
        try:
            decoded = np.asarray(self.image.decode(codes.astype(np.int64)))
        except Exception:   # noqa: BLE001 — quality figures must never fail a sample
            return -1.0
        return psnr_uint8(decoded, frames)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures (or stacks of them) of the same shape."""
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0 ** 2 / err))
