"""VQ-VAE image tokenizer: frames -> discrete codes -> frames.

CogVideo inherits CogView2's tokenizer (20,000 codes of dimension 256, 8x downsampling: a 160x160 frame
is 20x20 = 400 tokens). We cannot ship those weights, so clipforge trains its own tokenizer with the same
shape of API: `encode` takes uint8 frames [N, S, S, 3] and returns uint16 codes [N, S/8, S/8]; `decode`
is its inverse. The `tiny` preset (64x64 frames -> 8x8 codes, 512 codes) trains on a 2-core CPU in two to
three minutes (6,400 steps of 8 frames); the `cogview2` preset has CogView2's geometry and needs a GPU and a
real corpus.

The quantiser is an EMA vector quantiser (van den Oord et al. 2017, appendix; Razavi et al. 2019) with
a commitment loss and straight-through gradients. Codes unused since the last check restart on encoder
outputs of the current batch drawn in proportion to their squared quantisation error (k-means++ seeding,
`clipforge.tokenizer.vq.EMAQuantizer.restart_dead`), which keeps codebook usage high on small, repetitive data such as
synthetic clips.

On disk a tokenizer is a directory with `config.json` (the VQConfig as JSON) and `weights.pt` (a torch
state_dict, loaded with `weights_only=True`, so nothing is unpickled), plus `train_log.json` when it was
trained here. Its id is `vq-<preset>-<first 12 hex digits of the sha256 of weights.pt>`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.atomic import atomic_write
from clipforge.tokenizer.vq import VQVAE, VQConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
TRAIN_LOG_FILE = "train_log.json"


def frames_to_tensor(frames: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, S, S) in [-1, 1] (training path; the tokenizer's encode path
    copies uint8 and converts on the device, see `ImageTokenizer.encode`)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, S, S) in [-1, 1] -> uint8 (N, S, S, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def check_frames(frames: np.ndarray, downsample: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % downsample or frames.shape[2] % downsample:
        raise ValueError(f"frame size {frames.shape[1:3]} is not a multiple of the downsampling {downsample}")
    return frames


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------
# the tokenizer


class ImageTokenizer:
    """Symmetric frames <-> codes API over a trained VQ-VAE.

    encode: uint8 [N, S, S, 3] -> uint16 [N, h, w];  decode: ints [N, h, w] -> uint8 [N, S, S, 3].
    The network is fully convolutional, so any frame size that is a multiple of `downsample` encodes, but
    the tokenizer was trained at `image_size` and is meant to be used there.

    Encoding runs in fixed micro-batches of `batch_size` frames (the last one padded), so every frame goes
    through kernels of the same shapes whatever the caller's batch: the codes of a frame do not depend on
    how many frames come with it (convolution and GEMM libraries pick algorithms, and so summation orders,
    by shape; a flipped nearest-code tie would change a token). `dtype="bfloat16"` runs the encoder and
    decoder convolutions in bf16 (autocast) while the nearest-code search stays in float32; it can still flip
    near-ties, which is why the build records `encode_settings` with the dataset.
    """

    def __init__(self, config: VQConfig, model: VQVAE | None = None, device: str | torch.device | None = None,
                 sha256: str | None = None, batch_size: int = 64, dtype: str = "float32",
                 channels_last: bool | None = None):
        config.validate()
        if dtype not in DTYPES:
            raise ClipforgeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.config = config
        self.device = torch.device(device or default_device())
        self.dtype = dtype
        # channels-last suits NHWC uint8 input and GPU convolutions (tensor cores want NHWC); on CPU the
        # default layout measured as fast or faster here (bench/tokenize.py sweeps both)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        self.model = (model or VQVAE(config)).to(self.device).eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self._sha256 = sha256
        self._staging: list[torch.Tensor] = []     # reusable (pinned on CUDA) host buffers, see encode

    # --- identity -----------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def tokens_hw(self) -> tuple[int, int]:
        return self.config.tokens_hw

    def fit_size(self, size: int) -> None:
        """Refuse frames of another size than the one this tokenizer was trained at."""
        if size != self.image_size:
            raise ClipforgeError(f"the image tokenizer takes {self.image_size}px frames but clips are {size}px: "
                                 f"set --size {self.image_size}")

    @property
    def sha256(self) -> str:
        """sha256 of weights.pt as saved (computed from the serialised state_dict if never saved)."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.weights_bytes()).hexdigest()
        return self._sha256

    @property
    def tokenizer_id(self) -> str:
        return f"vq-{self.config.name}-{self.sha256[:12]}"

    @property
    def encode_settings(self) -> dict:
        """What can change codes besides the weights: record it beside the tokens (bf16 and the device
        class can flip nearest-code near-ties)."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"dtype": self.dtype, "device": self.device.type, "device_name": name,
                "micro_batch": self.batch_size, "torch": torch.__version__}

    def weights_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, buf)
        return buf.getvalue()

    # --- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = self.weights_bytes()
        atomic_write(directory / WEIGHTS_FILE, blob)
        atomic_write(directory / CONFIG_FILE, json.dumps(asdict(self.config), indent=2).encode("utf-8"))
        self._sha256 = hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
             dtype: str = "float32", **kwargs) -> "ImageTokenizer":
        """Load config.json + weights.pt; device None picks CUDA when present. Extra keyword arguments
        (batch_size, channels_last) go to the constructor."""
        directory = Path(directory)
        if not directory.is_dir() or not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ClipforgeError(f"{directory} is not an image tokenizer folder (one with {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE}, as `clipforge tokenizer train-image` writes)")
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            known = {f.name for f in fields(VQConfig)}
            config = VQConfig(**{k: v for k, v in raw.items() if k in known})
            blob = (directory / WEIGHTS_FILE).read_bytes()
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            model = VQVAE(config)
            model.load_state_dict(state)
        except (ValueError, TypeError, RuntimeError, KeyError, EOFError) as err:
            raise ClipforgeError(f"{directory}: not a readable image tokenizer ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]})") from None
        return cls(config, model, device=device, sha256=hashlib.sha256(blob).hexdigest(), dtype=dtype, **kwargs)

    # --- encode / decode ----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    def _staging_buffers(self, shape: tuple) -> list[torch.Tensor]:
        """Two host buffers of one micro-batch of uint8 frames, pinned on CUDA so that the copy to the
        device is a true asynchronous DMA; reused across calls (pinning is slow)."""
        if not self._staging or tuple(self._staging[0].shape) != shape:
            pin = self.device.type == "cuda"
            self._staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        return self._staging

    def codes_from_device_frames(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) already on the device -> int64 codes (B, h, w) on the device."""
        # NHWC uint8 -> NCHW view with channels-last strides: the float conversion keeps that layout
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with self._autocast():
            z = self.model.encoder(x)                                                  # (B, D, h, w)
        b, d, h, w = z.shape
        quantizer = self.model.quantizer
        flat = quantizer.prepare(z.float().permute(0, 2, 3, 1).reshape(-1, d))         # (B*h*w, D) float32
        return quantizer.indices(flat).view(b, h, w)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> uint16 codes [N, S/8, S/8] (a single [S, S, 3] frame gives [1, h, w]).

        The host side only copies uint8 into a staging buffer (4x fewer bytes cross the bus than float32);
        on CUDA the copy of micro-batch i+1 runs on a side stream while micro-batch i computes, and codes
        stay on the device until the end, so the GPU never waits on the host in between."""
        frames = check_frames(frames, self.downsample)
        self.model.eval()
        n, hh, ww = len(frames), frames.shape[1] // self.downsample, frames.shape[2] // self.downsample
        if n == 0:
            return np.zeros((0, hh, ww), dtype=np.uint16)
        bs = self.batch_size
        buffers = self._staging_buffers((bs,) + frames.shape[1:])
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        copied = [None, None]                          # per buffer: the event that ends its last copy

        def stage(k: int, start: int):
            """Fill buffer k with frames[start:start+bs] and start its copy to the device."""
            buf = buffers[k]
            if copied[k] is not None:
                copied[k].synchronize()                # the previous copy out of this buffer is done
            part = frames[start:start + bs]
            buf[:len(part)].copy_(torch.from_numpy(np.ascontiguousarray(part)))
            # rows past len(part) keep stale frames: they pad the micro-batch and their codes are dropped
            if not cuda:
                return buf, None
            with torch.cuda.stream(copy_stream):
                x = buf.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy_stream)
            copied[k] = event
            return x, event

        out = []
        nxt = stage(0, 0)
        for i, start in enumerate(range(0, n, bs)):
            x, event = nxt
            if cuda:
                torch.cuda.current_stream(self.device).wait_event(event)
                x.record_stream(torch.cuda.current_stream(self.device))   # allocated on the copy stream
            if start + bs < n:
                nxt = stage((i + 1) % 2, start + bs)   # queue the next copy before this batch computes
            codes = self.codes_from_device_frames(x)[:min(bs, n - start)]
            out.append(codes.to(torch.int32) if cuda else codes)
        return torch.cat(out).cpu().numpy().astype(np.uint16)

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """integer codes [N, h, w] (or [h, w]) -> uint8 frames [N, 8h, 8w, 3]."""
        codes = np.asarray(codes)
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers [N, h, w], got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        self.model.eval()
        n, h, w = codes.shape
        out = []
        for i in range(0, n, self.batch_size):
            idx = torch.from_numpy(codes[i:i + self.batch_size].astype(np.int64)).to(self.device)
            out.append(self.frames_from_device_codes(idx))
        if not out:
            return np.zeros((0, h * self.downsample, w * self.downsample, 3), dtype=np.uint8)
        return np.concatenate(out)

    def frames_from_device_codes(self, codes: torch.Tensor) -> np.ndarray:
        """int64 codes (B, h, w) on the device -> uint8 frames (B, S, S, 3) on the host."""
        q = self.model.quantizer.lookup(codes).permute(0, 3, 1, 2)  # (n, D, h, w)
        if self.channels_last:
            q = q.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            y = self.model.decoder(q)
        return to_uint8(y)

    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(frames))
