"""Session fixtures: a small real corpus (H.264 files written with PyAV) and tokenizers trained on it.

Everything is built once per session in a temporary directory; the tokenizers are deliberately
under-trained (a few steps), since the tests check the plumbing, not the picture quality.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


def start_local_ray(**kwargs):
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


def shared_videos() -> list[Path]:
    videos = SHARED_DATA / "videos"
    return sorted(p for p in videos.rglob("*") if p.is_file()) if videos.exists() else []


def commit_shards(root, writer_rows: list[list[dict]], layout: dict, info: dict | None = None,
                  inputs_per_shard: int = 2) -> list[dict]:
    """A dataset made by hand: each list of rows written as one shard attempt and committed by a driver
    holding the lease, as the build does; `info` (merged into a minimal dataset.json) when given."""
    from clipforge.pipeline.storage.commits import CommitLog, RunLease
    from clipforge.pipeline.storage.dataset import DatasetInfo
    from clipforge.pipeline.storage.shards import ShardWriter

    writer = ShardWriter(root, layout)
    records = [writer.write(i, rows, inputs=inputs_per_shard) for i, rows in enumerate(writer_rows)]
    with RunLease(root) as lease:
        log = CommitLog(root)
        log.start_epoch(lease.epoch)
        log.commit(records, lease)
    if info is not None:
        DatasetInfo({"format": "clipforge-dataset", "layout": layout, **info}).write(root)
    return records


def forget_commit(root, shard: str) -> None:
    """As if the driver died before committing `shard`: its record leaves the log (its parts stay)."""
    from pathlib import Path

    for segment in (Path(root) / "commits").glob("*.jsonl"):
        lines = [line for line in segment.read_text().splitlines(keepends=True) if f'"shard": "{shard}"' not in line]
        segment.write_text("".join(lines))


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
