"""The CogVideo-style model's structure, without training: layouts, attention masks (entry by entry),
the structured attention against the dense masks, initialisation, loss positions, freezing, the KV cache,
generation shapes and causality."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clipforge.model.attention import FrameBlocks, attention, rotate
from clipforge.model.distributed import cpu_has_native_bf16, uses_bf16_autocast
from clipforge.model.config import CogVideoConfig
from clipforge.model.gpt import CogVideo, KVCache, nucleus
from clipforge.model.sequence import build_masks, grid_rotary, position_descriptors
from clipforge.model.sample import rounds_for

# a 4x4 code grid, 4-token text slot: masks are small enough to check entry by entry
SMALL = CogVideoConfig(text_vocab=50, image_vocab=30, n_layer=2, n_head=2, n_embd=16, text_slot=4, frames=5,
                       tokens_h=4, tokens_w=4, window=2, shift=1)


def pos(cfg, phase, frame, r=None, c=None):
    """Sequence position of frame `frame`'s <boi> (r is None) or its code (r, c) in a phase's layout."""
    k = cfg.frame_order(phase).index(frame)
    base = cfg.text_slot + k * cfg.frame_len
    return base if r is None else base + 1 + r * cfg.tokens_w + c


# ---------------------------------------------------------------------------------------------- masks

def test_layout_orders_frames():
    assert SMALL.frame_order("sequential") == [0, 1, 2, 3, 4]
    assert SMALL.frame_order("interpolation") == [0, 2, 4, 1, 3]
    assert SMALL.frame_order("image") == [0]
    lay = position_descriptors(SMALL, "interpolation")
    assert lay["frame"][:4].tolist() == [-1] * 4
    assert lay["frame"][pos(SMALL, "interpolation", 1)].item() == 1
    assert SMALL.seq_len("sequential") == 4 + 5 * 17
    assert SMALL.boi_id == 80 and SMALL.vocab_size == 81


def test_base_channel_sees_text_and_own_frame_only():
    m = build_masks(SMALL, "sequential")["base"]
    q = pos(SMALL, "sequential", 2, 1, 1)
    assert m[q, 0] and m[q, 3]                                          # all text
    assert m[q, pos(SMALL, "sequential", 2)]                             # own <boi>
    assert m[q, pos(SMALL, "sequential", 2, 0, 3)] and m[q, q]           # own frame, earlier codes
    assert not m[q, pos(SMALL, "sequential", 2, 1, 2) + 2]              # own frame, later codes (causal)
    assert not m[q, pos(SMALL, "sequential", 1, 1, 1)]                   # not the previous frame
    assert not m[q, pos(SMALL, "sequential", 0, 0, 0)]
    assert not m[q, pos(SMALL, "sequential", 1)]                         # nor its <boi>
    assert m[2, 1] and m[2, 2] and not m[2, 3]                           # text attends text, causally
    assert not m[3, pos(SMALL, "sequential", 0)]
    # the same rule in the interpolation layout: given frames do not see each other in the base channel
    mi = build_masks(SMALL, "interpolation")["base"]
    q = pos(SMALL, "interpolation", 4, 0, 0)
    assert mi[q, 0] and not mi[q, pos(SMALL, "interpolation", 0, 3, 3)]
    assert torch.equal(build_masks(SMALL, "image")["base"], torch.ones(21, 21).tril().bool())


def test_plus_channel_is_causal_in_sequential_stage():
    plus = build_masks(SMALL, "sequential")["plus"]
    L = SMALL.seq_len("sequential")
    causal = torch.ones(L, L).tril().bool()
    assert torch.equal(plus[0], causal) and torch.equal(plus[1], causal)
    assert build_masks(SMALL, "image")["plus"] is None                   # image phase: base channel alone


def test_interpolation_visibility_and_windows():
    st = "interpolation"
    even, odd = build_masks(SMALL, st)["plus"]                          # layers 0, 2, ... and 1, 3, ...
    # text and given frames 0, 2, 4 see each other both ways (windowed between codes)
    assert even[0, pos(SMALL, st, 4, 3, 3)]                              # text -> last given code
    assert even[pos(SMALL, st, 0, 0, 0), pos(SMALL, st, 4, 1, 1)]        # frame 0 -> frame 4 (same window)
    assert even[pos(SMALL, st, 4, 1, 1), pos(SMALL, st, 0, 0, 0)]
    assert even[pos(SMALL, st, 0, 0, 0), pos(SMALL, st, 0, 1, 1)]        # bidirectional inside a given frame
    assert not even[pos(SMALL, st, 0, 0, 0), pos(SMALL, st, 2, 0, 2)]   # other window (window 2, no shift)
    assert not even[pos(SMALL, st, 0, 0, 0), pos(SMALL, st, 1, 0, 0)]   # given frames never see frame 1
    assert not even[3, pos(SMALL, st, 3)]                                # nor does the text
    # generated frame 1: all given frames (in its window), its own frame causally, not frame 3
    q = pos(SMALL, st, 1, 1, 1)
    assert even[q, 0] and even[q, pos(SMALL, st, 4)] and even[q, pos(SMALL, st, 2, 0, 0)]
    assert even[q, pos(SMALL, st, 1, 0, 0)] and not even[q, pos(SMALL, st, 1, 1, 1) + 1]
    assert not even[q, pos(SMALL, st, 3, 0, 0)] and not even[q, pos(SMALL, st, 3)]
    # frame 3 sees frame 1 (and its <boi>)
    q3 = pos(SMALL, st, 3, 0, 0)
    assert even[q3, pos(SMALL, st, 1, 1, 1)] and even[q3, pos(SMALL, st, 1)]
    assert not even[q3, pos(SMALL, st, 1, 2, 2)]                         # ...within the window only
    # odd layers shift the windows by 1: (0,0) is alone in its window, (1,1) and (2,2) share one
    assert not odd[q3, pos(SMALL, st, 1, 1, 1)]
    assert odd[pos(SMALL, st, 3, 2, 2), pos(SMALL, st, 1, 1, 1)]
    assert not even[pos(SMALL, st, 3, 2, 2), pos(SMALL, st, 1, 1, 1)]
    # <boi> queries are not windowed
    assert even[pos(SMALL, st, 3), pos(SMALL, st, 1, 3, 3)]


def test_loss_positions_per_stage():
    for phase, frames in (("sequential", [1, 2, 3, 4]), ("interpolation", [1, 3]), ("image", [0])):
        loss = build_masks(SMALL, phase)["loss"]
        lay = position_descriptors(SMALL, phase)
        predicted = torch.zeros_like(loss)
        predicted[:-1] = lay["code"][1:] & torch.isin(lay["frame"][1:], torch.tensor(frames))
        assert torch.equal(loss, predicted)
        assert int(loss.sum()) == len(frames) * 16


# ------------------------------------------------------------------------------------- initialisation

def test_alpha_and_plus_channel_initialisation():
    model = CogVideo(SMALL)
    for block in model.h:
        assert torch.allclose(block.attn.alpha, torch.full((16,), 0.5))
        assert torch.equal(block.attn.c_attn_plus.weight, block.attn.c_attn.weight)
        assert torch.equal(block.attn.c_attn_plus.bias, block.attn.c_attn.bias)
        assert torch.equal(block.attn.c_proj_plus.weight, block.attn.c_proj.weight)
    for f in range(SMALL.frames - 1):
        assert torch.equal(model.wpe_frames[f], model.wpe_image)
    # init_plus_from_base copies trained base weights again (image-phase checkpoint -> video phase)
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.add_(1.0)
        model.h[0].attn.mix.fill_(3.0)
        model.wpe_image.add_(1.0)
    model.init_plus_from_base()
    assert torch.equal(model.h[0].attn.c_attn_plus.weight, model.h[0].attn.c_attn.weight)
    assert model.h[0].attn.mix.abs().max() == 0
    assert torch.equal(model.wpe_frames[3], model.wpe_image)


def test_loss_uses_only_the_stage_frames():
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    for phase in ("sequential", "interpolation", "image"):
        L = SMALL.seq_len(phase)
        tokens = torch.randint(0, SMALL.vocab_size, (2, L))
        targets = torch.randint(0, SMALL.image_vocab, (2, L))               # garbage everywhere
        logits, loss = model(tokens, targets, phase=phase)
        assert logits.shape == (2, L, SMALL.image_vocab)
        keep = build_masks(SMALL, phase)["loss"]
        cleaned = targets.clone()
        cleaned[:, ~keep] = -1
        _, loss_clean = model(tokens, cleaned, phase=phase)
        manual = F.cross_entropy(logits[:, keep].reshape(-1, SMALL.image_vocab), targets[:, keep].reshape(-1))
        assert torch.allclose(loss, loss_clean) and torch.allclose(loss, manual)
    logits, loss = model(tokens[:, :10], phase="sequential")
    assert logits.shape == (2, 1, SMALL.image_vocab) and loss is None


def test_freeze_base_trains_only_the_new_parts():
    model = CogVideo(SMALL)
    model.freeze_base(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "wpe_frames" in trainable and "h.0.attn.mix" in trainable
    assert "h.1.attn.c_attn_plus.weight" in trainable and "h.1.attn.c_proj_plus.bias" in trainable
    for frozen in ("wte.weight", "wpe_text", "wpe_image", "lm_head.weight", "h.0.attn.c_attn.weight",
                   "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.ln_1.weight", "ln_f.weight"):
        assert frozen not in trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    L = SMALL.seq_len("sequential")
    _, loss = model(torch.randint(0, SMALL.vocab_size, (2, L)), torch.randint(0, 30, (2, L)))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n
    model.freeze_base(False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("grid_rope", [False, True])
def test_kv_cache_matches_full_forward(grid_rope):
    torch.manual_seed(1)
    model = CogVideo(dataclasses.replace(SMALL, grid_rope=grid_rope)).eval()
    for phase, prefix in (("sequential", 4 + 17), ("interpolation", 4 + 3 * 17), ("image", 4)):
        L = SMALL.seq_len(phase)
        tokens = torch.randint(0, SMALL.vocab_size, (2, L))
        full, _ = model(tokens, torch.zeros_like(tokens), phase=phase)
        cache = KVCache(SMALL.n_layer)
        out = [model(tokens[:, :prefix], torch.zeros_like(tokens[:, :prefix]), phase=phase, cache=cache)[0]]
        for i in range(prefix, L):
            out.append(model(tokens[:, i:i + 1], phase=phase, cache=cache)[0])
        assert torch.allclose(torch.cat(out, 1), full, atol=1e-5)


def test_grid_rope_scores_depend_on_the_grid_offset_alone():
    """One query and one key placed at code positions of any frames: with the rotary tables their score
    is a function of (row offset, column offset) only; text keeps its vectors unrotated."""
    cfg = CogVideoConfig(text_vocab=50, image_vocab=30, n_layer=1, n_head=2, n_embd=32, text_slot=4, frames=3,
                         tokens_h=4, tokens_w=4, grid_rope=True)
    cos, sin = grid_rotary(cfg, "sequential")
    torch.manual_seed(3)
    q0, k0 = torch.randn(2, 1, 1, 1, 16).unbind(0)
    at = lambda x, p: rotate(x, cos[p:p + 1], sin[p:p + 1])
    score = lambda pq, pk: float((at(q0, pq) * at(k0, pk)).sum())
    by_offset = {}
    for fq, fk in ((1, 0), (2, 1), (2, 0), (1, 1)):
        for rq in range(4):
            for cq in range(4):
                for rk, ck in ((rq, cq - 1), (rq - 1, cq), (rq + 1, cq + 1)):
                    if 0 <= rk < 4 and 0 <= ck < 4:
                        s = score(pos(cfg, "sequential", fq, rq, cq), pos(cfg, "sequential", fk, rk, ck))
                        by_offset.setdefault((rq - rk, cq - ck), []).append(s)
    assert len(by_offset) == 3
    for scores in by_offset.values():
        assert max(scores) - min(scores) < 1e-4
    assert len({round(v[0], 3) for v in by_offset.values()}) == 3      # different offsets, different scores
    assert torch.equal(at(q0, 0), q0) and torch.equal(at(q0, pos(cfg, "sequential", 1)), q0)  # text, <boi>


def test_whole_sequence_attention_structure_equals_the_dense_masks():
    """Training runs the base channel as per-frame blocks and the sequential plus channel as plain causal
    attention; both must be the very masks of build_masks, for every phase and in bf16 autocast too."""
    torch.manual_seed(2)
    for phase in ("image", "sequential", "interpolation"):
        masks, L = build_masks(SMALL, phase), SMALL.seq_len(phase)
        q, k, v = torch.randn(3, 2, 2, L, 8).unbind(0)
        n_frames = len(SMALL.frame_order(phase))
        blocks = "causal" if n_frames == 1 else FrameBlocks(SMALL.text_slot, SMALL.frame_len, n_frames)
        assert torch.allclose(attention(q, k, v, blocks), attention(q, k, v, masks["base"]), atol=1e-6)
        if phase == "sequential":
            assert all(torch.equal(p, masks["base"] | p) for p in masks["plus"])
            assert torch.allclose(attention(q, k, v, "causal"), attention(q, k, v, masks["plus"][0]), atol=1e-6)
    model = CogVideo(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (2, SMALL.seq_len("sequential")))
    with torch.no_grad():
        full, _ = model(tokens, torch.zeros_like(tokens))                    # whole sequence: the structure
        part, _ = model(tokens[:, :-1], torch.zeros_like(tokens[:, :-1]))    # a prefix: the dense masks
        assert torch.allclose(full[:, :-1], part, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):                    # the CPU bf16 training path
            low, _ = model(tokens, torch.zeros_like(tokens))
    assert torch.allclose(low.float(), full, atol=0.05)
    with pytest.raises(ValueError, match="FrameBlocks"):
        attention(q, k, v, FrameBlocks(SMALL.text_slot, SMALL.frame_len, 2))
    # the trainer's autocast: on a CPU only where it multiplies bf16 natively, never when switched off
    assert uses_bf16_autocast(torch.device("cpu"), True) == cpu_has_native_bf16()
    assert not uses_bf16_autocast(torch.device("cpu"), False) and uses_bf16_autocast(torch.device("cuda"), True)


def test_generate_shapes_and_interpolation_rounds():
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    text = torch.randint(0, 50, (4,))
    gen = torch.Generator().manual_seed(0)
    codes = model.generate(text, torch.zeros(4, dtype=torch.long), top_k=5, rounds=1, generator=gen)
    assert codes.shape == (9, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < SMALL.image_vocab
    again = model.generate(text, torch.zeros(4, dtype=torch.long), top_k=5, rounds=1,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)
    # a round keeps the old frames at even positions
    five = codes[::2]
    nine = model.interpolate(five, text.view(1, -1), None, top_k=5)
    assert torch.equal(nine[::2], five)
    assert rounds_for(5, 5) == 0 and rounds_for(5, 9) == 1 and rounds_for(5, 33) == 3
    with pytest.raises(ValueError):
        rounds_for(5, 8)


def test_nucleus_sampling_keeps_the_smallest_set_holding_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.97, 0.01, 0.01, 0.01]])
    kept = nucleus(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([[0.0, 0.625, 0.0, 0.375], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(nucleus(probs, 1e-9).argmax(-1), probs.argmax(-1))   # always at least the best code
    assert torch.allclose(nucleus(probs, 0.999), probs)
    # in generation: a vanishing top_p is greedy whatever the seed; top_p 1.0 changes nothing
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    text = torch.randint(0, 50, (4,))
    greedy = model.generate(text, None, top_k=1, generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        nucl = model.generate(text, None, top_p=1e-6, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(nucl, greedy)
    plain = model.generate(text, None, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(text, None, top_k=5, top_p=1.0, generator=torch.Generator().manual_seed(3)), plain)
    assert not torch.equal(plain, greedy)


def test_code_log_likelihood_is_the_training_loss_summed():
    """Teacher-forced scoring sums exactly the log-probabilities the training loss averages: the same
    positions (the phase's loss frames), the same targets (the next token's code)."""
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    N, hw = 3, SMALL.tokens_h * SMALL.tokens_w
    text = torch.randint(0, 50, (N, SMALL.text_slot))
    videos = torch.randint(0, SMALL.image_vocab, (N, SMALL.frames, SMALL.tokens_h, SMALL.tokens_w))
    for phase, frames in (("image", [0]), ("sequential", [0, 1, 2, 3, 4])):
        boi = torch.full((N, 1), SMALL.boi_id)
        tokens = torch.cat([text] + [t for f in frames for t in (boi, videos[:, f].reshape(N, hw) + SMALL.text_vocab)], 1)
        targets = torch.full_like(tokens, -1)
        for k, f in enumerate(frames):   # a frame's <boi> predicts its first code, each code the next
            start = SMALL.text_slot + k * SMALL.frame_len
            targets[:, start:start + hw] = videos[:, f].reshape(N, hw)
        for n in range(N):
            _, loss = model(tokens[n:n + 1], targets[n:n + 1], phase=phase)
            counted = len(SMALL.loss_frames(phase)) * hw
            got = model.code_log_likelihood(phase, text[n:n + 1], videos[n:n + 1])
            assert torch.allclose(got, -loss * counted, rtol=1e-4), phase
    both = model.code_log_likelihood("image", text, videos) + model.code_log_likelihood("sequential", text, videos)
    assert torch.allclose(model.caption_scores(videos, text), both)
    assert torch.allclose(model.caption_scores(videos, text, text), torch.zeros(N), atol=1e-4)


def test_candidates_keep_the_draw_the_caption_explains_best():
    """generate(candidates=K) draws K videos per slot exactly as K copies of the slot would be drawn and
    keeps, per slot, the one with the highest caption score."""
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    text = torch.randint(0, 50, (2, SMALL.text_slot))
    null = torch.zeros(SMALL.text_slot, dtype=torch.long)
    K = 4
    kw = dict(guidance=2.0, top_k=8)
    drawn = model.generate(text.repeat_interleave(K, 0), null, generator=torch.Generator().manual_seed(5), **kw)
    scores = model.caption_scores(drawn, text.repeat_interleave(K, 0), null.expand(2 * K, -1)).view(2, K)
    assert len(set(scores.flatten().tolist())) == 2 * K                       # the choice is not a tie
    best = model.generate(text, null, candidates=K, generator=torch.Generator().manual_seed(5), **kw)
    for n in range(2):
        assert torch.equal(best[n], drawn.view(2, K, *drawn.shape[1:])[n, scores[n].argmax()])
    one = model.generate(text, null, candidates=1, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(one, model.generate(text, null, generator=torch.Generator().manual_seed(5), **kw))


def test_frame0_model_draws_and_scores_frame_0():
    """generate(frame0_model=M): frame 0 is what M's image phase draws from the same generator state,
    frames 1.. come from the model itself; caption_scores takes frame 0's term from M."""
    torch.manual_seed(0)
    model, image_model = CogVideo(SMALL).eval(), CogVideo(SMALL).eval()
    text = torch.randint(0, 50, (3, SMALL.text_slot))
    null = torch.zeros(SMALL.text_slot, dtype=torch.long)
    kw = dict(guidance=2.0, top_k=8)
    mixed = model.generate(text, null, frame0_model=image_model, generator=torch.Generator().manual_seed(7), **kw)
    alone = image_model.generate(text, null, generator=torch.Generator().manual_seed(7), **kw)
    own = model.generate(text, null, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(mixed[:, 0], alone[:, 0]) and not torch.equal(mixed[:, 0], own[:, 0])
    expected = (image_model.code_log_likelihood("image", text, mixed)
                + model.code_log_likelihood("sequential", text, mixed))
    assert torch.allclose(model.caption_scores(mixed, text, frame0_model=image_model), expected)
    best = model.generate(text, null, candidates=3, frame0_model=image_model,
                          generator=torch.Generator().manual_seed(7), **kw)
    assert best.shape == mixed.shape


# ---------------------------------------------------------------------------------- causality of masks

def _logits(model, tokens, phase):
    return model(tokens, torch.zeros_like(tokens), phase=phase)[0]


def test_future_tokens_do_not_move_earlier_outputs_sequential():
    """Phase 1: changing tokens after position t leaves the logits at 0..t exactly as they were."""
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    L = SMALL.seq_len("sequential")
    tokens = torch.randint(0, SMALL.vocab_size, (1, L))
    ref = _logits(model, tokens, "sequential")
    for t in (SMALL.text_slot - 1, pos(SMALL, "sequential", 1, 2, 1), pos(SMALL, "sequential", 3, 0, 0)):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, SMALL.vocab_size, (1, L - t - 1))
        out = _logits(model, changed, "sequential")
        assert torch.equal(out[:, :t + 1], ref[:, :t + 1]), t
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])      # the change does reach later positions


def test_future_tokens_do_not_move_earlier_outputs_interpolation():
    """Phase 2: the given block never sees generated frames; frame 1 never sees frame 3 nor its own later
    codes; frame 3 sees frame 1. Controls: given frames do see each other, both ways."""
    st = "interpolation"
    torch.manual_seed(0)
    model = CogVideo(SMALL).eval()
    L = SMALL.seq_len(st)
    tokens = torch.randint(0, SMALL.vocab_size, (1, L))
    ref = _logits(model, tokens, st)
    f1, f3 = pos(SMALL, st, 1), pos(SMALL, st, 3)                          # <boi> of frames 1 and 3

    def perturb(lo, hi):
        changed = tokens.clone()
        changed[:, lo:hi] = (tokens[:, lo:hi] + 1 + torch.randint(0, 20, (1, hi - lo))) % SMALL.vocab_size
        return _logits(model, changed, st)

    out = perturb(f3, L)                                                   # all of frame 3
    assert torch.equal(out[:, :f3], ref[:, :f3])
    out = perturb(f1, L)                                                   # frames 1 and 3
    assert torch.equal(out[:, :f1], ref[:, :f1])                           # text + given block unmoved
    q = pos(SMALL, st, 1, 1, 2)
    out = perturb(q + 1, f3)                                               # frame 1 after code (1, 2)
    assert torch.equal(out[:, :q + 1], ref[:, :q + 1])
    assert not torch.allclose(out[:, f3:], ref[:, f3:])                    # frame 3 does see frame 1
    # controls: the given block is bidirectional (frame 4 moves frame 0) and generated frames see it
    out = perturb(pos(SMALL, st, 4), pos(SMALL, st, 4) + SMALL.frame_len)
    g0 = pos(SMALL, st, 0)
    assert not torch.allclose(out[:, g0:g0 + SMALL.frame_len], ref[:, g0:g0 + SMALL.frame_len])
    assert not torch.allclose(out[:, f1:], ref[:, f1:])

