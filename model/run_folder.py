"""A training run's folder on any filesystem: local, or on object storage (s3://, gs://) through a local
working copy.

Training writes into a local folder as always (checkpoints, log.jsonl, keys/, tokenizers/). For a remote
RUN that folder is a working copy under the user's cache, and every checkpoint is published the way a
shard is committed: the checkpoint file, the tokenizers, the log and the keys first, `latest.json` (the
record that names the checkpoint) last, and only then are checkpoints beyond `keep_checkpoints` removed.
A reader (resume, `sample`, `eval-synth`, `--init-from`) that finds `latest.json` finds everything it
names. A resume pulls the latest checkpoint, the log, the keys and the tokenizers back first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from clipforge.pipeline.storage.fs import Location, cache_root, is_remote

RUN_FILES = ("latest.json", "summary.json", "log.jsonl")   # with ckpt_*.pt, tokenizers/, keys/: what a run writes


def is_run_file(name: str) -> bool:
    return (name in RUN_FILES or name in ("tokenizers", "keys")
            or (name.startswith("ckpt_") and name.endswith(".pt")))


class RunFolder:
    """RUN as given (a path or a URL): `local` is where training reads and writes."""

    def __init__(self, run: str | os.PathLike, endpoint: str | None = None):
        self.url = str(run)
        self.remote = is_remote(self.url)
        if self.remote:
            self.store = Location(self.url, endpoint)
            digest = hashlib.sha256(self.store.url.encode("utf-8")).hexdigest()[:16]
            self.local = cache_root() / "runs" / digest
        else:
            self.store, self.local = None, Path(run)

    def claim(self, overwrite: bool) -> None:
        """A new run goes into a new or empty folder; one that holds a run is refused unless `overwrite`,
        which removes only what a run writes; a folder holding anything else is refused either way."""
        if not self.remote:
            claim_local(self.local, overwrite)
            return
        check_claim(self.url, {n.split("/", 1)[0] for n in self.store.walk()}, overwrite)
        self.store.delete("latest.json")   # first: no reader may find a record whose checkpoint is gone
        for name in self.store.walk():
            self.store.delete(name)
        shutil.rmtree(self.local, ignore_errors=True)   # the working copy is clipforge's own

    def has_checkpoint(self) -> bool:
        return self.store.exists("latest.json") if self.remote else (self.local / "latest.json").exists()

    def pull(self, everything: bool = True) -> Path:
        """Bring the latest checkpoint and what it names into the working copy; `everything` also brings
        the log and the keys (for a resume). Returns the local folder."""
        if not self.remote:
            return self.local
        if not self.store.exists("latest.json"):
            raise FileNotFoundError(f"{self.url}: no latest.json (not a training run, or no checkpoint yet)")
        latest = self.store.read_bytes("latest.json")
        names = [json.loads(latest)["ckpt"]]
        names += self.store.walk("tokenizers")
        if everything:
            names += self.store.walk("keys") + [n for n in ("log.jsonl",) if self.store.exists(n)]
        self.local.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.store.read_bytes(name))
        (self.local / "latest.json").write_bytes(latest)   # last: the working copy is whole when it names one
        return self.local

    def publish(self, checkpoint: str, keep: list[Path]) -> None:
        """After a checkpoint: its file, the tokenizers, the log and the keys, then latest.json, then the
        removal of the published checkpoints that `keep` no longer holds."""
        if not self.remote:
            return
        names = [checkpoint] + [str(p.relative_to(self.local)) for folder in ("tokenizers", "keys")
                                for p in sorted((self.local / folder).rglob("*")) if p.is_file()]
        names += [n for n in ("log.jsonl",) if (self.local / n).exists()]
        for name in names:
            if name.startswith("tokenizers/") and self.store.exists(name):
                continue   # written once: a run's tokenizers never change
            self.store.write_bytes(name, (self.local / name).read_bytes())
        self.store.write_bytes("latest.json", (self.local / "latest.json").read_bytes())
        kept = {p.name for p in keep}
        for name in self.store.list(suffix=".pt"):
            if name.startswith("ckpt_") and name not in kept:
                self.store.delete(name)

    def publish_file(self, name: str) -> None:
        if self.remote:
            self.store.write_bytes(name, (self.local / name).read_bytes())


def check_claim(where: str, names: set[str], overwrite: bool) -> None:
    """Refuse a folder (its top-level `names`) that holds anything but a run's files, or a run unless
    `overwrite`."""
    others = sorted(n for n in names if not is_run_file(n))
    if others:
        raise FileExistsError(f"{where} holds files that are not a training run's ({', '.join(others[:3])}): "
                              f"pick a new --out")
    if names and not overwrite:
        raise FileExistsError(f"{where} already holds a training run: pass --resume to continue it, or "
                              f"--overwrite to replace it")


def claim_local(run: Path, overwrite: bool) -> None:
    if not run.exists():
        return
    check_claim(str(run), {p.name for p in run.iterdir()}, overwrite)
    for p in run.iterdir():   # only a run's own files are left here
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def local_run(run: str | os.PathLike) -> Path:
    """A run's folder to read from: RUN itself, or the working copy of a remote RUN with its latest
    checkpoint and tokenizers pulled."""
    folder = RunFolder(run)
    return folder.pull(everything=False) if folder.remote else folder.local
