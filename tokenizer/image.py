"""VQ-VAE image tokenizer: frames -> discrete codes -> frames.

CogVideo inherits CogView2's tokenizer (20,000 codes of dimension 256, 8x downsampling: a 160x160 frame
is 20x20 = 400 tokens). We cannot ship those weights, so clipforge trains its own tokenizer with the same
shape of API: `encode` takes uint8 frames [N, S, S, 3] and returns uint16 codes [N, S/8, S/8]; `decode`
is its inverse. The `tiny` preset (64x64 frames -> 8x8 codes, 512 codes) trains on a 2-core CPU in about
four to five minutes; the `cogview2` preset has CogView2's geometry and needs a GPU and a real corpus.

The quantiser is an EMA vector quantiser (van den Oord et al. 2017, appendix; Razavi et al. 2019) with
a commitment loss and straight-through gradients. Codes unused since the last check restart on encoder
outputs of the current batch drawn in proportion to their squared quantisation error (k-means++ seeding,
`EMAQuantizer.restart_dead`), which keeps codebook usage high on small, repetitive data such as
synthetic clips.

On disk a tokenizer is a directory with `config.json` (the VQConfig as JSON) and `weights.pt` (a torch
state_dict, loaded with `weights_only=True`, so nothing is unpickled), plus `train_log.json` when it was
trained here. Its id is `vq-<preset>-<first 12 hex digits of the sha256 of weights.pt>`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
TRAIN_LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class VQConfig:
    image_size: int                 # S: frames are S x S (the caller resizes and center-crops)
    downsample: int = 8             # S / h; a power of two
    codebook_size: int = 512        # number of codes K
    code_dim: int = 64              # dimension of one code vector
    channels: int = 64              # conv width on the token grid (h x w)
    stem_channels: int = 32         # conv width at half resolution (S/2 x S/2)
    res_blocks: int = 2             # residual blocks on the token grid, in encoder and decoder each
    beta: float = 0.25              # commitment loss weight
    normalize: bool = False         # l2-normalise encoder outputs and codes (cosine lookup); off: it
                                    # slowed learning badly here (an autoencoder reached 17 vs 26 dB)
    ema_decay: float = 0.99         # EMA decay of the codebook statistics (lower: follows a fast encoder)
    stem_res_blocks: int = 0        # residual blocks at S/2 in the decoder only (edges; encode cost unchanged)
    encoder_kernel: int = 3         # kernel of the encoder's residual blocks on the token grid; 1: each code
                                    # sees only its own patch (plus the stem's pixel of overlap)
    padding: str = "zeros"          # conv padding at the frame border: "zeros" or "replicate" (a flat
                                    # frame then encodes to one code everywhere, borders included)
    name: str = "custom"            # preset name, part of the tokenizer id
    # training defaults of the preset (train_image_tokenizer's steps / batch_size / lr when not given)
    train_steps: int = 300
    train_batch: int = 32
    train_lr: float = 3e-3
    train_augment: str = "hflip"    # comma-separated: hflip (mirror), channels (permute R, G, B per frame)

    @property
    def tokens_hw(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    def validate(self) -> None:
        n = int(round(math.log2(self.downsample)))
        if self.downsample < 1 or 2 ** n != self.downsample:
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.downsample < 2:
            raise ValueError("downsample must be at least 2")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {self.downsample}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in [2, 65536] (codes are uint16), got {self.codebook_size}")
        if self.encoder_kernel not in (1, 3):
            raise ValueError(f"encoder_kernel must be 1 or 3, got {self.encoder_kernel}")
        if self.padding not in ("zeros", "replicate"):
            raise ValueError(f"padding must be 'zeros' or 'replicate', got {self.padding!r}")


PRESETS: dict[str, VQConfig] = {
    # 64x64 -> 8x8 codes; 0.8M parameters; 1,600 steps of batch 8 take ~4-5 minutes on 2 CPU cores. Why batch
    # 8, code dimension 16 and colour-channel permutation: measured in docs/tokenizer.md
    "tiny": VQConfig(image_size=64, downsample=8, codebook_size=512, code_dim=16, channels=128,
                     stem_channels=32, res_blocks=1, ema_decay=0.95, name="tiny", train_steps=1600, train_batch=8,
                     train_augment="hflip,channels"),
    # CogView2's geometry: 160x160 -> 20x20 codes of a 20,000-entry codebook of dimension 256. Training
    # defaults are a GPU budget (about 16 GFLOP per frame forward); on a CPU, use --max-minutes and --resume
    "cogview2": VQConfig(image_size=160, downsample=8, codebook_size=20000, code_dim=256, channels=512,
                         stem_channels=128, res_blocks=4, name="cogview2", train_steps=40000, train_batch=32,
                         train_lr=1e-3),
}


# ----------------------------------------------------------------------------------------------------
# network


class ResBlock(nn.Module):
    def __init__(self, ch: int, kernel: int = 3, padding: str = "zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, kernel, padding=kernel // 2, padding_mode=padding)
        self.conv2 = nn.Conv2d(ch, ch, kernel, padding=kernel // 2, padding_mode=padding)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


# Both halves work at two resolutions only: a 3x3 "stem" conv at half resolution, then space-to-depth
# (PixelUnshuffle) straight to the token grid, where the residual blocks run. Measured on 2 CPU cores, this
# trains several times faster per step than strided / transposed conv pyramids of similar quality, because
# almost all arithmetic happens on the small token grid.

class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        r = cfg.downsample // 2  # the stem halves H and W, the unshuffle does the rest
        self.net = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, cfg.stem_channels, 3, padding=1, padding_mode=cfg.padding),
            nn.SiLU(),                                                                        # (N, c1, S/2, S/2)
            nn.PixelUnshuffle(r), nn.Conv2d(cfg.stem_channels * r * r, cfg.channels, 1),      # (N, c, h, w)
            *[ResBlock(cfg.channels, cfg.encoder_kernel, cfg.padding) for _ in range(cfg.res_blocks)],
            nn.SiLU(), nn.Conv2d(cfg.channels, cfg.code_dim, 1))                             # (N, D, h, w)

    def forward(self, x):  # (N, 3, S, S) -> (N, D, h, w)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        r = cfg.downsample // 2
        self.net = nn.Sequential(
            nn.Conv2d(cfg.code_dim, cfg.channels, 3, padding=1, padding_mode=cfg.padding),  # (N, c, h, w)
            *[ResBlock(cfg.channels, 3, cfg.padding) for _ in range(cfg.res_blocks)],
            nn.SiLU(), nn.Conv2d(cfg.channels, cfg.stem_channels * r * r, 1), nn.PixelShuffle(r),  # (N, c1, S/2, S/2)
            *[ResBlock(cfg.stem_channels, 3, cfg.padding) for _ in range(cfg.stem_res_blocks)],
            nn.SiLU(), nn.Conv2d(cfg.stem_channels, 12, 3, padding=1, padding_mode=cfg.padding), nn.PixelShuffle(2))   # (N, 3, S, S)

    def forward(self, z):  # (N, D, h, w) -> (N, 3, S, S)
        return self.net(z)


class EMAQuantizer(nn.Module):
    """Nearest-code quantiser with an EMA-updated codebook (no codebook gradient)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.decay = cfg.ema_decay
        self.beta = cfg.beta
        self.normalize = cfg.normalize
        self.register_buffer("codebook", torch.randn(cfg.codebook_size, cfg.code_dim) * 0.1)  # (K, D)
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))                      # (K,)
        self.register_buffer("ema_sum", self.codebook.clone())                                # (K, D)
        # assignments since the last dead-code check (training bookkeeping, not saved)
        self.register_buffer("usage", torch.zeros(cfg.codebook_size), persistent=False)       # (K,)

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """(M, D) encoder outputs -> the vectors that are quantised (unit length when `normalize`)."""
        return F.normalize(z, dim=1) if self.normalize else z

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(M, D) prepared vectors -> (M,) nearest code ids, in chunks of at most ~2**24 distances (2**26
        on a GPU): a 20,000-code book against a batch of 160x160 frames would otherwise need gigabytes."""
        e = self.codebook
        e2 = e.pow(2).sum(1)[None, :]                                                   # (1, K)
        # a GPU has room for 4x larger chunks, and fewer, larger GEMMs keep it busy
        step = max(1, (1 << (26 if z.is_cuda else 24)) // e.shape[0])
        out = [((z[i:i + step] @ e.t()).mul_(-2).add_(e2)).argmin(1) for i in range(0, z.shape[0], step)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.codebook)

    def forward(self, z: torch.Tensor, quantize: bool = True):
        """z (N, D, h, w) -> quantised z (straight-through), ids (N, h, w), commitment loss.

        With quantize=False (the autoencoder warm-up of training) the prepared vectors pass through
        unquantised, ids are still computed for logging, and the loss is zero."""
        n, d, h, w = z.shape
        flat = self.prepare(z.permute(0, 2, 3, 1).reshape(-1, d))  # (M, D)
        idx = self.indices(flat.detach())
        if not quantize:
            return flat.view(n, h, w, d).permute(0, 3, 1, 2), idx.view(n, h, w), flat.new_zeros(())
        q = self.lookup(idx)
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx, minlength=self.codebook.shape[0]).type_as(flat)     # (K,)
                sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat.detach())         # (K, D)
                self.usage.add_(counts)
                self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                total = self.ema_count.sum()
                count = (self.ema_count + 1e-5) / (total + 1e-5 * len(self.ema_count)) * total  # Laplace smoothing
                self.codebook.copy_(self.prepare(self.ema_sum / count[:, None]))
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()  # straight-through estimator
        q = q.view(n, h, w, d).permute(0, 3, 1, 2)
        return q, idx.view(n, h, w), self.beta * commit

    @torch.no_grad()
    def restart_dead(self, z_flat: torch.Tensor, min_usage: float = 1.0) -> int:
        """Move codes assigned fewer than `min_usage` times since the last call onto encoder outputs of
        this batch; returns how many were moved.

        The new positions are drawn with probability proportional to each vector's squared distance to
        its nearest code (k-means++ seeding): on frames that are mostly background, uniform draws would
        put nearly every restarted code on the background again, while the badly served vectors (edges,
        rare colours) are the ones that need codes.
        """
        dead = (self.usage < min_usage).nonzero().flatten()
        self.usage.zero_()
        if len(dead) == 0:
            return 0
        err = (z_flat - self.lookup(self.indices(z_flat))).pow(2).sum(1)  # (M,)
        weights = err + 1e-8 * err.max().clamp_min(1e-12)
        pick = torch.multinomial(weights, len(dead), replacement=len(dead) > len(weights))
        fresh = self.prepare(z_flat[pick] + 0.01 * z_flat.std() * torch.randn_like(z_flat[pick]))
        self.codebook[dead] = fresh
        self.ema_count[dead] = self.ema_count.mean()
        self.ema_sum[dead] = fresh * self.ema_count[dead, None]
        return int(len(dead))

    @torch.no_grad()
    def init_kmeans(self, z_flat: torch.Tensor, iters: int = 10) -> None:
        """Start the codebook on k-means centroids of prepared encoder outputs (M, D); empty clusters are
        reseeded on the worst-served vectors, as in `restart_dead`."""
        k = self.codebook.shape[0]
        pick = torch.randint(0, z_flat.shape[0], (k,), device=z_flat.device)
        self.codebook.copy_(self.prepare(z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])))
        for _ in range(iters):
            idx = self.indices(z_flat)
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(self.codebook).index_add_(0, idx, z_flat)
            alive = counts > 0
            self.codebook[alive] = self.prepare(sums[alive] / counts[alive, None])
            if (~alive).any():
                self.usage.copy_(counts)
                self.restart_dead(z_flat, 1.0)
        counts = torch.bincount(self.indices(z_flat), minlength=k).float()
        self.ema_count.copy_(counts.clamp_min(1.0))
        self.ema_sum.copy_(self.codebook * self.ema_count[:, None])
        self.usage.zero_()


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quantizer = EMAQuantizer(cfg)
        self.decoder = Decoder(cfg)
        # He-normal init: PyTorch's default conv init shrinks activations layer after layer, and this
        # shallow, norm-free network then learns noticeably slower (measured: 24.3 vs 23.1 dB after 300
        # autoencoder steps on synthetic shapes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x, quantize: bool = True):  # x (N, 3, S, S) in [-1, 1] -> recon, ids (N, h, w), commit loss
        z = self.encoder(x)
        q, idx, commit = self.quantizer(z, quantize)
        return self.decoder(q), idx, commit


def frames_to_tensor(frames: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, S, S) in [-1, 1] (training path; the tokenizer's encode path
    copies uint8 and converts on the device, see `ImageTokenizer.encode`)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, S, S) in [-1, 1] -> uint8 (N, S, S, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def check_frames(frames: np.ndarray, cfg: VQConfig) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % cfg.downsample or frames.shape[2] % cfg.downsample:
        raise ValueError(f"frame size {frames.shape[1:3]} is not a multiple of the downsampling {cfg.downsample}")
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
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
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
        raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        known = {f.name for f in fields(VQConfig)}
        config = VQConfig(**{k: v for k, v in raw.items() if k in known})
        blob = (directory / WEIGHTS_FILE).read_bytes()
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        model = VQVAE(config)
        model.load_state_dict(state)
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
        frames = check_frames(frames, self.config)
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
            q = self.model.quantizer.lookup(idx).permute(0, 3, 1, 2)  # (n, D, h, w)
            if self.channels_last:
                q = q.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                y = self.model.decoder(q)
            out.append(to_uint8(y))
        if not out:
            return np.zeros((0, h * self.downsample, w * self.downsample, 3), dtype=np.uint8)
        return np.concatenate(out)

    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(frames))


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
