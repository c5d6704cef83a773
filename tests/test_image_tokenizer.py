"""The VQ image tokenizer: frames -> codes -> frames, training, persistence, evaluation."""
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from clipforge.pipeline.errors import ClipforgeError
from clipforge.tokenizer.image import ImageTokenizer
from clipforge.tokenizer.vq import PRESETS, EMAQuantizer, VQConfig
from clipforge.tokenizer.image_train import (STATE_FILE, augment, codebook_stats, evaluate_image_tokenizer,
                                             learning_rate, train_image_tokenizer)
from clipforge.tokenizer.metrics import psnr, ssim

SMALL = VQConfig(image_size=32, downsample=8, codebook_size=64, code_dim=8, channels=16, stem_channels=8,
                 res_blocks=1, name="small")


def shape_frames(n_videos=40, frames=8, size=64, seed=0):
    """uint8 [n_videos * frames, size, size, 3]: a coloured circle or square moving over a dark background."""
    rng = np.random.default_rng(seed)
    palette = np.array([(220, 40, 40), (40, 190, 60), (50, 90, 235), (235, 215, 40), (235, 235, 235)], np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n_videos * frames, size, size, 3), np.uint8)
    for v in range(n_videos):
        background = rng.integers(10, 40, size=3)
        color = palette[rng.integers(len(palette))]
        r = size * rng.uniform(0.12, 0.17)
        p = rng.uniform(r + 1, size - r - 1, size=2)
        vel = rng.uniform(-2, 2, size=2)
        square = rng.random() < 0.5
        for t in range(frames):
            cy, cx = np.clip(p + t * vel, r + 1, size - r - 1)
            if square:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img = out[v * frames + t]
            img[:] = background
            img[mask] = color
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    frames = shape_frames(60, 8, seed=0)
    tok = train_image_tokenizer(frames, out, preset="tiny", steps=150, batch_size=32, seed=0, log=None)
    return tok, out


def test_round_trip_shapes_and_dtypes():
    torch.manual_seed(0)
    tok = ImageTokenizer(SMALL, device="cpu")
    frames = shape_frames(2, 3, size=32)
    codes = tok.encode(frames)
    assert codes.dtype == np.uint16 and codes.shape == (6, 4, 4)
    assert codes.max() < tok.codebook_size
    back = tok.decode(codes)
    assert back.dtype == np.uint8 and back.shape == frames.shape
    assert tok.encode(frames[0]).shape == (1, 4, 4)                      # a single frame
    assert tok.decode(codes[0]).shape == (1, 32, 32, 3)
    assert tok.encode(frames[:0]).shape == (0, 4, 4) and tok.decode(codes[:0]).shape == (0, 32, 32, 3)
    assert np.array_equal(tok.encode(frames), codes)                     # deterministic
    tok.batch_size = 4                                                   # internal batching is invisible
    assert np.array_equal(tok.encode(frames), codes)
    assert tok.tokens_hw == (4, 4) and tok.downsample == 8 and tok.image_size == 32


def test_bad_inputs_raise():
    tok = ImageTokenizer(SMALL, device="cpu")
    with pytest.raises(ValueError):
        tok.encode(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        tok.encode(np.zeros((2, 30, 30, 3), np.uint8))
    with pytest.raises(ValueError):
        tok.decode(np.full((1, 4, 4), 64))                               # outside the codebook
    # a user's mistakes (frames of another size, a bad setting, an unknown preset) are ClipforgeErrors
    with pytest.raises(ClipforgeError, match="the preset wants"):
        train_image_tokenizer(np.zeros((4, 32, 32, 3), np.uint8), "unused", preset="tiny", steps=1, log=None)
    with pytest.raises(ClipforgeError, match="unknown preset"):
        train_image_tokenizer(np.zeros((4, 32, 32, 3), np.uint8), "unused", preset="tiny2", steps=1, log=None)
    with pytest.raises(ClipforgeError, match="steps"):
        train_image_tokenizer(np.zeros((4, 32, 32, 3), np.uint8), "unused", preset=SMALL, steps=0, log=None)
    with pytest.raises(ClipforgeError):
        VQConfig(image_size=30, downsample=8).validate()
    with pytest.raises(ClipforgeError, match="dtype"):
        ImageTokenizer(SMALL, device="cpu", dtype="float16")


def test_presets():
    assert PRESETS["tiny"].tokens_hw == (8, 8) and PRESETS["tiny"].codebook_size == 512
    big = PRESETS["cogview2"]
    assert (big.image_size, big.downsample, big.codebook_size, big.code_dim) == (160, 8, 20000, 256)
    assert big.tokens_hw == (20, 20)


def _encoder_outputs(config, frames):
    torch.manual_seed(0)
    tok = ImageTokenizer(config, device="cpu")
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        return tok.model.encoder(x).numpy()                                   # (N, D, h, w)


def test_a_local_encoder_codes_each_patch_from_its_own_pixels():
    """encoder_kernel=1 with replicate padding: a token's encoding depends on its 8x8 patch and a 2-pixel
    rim (the stem's 3x3 conv at half resolution) only, and a flat frame encodes to one vector everywhere.
    So a still background keeps its codes while an object moves past it (measured on synthetic videos:
    background tokens near the object changed code between frames 20 % of the time, against 78 % with the
    3x3 encoder)."""
    local = replace(SMALL, encoder_kernel=1, padding="replicate")
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    frames[1] = 30
    frames[1, 8 - 2:16 + 2, 8 - 2:16 + 2] = frames[0, 8 - 2:16 + 2, 8 - 2:16 + 2]  # token (1, 1) and its rim kept
    z = _encoder_outputs(local, frames)
    assert np.allclose(z[0, :, 1, 1], z[1, :, 1, 1], atol=1e-5)
    assert not np.allclose(z[0, :, 0, 0], z[1, :, 0, 0], atol=1e-3)          # the rest did change
    wide = _encoder_outputs(SMALL, frames)                                  # 3x3 blocks see the neighbours
    assert not np.allclose(wide[0, :, 1, 1], wide[1, :, 1, 1], atol=1e-3)

    flat = np.full((1, 32, 32, 3), 30, np.uint8)
    z = _encoder_outputs(local, flat)
    assert np.allclose(z, z[:, :, :1, :1], atol=1e-5)                       # borders included
    zeros = _encoder_outputs(replace(SMALL, encoder_kernel=1), flat)
    assert not np.allclose(zeros, zeros[:, :, 1:2, 1:2], atol=1e-3)         # zero padding marks the border
    with pytest.raises(ClipforgeError, match="encoder_kernel"):
        VQConfig(image_size=32, encoder_kernel=5).validate()
    with pytest.raises(ClipforgeError, match="padding"):
        VQConfig(image_size=32, padding="reflect").validate()


def test_codes_do_not_depend_on_the_callers_batch(trained):
    """The build encodes whatever number of frames its rows bring: a frame's codes must not change with
    the call's size or the frame's position in it (micro-batches are padded to one fixed shape)."""
    tok, out = trained
    tok = ImageTokenizer.load(out, device="cpu", batch_size=16)
    frames = shape_frames(7, 5, seed=3)                                  # 35 frames: 2 micro-batches + 3
    codes = tok.encode(frames)
    assert np.array_equal(np.concatenate([tok.encode(f) for f in frames]), codes)           # one at a time
    assert np.array_equal(tok.encode(frames[5:]), codes[5:])             # shifted within the micro-batches
    assert np.array_equal(np.concatenate([tok.encode(frames[i:i + 9]) for i in range(0, 35, 9)]), codes)
    assert np.array_equal(tok.encode(frames[::-1]), codes[::-1])


def test_bfloat16_encode_and_decode(trained):
    tok, out = trained
    fp32 = ImageTokenizer.load(out, device="cpu")
    bf16 = ImageTokenizer.load(out, device="cpu", dtype="bfloat16")
    assert bf16.dtype == "bfloat16" and bf16.encode_settings["dtype"] == "bfloat16"
    assert bf16.sha256 == fp32.sha256                                    # same weights: same tokenizer id
    frames = shape_frames(6, 4, seed=4)
    codes16, codes32 = bf16.encode(frames), fp32.encode(frames)
    assert codes16.dtype == np.uint16 and codes16.shape == codes32.shape
    assert (codes16 == codes32).mean() > 0.8                             # bf16 may flip near-ties, not most codes
    assert psnr(bf16.decode(codes16), fp32.decode(codes32)) > 25
    channels_last = ImageTokenizer.load(out, device="cpu", channels_last=True)
    assert np.array_equal(channels_last.encode(frames), codes32)


def test_trained_tokenizer_reconstructs_shapes(trained, tmp_path):
    tok, out = trained
    held_out = shape_frames(10, 8, seed=1)
    codes = tok.encode(held_out)
    assert codes.dtype == np.uint16 and codes.shape == (80, 8, 8) and codes.max() < 512
    recon = tok.decode(codes)
    assert recon.shape == held_out.shape and recon.dtype == np.uint8
    assert psnr(held_out, recon) > 20.0                                 # 22.1 dB measured after 150 steps
    stats = codebook_stats(codes, tok.codebook_size)
    assert stats["usage"] > 0.3 and stats["perplexity"] > 50
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 150 and log["history"][-1]["step"] == 149 and log["tokenizer_id"] == tok.tokenizer_id
    assert log["finished"] and log["steps_done"] == 150


def test_save_load_gives_identical_codes(trained, tmp_path):
    tok, out = trained
    assert (out / "config.json").exists() and (out / "weights.pt").exists()
    assert tok.sha256 == hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest()
    assert tok.tokenizer_id == f"vq-tiny-{tok.sha256[:12]}"
    loaded = ImageTokenizer.load(out)
    frames = shape_frames(3, 4, seed=5)
    assert np.array_equal(loaded.encode(frames), tok.encode(frames))
    assert np.array_equal(loaded.decode(tok.encode(frames)), tok.decode(tok.encode(frames)))
    assert loaded.tokenizer_id == tok.tokenizer_id and loaded.config == tok.config
    loaded.save(tmp_path / "copy")
    assert ImageTokenizer.load(tmp_path / "copy").sha256 == loaded.sha256
    # weights.pt is a plain state_dict: loadable with weights_only=True
    state = torch.load(out / "weights.pt", weights_only=True)
    assert "quantizer.codebook" in state and state["quantizer.codebook"].shape == (512, PRESETS["tiny"].code_dim)


def test_evaluate_writes_metrics_and_contact_sheet(trained, tmp_path):
    tok, _ = trained
    frames = shape_frames(4, 4, seed=2)
    metrics = evaluate_image_tokenizer(tok, frames, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["psnr"] == pytest.approx(metrics["psnr"]) and saved["tokenizer_id"] == tok.tokenizer_id
    assert metrics["frames"] == 16 and metrics["psnr"] > 15 and 0 < metrics["usage"] <= 1
    assert metrics["tokens_hw"] == [8, 8] and metrics["perplexity"] >= 1
    assert saved["ssim"] == pytest.approx(metrics["ssim"]) and 0.3 < metrics["ssim"] <= 1
    assert metrics["encode"]["dtype"] == "float32" and metrics["encode"]["device"] == "cpu"
    from PIL import Image
    sheet = np.asarray(Image.open(tmp_path / "eval" / "roundtrip.png"))
    assert sheet.shape == (2 + 2 * 66, 2 + 8 * 66, 3)                 # originals over reconstructions


def test_codebook_stats():
    stats = codebook_stats(np.array([[0, 0], [1, 1]]), 4)
    assert stats["codes_used"] == 2 and stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(2.0)


def test_psnr_and_ssim():
    a = shape_frames(2, 2, size=32)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    off = a.astype(np.int16) + np.where(a < 128, 1, -1)                 # every value off by exactly one
    assert psnr(a, off.astype(np.uint8)) == pytest.approx(10 * np.log10(255 ** 2), abs=1e-9)
    rng = np.random.default_rng(0)
    noisy = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    blurred = ((a.astype(np.float64) + np.roll(a, 1, axis=2) + np.roll(a, -1, axis=2)) / 3).astype(np.uint8)
    assert 0 < ssim(a, noisy) < 0.9 and ssim(a, blurred) > ssim(a, noisy)
    per = ssim(np.concatenate([a[:1], a[1:]]), np.concatenate([a[:1], noisy[1:]]), per_frame=True)
    assert per.shape == (4,) and per[0] == pytest.approx(1.0) and (per[1:] < 0.9).all()
    assert ssim(a[0], a[0]) == pytest.approx(1.0)                         # one [H, W, 3] frame
    with pytest.raises(ValueError):
        psnr(a, a[:1])
    with pytest.raises(ValueError):
        ssim(a, a[:1])


def test_augment_mirrors_and_permutes_colours_without_touching_the_input():
    frames = shape_frames(16, 1, size=32, seed=7)
    before = frames.copy()
    out = augment(frames, ["hflip", "channels"], np.random.default_rng(0))
    assert np.array_equal(frames, before) and out.shape == frames.shape and out.dtype == np.uint8
    flipped = changed = 0
    for a, b in zip(frames, out):
        ok = [np.array_equal(b, a[:, ::f][..., list(p)]) for f in (1, -1)
              for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))]
        assert any(ok)                                                   # each frame: one mirror x one permutation
        flipped += not any(ok[:6])
        changed += not ok[0]
    assert 0 < flipped < 16 and changed > 8
    assert augment(frames, [], np.random.default_rng(0)) is frames
    with pytest.raises(ClipforgeError, match="train_augment"):
        train_image_tokenizer(frames, "unused", preset=VQConfig(image_size=32, train_augment="rotate"), steps=1, log=None)


def test_training_resumes_exactly_where_it_stopped(tmp_path):
    """A budgeted run stops, saves optimizer + step + RNG, and a resumed run ends with the very weights of an
    uninterrupted one (same batches, same learning-rate schedule, same restarts)."""
    frames = shape_frames(8, 4, size=32, seed=6)
    args = dict(preset=SMALL, steps=12, batch_size=8, log=None, ae_warmup=0.25, restart_every=2, device="cpu")
    whole = train_image_tokenizer(frames, tmp_path / "whole", **args)
    part = train_image_tokenizer(frames, tmp_path / "part", stop_at=7, **args)
    log = json.loads((tmp_path / "part" / "train_log.json").read_text())
    assert log["steps_done"] == 7 and not log["finished"] and (tmp_path / "part" / STATE_FILE).exists()
    assert part.sha256 != whole.sha256
    state = torch.load(tmp_path / "part" / STATE_FILE, weights_only=True)   # no pickle needed to resume
    assert state["step"] == 7 and "optimizer" in state
    resumed = train_image_tokenizer(frames, tmp_path / "part", resume=True, **args)
    assert resumed.sha256 == whole.sha256
    log = json.loads((tmp_path / "part" / "train_log.json").read_text())
    assert log["steps_done"] == 12 and log["finished"]
    # a budget of zero minutes still makes one step, then stops resumably
    train_image_tokenizer(frames, tmp_path / "budget", max_minutes=0, **args)
    assert json.loads((tmp_path / "budget" / "train_log.json").read_text())["steps_done"] == 1
    # the bf16 autocast path (on by default on CUDA) runs here too: quantiser and loss stay float32
    amp = train_image_tokenizer(frames, tmp_path / "amp", amp=True, **{**args, "steps": 8})   # dead-code restarts included
    assert json.loads((tmp_path / "amp" / "train_log.json").read_text())["amp"] is True
    assert amp.model.quantizer.codebook.dtype == torch.float32
    with pytest.raises(ClipforgeError, match="another run"):
        train_image_tokenizer(frames, tmp_path / "part", resume=True, **{**args, "steps": 20})


def test_dead_codes_restart_on_badly_served_vectors():
    torch.manual_seed(0)
    q = EMAQuantizer(VQConfig(image_size=32, codebook_size=8, code_dim=2))
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0]] + [[100.0, 100.0]] * 7))
        q.ema_sum.copy_(q.codebook)
    z = torch.cat([torch.zeros(54, 2), torch.tensor([[5.0, 5.0]]).repeat(10, 1)])  # code 0 serves all
    q.train()
    q(z.view(64, 2, 1, 1))                                          # counts usage: only code 0 used
    assert q.usage.tolist() == [64] + [0] * 7
    with torch.no_grad():
        q.codebook[0] = 0.0                                         # undo the EMA step: zeros served exactly
    moved = q.restart_dead(z, 1.0)
    assert moved == 7
    # restarted codes land on the vectors that code 0 serves worst (the (5, 5) ones), not the background
    assert torch.allclose(q.codebook[1:], torch.tensor([5.0, 5.0]).expand(7, 2), atol=0.5)


def test_the_learning_rate_warms_up_again_where_quantisation_starts():
    steps, lr, switch = 1000, 3e-3, 300
    rates = [learning_rate(s, steps, lr, switch, switch_warmup=0.05) for s in range(steps)]
    plain = [learning_rate(s, steps, lr, switch, switch_warmup=0.0) for s in range(steps)]
    assert rates[19] == pytest.approx(lr, rel=0.01) and rates[0] == pytest.approx(lr / 20)   # first warmup
    assert rates[switch - 1] == pytest.approx(plain[switch - 1])                               # cosine before
    assert rates[switch] == pytest.approx(plain[switch] / 50)                                  # 50 = 5% of 1000
    assert all(rates[s] < rates[s + 1] for s in range(switch, switch + 49))                    # ramps up ...
    assert rates[switch + 50:] == plain[switch + 50:]                                          # ... to the cosine
    assert rates[-1] == pytest.approx(0.1 * lr, rel=0.01)
