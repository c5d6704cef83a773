"""The VQ-VAE behind the image tokenizer: its configuration, the presets, and the network (encoder,
EMA vector quantiser, decoder). `clipforge.tokenizer.image.ImageTokenizer` wraps a trained VQVAE for
encoding and decoding frames; `clipforge.tokenizer.image_train` trains one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipforge.pipeline.errors import ClipforgeError


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
            raise ClipforgeError(f"downsample must be a power of two, got {self.downsample}")
        if self.downsample < 2:
            raise ClipforgeError("downsample must be at least 2")
        if self.image_size % self.downsample:
            raise ClipforgeError(f"image_size {self.image_size} is not a multiple of downsample {self.downsample}")
        if not 2 <= self.codebook_size <= 65536:
            raise ClipforgeError(f"codebook_size must be in [2, 65536] (codes are uint16), got {self.codebook_size}")
        if self.encoder_kernel not in (1, 3):
            raise ClipforgeError(f"encoder_kernel must be 1 or 3, got {self.encoder_kernel}")
        if self.padding not in ("zeros", "replicate"):
            raise ClipforgeError(f"padding must be 'zeros' or 'replicate', got {self.padding!r}")


PRESETS: dict[str, VQConfig] = {
    # 64x64 -> 8x8 codes; 0.8M parameters; 6,400 steps of batch 8 take about 3 minutes on 2 CPU cores. Why
    # batch 8, 6,400 steps, code dimension 8, a residual block at 32x32 in the decoder and colour-channel
    # permutation: measured in docs/tokenizer.md (31.2-31.5 dB held-out, against 28.0 dB for 1,600 steps at
    # dimension 16 without the block; at dimension 16 with the block, 6,400 steps once collapsed onto one code)
    "tiny": VQConfig(image_size=64, downsample=8, codebook_size=512, code_dim=8, channels=128,
                     stem_channels=32, res_blocks=1, stem_res_blocks=1, ema_decay=0.95, name="tiny",
                     train_steps=6400, train_batch=8, train_augment="hflip,channels"),
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
