"""The CogVideo-style model: attention masks, initialisation, loss, freezing, data, training, sampling."""
import json

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from clipforge.model.data import SequenceBuilder, ShardStream, read_dataset_info, shard_urls
from clipforge.model.distributed import cpu_has_native_bf16, uses_bf16_autocast
from clipforge.model.attention import FrameBlocks, attention
from clipforge.model.gpt import CogVideo, CogVideoConfig, KVCache, build_masks, layout
from clipforge.model.sample import rounds_for, sample
from clipforge.model.train import TrainConfig, load_checkpoint, model_from_checkpoint, train
from clipforge.pipeline.storage.samples import encode_sample
from clipforge.tokenizer.image import VQConfig
from clipforge.tokenizer.image_train import train_image_tokenizer
from clipforge.tokenizer.text import TextTokenizer, train_text_tokenizer

# a 4x4 code grid, 4-token text slot: masks are small enough to check entry by entry
SMALL = CogVideoConfig(text_vocab=50, image_vocab=30, n_layer=2, n_head=2, n_embd=16, text_slot=4, frames=5,
                       tokens_h=4, tokens_w=4, window=2, shift=1)


def pos(cfg, stage, frame, r=None, c=None):
    """Sequence position of frame `frame`'s <boi> (r is None) or its code (r, c) in a stage's layout."""
    k = cfg.frame_order(stage).index(frame)
    base = cfg.text_slot + k * cfg.frame_len
    return base if r is None else base + 1 + r * cfg.tokens_w + c


# ---------------------------------------------------------------------------------------------- masks

def test_layout_orders_frames():
    assert SMALL.frame_order("sequential") == [0, 1, 2, 3, 4]
    assert SMALL.frame_order("interpolation") == [0, 2, 4, 1, 3]
    assert SMALL.frame_order("image") == [0]
    lay = layout(SMALL, "interpolation")
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
    assert build_masks(SMALL, "image")["plus"] is None                   # image stage: base channel alone


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
    for stage, frames in (("sequential", [1, 2, 3, 4]), ("interpolation", [1, 3]), ("image", [0])):
        loss = build_masks(SMALL, stage)["loss"]
        lay = layout(SMALL, stage)
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
    # init_plus_from_base copies trained base weights again (image-stage checkpoint -> video stage)
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
    for stage in ("sequential", "interpolation", "image"):
        L = SMALL.seq_len(stage)
        tokens = torch.randint(0, SMALL.vocab_size, (2, L))
        targets = torch.randint(0, SMALL.image_vocab, (2, L))               # garbage everywhere
        logits, loss = model(tokens, targets, stage=stage)
        assert logits.shape == (2, L, SMALL.image_vocab)
        keep = build_masks(SMALL, stage)["loss"]
        cleaned = targets.clone()
        cleaned[:, ~keep] = -1
        _, loss_clean = model(tokens, cleaned, stage=stage)
        manual = F.cross_entropy(logits[:, keep].reshape(-1, SMALL.image_vocab), targets[:, keep].reshape(-1))
        assert torch.allclose(loss, loss_clean) and torch.allclose(loss, manual)
    logits, loss = model(tokens[:, :10], stage="sequential")
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


def test_kv_cache_matches_full_forward():
    torch.manual_seed(1)
    model = CogVideo(SMALL).eval()
    for stage, prefix in (("sequential", 4 + 17), ("interpolation", 4 + 3 * 17), ("image", 4)):
        L = SMALL.seq_len(stage)
        tokens = torch.randint(0, SMALL.vocab_size, (2, L))
        full, _ = model(tokens, torch.zeros_like(tokens), stage=stage)
        cache = KVCache(SMALL.n_layer)
        out = [model(tokens[:, :prefix], torch.zeros_like(tokens[:, :prefix]), stage=stage, cache=cache)[0]]
        for i in range(prefix, L):
            out.append(model(tokens[:, i:i + 1], stage=stage, cache=cache)[0])
        assert torch.allclose(torch.cat(out, 1), full, atol=1e-5)


def test_whole_sequence_attention_structure_equals_the_dense_masks():
    """Training runs the base channel as per-frame blocks and the sequential plus channel as plain causal
    attention; both must be the very masks of build_masks, for every stage and in bf16 autocast too."""
    torch.manual_seed(2)
    for stage in ("image", "sequential", "interpolation"):
        masks, L = build_masks(SMALL, stage), SMALL.seq_len(stage)
        q, k, v = torch.randn(3, 2, 2, L, 8).unbind(0)
        n_frames = len(SMALL.frame_order(stage))
        blocks = "causal" if n_frames == 1 else FrameBlocks(SMALL.text_slot, SMALL.frame_len, n_frames)
        assert torch.allclose(attention(q, k, v, blocks), attention(q, k, v, masks["base"]), atol=1e-6)
        if stage == "sequential":
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


# ------------------------------------------------------------------------------ data, train, sample

CAPTIONS = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue", "yellow", "white")
            for s in ("circle", "square") for d in ("left", "right", "up", "down", "around")]
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
          "white": (235, 235, 235)}


def clip_frames(caption, n=5, size=32, seed=0):
    """uint8 [n, size, size, 3]: the caption's shape moving in its direction over a dark background."""
    _, color, shape, _, direction = caption.split()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    step = {"left": (0, -3), "right": (0, 3), "up": (-3, 0), "down": (3, 0), "around": (2, 2)}[direction]
    cy, cx = size / 2 - 2 * step[0] + rng.uniform(-2, 2), size / 2 - 2 * step[1] + rng.uniform(-2, 2)
    out = np.full((n, size, size, 3), 20, np.uint8)
    for t in range(n):
        y, x = cy + t * step[0], cx + t * step[1]
        mask = ((yy - y) ** 2 + (xx - x) ** 2 <= 25) if shape == "circle" else (
            (abs(yy - y) <= 4) & (abs(xx - x) <= 4))
        out[t][mask] = COLORS[color]
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A tiny built dataset: 32x32 frames -> 4x4 codes, 5 frames, text slot 12, two train shards (session
    scope: tests/test_model_ddp.py uses it too)."""
    root = tmp_path_factory.mktemp("ds")
    text = train_text_tokenizer(CAPTIONS, root / "text.model", vocab_size=120)
    clips = {i: clip_frames(CAPTIONS[i % len(CAPTIONS)], seed=i) for i in range(80)}
    vq = VQConfig(image_size=32, downsample=8, codebook_size=64, code_dim=16, channels=32, stem_channels=16,
                  res_blocks=1, name="test")
    image = train_image_tokenizer(np.concatenate(list(clips.values())), root / "image", preset=vq, steps=40,
                                  batch_size=32, log=None)
    layout_ = {"frames": 5, "frame_size": 32, "tokens_h": 4, "tokens_w": 4, "text_slot": 12}
    (root / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / "shards" / f"train-{shard:06d}.tar")) as sink:
            for i in range(shard * 40, shard * 40 + 40):
                caption = CAPTIONS[i % len(CAPTIONS)]
                meta = {"mode": "sequential", "rate": 1.0, "span": 4.0, "layout": layout_}
                ttok, _ = text.encode_caption(caption)
                sink.write(encode_sample(f"clip{i:04d}", meta, caption, image.encode(clips[i]), ttok))
            # one sample with the wrong number of frames: skipped and counted, never trained on
            sink.write(encode_sample(f"bad{shard}", {"span": 4.0}, "x", np.zeros((3, 4, 4), np.uint16), ttok))
    info = {"layout": layout_, "tokenizers": {
        "image": {"id": image.tokenizer_id, "sha256": image.sha256, "path": str(root / "image")},
        "text": {"id": text.tokenizer_id, "sha256": text.sha256, "path": "text.model"}}}  # relative path
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_sequence_builder_and_stream(dataset):
    info = read_dataset_info(dataset)
    text = TextTokenizer(dataset / "text.model")
    cfg = CogVideoConfig(text_vocab=text.vocab_size, image_vocab=64, n_layer=1, n_head=1, n_embd=8, text_slot=12,
                         frames=5, tokens_h=4, tokens_w=4, window=2, shift=1)
    builder = SequenceBuilder(cfg, text, "interpolation")
    vtok = np.arange(5 * 16, dtype=np.uint16).reshape(5, 4, 4) % 64
    tokens, targets = builder(vtok, np.array([7, 8, 9], np.int32), 4.0)
    assert tokens.shape == targets.shape == (cfg.seq_len("interpolation"),)
    slot, _ = text.build_slot([7, 8, 9], 4.0, 12)
    assert tokens[:12].tolist() == slot.tolist()
    start = 12 + 3 * 17                                       # [text][f0][f2][f4] then frame 1
    assert tokens[start] == cfg.boi_id
    assert tokens[start + 1:start + 17].tolist() == (vtok[1].ravel().astype(int) + cfg.text_vocab).tolist()
    assert targets[start] == vtok[1, 0, 0] and targets[start - 1] == -1 and targets[11] == -1
    dropped, _ = builder(vtok, np.array([7, 8, 9], np.int32), 4.0, drop_caption=True)
    assert dropped[:12].tolist() == text.build_slot([], 4.0, 12)[0].tolist()
    stream = ShardStream(shard_urls(dataset, "train"), builder, shuffle=False, repeat=False)
    items = list(stream)
    assert len(items) == 80 and stream.skipped == {"shape": 2}
    assert info["layout"]["text_slot"] == 12
    # later epochs come from memory, and are the very epochs a stream that keeps nothing reads from disk
    def epochs(memory_mb, n=200):
        s = ShardStream(shard_urls(dataset, "train"), builder, seed=3, buffer=16, cond_drop=0.3, memory_mb=memory_mb)
        out = [(key, tokens.tolist()) for (tokens, _, key), _ in zip(s, range(n))]
        return out, s
    from_memory, kept = epochs(256)
    from_disk, none = epochs(0)
    assert from_memory == from_disk and kept.skipped == none.skipped == {"shape": 5}
    assert kept.in_memory and kept.bytes_in_memory > 0 and not none.in_memory


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(stage="sequential", steps=60, batch_size=8, lr=3e-3, n_layer=2, n_head=2, n_embd=48,
                         eval_interval=30, eval_batches=2, ckpt_interval=30, log_interval=10, warmup_steps=5,
                         seed=0)
    summary = train(dataset, out, config, log=None)
    return out, summary


def test_train_lowers_loss_and_writes_run(run):
    out, summary = run
    assert summary["steps"] == 60 and summary["stopped_by"] == "steps"
    assert summary["train_loss"] < summary["first_loss"] - 0.5, summary
    assert summary["val_loss"] < summary["first_loss"] - 0.5, summary
    assert summary["joint_image"] and not summary["freeze_base"] and summary["tokens_per_s"] > 0
    assert summary["skipped"].get("shape", 0) >= 1
    latest = json.loads((out / "latest.json").read_text())
    assert latest["ckpt"] == "ckpt_000060.pt" and latest["step"] == 60
    assert (out / "ckpt_000030.pt").exists() and (out / "tokenizers" / "text.model").exists()
    assert (out / "tokenizers" / "image" / "weights.pt").exists()
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in l for l in lines) and lines[0]["step"] == 1


def test_checkpoint_reload_gives_identical_logits(run, dataset):
    out, _ = run
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["text_slot"] == 12 and ckpt["train_config"]["stage"] == "sequential"
    a = model_from_checkpoint(ckpt).eval()
    b = model_from_checkpoint(torch.load(out / "ckpt_000060.pt", weights_only=True)).eval()
    L = a.config.seq_len("sequential")
    tokens = torch.randint(0, a.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))
    la, _ = a(tokens, torch.zeros_like(tokens))
    lb, _ = b(tokens, torch.zeros_like(tokens))
    assert torch.equal(la, lb)


def test_interpolation_stage_from_image_stage_run(run, dataset, tmp_path):
    """image stage -> interpolation stage: plus channel re-initialised from base, base frozen."""
    image_run = tmp_path / "image"
    small = dict(batch_size=4, n_layer=2, n_head=2, n_embd=48, eval_batches=1, log_interval=5, lr=3e-3)
    train(dataset, image_run, TrainConfig(stage="image", steps=6, **small), log=None)
    base = load_checkpoint(image_run)["model"]
    interp_run = tmp_path / "interp"
    summary = train(dataset, interp_run, TrainConfig(stage="interpolation", steps=6, init_from=str(image_run),
                                                     **small), log=None)
    assert summary["freeze_base"] and not summary["joint_image"]
    after = load_checkpoint(interp_run)
    assert after["stages"] == ["image", "interpolation"]
    state = after["model"]
    assert torch.equal(state["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"])   # frozen
    assert torch.equal(state["wte.weight"], base["wte.weight"])
    assert not torch.equal(state["h.0.attn.c_attn_plus.weight"], base["h.0.attn.c_attn_plus.weight"])
    # the interpolation run can fill in midpoints of the sequential run's frames
    result = sample(run[0], "a red circle moves right", tmp_path / "nine.mp4", frames_out=9, interp_run=interp_run)
    assert result["frames"] == 9 and result["rounds"] == 1
    with pytest.raises(ValueError):
        sample(run[0], "a red circle moves right", tmp_path / "x.mp4", frames_out=9)  # not trained for it


def test_sample_writes_a_real_video(run, tmp_path):
    out, _ = run
    result = sample(out, "a red circle moves right", tmp_path / "clip.mp4", seed=1)
    assert result["frames"] == 5 and result["tokens"] == 5 * 16 and result["out"].endswith("clip.mp4")
    assert result["span"] == 4.0 and result["fps"] == 1.0
    with av.open(result["out"]) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(frames) == 5 and frames[0].shape == (128, 128, 3)
    again = sample(out, "a red circle moves right", tmp_path / "again.gif", seed=1)
    assert again["frames"] == 5 and (tmp_path / "again.gif").stat().st_size > 0


# ---------------------------------------------------------------------------------- causality of masks

def _logits(model, tokens, stage):
    return model(tokens, torch.zeros_like(tokens), stage=stage)[0]


def test_future_tokens_do_not_move_earlier_outputs_sequential():
    """Stage 1: changing tokens after position t leaves the logits at 0..t exactly as they were."""
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
    """Stage 2: the given block never sees generated frames; frame 1 never sees frame 3 nor its own later
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


# ------------------------------------------------------------------------------------------- resume

class Crash(Exception):
    pass


def _curve(run_dir):
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(l["step"], l["loss"], l.get("loss_image")) for l in lines if "loss" in l]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(dataset, tmp_path):
    """A run killed after step 5 (last checkpoint at step 3) and resumed gives the same per-step losses
    and the same final weights as a run that was never interrupted: dropout, caption dropout, shuffling,
    AdamW moments and the schedule all continue where they were."""
    cfg = dict(stage="sequential", steps=8, batch_size=4, lr=3e-3, n_layer=1, n_head=2, n_embd=32, dropout=0.1,
               cond_drop=0.3, shuffle_buffer=16, eval_interval=100, eval_batches=1, ckpt_interval=3,
               log_interval=1, warmup_steps=2, keep_checkpoints=0, seed=3)
    full = tmp_path / "full"
    train(dataset, full, TrainConfig(**cfg), log=None)

    def crash_after_step_5(msg):
        if msg.startswith("step      5 loss"):
            raise Crash

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(dataset, cut, TrainConfig(**cfg), log=crash_after_step_5)
    assert json.loads((cut / "latest.json").read_text())["step"] == 3
    assert [s for s, _, _ in _curve(cut)] == [1, 2, 3, 4, 5]
    summary = train(dataset, cut, TrainConfig(), log=None, resume=True)     # config comes from the checkpoint
    assert summary["resumed_from"] == 3 and summary["steps"] == 8
    assert _curve(cut) == _curve(full)
    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert b["optimizer"]["state"] and b["data"]["batches_per_rank"] == 8
    assert sorted(p.name for p in cut.glob("ckpt_*.pt")) == ["ckpt_000003.pt", "ckpt_000006.pt", "ckpt_000008.pt"]


# -------------------------------------------------------------------------------------------- eval-synth

def test_eval_synth_scores_samples_against_the_manifest(run, corpus, tmp_path, capsys):
    """The whole command on a real run and a real synthetic manifest: JSON per attribute and all three,
    seen/unseen split against the training manifest, the tokenizer ceiling, a contact sheet."""
    import pandas as pd
    from PIL import Image

    from clipforge.jobs.cli import main

    out = tmp_path / "eval"
    main(["eval-synth", str(run[0]), str(corpus), "--train-manifest", str(corpus), "--limit", "3",
          "--out", str(out), "--top-k", "8"])
    printed = json.loads(capsys.readouterr().out)                       # stdout is the scores JSON alone
    scores = json.loads((out / "scores.json").read_text())
    assert printed == scores["scores"]
    good = pd.read_parquet(corpus).query("not broken")
    assert scores["scores"]["overall"]["n"] == 3 and scores["scores"]["seen"]["n"] == 3
    assert scores["scores"]["unseen"] == {"n": 0}                       # trained on the same manifest
    assert scores["scores"]["ceiling"]["n"] == 3
    for key in ("color", "shape", "direction", "all"):
        assert 0.0 <= scores["scores"]["overall"][key] <= 1.0
    rows = scores["rows"]
    assert [r["caption"] for r in rows] == good["caption"].tolist()[:3]
    assert rows[0]["truth"]["color"] == good["color"].iloc[0] and set(rows[0]["detected"]) >= {"color", "shape"}
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape[0] == 3 * (32 + 2) + 2 and sheet.shape[1] == 5 * (32 + 2) + 2
    # another held-out manifest whose combinations are not in the training one counts them as unseen
    other = tmp_path / "other.parquet"
    changed = good.head(2).assign(color="not-a-colour")
    changed.to_parquet(other)
    from clipforge.jobs.eval_synth import eval_synth

    result = eval_synth(str(run[0]), str(other), out=str(tmp_path / "eval2"), train_manifest=str(corpus),
                        ceiling=False, log=None)
    assert result["scores"]["unseen"]["n"] == 2 and result["scores"]["unseen"]["color"] == 0.0
