"""The tokenize stage: batches, device errors, and an encoder that answers later (GPU workers)."""
from __future__ import annotations

import numpy as np

from clipforge.pipeline.schema import REASONS, TRANSIENT
from clipforge.pipeline.stages import ImageEncoder
from clipforge.pipeline.tokenize import EncoderUnavailable, TokenizeClips, image_error_reason


def _rows(n: int, size: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"status": "ok", "key": f"k{i}", "row_index": i, "caption": "a red circle moves left",
             "frames": rng.integers(0, 255, (5, size, size, 3), dtype=np.uint8)} for i in range(n)]


class LaterEncoder:
    """An ImageEncoder that answers later, as GPU workers do: `submit` queues the frames, `result`
    encodes them with the real tokenizer. Records what was in flight at each submit."""

    def __init__(self, tokenizer, fail_when=None):
        self.tokenizer, self.fail_when = tokenizer, fail_when
        self.tokenizer_id, self.sha256 = tokenizer.tokenizer_id, tokenizer.sha256
        self.outstanding: list = []
        self.in_flight_at_submit: list[tuple[int, int]] = []

    @property
    def encode_settings(self) -> dict:
        return self.tokenizer.encode_settings

    def submit(self, frames):
        self.in_flight_at_submit.append((len(self.outstanding), sum(f.nbytes for f in self.outstanding)))
        self.outstanding.append(frames)
        return frames

    def result(self, handle):
        self.outstanding = [f for f in self.outstanding if f is not handle]
        return self.encode(handle)

    def encode(self, frames):
        if self.fail_when is not None:
            self.fail_when(frames)
        return self.tokenizer.encode(frames)

    def decode(self, codes):
        return self.tokenizer.decode(codes)


def test_an_encoder_that_answers_later_overlaps_decoding_and_is_bounded(image_tokenizer, text_tokenizer):
    local = TokenizeClips(str(image_tokenizer), str(text_tokenizer), batch_size=2, device="cpu")
    expected = {r["key"]: r["vtok"] for r in local(_rows(12))}
    encoder = LaterEncoder(local.image)
    assert isinstance(encoder, ImageEncoder)
    batch_bytes = 2 * 5 * 64 * 64 * 3
    stage = TokenizeClips(None, str(text_tokenizer), batch_size=2, image_encoder=encoder,
                          inflight_bytes=2 * batch_bytes)
    pulled = []

    def decoded():   # the upstream decoder: records which rows were produced while batches were out
        for row in _rows(12):
            pulled.append(len(encoder.outstanding))
            yield row

    out = list(stage(decoded()))
    assert {r["key"]: r["vtok"].tolist() for r in out} == {k: v.tolist() for k, v in expected.items()}
    assert max(pulled) >= 1                      # rows were decoded while frames were being encoded
    assert max(b for _, b in encoder.in_flight_at_submit) <= 2 * batch_bytes   # never more than the bound


def test_no_encoder_answering_is_transient_for_every_clip(image_tokenizer, text_tokenizer):
    local = TokenizeClips(str(image_tokenizer), str(text_tokenizer), device="cpu")

    def nobody(frames):
        raise EncoderUnavailable("no image tokenizer worker answered within 300 s")

    stage = TokenizeClips(None, str(text_tokenizer), batch_size=3, image_encoder=LaterEncoder(local.image, nobody))
    out = list(stage(_rows(4)))
    assert [(r["status"], r["reason"]) for r in out] == [("error", "tokenize_transient")] * 4


def test_one_clips_bad_frames_fail_that_clip_only(image_tokenizer, text_tokenizer):
    local = TokenizeClips(str(image_tokenizer), str(text_tokenizer), device="cpu")

    def refuse_black(frames):
        if (frames.reshape(len(frames), -1).max(axis=1) == 0).any():
            raise ValueError("a black frame")

    rows = _rows(4)
    rows[2]["frames"][:] = 0
    stage = TokenizeClips(None, str(text_tokenizer), batch_size=4, image_encoder=LaterEncoder(local.image, refuse_black))
    out = {r["key"]: r for r in stage(rows)}
    assert out["k2"]["reason"] == "tokenize_error"
    assert all(out[k]["status"] == "ok" for k in ("k0", "k1", "k3"))


def test_device_errors_in_the_image_tokenizer_are_transient():
    import torch

    assert image_error_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) \
        == "tokenize_transient"
    assert image_error_reason(RuntimeError("CUDA error: an illegal memory access was encountered")) \
        == "tokenize_transient"
    assert image_error_reason(MemoryError()) == "tokenize_transient"
    assert image_error_reason(ValueError("expected 4 dimensions, got 3")) == "tokenize_error"
    assert "tokenize_transient" in REASONS and "tokenize_transient" in TRANSIENT
    assert "tokenize_error" not in TRANSIENT


def test_the_tokenize_stage_retries_device_errors(image_tokenizer, text_tokenizer):
    """An out-of-memory error on the GPU is the transient reason, for each row of the failed batch."""
    import torch

    from clipforge.pipeline.tokenize import TokenizeClips

    stage = TokenizeClips(str(image_tokenizer), str(text_tokenizer), device="cpu")

    def out_of_memory(frames):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    stage.image.encode = out_of_memory
    rows = [{"status": "ok", "key": f"k{i}", "frames": np.zeros((5, 64, 64, 3), np.uint8), "caption": "a red circle"}
            for i in range(2)]
    out = list(stage(rows))
    assert [(r["status"], r["reason"]) for r in out] == [("error", "tokenize_transient")] * 2
