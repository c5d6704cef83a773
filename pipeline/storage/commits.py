"""What readers see of a dataset, and who may change it: attempt parts, a run lease, a commit log.

(One file over 400 lines on purpose: the whole commit protocol (parts, log, lease, garbage
collection) must be read together to check that a retry or a second driver can never change what
readers see.)

Spark's output committer, Delta's log and datatrove's completion markers share one idea: workers may
write what they like under names of their own, but exactly one party decides, once, which of those
writes count. Here:

- **Attempt parts.** A task writes each part of its shard (tar, index, ledger) under a name of its own,
  `shards/train-000000.<attempt>.tar` and so on, as one whole object, and returns the shard's *record*
  (the parts' names, sizes and sha256, and the shard's counts) to the driver. It never commits.
- **The commit log** (`commits/`) is written by the driver alone. It accepts the first good record of a
  shard and appends it to a segment `commits/<epoch>-<seq>.jsonl`; a later record of that shard is
  accepted only when it names the attempt it replaces (`--retry-failed`). A second, late or duplicated
  attempt is never committed, so it can never change what readers see. Every record carries the hash of
  the run's fingerprint; readers accept only records whose hash matches `dataset.json`'s.
- **The run lease** (`lease/<epoch>.json`): one driver per dataset at a time. A driver takes the next
  epoch (created exclusively on a local disk; on object stores written, left to settle and read back),
  renews it while it runs and releases it at the end. A second driver is refused with one line while the
  lease is fresh. Taking the lease starts a commit epoch: the new driver writes a checkpoint of every
  accepted record (`commits/<epoch>-checkpoint.jsonl`) and then `commits/epoch-<epoch>.json`; from then
  on readers read that checkpoint and the new epoch's segments only, so a segment that a driver of an
  older epoch writes late (one partitioned past its lease) is never read.
- **Garbage collection** removes only attempt parts that no accepted record names and that are older than
  a grace period, and it stops at the first read error: a read that fails is not a missing object.

Readers need one listing of `commits/` and one GET per segment (fetched in parallel), whatever the
number of shards, instead of one GET per shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import pyarrow.fs as pafs

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.fs import Location, as_location

RECORD_FORMAT = "clipforge-shard-record-v3"
LEGACY_RECORD_FORMAT = "clipforge-shard-record-v2"
COMMITS = "commits"
LEASES = "lease"
PART_FOLDERS = ("shards", "index", "ledger")
# an attempt part: `<split>-<6 digits>.<10 hex>.<tar|parquet>`; nothing else is ever garbage
ATTEMPT_PART = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.[0-9a-f]{10}\.(tar|parquet)$")
TEMP_NAME = re.compile(r"\.tmp\d+$")   # `Location.write_bytes` writes `NAME.tmp<pid>` before its rename
SEGMENT = re.compile(r"^(\d{6})-(\d{8}|checkpoint)\.jsonl$")
EPOCH_FILE = re.compile(r"^epoch-(\d{6})\.json$")
READ_THREADS = 32
DEFAULT_GRACE_S = 900.0


class LeaseHeld(ClipforgeError):
    """Another driver holds the dataset (a user-facing refusal)."""


class LeaseLost(ClipforgeError):
    """This driver's lease expired or was taken over: it must stop committing."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def shard_number(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_sha256(fingerprint: dict) -> str:
    """The hash every record of a run carries: canonical JSON of the fingerprint."""
    return sha256_bytes(json.dumps(fingerprint, sort_keys=True, default=str).encode())


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


def write_attempt(out: Location, name: str, blobs: dict[str, bytes], fields: dict, fingerprint: str) -> dict:
    """Write one attempt's parts under names of its own and return its record, uncommitted.

    `blobs` maps "tar", "index", "ledger" to bytes. Each part is one whole object (on a local disk a
    temporary name, fsync, rename); nothing here is visible to readers until the driver commits the record.
    """
    attempt = new_attempt()
    names = {"tar": f"shards/{name}.{attempt}.tar", "index": f"index/{name}.{attempt}.parquet",
             "ledger": f"ledger/{name}.{attempt}.parquet"}
    for part, blob in blobs.items():
        out.write_bytes(names[part], blob)
    return {"format": RECORD_FORMAT, "shard": name, "attempt": attempt, "fingerprint": fingerprint,
            "files": {part: {"name": names[part], "bytes": len(blob), "sha256": sha256_bytes(blob)}
                      for part, blob in blobs.items()},
            **fields}


def accept(effective: dict[str, dict], record: dict) -> bool:
    """Apply one record to the accepted set: the first record of a shard wins; a later one only when it
    names the attempt it replaces. The same rule for the driver deciding and every reader replaying."""
    held = effective.get(record["shard"])
    if held is None or (record.get("replaces") is not None and record.get("replaces") == held["attempt"]):
        effective[record["shard"]] = record
        return True
    return False


def _is_missing(err: BaseException) -> bool:
    return isinstance(err, FileNotFoundError)


class CommitLog:
    """The append-only log of accepted shard records of one dataset (see the module's docstring)."""

    def __init__(self, out: str | os.PathLike | Location, endpoint: str | None = None):
        self.out = as_location(out, endpoint)
        self.epoch: int | None = None      # set by `start_epoch`: only then may this object append
        self.seq = 0
        self.effective: dict[str, dict] = {}
        self.buffer: list[dict] = []
        self.flushed_at = time.monotonic()

    # -- reading ---------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return retrying(lambda: self.out.list(COMMITS))

    def latest_epoch(self, names: list[str] | None = None) -> int:
        names = self._names() if names is None else names
        epochs = [int(m.group(1)) for n in names if (m := EPOCH_FILE.match(n))]
        return max(epochs, default=0)

    def read(self, fingerprint: str | None = None) -> dict[str, dict]:
        """{shard name: accepted record}, in shard order. Raises on any read error other than "there is
        no log" (a failed read is never taken for a missing object). With `fingerprint`, a record of
        another run is left out."""
        names = self._names()
        epoch = self.latest_epoch(names)
        if epoch == 0:
            effective = read_legacy_records(self.out)
        else:
            head = json.loads(retrying(lambda: self.out.read_text(f"{COMMITS}/epoch-{epoch:06d}.json")))
            segments = ([head["checkpoint"]] if head.get("checkpoint") else []) + sorted(
                n for n in names if (m := SEGMENT.match(n)) and int(m.group(1)) == epoch and m.group(2) != "checkpoint")
            texts = parallel_map(lambda n: self.out.read_text(f"{COMMITS}/{n}"), segments)
            effective: dict[str, dict] = {}
            for text in texts:
                for line in text.splitlines():
                    if line.strip():
                        accept(effective, json.loads(line))
        if fingerprint is not None and epoch:   # legacy records carry no fingerprint
            effective = {k: r for k, r in effective.items() if r.get("fingerprint") == fingerprint}
        return dict(sorted(effective.items()))

    # -- writing (the lease holder only) ------------------------------------------------------------
    def start_epoch(self, epoch: int) -> dict[str, dict]:
        """Begin committing as `epoch` (the lease's): checkpoint what is accepted now, then name the
        checkpoint in `epoch-<epoch>.json`. Segments of older epochs are never read again."""
        self.effective = self.read()
        checkpoint = f"{epoch:06d}-checkpoint.jsonl"
        self.out.makedirs(COMMITS)
        self.out.write_text(f"{COMMITS}/{checkpoint}", _jsonl(self.effective.values()))
        self.out.write_text(f"{COMMITS}/epoch-{epoch:06d}.json",
                            json.dumps({"epoch": epoch, "checkpoint": checkpoint, "records": len(self.effective),
                                        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        self.epoch, self.seq = epoch, 0
        return dict(self.effective)

    def add(self, record: dict) -> bool:
        """Accept `record` if the rule takes it, and hold it for the next `flush`; False: a duplicate."""
        if self.epoch is None:
            raise RuntimeError("CommitLog.add before start_epoch")
        if not accept(self.effective, record):
            return False
        self.buffer.append(record)
        return True

    def flush(self, lease: "RunLease | None" = None, every_s: float = 0.0) -> int:
        """Write the held records as one segment (when `every_s` has passed since the last write)."""
        if not self.buffer or time.monotonic() - self.flushed_at < every_s:
            return 0
        if lease is not None:
            lease.check()
        self.seq += 1
        name = f"{COMMITS}/{self.epoch:06d}-{self.seq:08d}.jsonl"
        retrying(lambda: self.out.write_text(name, _jsonl(self.buffer)))
        n, self.buffer, self.flushed_at = len(self.buffer), [], time.monotonic()
        return n

    def commit(self, records: Iterable[dict], lease: "RunLease | None" = None) -> list[dict]:
        """Append the records the accepted set takes (others are dropped: a duplicate attempt) as one new
        segment; returns the accepted ones. Refuses to write once `lease` is lost."""
        if lease is not None:
            lease.check()
        accepted = [r for r in records if self.add(r)]
        self.flush(lease)
        return accepted


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)


def retrying(fn, tries: int = 3, pause_s: float = 0.2):
    """`fn()`, tried again after an error that is not "not found" (stores throttle and fail now and
    then); the last error propagates. Only for idempotent calls: reads, and writes of fixed content."""
    for attempt in range(tries):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(pause_s * 2 ** attempt)


def parallel_map(fn, items: list, threads: int = READ_THREADS) -> list:
    """`[fn(x) for x in items]` with object-store latency overlapped, each call retried (`retrying`);
    the first error that remains propagates."""
    if len(items) <= 1:
        return [retrying(lambda: fn(x)) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(lambda x: retrying(lambda: fn(x)), items))


def read_legacy_records(out: Location) -> dict[str, dict]:
    """Records of a dataset written before the commit log (format 2: one `shards/<name>.json` per shard,
    written by the task itself). Read-only support, so that older datasets stay readable."""
    names = [n for n in out.list("shards", ".json")]
    texts = parallel_map(lambda n: out.read_text(f"shards/{n}"), names)
    records = {}
    for text in texts:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("format") == LEGACY_RECORD_FORMAT:
            records[record["shard"]] = record
    return records


# -- the run lease ---------------------------------------------------------------------------------
class RunLease:
    """One driver per dataset: `lease/<epoch>.json`, renewed every `ttl_s / 4` by a background thread.

    A lease is fresh while `renewed + ttl_s` is in the future (wall clock: drivers on different machines
    compare times, so keep their clocks in sync and the ttl well above any skew). `take_over=True` takes
    a fresh lease anyway (for a driver known to be dead). The holder checks `check()` before every
    commit: a lease it could not renew for half its ttl, or that a newer epoch replaced, stops it.
    """

    def __init__(self, out: str | os.PathLike | Location, ttl_s: float = 120.0, take_over: bool = False,
                 settle_s: float = 1.0, purpose: str = "build"):
        self.out = as_location(out)
        self.ttl_s, self.take_over, self.settle_s, self.purpose = ttl_s, take_over, settle_s, purpose
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self.lost: str | None = None
        self.renewed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _name(self, epoch: int) -> str:
        return f"{LEASES}/{epoch:06d}.json"

    def _payload(self, released: bool = False) -> bytes:
        return json.dumps({"epoch": self.epoch, "owner": self.owner, "purpose": self.purpose,
                           "renewed": time.time(), "ttl_s": self.ttl_s, "released": released}).encode()

    def _epochs(self) -> list[int]:
        return sorted(int(n[:-5]) for n in self.out.list(LEASES, ".json") if n[:-5].isdigit())

    def acquire(self) -> int:
        epochs = self._epochs()
        current = epochs[-1] if epochs else 0
        if current:
            held = json.loads(self.out.read_text(self._name(current)))
            age = time.time() - float(held.get("renewed", 0))
            fresh = age < float(held.get("ttl_s", self.ttl_s)) and not _dead_here(str(held.get("owner", "")))
            if not held.get("released") and fresh and not self.take_over:
                raise LeaseHeld(
                    f"{self.out.url} is in use by another clipforge {held.get('purpose', 'run')} "
                    f"({held.get('owner')}, lease renewed {age:.0f} s ago, expires in "
                    f"{float(held.get('ttl_s', self.ttl_s)) - age:.0f} s): wait for it to finish, or pass "
                    f"--take-over if it is dead")
        self.epoch = current + 1
        self.out.makedirs(LEASES)
        if self.out.local:
            try:   # O_EXCL: of two drivers taking the same epoch, exactly one creates the file
                fd = os.open(self.out.path(self._name(self.epoch)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise LeaseHeld(f"{self.out.url} is in use: another clipforge run took it at this moment") from None
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
                f.flush()
                os.fsync(f.fileno())
        else:
            # object stores: no conditional create through pyarrow.fs. Write, let a racing writer's PUT
            # land, then read back: of two drivers racing for one epoch, only the last writer reads
            # its own owner back, and a driver that sees a newer epoch gives up.
            if self.out.exists(self._name(self.epoch)):
                raise LeaseHeld(f"{self.out.url} is in use: another clipforge run took it at this moment")
            self.out.write_bytes(self._name(self.epoch), self._payload())
            time.sleep(self.settle_s)
            back = json.loads(self.out.read_text(self._name(self.epoch)))
            if back.get("owner") != self.owner or self._epochs()[-1] != self.epoch:
                raise LeaseHeld(f"{self.out.url} is in use: another clipforge run took it at this moment")
        self.renewed_at = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="clipforge-lease", daemon=True)
        self._thread.start()
        return self.epoch

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._epochs()[-1] != self.epoch:
                    self.lost = "a newer driver took the dataset's lease"
                    return
                if json.loads(self.out.read_text(self._name(self.epoch))).get("owner") != self.owner:
                    self.lost = "another driver wrote this epoch's lease"   # a racing PUT landed late
                    return
                self.out.write_bytes(self._name(self.epoch), self._payload())
                self.renewed_at = time.monotonic()
            except OSError:
                pass   # a flaky store: `check` stops commits if renewals fail for half the ttl

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.out.url}: {self.lost}; this run stops committing")
        if time.monotonic() - self.renewed_at > self.ttl_s / 2:
            raise LeaseLost(f"{self.out.url}: the lease could not be renewed for {self.ttl_s / 2:.0f} s; "
                            f"this run stops committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.epoch and not self.lost:
            try:
                self.out.write_bytes(self._name(self.epoch), self._payload(released=True))
            except OSError:
                pass   # it expires by itself

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _dead_here(owner: str) -> bool:
    """True when `owner` (host:pid:token) is a process of this host that no longer runs: a driver killed
    here need not wait for its lease to expire."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- garbage collection ------------------------------------------------------------------------------
def named_parts(records: Iterable[dict]) -> set[str]:
    return {f["name"] for r in records for f in r["files"].values()}


def _epoch_of(name: str) -> int | None:
    """The commit epoch a file of `commits/` belongs to (None for anything else)."""
    match = SEGMENT.match(name) or EPOCH_FILE.match(name)
    return int(match.group(1)) if match else None


def collect_garbage(out: str | os.PathLike | Location, older_than_s: float = DEFAULT_GRACE_S,
                    dry_run: bool = False, now: float | None = None, accepted: dict | None = None) -> dict:
    """Remove attempt parts that no accepted record names and that are older than `older_than_s`, and
    as old: temporary files of killed writers, the commit files of epochs before the latest (folded into
    its checkpoint) and leases before the latest. Call it holding the dataset's lease; `accepted` is the
    holder's own accepted set (else the log is read). Any error while reading the log or listing a
    folder propagates before anything is deleted."""
    out = as_location(out)
    keep = named_parts((CommitLog(out).read() if accepted is None else accepted).values())
    now = time.time() if now is None else now
    removed, young, removed_bytes = [], 0, 0
    folders = (*PART_FOLDERS, "", "wids", COMMITS, LEASES)
    listings = parallel_map(lambda folder: out.fs.get_file_info(
        pafs.FileSelector(out.path(folder), allow_not_found=True, recursive=False)), list(folders))
    by_folder = dict(zip(folders, listings))
    # files of commit epochs before the latest (readers never read them again) and leases before the latest
    latest_commit = max((e for i in by_folder[COMMITS] if (e := _epoch_of(i.base_name)) is not None), default=0)
    latest_lease = max((int(i.base_name[:-5]) for i in by_folder[LEASES] if i.base_name[:-5].isdigit()), default=0)
    for folder, infos in zip(folders, listings):
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            name = f"{folder}/{info.base_name}" if folder else info.base_name
            epoch = _epoch_of(info.base_name) if folder == COMMITS else None
            garbage = (TEMP_NAME.search(info.base_name)
                       or (folder in PART_FOLDERS and ATTEMPT_PART.match(info.base_name))
                       or (epoch is not None and epoch < latest_commit)
                       or (folder == LEASES and info.base_name[:-5].isdigit()
                           and int(info.base_name[:-5]) < latest_lease))
            if not garbage or name in keep:
                continue
            mtime = info.mtime.timestamp() if info.mtime is not None else now
            if now - mtime < older_than_s:
                young += 1
                continue
            if not dry_run:
                out.delete(name)
            removed.append(name)
            removed_bytes += int(info.size or 0)
    return {"removed": len(removed), "removed_bytes": removed_bytes, "kept_young": young,
            "names": removed[:20], "dry_run": dry_run}
