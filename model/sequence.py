"""A training phase's sequence as tensors: per-position descriptors, the attention masks of both channels,
the loss positions and the grid rotary tables. Pure functions of a CogVideoConfig (model/config.py) and a
phase, built once per phase and device by CogVideo.masks."""
from __future__ import annotations

import torch

from clipforge.model.config import CogVideoConfig


def position_descriptors(cfg: CogVideoConfig, phase: str) -> dict[str, torch.Tensor]:
    """Per-position descriptors of a phase's sequence, each (L,): frame index (-1 for text), is-code,
    grid row and column (-1 for text and <boi>)."""
    hw = cfg.tokens_h * cfg.tokens_w
    frame = [-1] * cfg.text_slot
    code = [False] * cfg.text_slot
    row = [-1] * cfg.text_slot
    col = [-1] * cfg.text_slot
    for f in cfg.frame_order(phase):
        frame += [f] * (1 + hw)
        code += [False] + [True] * hw
        row += [-1] + [i // cfg.tokens_w for i in range(hw)]
        col += [-1] + [i % cfg.tokens_w for i in range(hw)]
    return {"frame": torch.tensor(frame), "code": torch.tensor(code),
            "row": torch.tensor(row), "col": torch.tensor(col)}


def build_masks(cfg: CogVideoConfig, phase: str) -> dict[str, object]:
    """Boolean attention masks (True = may attend), (L, L) with query rows and key columns.

    Returns {"base": mask, "plus": [mask for even layers, mask for odd layers] or None (image phase),
    "loss": (L,) bool, True where the logits predict an image code of a loss frame (the next token)}.
    """
    lay = position_descriptors(cfg, phase)
    frame, code = lay["frame"], lay["code"]
    n = len(frame)
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]                        # (L, L) key <= query
    text_k = (frame == -1)[None, :]
    same_frame = (frame[:, None] == frame[None, :]) & (frame >= 0)[:, None]
    base = causal & (text_k | same_frame)

    plus = None
    if phase == "sequential":
        plus = [causal, causal]
    elif phase == "interpolation":
        is_text, given, gen = frame == -1, (frame >= 0) & (frame % 2 == 0), frame % 2 == 1
        in_given_block = is_text | given
        visible = ((in_given_block[:, None] & in_given_block[None, :])          # text + given: bidirectional
                   | (gen[:, None] & in_given_block[None, :])                   # generated frames see them all
                   | (gen[:, None] & gen[None, :] & (frame[None, :] < frame[:, None]))  # 3 sees 1
                   | (gen[:, None] & same_frame & causal))                      # causal inside own frame
        both_code = code[:, None] & code[None, :]
        plus = []
        for shift in (0, cfg.shift):                                            # even layers, odd layers
            wr = (lay["row"] + shift) // cfg.window
            wc = (lay["col"] + shift) // cfg.window
            same_window = (wr[:, None] == wr[None, :]) & (wc[:, None] == wc[None, :])
            plus.append(visible & (~both_code | same_window))

    loss_frame = torch.zeros(n, dtype=torch.bool)
    for f in cfg.loss_frames(phase):
        loss_frame |= frame == f
    loss = torch.zeros(n, dtype=torch.bool)
    loss[:-1] = (code & loss_frame)[1:]  # logits at t predict token t+1
    return {"base": base, "plus": plus, "loss": loss}


def grid_rotary(cfg: CogVideoConfig, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, rot/2) of 2D rotary embeddings over a phase's layout: the first rot/2 dims of a
    head (rot = half the head, a multiple of 4) turn with the code's grid row, the next rot/2 with its
    column, at frequencies from 1 rad per token down to 1/side (no wrap-around across the grid). Text
    and <boi> stay unrotated. Why: a query's score then depends on the *offset* between code positions,
    so "the code one step left of me in the previous frame" is one fixed pattern for every position;
    with learned absolute tables alone each of the h*w positions has to learn its own shifted match, and
    the sequential phase carried the shape forward but never learnt which way the words move it."""
    lay = position_descriptors(cfg, phase)
    hs = cfg.n_embd // cfg.n_head
    pairs = max(1, hs // 8)                                  # per axis: rot = 4 * pairs dims
    side = max(cfg.tokens_h, cfg.tokens_w)
    freq = side ** (-torch.arange(pairs, dtype=torch.float32) / pairs)
    row = lay["row"].clamp(min=0).float() * lay["code"]
    col = lay["col"].clamp(min=0).float() * lay["code"]
    angles = torch.cat([row[:, None] * freq, col[:, None] * freq], dim=1)   # (L, 2 * pairs)
    return angles.cos(), angles.sin()
