"""The CogVideo-style model on data: sequences from shards, training, checkpoints, resume, sampling, eval-synth.
(Masks, layouts and the KV cache without training: tests/test_model_structure.py.)"""
import itertools
import json

import av
import numpy as np
import pytest
import torch

from clipforge.model.data import SequenceBuilder, ShardStream, read_dataset_info, shard_urls
from clipforge.model.config import CogVideoConfig
from clipforge.model.sample import sample
from clipforge.model.checkpoint import load_checkpoint, model_from_checkpoint
from clipforge.model.config import TrainConfig
from clipforge.model.train import train
from clipforge.tokenizer.text import TextTokenizer

# ------------------------------------------------------------------------------ data, train, sample


def test_sequence_builder_and_stream(model_dataset):
    info = read_dataset_info(model_dataset)
    text = TextTokenizer(model_dataset / "text.model")
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
    # captions longer than the slot are counted (the trainer warns): dropped captions are not captions
    builder(vtok, np.arange(7, 27, dtype=np.int32), 4.0)
    assert (builder.captions, builder.captions_cut) == (2, 1)
    stream = ShardStream(shard_urls(model_dataset, "train"), builder, shuffle=False, repeat=False)
    items = list(stream)
    assert len(items) == 80 and stream.skipped == {"shape": 2}
    assert info["layout"]["text_slot"] == 12
    # later epochs come from memory, and are the very epochs a stream that keeps nothing reads from disk
    def epochs(memory_mb, n=200):
        s = ShardStream(shard_urls(model_dataset, "train"), builder, seed=3, open_shards=2, cond_drop=0.3, memory_mb=memory_mb)
        out = [(key, tokens.tolist()) for (tokens, _, key, _), _ in zip(s, range(n))]
        return out, s
    from_memory, kept = epochs(256)
    from_disk, none = epochs(0)
    assert from_memory == from_disk and kept.skipped == none.skipped
    assert kept.skipped["shape"] == 5   # 2 an epoch; the third epoch has one of them before sample 200
    assert kept.in_memory and kept.bytes_in_memory > 0 and not none.in_memory


@pytest.mark.parametrize("cut", [1, 37, 79, 80, 130])
def test_a_stream_resumed_from_a_position_reads_nothing_before_it(model_dataset, cut):
    """Stop a shuffled, repeating stream after `cut` samples (mid-shard, end of an epoch, next epoch) and
    start a new one from the last sample's position: it continues with exactly the samples (and caption
    dropout) the uninterrupted stream gives, and decodes none of the samples that came before."""
    info = read_dataset_info(model_dataset)
    text = TextTokenizer(model_dataset / "text.model")
    cfg = CogVideoConfig(text_vocab=text.vocab_size, image_vocab=64, n_layer=1, n_head=1, n_embd=8,
                         text_slot=info["layout"]["text_slot"], frames=5, tokens_h=4, tokens_w=4, window=2, shift=1)

    def stream():
        return ShardStream(shard_urls(model_dataset, "train"), SequenceBuilder(cfg, text, "sequential"), seed=7,
                           open_shards=2, cond_drop=0.5)

    whole = [(key, tokens.tolist(), pos) for tokens, _, key, pos in itertools.islice(stream(), cut + 40)]
    resumed = stream()
    resumed.resume_from({0: whole[cut - 1][2]})
    rest = [(key, tokens.tolist(), pos) for tokens, _, key, pos in itertools.islice(resumed, 40)]
    assert rest == whole[cut:]
    before = {key for key, _, _ in whole[:cut]} - {key for key, _, _ in whole[cut:]}   # not met again
    assert before and not before & set(resumed.decoded_keys)


@pytest.fixture(scope="module")
def run(model_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(phase="sequential", steps=60, batch_size=8, lr=3e-3, n_layer=2, n_head=2, n_embd=48,
                         eval_interval=30, eval_batches=2, ckpt_interval=30, log_interval=10, warmup_steps=5,
                         seed=0)
    summary = train(model_dataset, out, config, log=None)
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


def test_checkpoint_reload_gives_identical_logits(run, model_dataset):
    out, _ = run
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["text_slot"] == 12 and ckpt["train_config"]["phase"] == "sequential"
    a = model_from_checkpoint(ckpt).eval()
    b = model_from_checkpoint(torch.load(out / "ckpt_000060.pt", weights_only=True)).eval()
    L = a.config.seq_len("sequential")
    tokens = torch.randint(0, a.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))
    la, _ = a(tokens, torch.zeros_like(tokens))
    lb, _ = b(tokens, torch.zeros_like(tokens))
    assert torch.equal(la, lb)


def test_interpolation_stage_from_image_stage_run(run, model_dataset, tmp_path):
    """image phase -> interpolation phase with --freeze-base: plus channel re-initialised from base, base
    frozen."""
    image_run = tmp_path / "image"
    small = dict(batch_size=4, n_layer=2, n_head=2, n_embd=48, eval_batches=1, log_interval=5, lr=3e-3)
    train(model_dataset, image_run, TrainConfig(phase="image", steps=6, **small), log=None)
    base = load_checkpoint(image_run)["model"]
    interp_run = tmp_path / "interp"
    summary = train(model_dataset, interp_run, TrainConfig(phase="interpolation", steps=6, init_from=str(image_run),
                                                     freeze_base=True, **small), log=None)
    assert summary["freeze_base"] and not summary["joint_image"]
    after = load_checkpoint(interp_run)
    assert after["phases"] == ["image", "interpolation"]
    state = after["model"]
    assert torch.equal(state["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"])   # frozen
    assert torch.equal(state["wte.weight"], base["wte.weight"])
    assert not torch.equal(state["h.0.attn.c_attn_plus.weight"], base["h.0.attn.c_attn_plus.weight"])
    # the interpolation run can fill in midpoints of the sequential run's frames
    result = sample(run[0], "a red circle moves right", tmp_path / "nine.mp4", frames_out=9, interp_run=interp_run)
    assert result["frames"] == 9 and result["rounds"] == 1
    with pytest.raises(ValueError):
        sample(run[0], "a red circle moves right", tmp_path / "x.mp4", frames_out=9)  # not trained for it
    # frame 0 from the image-phase run, frames 1.. from the sequential run
    mixed = sample(run[0], "a red circle moves right", tmp_path / "mixed.mp4", image_run=image_run, candidates=2)
    assert mixed["frames"] == 5 and mixed["image_run"] == str(image_run)
    # a sequential run started from the image-phase run draws frame 0 with it unless told otherwise
    seq_run = tmp_path / "seq"
    train(model_dataset, seq_run, TrainConfig(phase="sequential", steps=2, init_from=str(image_run), **small), log=None)
    assert sample(seq_run, "a red circle", tmp_path / "a.mp4", candidates=1)["image_run"] == str(image_run)
    assert sample(seq_run, "a red circle", tmp_path / "b.mp4", candidates=1, image_run="none")["image_run"] is None
    assert sample(run[0], "a red circle", tmp_path / "c.mp4", candidates=1)["image_run"] is None   # a fresh run


def test_dropout_given_with_init_from_replaces_the_image_runs(model_dataset, tmp_path):
    """Dropout is a training choice, not part of the architecture: the video phases train without it by
    default (the image phase's 0.1 is not inherited), and a given value replaces the image-phase run's."""
    small = dict(batch_size=4, n_layer=1, n_head=2, n_embd=32, eval_batches=1, log_interval=5)
    train(model_dataset, tmp_path / "image", TrainConfig(phase="image", steps=2, **small), log=None)   # dropout 0.1
    tokens = torch.randint(0, 100, (2, 12 + 5 * 17), generator=torch.Generator().manual_seed(0))
    for given, want in ((None, 0.0), (0.2, 0.2)):
        out = tmp_path / f"seq-{given}"
        train(model_dataset, out, TrainConfig(phase="sequential", steps=2, init_from=str(tmp_path / "image"), dropout=given,
                                        **small), log=None)
        model = model_from_checkpoint(load_checkpoint(out)).train()
        assert model.config.dropout == want
        a, _ = model(tokens, torch.zeros_like(tokens))
        b, _ = model(tokens, torch.zeros_like(tokens))
        assert torch.equal(a, b) is (want == 0.0)   # in training mode only dropout makes two passes differ


def test_what_trains_from_an_image_phase_run(model_dataset, tmp_path, capsys):
    """`train --init-from IMAGE_RUN` trains the whole model without the image-phase loss (the image-phase
    run draws frame 0); --joint-image adds it to every step, --freeze-base trains only the new parts. The
    summary says which, and only the joint run logs a frame-0 loss."""
    from clipforge.jobs.cli import main

    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--log-interval", "1", "--eval-interval", "100"]
    main(["train", str(model_dataset), "--out", str(tmp_path / "image"), "--phase", "image", "--steps", "2", *small])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["global_batch"], summary["lr"]) == (32, 2e-3)            # the image phase's defaults
    assert model_from_checkpoint(load_checkpoint(tmp_path / "image")).config.dropout == 0.1
    for flag, joint, freeze in ((None, False, False), ("--joint-image", True, False), ("--freeze-base", False, True)):
        out = tmp_path / f"seq-{flag}"
        main(["train", str(model_dataset), "--out", str(out), "--steps", "3", "--init-from", str(tmp_path / "image"),
              *small, *([flag] if flag else [])])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["joint_image"] is joint and summary["freeze_base"] is freeze
        assert (summary["trainable_params"] < summary["params"]) is freeze
        assert (summary["global_batch"], summary["lr"]) == (16, 1e-3)        # the video phases' defaults
        logged = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
        assert any("loss_image" in l for l in logged) is joint


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


# ------------------------------------------------------------------------------------------- resume

class Crash(Exception):
    pass


def _curve(run_dir):
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(l["step"], l["loss"], l.get("loss_image")) for l in lines if "loss" in l]


def test_resuming_a_run_that_saved_its_defaults_as_none_keeps_its_rate(model_dataset, tmp_path):
    """clipforge 0.3 saved lr and dropout as None (defaults then taken from init_from): a resume reads the
    rate its schedule ran at and its model's dropout, not today's phase defaults."""
    run = tmp_path / "run"
    train(model_dataset, run, TrainConfig(phase="sequential", steps=2, batch_size=4, lr=3e-3, dropout=0.2, n_layer=1,
                                          n_head=2, n_embd=32, eval_batches=1, ckpt_interval=2), log=None)
    ckpt_path = run / json.loads((run / "latest.json").read_text())["ckpt"]
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["train_config"].update(lr=None, dropout=None, steps=4)      # as 0.3 wrote it, and two steps to go
    torch.save(ckpt, ckpt_path)
    summary = train(model_dataset, run, TrainConfig(), log=None, resume=True)
    assert summary["resumed_from"] == 2 and summary["lr"] == 3e-3
    assert load_checkpoint(run)["train_config"]["dropout"] == 0.2


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(model_dataset, tmp_path):
    """A run killed after step 5 (last checkpoint at step 3) and resumed gives the same per-step losses
    and the same final weights as a run that was never interrupted: dropout, caption dropout, shuffling,
    AdamW moments and the schedule all continue where they were."""
    cfg = dict(phase="sequential", steps=8, batch_size=4, lr=3e-3, n_layer=1, n_head=2, n_embd=32, dropout=0.1,
               cond_drop=0.3, open_shards=2, eval_interval=100, eval_batches=1, ckpt_interval=3,
               log_interval=1, warmup_steps=2, keep_checkpoints=0, seed=3)
    full = tmp_path / "full"
    train(model_dataset, full, TrainConfig(**cfg), log=None)

    def crash_after_step_5(msg):
        if msg.startswith("step      5 loss"):
            raise Crash

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(model_dataset, cut, TrainConfig(**cfg), log=crash_after_step_5)
    assert json.loads((cut / "latest.json").read_text())["step"] == 3
    assert [s for s, _, _ in _curve(cut)] == [1, 2, 3, 4, 5]
    summary = train(model_dataset, cut, TrainConfig(), log=None, resume=True)     # config comes from the checkpoint
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


def _split_dataset(model_dataset, tmp_path) -> list:
    """Two datasets of one token space: each with one of the model dataset's two shards."""
    import shutil

    parts = []
    for keep in ("train-000000.tar", "train-000001.tar"):
        part = tmp_path / keep.split(".")[0]
        shutil.copytree(model_dataset, part, ignore=lambda d, names: [n for n in names if n.startswith("train-")
                                                                      and n != keep])
        parts.append(part)
    return parts


def test_a_mixture_draws_datasets_by_weight_and_resumes_from_a_position(model_dataset, tmp_path):
    from clipforge.model.data import MixtureStream

    parts = _split_dataset(model_dataset, tmp_path)
    info = read_dataset_info(model_dataset)
    text = TextTokenizer(model_dataset / "text.model")
    cfg = CogVideoConfig(text_vocab=text.vocab_size, image_vocab=64, n_layer=1, n_head=1, n_embd=8,
                         text_slot=info["layout"]["text_slot"], frames=5, tokens_h=4, tokens_w=4, window=2, shift=1)

    def mixture():
        streams = [ShardStream(shard_urls(p, "train"), SequenceBuilder(cfg, text, "sequential"), seed=i)
                   for i, p in enumerate(parts)]
        return MixtureStream(streams, [0.75, 0.25], seed=1)

    whole = [(key, pos) for _, _, key, pos in itertools.islice(mixture(), 400)]
    first = sum(int(key[4:]) < 40 for key, _ in whole) / len(whole)   # clip0000-0039 are the first dataset's
    assert 0.68 < first < 0.82, first
    resumed = mixture()
    resumed.resume_from({0: whole[149][1]})
    assert [key for _, _, key, _ in itertools.islice(resumed, 100)] == [key for key, _ in whole[150:250]]


def test_train_on_two_datasets_with_weights(model_dataset, tmp_path):
    parts = _split_dataset(model_dataset, tmp_path)
    config = TrainConfig(phase="sequential", steps=6, batch_size=8, n_layer=1, n_head=2, n_embd=32, weights=[1, 3],
                         eval_interval=100, eval_batches=1, log_interval=1, record_keys=True)
    summary = train([str(p) for p in parts], tmp_path / "run", config, log=None)
    keys = [line.split()[1] for line in (tmp_path / "run" / "keys" / "rank0.txt").read_text().splitlines()]
    assert len(keys) == 48 and 0 < sum(int(k[4:]) < 40 for k in keys) < 24   # a quarter from the first
    assert load_checkpoint(tmp_path / "run")["datasets"] == [str(p) for p in parts]
    assert summary["steps"] == 6
    other = tmp_path / "other"
    import shutil
    shutil.copytree(parts[1], other)
    (other / "dataset.json").write_text((other / "dataset.json").read_text().replace('"text_slot": 12', '"text_slot": 16'))
    with pytest.raises(ValueError, match="one token space"):
        train([str(parts[0]), str(other)], tmp_path / "run2", config, log=None)
