"""The build at cluster scale: exactly-once shard assembly, object storage in and out, a worker node lost
mid-build, declared GPUs used by the tokenizer workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from clipforge.jobs.build import BuildConfig, build, with_overrides
from clipforge.pipeline.storage.fs import Location, register_webdataset_schemes
from clipforge.pipeline.storage.samples import decode_sample
from clipforge.pipeline.storage.commits import CommitLog, RunLease, collect_garbage
from clipforge.pipeline.storage.shards import (ShardWriter, read_index, read_ledger, read_records,
                                               shard_urls)
from clipforge.jobs.verify import verify_dataset

LAYOUT = {"frames": 5, "frame_size": 64, "tokens_h": 8, "tokens_w": 8, "text_slot": 24, "image_vocab": 64}


def _clip_row(row_index: int, clip: int, **extra) -> dict:
    rng = np.random.default_rng(row_index * 10 + clip)
    return {"row_index": row_index, "clip_index": clip, "clips_total": 2, "key": f"v{row_index}_seq{clip:02d}",
            "video_id": f"vid{row_index}", "row_id": f"r{row_index}", "source": f"/videos/{row_index}.mp4",
            "caption": f"caption {row_index}", "status": "ok", "mode": "sequential", "rate": 1.0, "span": 4.0,
            "frame_indices": [0, 1, 2, 3, 4], "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0], "decoder": "pyav",
            "vtok": rng.integers(0, 64, (5, 8, 8)).astype(np.uint16),
            "ttok": rng.integers(0, 300, 6).astype(np.int32), **extra}


def test_shard_assembly_keeps_one_row_per_key_under_replays(tmp_path):
    good = [_clip_row(i, c) for i in range(3) for c in range(2)]
    failed_input = {"row_index": 3, "key": "v3_input", "video_id": "vid3", "source": "/videos/3.mp4",
                    "status": "error", "stage": "decode", "reason": "not_a_video", "error": "no video stream"}
    timed_out = dict(_clip_row(2, 1), status="error", stage="tokenize", reason="tokenize_transient", error="oom")
    # a replayed task delivers every clip again, in another order; a retried clip first failed, then worked
    replayed = good[::-1] + good + [failed_input, dict(failed_input), timed_out]
    record = ShardWriter(tmp_path / "a", LAYOUT).write(0, replayed, inputs=4)
    reference = ShardWriter(tmp_path / "b", LAYOUT).write(0, good + [failed_input], inputs=4)
    assert record["samples"] == 6 and record["inputs_failed"] == 1 and record["inputs_with_samples"] == 3
    assert record["sha256"] == reference["sha256"]           # the same bytes as a build without replays
    # a duplicated task writes the same shard again: the driver commits the first, the other is garbage
    duplicate = ShardWriter(tmp_path / "a", LAYOUT).write(0, good + [failed_input], inputs=4)
    with RunLease(tmp_path / "a") as lease:
        log = CommitLog(tmp_path / "a")
        log.start_epoch(lease.epoch)
        assert log.commit([record, duplicate], lease) == [record]
    index, ledger = read_index(tmp_path / "a"), read_ledger(tmp_path / "a")
    assert sorted(index.key) == sorted(r["key"] for r in good) and not index.key.duplicated().any()
    assert list(ledger.reason) == ["not_a_video"]
    assert len(read_records(tmp_path / "a")) == 1
    assert collect_garbage(Location(tmp_path / "a"), older_than_s=0)["removed"] == 3
    assert len(list((tmp_path / "a" / "shards").glob("*.tar"))) == 1
    samples = list(wds.WebDataset(shard_urls(tmp_path / "a"), shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(r["key"] for r in good)
    assert verify_dataset(tmp_path / "a")["problems"] == [f"{(tmp_path / 'a').as_posix()}/dataset.json is missing"]


def _config(**changes) -> BuildConfig:
    return with_overrides(BuildConfig(), **{"size": 64, "mode": "sequential", "inputs_per_shard": 2, "text_slot": 24,
                                            "tokenize_batch": 8, "gc_grace_s": 0, **changes})


def _facts(ds) -> tuple[list, list]:
    """What must not depend on how the build ran: the index rows (without attempt-specific names) and
    the ledger's (input, stage, reason) rows."""
    index = read_index(ds).drop(columns=[]).sort_values("key").reset_index(drop=True)
    ledger = read_ledger(ds)
    return (index.to_dict("records"),
            sorted(zip(ledger.row_index.tolist(), ledger.stage.tolist(), ledger.reason.tolist())))


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def wide_manifest(corpus, tmp_path_factory) -> Path:
    """40 inputs: the corpus's rows repeated (a video under several captions, as MSR-VTT has)."""
    df = pd.read_parquet(corpus)
    rows = pd.concat([df] * (40 // len(df) + 1), ignore_index=True).iloc[:40].copy()
    rows["caption"] = [f"{c} (take {i})" if isinstance(c, str) else c for i, c in enumerate(rows["caption"])]
    path = tmp_path_factory.mktemp("wide") / "manifest.parquet"
    rows.drop(columns=[c for c in ("id",) if c in rows.columns]).to_parquet(path)
    return path


def _when_committed(out, n: int, action, timeout_s: float = 300) -> threading.Event:
    """Run `action` in a thread once the build at `out` has committed `n` shards (or give up)."""
    done = threading.Event()

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if len(read_records(out)) >= n:
                    action()
                    done.set()
                    return
            except (OSError, ValueError):
                pass   # the log is being written
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return done


def _fractional_shares_with_a_tokenizer_killed(manifest, image_tokenizer, text_tokenizer, out, local,
                                               start_local_ray):
    """2 declared GPUs and a share of 0.4: two workers on each GPU (five would leave one unplaceable and
    its shards waiting forever). One worker is killed for good mid-build: its callers move to another,
    the pool replaces it, and the dataset equals the in-process build's."""
    import ray

    start_local_ray(num_cpus=4, num_gpus=2, log_to_driver=False)

    def kill_a_tokenizer():
        names = [n for n in ray.util.list_named_actors() if n.startswith("clipforge-tokenizer-")]
        ray.kill(ray.get_actor(sorted(names)[0]), no_restart=True)

    killed = _when_committed(out, 2, kill_a_tokenizer)
    info = build(str(manifest), str(out), str(image_tokenizer), str(text_tokenizer),
                 _config(runner="ray", tokenize_gpus=0.4, commit_every_s=0), progress=False)
    progress = json.loads(Location(str(out)).read_text("progress.json"))
    assert killed.is_set(), "no tokenizer was killed while the build ran"
    tokenizers = progress["workers"]["tokenize"]
    assert sorted({name.rsplit(":", 1)[1] for name in tokenizers}) == ["gpu0", "gpu1"], tokenizers
    assert len(tokenizers) >= 3 and all(calls > 0 for calls in tokenizers.values()), tokenizers
    assert info["funnel"]["accounted"] and info["funnel"]["inputs"] == 40 and info["funnel"]["samples"] > 0
    assert not any("tokenize_transient" in k for k in info["funnel"]["failures"]), info["funnel"]
    ray.shutdown()
    build(str(manifest), str(local), str(image_tokenizer), str(text_tokenizer), _config(runner="local"),
          progress=False)
    assert _facts(out) == _facts(local)


@pytest.mark.ray
@pytest.mark.slow
def test_fractional_gpu_shares_complete_and_a_killed_tokenizer_costs_nothing(wide_manifest, image_tokenizer,
                                                                            text_tokenizer, tmp_path, fresh_ray,
                                                                            start_local_ray):
    _fractional_shares_with_a_tokenizer_killed(wide_manifest, image_tokenizer, text_tokenizer, tmp_path / "ds",
                                               tmp_path / "local", start_local_ray)


@pytest.mark.ray
@pytest.mark.slow
def test_on_s3_fractional_gpu_shares_complete_and_a_killed_tokenizer_costs_nothing(
        wide_manifest, image_tokenizer, text_tokenizer, s3_server, tmp_path, fresh_ray, start_local_ray):
    _fractional_shares_with_a_tokenizer_killed(wide_manifest, image_tokenizer, text_tokenizer, "s3://datasets/gpu",
                                               tmp_path / "local", start_local_ray)


def test_tokenizer_workers_are_planned_per_gpu_so_every_one_can_be_placed():
    from clipforge.jobs.ray_build import tokenizer_worker_count

    def nodes(*gpus):
        return [{"Alive": True, "Resources": {"GPU": g, "CPU": 8}} for g in gpus]

    assert tokenizer_worker_count(BuildConfig(tokenize_gpus=0.4), nodes(2)) == 4          # not 5: a share is never split
    assert tokenizer_worker_count(BuildConfig(tokenize_gpus=0.25), nodes(2, 1, 0)) == 12
    assert tokenizer_worker_count(BuildConfig(tokenize_gpus=1.0), nodes(8, 8)) == 16
    assert tokenizer_worker_count(BuildConfig(tokenize_gpus=2.0), nodes(3, 4)) == 3
    assert tokenizer_worker_count(BuildConfig(tokenize_gpus=0.5), [{"Alive": False, "Resources": {"GPU": 4}}]) == 0


def _three_node_cluster():
    """A head and two worker nodes of 1 CPU each. Ray gives a node 30 s to register, which a loaded
    2-core machine can miss: starting the cluster (not the build under test) is tried a second time."""
    from ray.cluster_utils import Cluster

    for attempt in range(2):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=1)
            workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            return cluster, workers
        except Exception:   # noqa: BLE001 — Ray raises a bare Exception for a node that timed out starting
            cluster.shutdown()
            if attempt:
                raise


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_worker_node_mid_build_loses_and_duplicates_nothing(wide_manifest, image_tokenizer,
                                                                     text_tokenizer, tmp_path, fresh_ray):
    import ray

    cluster, workers = _three_node_cluster()
    out = tmp_path / "ds"
    removed = threading.Event()

    def remove_a_worker_when_shards_commit():
        deadline = time.time() + 300
        while time.time() < deadline:
            if len(list((out / "commits").glob("*-0*.jsonl"))) >= 2:
                cluster.remove_node(workers[0], allow_graceful=False)   # not gracefully: as if it died
                removed.set()
                return
            time.sleep(0.05)

    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        killer = threading.Thread(target=remove_a_worker_when_shards_commit, daemon=True)
        killer.start()
        info = build(str(wide_manifest), str(out), str(image_tokenizer), str(text_tokenizer),
                     _config(runner="ray"), address=cluster.address, progress=False)
        killer.join(timeout=5)
        # resharding and verifying run as Ray tasks on the (now smaller) cluster too
        from clipforge.jobs.reshard import ReshardConfig, reshard
        resharded = tmp_path / "re"
        report = reshard([str(out)], str(resharded), ReshardConfig(samples_per_shard=5, shuffle_seed=2,
                                                                    val_fraction=0.3), progress=False,
                         address=cluster.address)
        checked = verify_dataset(resharded, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set(), "the node was not removed while the build ran"
    assert len(read_records(out)) == 20
    assert info["funnel"]["accounted"] and info["funnel"]["inputs"] == 40
    local = tmp_path / "local"
    build(str(wide_manifest), str(local), str(image_tokenizer), str(text_tokenizer), _config(runner="local"),
          progress=False)
    assert _facts(out) == _facts(local)
    index = read_index(out)
    assert not index.key.duplicated().any()
    assert verify_dataset(out)["problems"] == []
    assert checked["problems"] == [] and checked["samples"] == len(index) == report["samples_out"]
    assert sorted(read_index(resharded).key) == sorted(index.key)


@pytest.mark.ray
@pytest.mark.slow
def test_on_s3_a_node_added_mid_build_runs_shards_and_a_removed_one_loses_nothing(
        wide_manifest, image_tokenizer, text_tokenizer, s3_server, tmp_path, fresh_ray):
    """The output on the S3 server on loopback; a head and one worker node of 1 CPU. After the first commit
    the worker is removed without grace and a node with a GPU joins: the new node's id shows in
    progress.json (it ran shard tasks), a tokenizer worker on its GPU encoded frames, and the dataset
    equals the in-process build's."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=False)
    cluster.add_node(num_cpus=1)
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    added: list = []
    out = "s3://datasets/elastic"
    long_manifest = tmp_path / "long.parquet"   # 160 inputs: the build outlasts a node's start
    df = pd.read_parquet(wide_manifest)
    pd.concat([df.assign(caption=df["caption"].astype(str) + f" [{n}]") for n in range(4)],
              ignore_index=True).to_parquet(long_manifest)
    result: dict = {}

    def run_build():
        try:
            result["info"] = build(str(long_manifest), out, str(image_tokenizer), str(text_tokenizer),
                                   _config(runner="ray", commit_every_s=0), address=cluster.address, progress=False)
        except BaseException as err:   # noqa: BLE001 — reported by the main thread
            result["error"] = err

    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        builder = threading.Thread(target=run_build)
        builder.start()
        swapped = _when_committed(out, 1, lambda: None)
        swapped.wait(timeout=300)
        if builder.is_alive():   # Ray starts nodes with signals: only from the main thread
            cluster.remove_node(worker, allow_graceful=False)
            added.append(cluster.add_node(num_cpus=2, num_gpus=1))   # a GPU joins: the tokenizer pool grows
        builder.join(timeout=600)
        progress = json.loads(Location(out).read_text("progress.json"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in result, result.get("error")
    info = result["info"]
    assert swapped.is_set() and added, "the nodes were not swapped while the build ran"
    assert added[0].node_id in progress["workers"]["nodes"], progress["workers"]
    assert sum(progress["workers"]["tokenize"].values()) > 0, progress["workers"]   # the joined GPU's worker encoded
    assert info["funnel"]["accounted"] and info["funnel"]["inputs"] == 160
    local = tmp_path / "local"
    build(str(long_manifest), str(local), str(image_tokenizer), str(text_tokenizer), _config(runner="local"),
          progress=False)
    assert _facts(out) == _facts(local)
    assert verify_dataset(out)["problems"] == []


def test_build_from_s3_videos_to_an_s3_dataset(corpus, image_tokenizer, text_tokenizer, s3_server, tmp_path,
                                               monkeypatch):
    monkeypatch.chdir(tmp_path)   # anything written "locally" by mistake would land here
    videos = Location("s3://videos/corpus")
    df = pd.read_parquet(corpus)
    urls = []
    for path in df["video"]:
        name = Path(path).name
        if Path(path).exists():
            videos.write_bytes(name, Path(path).read_bytes())
        urls.append(f"s3://videos/corpus/{name}")   # a row whose file never existed stays missing
    df["video"] = urls
    manifest = Location("s3://videos")
    import io
    buf = io.BytesIO()
    df.to_parquet(buf)
    manifest.write_bytes("manifest.parquet", buf.getvalue())

    info = build("s3://videos/manifest.parquet", "s3://datasets/ds", str(image_tokenizer), str(text_tokenizer),
                 _config(runner="local"), progress=False)
    funnel = info["funnel"]
    assert funnel["accounted"] and funnel["inputs"] == len(df) and funnel["samples"] > 0
    # the broken rows fail for their own reasons; the row whose object is absent is `missing`
    ledger = read_ledger("s3://datasets/ds")
    missing_rows = [i for i, p in enumerate(pd.read_parquet(corpus)["video"]) if not Path(p).exists()]
    assert set(ledger.loc[ledger.reason == "missing", "row_index"]) == set(missing_rows)

    register_webdataset_schemes()
    samples = [decode_sample(s) for s in wds.WebDataset(shard_urls("s3://datasets/ds"), shardshuffle=False,
                                                          empty_check=False)]
    assert len(samples) == funnel["samples"] and all(s["vtok"].shape == (5, 8, 8) for s in samples)
    assert all(s["meta"]["source"].startswith("s3://videos/corpus/") for s in samples)

    env = dict(os.environ)
    cli = [sys.executable, "-m", "clipforge.jobs.cli"]
    verify = subprocess.run(cli + ["verify", "s3://datasets/ds"], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["samples"] == funnel["samples"]
    reshard = subprocess.run(cli + ["reshard", "s3://datasets/ds", "s3://datasets/re", "--samples-per-shard", "2",
                                    "--shuffle-seed", "3", "--val-fraction", "0.4", "--quiet"],
                             capture_output=True, text=True, env=env)
    assert reshard.returncode == 0, reshard.stderr
    index = read_index("s3://datasets/re")
    assert sorted(index.key) == sorted(s["key"] for s in samples)
    assert not set(index[index.shard.str.startswith("train")].video_id) & set(index[index.shard.str.startswith("val")].video_id)
    verify = subprocess.run(cli + ["verify", "s3://datasets/re"], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert list(tmp_path.iterdir()) == []          # nothing was created on local disk


def test_a_build_where_nothing_succeeds_exits_non_zero(image_tokenizer, text_tokenizer, tmp_path):
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"video": [str(tmp_path / f"gone{i}.mp4") for i in range(3)],
                  "caption": ["a red circle moves left"] * 3}).to_csv(manifest, index=False)
    res = subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "build", str(manifest), "--out",
                          str(tmp_path / "ds"), "--image-tokenizer", str(image_tokenizer), "--text-tokenizer",
                          str(text_tokenizer), "--size", "64", "--text-slot", "24", "--runner", "local", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "no input produced a sample" in res.stderr, res.stderr
    funnel = json.loads(res.stdout[res.stdout.index("{"):])["funnel"]
    assert funnel["inputs"] == 3 and funnel["samples"] == 0 and funnel["failures"] == {"decode/missing": 3}
    # the driver streams the manifest to the tasks: nothing is staged in the output
    assert not (tmp_path / "ds" / "manifest.parquet").exists()


def test_resume_with_another_configuration_is_refused(corpus, image_tokenizer, text_tokenizer, tmp_path):
    out = tmp_path / "ds"
    build(str(corpus), str(out), str(image_tokenizer), str(text_tokenizer), _config(runner="local"), progress=False)
    with pytest.raises(ValueError, match="inputs_per_shard"):
        build(str(corpus), str(out), str(image_tokenizer), str(text_tokenizer),
              _config(runner="local", inputs_per_shard=3), resume=True, progress=False)
    # what only changes how the run goes (workers, time limits) may change on resume
    build(str(corpus), str(out), str(image_tokenizer), str(text_tokenizer),
          _config(runner="local", shard_tasks=3), resume=True, progress=False)
