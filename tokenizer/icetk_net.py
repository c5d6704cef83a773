"""icetk's image tokenizer network, rebuilt so that clipforge reads icetk's own `ice_image.pt`.

CogView2 and CogVideo tokenize frames with icetk's hierarchical VQ-VAE. The `icetk` package cannot be
installed beside Ray (it pins protobuf < 3.19, Ray needs >= 3.20.3) and imports torchvision, so clipforge
carries the network itself: the same modules under the same state-dict names, and the same arithmetic in
the same order (x * sigmoid(x), not F.silu; the attention scale after the product; the quantiser's
distance written as icetk writes it), so that the codes are icetk's bit for bit (`tests/test_icetk.py`
compares them with the `icetk` package's own `encode`).

The network: an encoder (conv, then 128/256/512 channels with two residual blocks each and two strided
downsamplings, a middle of residual-attention-residual, 256 output channels: 4x smaller), two residual
downsamplers (average pool + strided conv) for compression 8 and 16, one codebook of 20,000 codes of 256
dimensions shared by every level, and one decoder per level. A checkpoint is `{"module": state_dict}`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CODES = 20000
CODE_DIM = 256
# icetk's pixel normalisation (its training set's mean and standard deviation per RGB channel)
MEAN = (0.79093, 0.76271, 0.75340)
STD = (0.30379, 0.32279, 0.32800)
# decoder widths per level (compression 4, 8, 16): icetk's `decs[2 - level]`
DECODER_MULTS = ((1, 2, 4), (1, 1, 2, 4), (1, 1, 1, 2, 4))
COMPRESSIONS = {4: 0, 8: 1, 16: 2}   # compression -> level (how many residual downsamplers follow the encoder)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)   # as icetk computes it: F.silu may differ in the last bit


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class SelfAttention(nn.Module):
    """Single-head attention over the pixels of a feature map (the scale applies after q.k)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1))   # (b, hw, hw)
        weights = F.softmax(weights * c ** (-0.5), dim=2)
        h = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class StridedConv(nn.Module):
    """3x3 stride-2 convolution, padded on the right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResidualDownsample(nn.Module):
    def __init__(self, channels: int = CODE_DIM):
        super().__init__()
        self.conv_down_sampler = StridedConv(channels)

    def forward(self, x):
        return F.avg_pool2d(x, kernel_size=2, stride=2) + self.conv_down_sampler(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResBlock(channels, channels), SelfAttention(channels), ResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (blocks, then an optional downsampling) or the decoder (blocks with
    optional attention, then an optional upsampling)."""

    def __init__(self, blocks: list, attn: list, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name if resample is not None else None

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, channels: int = 128, mults=(1, 2, 4), blocks: int = 2, z_channels: int = CODE_DIM):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, 1, 1)
        levels, cin = [], channels
        for i, mult in enumerate(mults):
            cout = channels * mult
            res = [ResBlock(cin if j == 0 else cout, cout) for j in range(blocks)]
            # attention only at resolution 16 of a nominal 256: never reached by a 3-level encoder
            levels.append(Level(res, [], StridedConv(cout) if i < len(mults) - 1 else None, "downsample"))
            cin = cout
        self.down = nn.ModuleList(levels)
        self.mid = Middle(cin)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, mults, channels: int = 128, z_channels: int = CODE_DIM):
        super().__init__()
        cin = channels * mults[-1]
        resolution = 256 // 2 ** (len(mults) - 1)   # icetk's nominal resolution: attention where it is 16
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = Middle(cin)
        levels = []
        for i in reversed(range(len(mults))):
            cout = channels * mults[i]
            attn = [SelfAttention(cout)] if resolution == 16 else []
            levels.insert(0, Level([ResBlock(cin, cout)], attn, Upsample(cout) if i else None, "upsample"))
            cin = cout
            resolution *= 2 if i else 1
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, codes: int = CODES, dim: int = CODE_DIM):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.embed = nn.Embedding(codes, dim)
        # EMA statistics icetk keeps in its checkpoints (unused for encoding)
        self.register_buffer("cluster_size", torch.zeros(codes))
        self.register_buffer("embed_avg", self.embed.weight.data.clone())

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) encoder output -> (B, h, w) nearest codes, with icetk's distance arithmetic."""
        b, _, h, w = z.shape
        flat = self.proj(z).permute(0, 2, 3, 1).reshape(-1, self.embed.weight.shape[1])
        codebook = self.embed.weight
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                + codebook.pow(2).sum(1, keepdim=True).t())
        return (-dist).max(1)[1].view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed.weight)   # (B, h, w, D)


class IceImageNetwork(nn.Module):
    """The module tree of icetk's `HVQVAE` (state-dict names `enc.*`, `decs.*`, `quantize.*`,
    `down_samplers.*`)."""

    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.decs = nn.ModuleList(Decoder(m) for m in reversed(DECODER_MULTS))
        self.quantize = Quantizer()
        self.down_samplers = nn.ModuleList(ResidualDownsample() for _ in range(2))

    def encode_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> what the quantiser reads (B, 256, H/c, W/c), c = 4 * 2**level."""
        z = self.enc(x)
        for i in range(level):
            z = self.down_samplers[i](z)
        return z

    def encode(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> codes (B, H/c, W/c)."""
        return self.quantize.indices(self.encode_features(x, level))

    def decode(self, codes: torch.Tensor, level: int) -> torch.Tensor:
        """codes (B, h, w) -> normalised pixels (B, 3, h*c, w*c)."""
        return self.decs[2 - level](self.quantize.lookup(codes).permute(0, 3, 1, 2))


def random_checkpoint(path, seed: int = 0, spread: float = 1.0) -> None:
    """Write an `ice_image.pt` of random weights in icetk's own format, `{"module": state_dict}`: for tests
    and benchmarks where icetk's trained weights cannot be fetched. `spread` scales the codebook (icetk
    initialises it within +-1/20000, where nearly every code is a near-tie)."""
    torch.manual_seed(seed)
    net = IceImageNetwork()
    with torch.no_grad():
        net.quantize.embed.weight.normal_(0.0, spread)
        net.quantize.embed_avg.copy_(net.quantize.embed.weight)
    torch.save({"module": net.state_dict()}, path)
