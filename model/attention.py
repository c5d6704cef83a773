"""Attention under the model's masks, and dropout, as the CPU and GPU kernels run them fastest (see
docs/model.md, "Whole sequences attend by structure")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class FrameBlocks:
    """The base channel's mask over a whole sequence, as structure rather than an (L, L) tensor: text
    attends text causally, each of `n_frames` blocks of `frame_len` tokens attends all text and itself
    causally. Frames see only text and themselves, so a block costs frame_len x (text + frame_len)
    scores instead of a row of the whole square: at the demo's shape (349 tokens, 5 frames) a fifth."""
    text: int
    frame_len: int
    n_frames: int


def attention(q, k, v, mask) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, nh, S, hs) under `mask`: an (T, S)
    bool tensor (True = may attend), "causal" (T == S), or FrameBlocks (a whole sequence).

    No dropout on the attention probabilities: with a mask it pushed CPU attention onto a slow path (3x
    slower training steps on the demo model); residual and MLP dropout remain. On CPU the scores are
    computed in float32 even under bf16 autocast: PyTorch's CPU flash kernel ran slower in bf16 than in
    float32 (332 vs 237 ms for a demo-shaped batch, forward and backward)."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        # autocast would cast float32 inputs of scaled_dot_product_attention back down: switch it off
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), mask).to(dtype)
    if isinstance(mask, FrameBlocks):
        return frame_block_attention(q, k, v, mask)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def frame_block_attention(q, k, v, blocks: FrameBlocks) -> torch.Tensor:
    """`attention` under a FrameBlocks mask: the text rows causally, then all frames as one batch of
    (frame_len queries) x (text + frame_len keys)."""
    B, nh, L, hs = q.shape
    n, fl, t = blocks.n_frames, blocks.frame_len, blocks.text
    if L != t + n * fl or k.shape[2] != L:
        raise ValueError(f"FrameBlocks({t}, {fl}, {n}) needs {t + n * fl} queries and keys, got {L}, {k.shape[2]}")
    y_text = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True)

    # frames as extra heads, (B, nh * n, ...): the fused kernels take 4-d inputs only (5-d fell back to
    # plain matmuls and softmax)
    def frames(x):                                               # (B, nh * n, fl, hs)
        return x[:, :, t:].reshape(B, nh * n, fl, hs)

    def with_text(x):                                            # (B, nh * n, t + fl, hs)
        text = x[:, :, None, :t].expand(B, nh, n, t, hs).reshape(B, nh * n, t, hs)
        return torch.cat([text, frames(x)], dim=2)

    visible = torch.ones(fl, t + fl, dtype=torch.bool, device=q.device)
    visible[:, t:] = torch.ones(fl, fl, dtype=torch.bool, device=q.device).tril()
    y_frames = F.scaled_dot_product_attention(frames(q), with_text(k), with_text(v), attn_mask=visible)
    return torch.cat([y_text, y_frames.reshape(B, nh, n * fl, hs)], dim=2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, nh, T, hs) by per-position angles (T, r): dims [0, r) pair with [r, 2r)."""
    r = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class Dropout(nn.Module):
    """nn.Dropout, except that on a CPU the mask comes from torch.rand: torch's CPU bernoulli_ drew a
    demo-sized mask (32 x 89 x 128) in 18.7 ms against 7.5 ms, and dropout was 38 % of an image-phase
    training step in bf16. Same distribution, same scaling, same seeded generator."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))
