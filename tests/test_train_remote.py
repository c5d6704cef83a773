"""Training on object storage: a dataset on s3:// (tokenizers fetched by URL and checked), a run on
s3:// killed and resumed on a machine that kept nothing, ending with the weights of an uninterrupted run
and having decoded no sample the killed run had consumed; sampling from the run on s3://."""
from __future__ import annotations

import shutil

import pyarrow.fs as pafs
import pytest
import torch

import clipforge
from clipforge.model.checkpoint import load_checkpoint
from clipforge.model.config import TrainConfig
from clipforge.model.train import train
from clipforge.pipeline.storage.fs import Location

pytestmark = pytest.mark.slow


class Crash(Exception):
    pass


def _upload(endpoint: str, local, key: str) -> None:
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    with fs.open_output_stream(f"datasets/{key}") as out:
        out.write(local.read_bytes())


def _keys(run: str) -> list[tuple[int, str]]:
    lines = Location(run).read_text("keys/rank0.txt").splitlines()
    return [(int(step), key) for step, key in (line.split() for line in lines)]


def test_train_on_s3_killed_and_resumed_from_s3(s3_server, corpus, image_tokenizer, text_tokenizer, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    # the S3 server's buckets live as long as the test process: a prefix of this test's own
    top = f"s3://datasets/{tmp_path.name}"
    key = tmp_path.name
    config = clipforge.BuildConfig(clips=clipforge.ClipConfig(size=64), inputs_per_shard=2, text_slot=24,
                                   runner="local")
    info = clipforge.build(str(corpus), f"{top}/ds", str(image_tokenizer), str(text_tokenizer), config,
                           progress=False, log=lambda *_: None)
    assert info["funnel"]["samples"] > 4
    for name in ("config.json", "weights.pt"):
        _upload(s3_server, image_tokenizer / name, f"{key}/tok/image/{name}")
    _upload(s3_server, text_tokenizer, f"{key}/tok/text.model")
    cfg = dict(phase="sequential", steps=8, batch_size=4, lr=3e-3, n_layer=1, n_head=2, n_embd=32, dropout=0.1,
               cond_drop=0.3, open_shards=2, eval_interval=100, eval_batches=1, ckpt_interval=3, log_interval=1,
               warmup_steps=2, keep_checkpoints=2, holdout=0.0, seed=3, record_keys=True,
               image_tokenizer=f"{top}/tok/image", text_tokenizer=f"{top}/tok/text.model")
    full = train(f"{top}/ds", f"{top}/runs/full", TrainConfig(**cfg), log=None)
    assert full["samples_decoded"] == 8 * 4

    def crash_after_step_5(msg):
        if msg.startswith("step      5 loss"):
            raise Crash

    with pytest.raises(Crash):
        train(f"{top}/ds", f"{top}/runs/cut", TrainConfig(**cfg), log=crash_after_step_5)
    cut = Location(f"{top}/runs/cut")
    assert cut.read_text("latest.json").count('"step": 3') == 1
    assert sorted(cut.list(suffix=".pt")) == ["ckpt_000003.pt"]
    shutil.rmtree(tmp_path / "cache")   # a new machine: nothing of the killed run is left locally

    resumed = train(f"{top}/ds", f"{top}/runs/cut", TrainConfig(), log=None, resume=True)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 8
    assert resumed["samples_decoded"] == (8 - 3) * 4   # nothing before the checkpoint's position was read
    a, b = load_checkpoint(f"{top}/runs/full"), load_checkpoint(f"{top}/runs/cut")
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert _keys(f"{top}/runs/cut") == _keys(f"{top}/runs/full")
    assert sorted(cut.list(suffix=".pt")) == ["ckpt_000006.pt", "ckpt_000008.pt"]   # --keep-last 2
    report = clipforge.audit(f"{top}/ds", str(tmp_path / "audit"))   # the dataset's captions, read on s3://
    assert report["rows"] == info["funnel"]["samples"], report
    video = clipforge.sample(f"{top}/runs/cut", "a red circle moves to the right", tmp_path / "v.gif",
                             clipforge.SamplingConfig(candidates=1))
    assert video["frames"] == 5 and (tmp_path / "v.gif").stat().st_size > 0


def test_a_remote_run_is_never_mixed_with_another(s3_server, tmp_path, monkeypatch):
    """Another tool's files under the run's prefix are refused; a run there is replaced only with overwrite."""
    from clipforge.model.run_folder import RunFolder

    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    key = tmp_path.name
    theirs = tmp_path / "notes.txt"
    theirs.write_text("mine")
    _upload(s3_server, theirs, f"{key}/theirs/notes.txt")
    with pytest.raises(FileExistsError, match="not a training run"):
        RunFolder(f"s3://datasets/{key}/theirs").claim(overwrite=True)
    assert Location(f"s3://datasets/{key}/theirs").read_text("notes.txt") == "mine"
    _upload(s3_server, theirs, f"{key}/ours/latest.json")
    with pytest.raises(FileExistsError, match="--resume"):
        RunFolder(f"s3://datasets/{key}/ours").claim(overwrite=False)
    RunFolder(f"s3://datasets/{key}/ours").claim(overwrite=True)
    assert Location(f"s3://datasets/{key}/ours").walk() == []
