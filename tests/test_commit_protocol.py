"""The commit protocol under concurrency: two attempts of one shard, cleanup and completion interleaved at
every step, a store that fails reads, two drivers on one dataset. On a local disk and on a real
S3-compatible server on loopback."""
from __future__ import annotations

import itertools
import subprocess
import sys
import threading

import numpy as np
import pytest
import webdataset as wds

from clipforge.jobs.verify import verify_dataset
from clipforge.pipeline.storage.commits import (CommitLog, LeaseHeld, LeaseLost, RunLease, collect_garbage,
                                                fingerprint_sha256)
from clipforge.pipeline.storage.dataset import DatasetInfo, funnel_from_records, write_wids_index
from clipforge.pipeline.storage.fs import Location, register_webdataset_schemes
from clipforge.pipeline.storage.shards import ShardWriter, read_index, read_records, shard_urls

LAYOUT = {"frames": 5, "frame_size": 64, "tokens_h": 8, "tokens_w": 8, "text_slot": 24, "image_vocab": 64}
TOKENIZERS = {"image": {"id": "vq", "sha256": "a" * 64}, "text": {"id": "spm", "sha256": "b" * 64}}
FINGERPRINT = {"format_version": 3, "inputs": 2, "layout": LAYOUT, "tokenizers": TOKENIZERS}
SHA = fingerprint_sha256(FINGERPRINT)


def _rows(failed: bool = False) -> list[dict]:
    if failed:   # a late attempt on a partitioned node: every input failed to fetch
        return [{"row_index": i, "key": f"k{i}_input", "video_id": f"v{i}", "source": f"s3://v/{i}.mp4",
                 "status": "error", "stage": "decode", "reason": "fetch_error", "error": "connection reset"}
                for i in range(2)]
    return [{"row_index": i, "clip_index": 0, "key": f"k{i}_seq00", "video_id": f"v{i}", "row_id": f"r{i}",
             "source": f"/v/{i}.mp4", "caption": "a red circle", "status": "ok", "mode": "sequential", "rate": 1.0,
             "span": 4.0, "frame_indices": [0, 1, 2, 3, 4], "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0],
             "decoder": "pyav", "tokenizers": TOKENIZERS, "vtok": np.full((5, 8, 8), i, np.uint16),
             "ttok": np.arange(4, dtype=np.int32)} for i in range(2)]


class FlakyLocation(Location):
    """A Location whose reads of the commit log fail `failures` times with what a throttling store says."""

    def __init__(self, url, failures: int):
        super().__init__(url)
        self.failures = failures

    def read_text(self, name: str) -> str:
        if name.startswith("commits/") and self.failures > 0:
            self.failures -= 1
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return super().read_text(name)

    def __reduce__(self):
        return (FlakyLocation, (self.url, self.failures))


def _complete(root: Location, commit_log: CommitLog) -> None:
    """What the driver writes when a build ends: the funnel and wids from the accepted records."""
    records = list(commit_log.effective.values())
    info = DatasetInfo.started(FINGERPRINT, "now")
    info.data.update(complete=True, tokenizers=TOKENIZERS, funnel=funnel_from_records(records, 2))
    info.write(root)
    write_wids_index(root, records)


def _check_readers(root: Location, stage: str) -> None:
    records = read_records(root)
    if not records:
        return
    assert len(records) == 1, stage
    # no committed byte is deleted: every part the accepted record names is there, whole
    for part in records[0]["files"].values():
        assert root.size(part["name"]) == part["bytes"], (stage, part)
    if records[0]["samples"]:
        samples = list(wds.WebDataset(shard_urls(root), shardshuffle=False, empty_check=False))
        assert sorted(s["__key__"] for s in samples) == ["k0_seq00", "k1_seq00"], stage
        assert sorted(read_index(root).key) == ["k0_seq00", "k1_seq00"], stage
    if root.exists("wids/train.json"):   # the wids index names the committed tar, and wids reads it
        import json
        listed = json.loads(root.read_text("wids/train.json"))["shardlist"]
        expected = [records[0]["files"]["tar"]["name"]] if records[0]["samples"] else []   # wids skips empty tars
        assert [e["url"].removeprefix("../") for e in listed] == expected, stage
        if root.local and expected:
            import wids
            ds = wids.ShardListDataset(root.path("wids/train.json"))
            assert sorted(ds[i]["__key__"] for i in range(len(ds))) == ["k0_seq00", "k1_seq00"], stage
    if root.exists("dataset.json"):
        assert verify_dataset(root)["problems"] == [], stage


STEPS = ("write A", "commit A", "write B", "commit B")
ORDERS = [order for order in itertools.permutations(STEPS)
          if order.index("write A") < order.index("commit A") and order.index("write B") < order.index("commit B")]


def _cleanup_refused_while_driving(root: Location) -> None:
    """`clipforge gc` from another process while the driver holds the lease: refused, nothing deleted."""
    with pytest.raises(LeaseHeld):
        with RunLease(root, purpose="gc"):
            collect_garbage(root, older_than_s=0.0)


def _interleave(root: Location, order: tuple, b_failed: bool) -> None:
    writer = ShardWriter(root, LAYOUT, fingerprint=SHA)
    with RunLease(root) as lease:
        commit_log = CommitLog(root)
        commit_log.start_epoch(lease.epoch)
        records = {}
        for step in order:
            verb, who = step.split()
            if verb == "write":
                records[who] = writer.write(0, _rows(failed=(who == "B" and b_failed)), inputs=2)
            else:
                commit_log.commit([records[who]], lease)
            # cleanup tried, the default grace's cleanup by the driver itself, and completion, after every step
            _cleanup_refused_while_driving(root)
            collect_garbage(root)
            if commit_log.effective:
                _complete(root, commit_log)
            _check_readers(root, f"{order} after {step}")
        first = order.index("commit A") < order.index("commit B")
        winner = records["A" if first else "B"]
    # the driver is done: cleanup without grace removes the loser's parts and nothing else
    collect_garbage(root, older_than_s=0.0)
    _check_readers(root, f"{order} after cleanup")
    # a late third attempt writes after the run ended: young, so kept; never read
    late = writer.write(0, _rows(), inputs=2)
    assert collect_garbage(root)["kept_young"] == 3
    _check_readers(root, f"{order} after a late attempt")
    assert read_records(root)[0]["attempt"] == winner["attempt"] != late["attempt"]   # the first commit won, and stayed


@pytest.mark.parametrize("b_failed", [False, True], ids=["duplicate", "late-failed"])
def test_two_attempts_cleanup_and_completion_interleaved_locally(tmp_path, b_failed):
    for n, order in enumerate(ORDERS):
        _interleave(Location(tmp_path / f"ds{n}"), order, b_failed)


def test_two_attempts_cleanup_and_completion_interleaved_on_s3(s3_server):
    register_webdataset_schemes()
    for n, order in enumerate(ORDERS):
        _interleave(Location(f"s3://datasets/ds{n}"), order, b_failed=n % 2 == 1)


def test_a_failing_read_during_cleanup_deletes_nothing(tmp_path):
    root = Location(tmp_path / "ds")
    writer = ShardWriter(root, LAYOUT, fingerprint=SHA)
    with RunLease(root) as lease:
        commit_log = CommitLog(root)
        commit_log.start_epoch(lease.epoch)
        committed = writer.write(0, _rows(), inputs=2)
        commit_log.commit([committed], lease)
        stale = writer.write(0, _rows(), inputs=2)   # a duplicate attempt: garbage
        _complete(root, commit_log)
    files = sorted(p.name for p in (tmp_path / "ds").rglob("*") if p.is_file())
    # the store keeps failing: cleanup stops before deleting anything
    with pytest.raises(OSError, match="SLOW_DOWN"):
        collect_garbage(FlakyLocation(root.url, failures=10), older_than_s=0.0)
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*") if p.is_file()) == files
    # it fails once: the retried read sees the same log, and only the duplicate's parts go
    report = collect_garbage(FlakyLocation(root.url, failures=1), older_than_s=0.0)
    assert report["removed"] == 3
    assert all(not root.exists(f["name"]) for f in stale["files"].values())
    assert all(root.exists(f["name"]) for f in committed["files"].values())
    _check_readers(root, "after cleanup")
    # young garbage is kept: an attempt may still be writing
    young = writer.write(0, _rows(), inputs=2)
    assert collect_garbage(root, older_than_s=3600)["kept_young"] == 3
    assert all(root.exists(f["name"]) for f in young["files"].values())


def test_a_late_segment_from_a_fenced_driver_is_never_read(tmp_path):
    import time

    root = Location(tmp_path / "ds")
    writer = ShardWriter(root, LAYOUT, fingerprint=SHA)
    old = RunLease(root, ttl_s=0.4)
    old.acquire()
    old_log = CommitLog(root)
    old_log.start_epoch(old.epoch)
    old_log.commit([writer.write(0, _rows(), inputs=2)], old)
    # the old driver is partitioned past its lease; a new one takes over and starts epoch 2
    old._stop.set()   # its renewals stop reaching the store
    time.sleep(0.5)
    new = RunLease(root)
    new.acquire()
    assert set(CommitLog(root).start_epoch(new.epoch)) == {"train-000000"}
    late = writer.write(1, _rows(), inputs=2)
    with pytest.raises(LeaseLost):   # a driver that checks its lease stops committing
        old_log.commit([late], old)
    old_log.commit([late], lease=None)   # one that does not: its late segment is never read
    assert [r["shard"] for r in read_records(root)] == ["train-000000"]
    new.release()


def test_records_of_another_run_are_not_read(tmp_path):
    root = Location(tmp_path / "ds")
    with RunLease(root) as lease:
        commit_log = CommitLog(root)
        commit_log.start_epoch(lease.epoch)
        commit_log.commit([ShardWriter(root, LAYOUT, fingerprint="other-run").write(0, _rows(), inputs=2)], lease)
        DatasetInfo.started(FINGERPRINT, "now").write(root)
    assert read_records(root) == []


def test_a_second_driver_is_refused_while_the_lease_is_fresh(tmp_path):
    root = Location(tmp_path / "ds")
    with RunLease(root):
        with pytest.raises(LeaseHeld, match="in use by another clipforge build"):
            RunLease(root).acquire()
    RunLease(root).acquire()   # released: the next driver gets it


def test_racing_drivers_on_s3_one_wins(s3_server):
    root = Location("s3://datasets/race")
    results: list = []

    def take():
        lease = RunLease(root, settle_s=0.5)
        try:
            lease.acquire()
            results.append("won")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "won"]


def test_two_builds_on_one_out_at_once(corpus, image_tokenizer, text_tokenizer, tmp_path):
    cmd = [sys.executable, "-m", "clipforge.jobs.cli", "build", str(corpus), "--out", str(tmp_path / "ds"),
           "--image-tokenizer", str(image_tokenizer), "--text-tokenizer", str(text_tokenizer), "--size", "64",
           "--text-slot", "24", "--inputs-per-shard", "4", "--runner", "local", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], outs
    refused = next(err for code, _, err in outs if code == 2)
    # refused while the other runs, or, if it started after the other ended, as an existing dataset
    assert refused.count("\n") == 1 and ("in use" in refused or "already holds" in refused), refused
    assert verify_dataset(tmp_path / "ds")["problems"] == []


def _foreign_lease(root: Location, owner: str, renewed_ago_s: float) -> None:
    import json
    import time
    root.makedirs("lease")
    root.write_text("lease/000001.json", json.dumps({"epoch": 1, "owner": owner, "purpose": "build",
                                                     "renewed": time.time() - renewed_ago_s, "ttl_s": 120,
                                                     "released": False}))


def test_a_fresh_lease_of_another_machine_needs_take_over_and_a_stale_one_does_not(tmp_path):
    root = Location(tmp_path / "ds")
    _foreign_lease(root, "another-host:4242:abcd", renewed_ago_s=5)
    with pytest.raises(LeaseHeld, match="another-host:4242"):
        RunLease(root).acquire()
    lease = RunLease(root, take_over=True)
    assert lease.acquire() == 2
    lease.release()
    stale = Location(tmp_path / "stale")
    _foreign_lease(stale, "another-host:4242:abcd", renewed_ago_s=600)   # expired: taken without a flag
    lease = RunLease(stale)
    assert lease.acquire() == 2
    lease.release()


def test_a_driver_killed_on_this_machine_does_not_hold_its_lease(tmp_path):
    import socket

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    root = Location(tmp_path / "ds")
    _foreign_lease(root, f"{socket.gethostname()}:{dead_pid}:abcd", renewed_ago_s=1)
    lease = RunLease(root)
    assert lease.acquire() == 2
    lease.release()


def test_resume_after_an_upgrade_is_refused_naming_the_version_that_differs():
    from clipforge.pipeline.storage.dataset import DatasetError, code_versions

    fingerprint = {**FINGERPRINT, "code": code_versions()}
    info = DatasetInfo.started(fingerprint, "now")
    info.check_resume(fingerprint)   # the same code: accepted
    upgraded = {**fingerprint, "code": {**fingerprint["code"], "av": "99.0.0"}}
    with pytest.raises(DatasetError, match=r"code differs .*av: was .*, now '99.0.0'"):
        info.check_resume(upgraded)
    assert "ffmpeg" in fingerprint["code"] and "clipforge" in fingerprint["code"]


def test_gc_drops_superseded_epochs_and_leases_and_readers_see_the_same(tmp_path):
    root = Location(tmp_path / "ds")
    writer = ShardWriter(root, LAYOUT, fingerprint=SHA)
    for shard in range(3):   # three drivers in turn, each committing one shard
        with RunLease(root) as lease:
            log = CommitLog(root)
            log.start_epoch(lease.epoch)
            log.commit([writer.write(shard, _rows(), inputs=2)], lease)
    before = [r["attempt"] for r in read_records(root)]
    assert len(before) == 3 and len(list((tmp_path / "ds" / "commits").iterdir())) == 9
    with RunLease(root, purpose="gc"):
        collect_garbage(root, older_than_s=0.0)
    assert sorted(p.name for p in (tmp_path / "ds" / "commits").iterdir()) == [
        "000003-00000001.jsonl", "000003-checkpoint.jsonl", "epoch-000003.json"]
    assert sorted(p.name for p in (tmp_path / "ds" / "lease").iterdir()) == ["000004.json"]
    assert [r["attempt"] for r in read_records(root)] == before
