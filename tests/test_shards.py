"""Shards you can trust: exactly-once resume after SIGKILL, retries, safe reading, many readers.
(Resharding: tests/test_reshard.py.)"""
import io
from pathlib import Path
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from clipforge.jobs.build import build, with_overrides
from clipforge.jobs.reshard import ReshardConfig, reshard
from clipforge.pipeline.storage.samples import decode_sample
from clipforge.pipeline.storage.shards import read_index, read_ledger, read_records, shard_urls
from clipforge.pipeline.storage.tarwriter import FastTarWriter, read_ustar_header
from clipforge.jobs.verify import verify_dataset
from clipforge.pipeline.storage.verify import iter_tar_samples

# the command-line form of `reference_config` (tests/conftest.py)
FLAGS = ["--size", "64", "--mode", "both", "--inputs-per-shard", "2", "--text-slot", "24", "--runner", "local",
         "--commit-every", "0", "--quiet"]


def _committed(out) -> int:
    try:
        return len(read_records(out))
    except (OSError, ValueError):
        return 0


def _cli_build(corpus, out, image_tokenizer, text_tokenizer, *extra):
    return [sys.executable, "-m", "clipforge.jobs.cli", "build", str(corpus), "--out", str(out), "--image-tokenizer",
            str(image_tokenizer), "--text-tokenizer", str(text_tokenizer), *FLAGS, *extra]


def _ledger_facts(ds):
    led = read_ledger(ds)
    return sorted(zip(led.row_index, led.stage, led.reason, led.key))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0, 1, 3])
def test_sigkill_then_resume_equals_an_uninterrupted_build(reference_dataset, corpus, image_tokenizer,
                                                           text_tokenizer, tmp_path, kill_after):
    out = tmp_path / "ds"
    proc = subprocess.Popen(_cli_build(corpus, out, image_tokenizer, text_tokenizer),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if _committed(out) >= kill_after and (kill_after or (out / "shards").exists()):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the kill really interrupted the build: its record of completion was never written
    info_path = out / "dataset.json"
    assert not info_path.exists() or json.loads(info_path.read_text())["complete"] is False
    assert len(read_records(out)) < len(read_records(reference_dataset)) or kill_after == 3
    res = subprocess.run(_cli_build(corpus, out, image_tokenizer, text_tokenizer, "--resume"),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert tar_bytes(out) == tar_bytes(reference_dataset)
    # parts of killed attempts are left to `clipforge gc` (they are younger than its default grace)
    gc = subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "gc", str(out), "--older-than", "0"],
                        capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    # then they are gone: every tar, index and ledger part on disk is named by a record
    named = {f["name"] for r in read_records(out) for f in r["files"].values()}
    on_disk = {str(p.relative_to(out)) for sub in ("shards", "index", "ledger") for p in (out / sub).iterdir()
               if not p.name.endswith(".json")}
    assert on_disk == named
    assert not list(out.rglob("*.tmp*"))
    pd.testing.assert_frame_equal(read_index(out), read_index(reference_dataset))
    assert _ledger_facts(out) == _ledger_facts(reference_dataset)
    assert verify_dataset(out)["problems"] == []


def tar_bytes(ds) -> dict:
    return {r["shard"]: (ds / r["files"]["tar"]["name"]).read_bytes() for r in read_records(ds)}


def test_retry_failed_redoes_only_shards_with_transient_failures(reference_dataset, reference_config, corpus,
                                                                 image_tokenizer, text_tokenizer, tmp_path):
    import shutil
    out = tmp_path / "ds"
    shutil.copytree(reference_dataset, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    build(str(corpus), str(out), str(image_tokenizer), str(text_tokenizer), reference_config, retry_failed=True,
          progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert before == after        # only permanent failures (missing, empty, not a video): nothing is redone

    # a build whose decodes all time out (a transient reason), retried twice: attempts are counted
    flaky = tmp_path / "flaky"
    hurried = with_overrides(reference_config, decode_timeout_s=0.001)
    build(str(corpus), str(flaky), str(image_tokenizer), str(text_tokenizer), hurried, progress=False)
    first = read_ledger(flaky)
    timed_out = set(first.loc[first.reason == "timeout", "row_index"])
    assert timed_out and (first.loc[first.reason == "timeout", "attempts"] == 1).all()
    build(str(corpus), str(flaky), str(image_tokenizer), str(text_tokenizer), hurried, retry_failed=True,
          progress=False)
    second = read_ledger(flaky)
    # every input failed the first time, so every timeout now is a second attempt (a 1 ms limit is a race:
    # which inputs time out, and which fail faster for their own reason, may differ between runs)
    assert len(first) == 10 and (second.reason == "timeout").any()
    assert (second.loc[second.reason == "timeout", "attempts"] == 2).all()
    # with a sane time limit the retry succeeds and gives exactly the uninterrupted build's shards
    build(str(corpus), str(flaky), str(image_tokenizer), str(text_tokenizer), reference_config, retry_failed=True,
          progress=False)
    assert tar_bytes(flaky) == tar_bytes(reference_dataset)
    assert not (read_ledger(flaky).reason == "timeout").any()
    assert verify_dataset(flaky)["problems"] == []


@pytest.fixture(scope="module")
def resharded(reference_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("resharded") / "ds"
    reshard([str(reference_dataset)], str(out), ReshardConfig(samples_per_shard=4, shuffle_seed=3), progress=False)
    return out


@pytest.fixture(params=["built", "resharded"])
def built_or_resharded(request, reference_dataset, resharded):
    """Each reader test runs on the dataset as built and as resharded into 4-sample shards."""
    return reference_dataset if request.param == "built" else resharded


def test_readers_webdataset_wids_and_plain_tar(built_or_resharded):
    import wids
    root = built_or_resharded
    tars = shard_urls(root, None)
    samples = [decode_sample(s) for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    assert sorted(s["key"] for s in samples) == sorted(read_index(root).key)
    assert all(s["vtok"].shape == (5, 8, 8) for s in samples)
    listing = json.loads((root / "wids" / "train.json").read_text())
    shards = [{"url": str((root / "wids" / e["url"]).resolve()), "nsamples": e["nsamples"]}
              for e in listing["shardlist"]]
    ds = wids.ShardListDataset(shards, transformations=[])
    assert len(ds) == len(read_index(root))   # the index and the wids listing agree
    keys = set()
    for i in range(len(ds)):
        s = ds[i]
        keys.add(s["__key__"])
        raw = s[".vtok.npy"]
        vtok = np.load(raw if hasattr(raw, "read") else io.BytesIO(raw), allow_pickle=False)
        assert vtok.shape == (5, 8, 8) and vtok.dtype == np.uint16
    assert keys == set(read_index(root).key)
    for record in read_records(root, None):
        tar = root / record["files"]["tar"]["name"]
        out = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
        assert len(out) == 4 * record["samples"]


@pytest.mark.ray
def test_ray_data_reads_the_shards(built_or_resharded, start_local_ray):
    import ray
    dataset = built_or_resharded
    start_local_ray(num_cpus=2)
    # the committed tars only: shards/ may also hold parts of attempts that were never committed
    stale = dataset / "shards" / "train-000000.0123456789.tar"
    stale.write_bytes(Path(shard_urls(dataset)[0]).read_bytes())
    try:
        ds = ray.data.read_webdataset(shard_urls(dataset), decoder=None)
        keys = [row["__key__"] for row in ds.iter_rows()]
    finally:
        stale.unlink()
    assert sorted(keys) == sorted(read_index(dataset).key)


def _tar_with(members, format=tarfile.DEFAULT_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("members", [
    [("../evil.json", b"{}", "file")],
    [("/abs/k.json", b"{}", "file")],
    [("k.json", b"", "symlink")],
])
def test_unsafe_members_are_refused(tmp_path, members):
    path = tmp_path / "bad.tar"
    path.write_bytes(_tar_with(members))
    with pytest.raises(ValueError):
        list(iter_tar_samples(path))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, "fast"])
def test_tar_headers_are_told_from_member_data(fmt):
    # A short JSON member padded with NULs has a NUL type flag and octal-looking bytes where a header's
    # size sits; an index offset that lands there must read as "not a header", never as a member.
    data = json.dumps({"frames": [0, 4, 8], "mode": "sequential", "n": 12345670}).encode()
    if fmt == "fast":
        buf = io.BytesIO()
        FastTarWriter(buf).write({"__key__": "clip-0001", "json": data, "txt": b"a red circle"})
        blob = buf.getvalue()
    else:
        blob = _tar_with([("clip-0001.json", data, "file"), ("clip-0001.txt", b"a red circle", "file")], fmt)
    headers = []
    pos = 0
    while pos < len(blob) and blob[pos:pos + 512] != bytes(512):
        member = read_ustar_header(blob[pos:pos + 512])
        assert member is not None, f"a real header at {pos} was refused"
        headers.append(member)
        name, key, size, kind = member
        data_start = pos + 512
        pos = data_start + size + (-size % 512)
        assert read_ustar_header(blob[data_start:data_start + 512]) is None, f"member data at {data_start} read as a header"
    plain = [(name, key, size) for name, key, size, kind in headers if kind in (b"0", b"\0")]
    assert plain == [("clip-0001.json", "clip-0001", len(data)), ("clip-0001.txt", "clip-0001", 12)]
