"""A CogVideo-style text-to-video transformer, written like nanoGPT's model.py.

(One file over 400 lines on purpose: the whole model, read top to bottom, as nanoGPT's model.py is;
its configuration is model/config.py and its masks model/sequence.py.)

One token space (V = text_vocab + image_vocab + 1 ids):
    [0, text_vocab)                          text ids of the sentencepiece tokenizer (pad, sep, ... included)
    [text_vocab, text_vocab + image_vocab)   image codes, offset by text_vocab
    text_vocab + image_vocab                 <boi>, the begin-of-image token before every frame
A dedicated <boi> id (rather than the text tokenizer's `<boi>` piece) keeps the model self-contained:
its vocabulary needs nothing but the two vocabulary sizes. The head predicts image codes only
(image_vocab logits): text is always given and <boi> is inserted, never sampled.

A sample is one sequence (L = text_slot + n_frames * (1 + h*w) tokens):
    [text slot][boi f0 codes][boi f1 codes]...       phases "sequential" (all frames) and "image" (f0 only)
    [text slot][boi f0][boi f2][boi f4][boi f1][boi f3]    phase "interpolation" (given frames first)

Every block has dual-channel attention (CogVideo, ICLR 2023), mixed per channel: out = a*base + (1-a)*plus,
a = sigmoid(mix), `mix` a learned (n_embd,) vector per layer, initialised to 0 (a = 0.5).
  base channel (the image model): text attends text causally; a frame token attends all text and its
      own frame, causally (a frame is generated token by token).
  plus channel ("attention-plus", the temporal channel), initialised as a copy of the base channel:
      sequential: full causal attention over [text][frames];
      interpolation: the given block (text + frames 0, 2, 4) is bidirectional; generated frames 1 and 3
      see the whole given block, earlier generated frames (3 sees 1) and their own frame causally; and
      it is 3D window attention: a code token attends code tokens of visible frames only inside its own
      window x window square of the grid, the squares shifted by `shift` on odd layers (Swin). Text and
      <boi> tokens are not windowed (as queries they see every visible token, as keys every visible
      query sees them).
  phase "image" runs the base channel alone: it is the text-to-image model CogVideo inherits.
The loss is cross-entropy over image-code logits only: on frames 1.. (sequential), frames 1, 3
(interpolation), frame 0 (image). `targets[t]` is the image code (0..image_vocab-1) of token t+1, or -1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from clipforge.model.attention import Dropout, FrameBlocks, attention, rotate
from clipforge.model.config import CogVideoConfig
from clipforge.model.sequence import build_masks, grid_rotary

# ----------------------------------------------------------------------------------------------------
# modules


class KVCache:
    """Keys and values of every layer and channel for incremental decoding; `pos` tokens so far."""

    def __init__(self, n_layer: int):
        self.layers: list[dict] = [{} for _ in range(n_layer)]
        self.pos = 0


class DualAttention(nn.Module):
    def __init__(self, cfg: CogVideoConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)        # base channel
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_attn_plus = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)   # attention-plus
        self.c_proj_plus = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.mix = nn.Parameter(torch.zeros(cfg.n_embd))                          # alpha = sigmoid(mix)
        self.resid_dropout = Dropout(cfg.dropout)

    def _attend(self, x, c_attn, mask, cache, name, rope):
        B, T, C = x.size()
        q, k, v = c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:  # cached keys were rotated at their own positions
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            if name in cache:
                k = torch.cat([cache[name][0], k], dim=2)                   # (B, nh, pos + T, hs)
                v = torch.cat([cache[name][1], v], dim=2)
            cache[name] = (k, v)
        y = attention(q, k, v, mask)
        return y.transpose(1, 2).contiguous().view(B, T, C)

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.mix)

    def forward(self, x, base_mask, plus_mask=None, cache=None, rope=None):
        base = self.resid_dropout(self.c_proj(self._attend(x, self.c_attn, base_mask, cache, "base", rope)))
        if plus_mask is None:  # image phase: the base image model alone
            return base
        plus = self.resid_dropout(self.c_proj_plus(self._attend(x, self.c_attn_plus, plus_mask, cache, "plus",
                                                                rope)))
        alpha = self.alpha.to(base.dtype)
        return alpha * base + (1 - alpha) * plus


class MLP(nn.Module):
    def __init__(self, cfg: CogVideoConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: CogVideoConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = DualAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, base_mask, plus_mask=None, cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), base_mask, plus_mask, cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------------------
# the model


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row, the most probable codes until they hold `top_p` of the probability (at least one),
    renormalised. Unlike a fixed top-k, a confident position (a still background) keeps one or two codes
    while an uncertain one (where an edge moves to) keeps its alternatives."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p                   # probability of the codes ranked above
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < top_p)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


class CogVideo(nn.Module):
    def __init__(self, cfg: CogVideoConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe_text = nn.Parameter(torch.zeros(cfg.text_slot, C))           # text positions
        self.wpe_image = nn.Parameter(torch.zeros(cfg.frame_len, C))          # frame 0 (the image model's)
        self.wpe_frames = nn.Parameter(torch.zeros(cfg.frames - 1, cfg.frame_len, C))  # frames 1.. (new)
        self.drop = Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(C, bias=cfg.bias)
        self.lm_head = nn.Linear(C, cfg.image_vocab, bias=False)              # image-code logits only
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight") or name.endswith("c_proj_plus.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for p in (self.wpe_text, self.wpe_image):
            torch.nn.init.normal_(p, mean=0.0, std=0.02)
        self.init_plus_from_base()
        self._masks: dict = {}
        self.gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def init_plus_from_base(self) -> None:
        """As in CogVideo: attention-plus starts as a copy of the base channel, alpha = 0.5, and frames 1.. start
        with copies of the image position table. Called at construction and when a sequential or
        interpolation run starts from an image-phase checkpoint."""
        for block in self.h:
            block.attn.c_attn_plus.load_state_dict(block.attn.c_attn.state_dict())
            block.attn.c_proj_plus.load_state_dict(block.attn.c_proj.state_dict())
            block.attn.mix.zero_()
        self.wpe_frames.copy_(self.wpe_image[None].expand_as(self.wpe_frames))

    def trainable_names(self, freeze_base: bool) -> list[str]:
        """With freeze_base, only attention-plus, the mix vectors and the new position tables train."""
        if not freeze_base:
            return [n for n, _ in self.named_parameters()]
        return [n for n, _ in self.named_parameters()
                if ".attn.c_attn_plus." in n or ".attn.c_proj_plus." in n or n.endswith(".attn.mix")
                or n == "wpe_frames"]

    def freeze_base(self, freeze: bool = True) -> None:
        keep = set(self.trainable_names(freeze))
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def masks(self, phase: str, device) -> dict:
        """Masks of a phase, built once per (phase, device) and cached (not saved in the state_dict)."""
        key = (phase, str(device))
        if key not in self._masks:
            m = build_masks(self.config, phase)
            self._masks[key] = {"base": m["base"].to(device), "loss": m["loss"].to(device),
                                "plus": None if m["plus"] is None else [p.to(device) for p in m["plus"]],
                                "rope": (tuple(t.to(device) for t in grid_rotary(self.config, phase))
                                         if self.config.grid_rope else None)}
        return self._masks[key]

    def whole_sequence_masks(self, phase: str, base_mask, plus_masks):
        """The same masks for a whole sequence, as structure the attention kernels exploit: the base
        channel is FrameBlocks (plain "causal" in the image phase, one frame), the sequential phase's
        plus channel is "causal". The interpolation phase's windows stay tensors."""
        cfg = self.config
        n_frames = len(cfg.frame_order(phase))
        base = "causal" if n_frames == 1 else FrameBlocks(cfg.text_slot, cfg.frame_len, n_frames)
        if phase == "sequential":
            plus_masks = ["causal", "causal"]
        return base, plus_masks

    def positions(self, phase: str) -> torch.Tensor:
        """(L, C) position embeddings of a phase: text, then each frame's table in sequence order."""
        tables = [self.wpe_text] + [self.wpe_image if f == 0 else self.wpe_frames[f - 1]
                                    for f in self.config.frame_order(phase)]
        return torch.cat(tables, dim=0)

    def forward(self, tokens, targets=None, phase: str = "sequential", cache: KVCache | None = None):
        """tokens (B, T) in the phase's layout, from position cache.pos (0 without a cache).

        Returns (logits, loss): with targets, logits (B, T, image_vocab) and the mean cross-entropy
        over the phase's loss positions where targets >= 0; without, the last position's logits
        (B, 1, image_vocab) and None.
        """
        B, T = tokens.size()
        start = cache.pos if cache is not None else 0
        masks = self.masks(phase, tokens.device)
        L = masks["base"].shape[0]
        if start + T > L:
            raise ValueError(f"sequence of {start + T} tokens is longer than the {phase} layout ({L})")
        rows = slice(start, start + T)
        base_mask = masks["base"][rows, :start + T]                              # (T, start + T)
        plus = masks["plus"]
        plus_masks = None if plus is None else [p[rows, :start + T] for p in plus]
        if start == 0 and T == L:  # a whole sequence (training, evaluation): the masks' structure is cheaper
            base_mask, plus_masks = self.whole_sequence_masks(phase, base_mask, plus_masks)

        rope = None if masks["rope"] is None else tuple(t[rows] for t in masks["rope"])
        x = self.wte(tokens) + self.positions(phase)[rows]                       # (B, T, C)
        x = self.drop(x)
        for i, block in enumerate(self.h):
            plus_mask = None if plus_masks is None else plus_masks[i % 2]
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, base_mask, plus_mask, None, rope, use_reentrant=False)
            else:
                x = block(x, base_mask, plus_mask, layer_cache, rope)
        x = self.ln_f(x)
        if cache is not None:
            cache.pos += T

        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)                                                 # (B, T, image_vocab)
        keep = masks["loss"][rows][None, :] & (targets >= 0)                     # (B, T)
        if not keep.any():
            return logits, logits.sum() * 0.0
        loss = F.cross_entropy(logits[keep].float(), targets[keep])
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, text, null_text=None, guidance: float = 3.0, temperature: float = 1.05,
                 top_k: int | None = None, rounds: int = 0, round_texts=None,
                 generator: torch.Generator | None = None, top_p: float | None = None,
                 candidates: int = 1, frame0_model: "CogVideo | None" = None) -> torch.Tensor:
        """Text slot (text_slot,) -> image codes (T, h, w), T = frames, then 2T-1 per interpolation round.
        A batch of slots (N, text_slot) gives (N, T, h, w), all N sampled together.

        Frame 0 comes from the image phase (base channel alone), frames 1.. from the sequential phase.
        With `null_text` (the slot of an empty caption) every sampled token uses classifier-free
        guidance, logits = g + guidance * (c - g); then temperature, top-k and top-p (nucleus: the
        smallest set of codes holding `top_p` of the probability). Each interpolation round
        fills the midpoints of every 3 consecutive frames (a, b, c) with the interpolation phase;
        round_texts[r] = (text, null_text) for round r (their span prefix halves each round), default
        the same as the first.

        candidates > 1: sample that many videos per slot and keep the one the caption explains best
        (`caption_scores`: the model's own judgement, CogView's self-reranking in spirit; no detector).

        frame0_model: draw (and score) frame 0 with this model's image phase instead, e.g. the image-phase
        run a sequential run started from, when the sequential run's base channel drifted while it trained.
        """
        cfg = self.config
        device = self.wte.weight.device
        batched = text.dim() == 2
        text = text.to(device).view(-1, cfg.text_slot)                           # (N, slot)
        N = text.shape[0]
        null_text = None if null_text is None else null_text.to(device).view(-1, cfg.text_slot).expand(N, -1)
        kw = dict(guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        K = max(1, int(candidates))
        rows = text.repeat_interleave(K, dim=0)                                  # (N*K, slot), K per slot in a row
        null_rows = None if null_text is None else null_text.repeat_interleave(K, dim=0)
        first = frame0_model if frame0_model is not None else self
        (f0,) = first._complete("image", rows, null_rows, [], 1, **kw)
        rest = self._complete("sequential", rows, null_rows, [f0], cfg.frames - 1, **kw)
        videos = torch.stack([f0] + rest, dim=1)                                 # (N*K, frames, h, w)
        if K > 1:
            best = self.caption_scores(videos, rows, null_rows, frame0_model).view(N, K).argmax(dim=1)
            videos = videos.view(N, K, *videos.shape[1:])[torch.arange(N, device=device), best]
        out = []
        for n in range(N):
            frames = videos[n]
            for r in range(rounds):
                t, nt = (round_texts[r] if round_texts else (text[n], None if null_text is None else null_text[n]))
                t = t.to(device).view(1, -1)
                nt = None if nt is None else nt.to(device).view(1, -1)
                frames = self.interpolate(frames, t, nt, **kw)
            out.append(frames)
        return torch.stack(out) if batched else out[0]

    @torch.no_grad()
    def code_log_likelihood(self, phase: str, text, videos) -> torch.Tensor:
        """Sum over the phase's loss frames of log p(code | every token before it), per row:
        text (N, slot), videos (N, frames, h, w) codes -> (N,), teacher-forced in one forward."""
        cfg = self.config
        N, hw = text.shape[0], cfg.tokens_h * cfg.tokens_w
        boi = torch.full((N, 1), cfg.boi_id, dtype=torch.long, device=text.device)
        parts = [text.long()]
        for f in cfg.frame_order(phase):
            parts += [boi, videos[:, f].reshape(N, hw).long() + cfg.text_vocab]
        tokens = torch.cat(parts, dim=1)                                          # (N, L)
        following = tokens[:, 1:] - cfg.text_vocab                                # the next token, as a code
        targets = torch.full_like(tokens, -1)
        targets[:, :-1] = torch.where((following >= 0) & (following < cfg.image_vocab), following, -1)
        logits, _ = self(tokens, targets, phase=phase)
        keep = self.masks(phase, tokens.device)["loss"][None, :] & (targets >= 0)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (logp * keep).sum(dim=1)

    @torch.no_grad()
    def caption_scores(self, videos, text, null_text=None, frame0_model: "CogVideo | None" = None) -> torch.Tensor:
        """How much each caption explains its video (N, frames, h, w): log p(video | caption) - log p(video |
        empty caption), frame 0 by the image phase and frames 1.. by the sequential phase, as they were
        sampled. The difference, not the likelihood alone, so that a still, near-empty video (likely under
        any caption) does not win. Without null_text: log p(video | caption). frame0_model: frame 0's
        term by that model's image phase (the one that drew it; see generate)."""
        first = frame0_model if frame0_model is not None else self

        def loglik(slot):
            return (first.code_log_likelihood("image", slot, videos)
                    + self.code_log_likelihood("sequential", slot, videos))

        score = loglik(text)
        return score if null_text is None else score - loglik(null_text)

    @torch.no_grad()
    def interpolate(self, frames, text, null_text=None, **kw) -> torch.Tensor:
        """One round: codes (n, h, w) -> (2n - 1, h, w), every gap gets its midpoint.

        With 5-frame models a group is 3 consecutive frames (a, b, c) given as frames 0, 2, 4, which
        yields the midpoints a|b and b|c as frames 1 and 3; groups overlap by one frame, so n = 4k + 1
        (5 -> 9 -> 17 -> 33). All groups are sampled as one batch."""
        cfg = self.config
        n = frames.shape[0]
        g = (cfg.frames + 1) // 2                          # given frames per group
        if (n - 1) % (g - 1):
            raise ValueError(f"cannot interpolate {n} frames in groups of {g} (need n = {g - 1}k + 1)")
        groups = (n - 1) // (g - 1)
        given = [torch.stack([frames[(g - 1) * k + j] for k in range(groups)]) for j in range(g)]  # g x (G, h, w)
        text = text.expand(groups, -1)
        null_text = None if null_text is None else null_text.expand(groups, -1)
        mids = self._complete("interpolation", text, null_text, given, g - 1, **kw)         # (g-1) x (G, h, w)
        out = []
        for k in range(groups):
            for j in range(g - 1):
                out += [frames[(g - 1) * k + j], mids[j][k]]
        out.append(frames[-1])
        return torch.stack(out)

    def _complete(self, phase, text, null_text, given, n_new, guidance=3.0, temperature=1.05, top_k=None,
                  generator=None, top_p=None):
        """Sample `n_new` frames after the prefix [text][boi given_0]...; text (N, slot); given: list of
        (N, h, w) codes in sequence order. Returns a list of n_new (N, h, w) code tensors."""
        cfg = self.config
        N = text.shape[0]
        hw = cfg.tokens_h * cfg.tokens_w
        device = text.device
        boi = torch.full((N, 1), cfg.boi_id, dtype=torch.long, device=device)
        prefix = [text.long()]
        for codes in given:
            prefix += [boi, codes.reshape(N, hw).long() + cfg.text_vocab]
        prefix = torch.cat(prefix, dim=1)                                          # (N, P)
        cfg_rows = null_text is not None
        if cfg_rows:  # guidance: the same frames after the empty-caption slot
            uncond = torch.cat([null_text.long(), prefix[:, cfg.text_slot:]], dim=1)
            prefix = torch.cat([prefix, uncond], dim=0)                            # (2N, P)
        R = prefix.shape[0]
        cache = KVCache(cfg.n_layer)
        self(prefix, phase=phase, cache=cache)
        out = []
        for _ in range(n_new):
            logits, _ = self(boi[:1].expand(R, 1), phase=phase, cache=cache)
            frame = torch.empty(N, hw, dtype=torch.long, device=device)
            for i in range(hw):
                logits = logits[:, -1, :].float()                                  # (R, image_vocab)
                if cfg_rows:
                    c, g = logits[:N], logits[N:]
                    logits = g + guidance * (c - g)
                logits = logits / max(temperature, 1e-5)
                if top_k is not None and top_k < logits.shape[-1]:
                    v, _ = torch.topk(logits, top_k)
                    logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                probs = F.softmax(logits, dim=-1)
                if top_p is not None and top_p < 1.0:
                    probs = nucleus(probs, top_p)
                code = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
                frame[:, i] = code
                if i < hw - 1 or len(out) < n_new - 1:  # the last code of the last frame needs no step
                    step = (code + cfg.text_vocab).repeat(R // N).view(R, 1)
                    logits, _ = self(step, phase=phase, cache=cache)
            out.append(frame.view(N, cfg.tokens_h, cfg.tokens_w))
        return out
