"""Session fixtures: a small real corpus (H.264 files written with PyAV) and tokenizers trained on it, the
dataset built from them that the shard and reshard tests share (`reference_dataset`), and the tiny dataset
the model tests share (`model_dataset`); a fresh local Ray (`start_local_ray`), an S3 server (`s3_server`).

Everything is built once per session in a temporary directory; the tokenizers are deliberately
under-trained (a few steps), since the tests check the plumbing, not the picture quality. Test modules
import nothing from here or from each other: what several share is a fixture, a helper one module needs
lives in that module.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """6 good videos (1-3 s) + 2 dirty captions + 4 broken rows; returns the manifest path."""
    from clipforge.pipeline.video.synth import SynthConfig, write_synthetic_corpus

    out = tmp_path_factory.mktemp("corpus")
    return write_synthetic_corpus(out, SynthConfig(videos=6, seed=1, max_seconds=3.0, dirty_captions=0.34, broken=4))


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory) -> Path:
    from clipforge.pipeline.video.synth import make_caption, COLORS, SHAPES, DIRECTIONS
    from clipforge.tokenizer.text import train_text_tokenizer

    rng = np.random.default_rng(0)
    captions = [make_caption(c, s, d, rng) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    path = tmp_path_factory.mktemp("tok") / "text.model"
    train_text_tokenizer(captions, path, vocab_size=300)
    return path


@pytest.fixture(scope="session")
def image_tokenizer(tmp_path_factory) -> Path:
    from clipforge.tokenizer.image_train import train_image_tokenizer
    from clipforge.pipeline.video.synth import render_frame, COLORS

    rng = np.random.default_rng(0)
    frames = np.stack([render_frame("circle", rgb, (rng.integers(10, 54), rng.integers(10, 54)), 10, 64, 64, (20, 20, 30))
                       for rgb in list(COLORS.values()) * 4])
    out = tmp_path_factory.mktemp("vq")
    train_image_tokenizer(frames, out, preset="tiny", steps=5, batch_size=8, log=None)
    return out


# ------------------------------------------------------------------ the model tests' dataset

MODEL_CAPTIONS = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue", "yellow", "white")
                  for s in ("circle", "square") for d in ("left", "right", "up", "down", "around")]
MODEL_COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
                "white": (235, 235, 235)}


def model_clip_frames(caption, n=5, size=32, seed=0):
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
        out[t][mask] = MODEL_COLORS[color]
    return out


@pytest.fixture(scope="session")
def model_dataset(tmp_path_factory) -> Path:
    """The one tiny dataset the model tests share (tests/test_model.py, tests/test_model_ddp.py), built once
    a session: 32x32 frames -> 4x4 codes, 5 frames, text slot 12, two train shards of 40 clips, each with
    one sample of the wrong shape, and its own tokenizers (the text one referred to by a relative path)."""
    import json

    import webdataset as wds

    from clipforge.pipeline.storage.samples import encode_sample
    from clipforge.tokenizer.image_train import train_image_tokenizer
    from clipforge.tokenizer.text import train_text_tokenizer
    from clipforge.tokenizer.vq import VQConfig

    root = tmp_path_factory.mktemp("model_ds")
    text = train_text_tokenizer(MODEL_CAPTIONS, root / "text.model", vocab_size=120)
    clips = {i: model_clip_frames(MODEL_CAPTIONS[i % len(MODEL_CAPTIONS)], seed=i) for i in range(80)}
    vq = VQConfig(image_size=32, downsample=8, codebook_size=64, code_dim=16, channels=32, stem_channels=16,
                  res_blocks=1, name="test")
    image = train_image_tokenizer(np.concatenate(list(clips.values())), root / "image", preset=vq, steps=40,
                                  batch_size=32, log=None)
    layout_ = {"frames": 5, "frame_size": 32, "tokens_h": 4, "tokens_w": 4, "text_slot": 12}
    (root / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / "shards" / f"train-{shard:06d}.tar")) as sink:
            for i in range(shard * 40, shard * 40 + 40):
                caption = MODEL_CAPTIONS[i % len(MODEL_CAPTIONS)]
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


# -------------------------------------------------------- the shard and reshard tests' build

@pytest.fixture(scope="session")
def reference_config():
    """The settings of `reference_dataset` (tests/test_shards.py's command-line builds pass the same flags)."""
    from clipforge.jobs.build import BuildConfig, with_overrides

    return with_overrides(BuildConfig(), size=64, mode="both", inputs_per_shard=2, text_slot=24, runner="local")


@pytest.fixture(scope="session")
def reference_dataset(corpus, image_tokenizer, text_tokenizer, reference_config, tmp_path_factory) -> Path:
    """The corpus built once, uninterrupted, with `reference_config`: what the shard tests (resume after
    SIGKILL, retries, readers) and the reshard tests compare against or read. Copy it before changing it."""
    from clipforge.jobs.build import build

    out = tmp_path_factory.mktemp("ref") / "ds"
    build(str(corpus), str(out), str(image_tokenizer), str(text_tokenizer), reference_config, progress=False)
    return out


def pytest_configure(config):
    # `make test` runs two xdist workers on two cores: one torch thread each, else both workers' thread
    # pools fight over the same cores (a module fixture that trains took 4x longer that way)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads the groups off the markers
def pytest_collection_modifyitems(config, items):
    """Tests that start a local Ray cluster share one xdist worker (`make test` runs two), so that two
    clusters never compete for the same two cores and ports; every other test runs on the worker of its
    module, so a module's expensive fixtures (a trained tokenizer, a built dataset) are built once."""
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.partition("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def _start_local_ray(**kwargs):
    """`ray.init(address="local", ...)`: always a fresh instance, never a cluster another test left running
    or registered on this machine. Ray gives a starting node a fixed 30 s to register with its GCS, which a
    loaded 2-core machine (the other test worker, a cluster still shutting down) can miss, so starting
    Ray (not the code under test) is tried a second time."""
    import ray

    for attempt in range(2):
        try:
            return ray.init(address="local", include_dashboard=False, **kwargs)
        except Exception:   # noqa: BLE001 — Ray raises a bare Exception for a node that timed out starting
            ray.shutdown()
            if attempt:
                raise


@pytest.fixture
def start_local_ray():
    """`start_local_ray(**ray_init_kwargs)`: a fresh local Ray instance (see `_start_local_ray`)."""
    return _start_local_ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's server mode) on loopback, for this test only."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    import pyarrow.fs as pafs
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    for bucket in ("videos", "datasets"):
        fs.create_dir(bucket)
    yield endpoint
    server.stop()
