"""`clipforge build`: manifest → shard tasks → committed shards, in process or on a Ray cluster.

This module only wires. The driver takes the dataset's lease (one driver per `--out`), checks or writes
`dataset.json` (`DatasetInfo`), streams the manifest once and hands each shard task its rows, runs the
tasks through the one executor (`clipforge.jobs.executor`: retries, deadlines, progress), and commits
each shard's first good attempt to the commit log. At the end it removes garbage older than the grace
period and completes `dataset.json` and `wids/`. The Ray wiring (GPU tokenizer workers) lives in
`clipforge.jobs.ray_build`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import Callable, Iterator

from clipforge.jobs.executor import run_tasks
from clipforge.pipeline.build_shard import (BuildSpec, build_shard_task, close_builders, lost_inputs,
                                            previous_attempts)
from clipforge.pipeline.manifest import count_rows, iter_shard_slices, manifest_digest, manifest_rows, repeated_id_rows
from clipforge.pipeline.chain import RUN_ONLY_FIELDS, BuildConfig
from clipforge.pipeline.storage.commits import (CommitLog, RunLease, collect_garbage, fingerprint_sha256,
                                                shard_number)
from clipforge.pipeline.storage.dataset import (DatasetError, DatasetInfo, build_fingerprint,
                                                check_output_folder, write_wids_index)
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.progress import ProgressTracker
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.errors import ClipforgeError
from clipforge.tokenizer.sources import absolute_spec

__all__ = ["BuildConfig", "build", "with_overrides"]


def build(manifest: str, out: str, image_tokenizer: str, text_tokenizer: str,
          config: BuildConfig = BuildConfig(), address: str | None = None, resume: bool = False,
          retry_failed: bool = False, take_over: bool = False, progress: bool = True, log=print,
          stage_factory: Callable | None = None) -> dict:
    dest = Location(out, config.endpoint)
    layout, tokenizer_ids = _layout(config, image_tokenizer, text_tokenizer)
    rows, columns = count_rows(manifest)
    missing = [c for c in ("video", "caption") if c not in columns]
    if missing:
        raise ClipforgeError(f"{manifest}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(columns)})")
    if rows == 0:
        raise ClipforgeError(f"{manifest}: the manifest has no rows")
    fingerprint = build_fingerprint(str(manifest), manifest_digest(manifest), rows, layout, tokenizer_ids,
                                    {k: v for k, v in asdict(config).items() if k not in RUN_ONLY_FIELDS})
    check_output_folder(dest)
    lease = RunLease(dest, ttl_s=config.lease_ttl_s, take_over=take_over)
    lease.acquire()
    try:
        commit_log = CommitLog(dest)
        if DatasetInfo.exists(dest):
            if not (resume or retry_failed):
                raise FileExistsError(f"{out} already holds a dataset: pass --resume or --retry-failed, or pick "
                                      f"another --out")
            DatasetInfo.read(dest).check_resume(fingerprint)
        else:
            if commit_log.read():
                raise DatasetError(f"{out} holds commit records but no dataset.json (another tool's or a damaged "
                                   f"dataset): build into a new --out")
            DatasetInfo.started(fingerprint, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())).write(dest)
        sha = fingerprint_sha256(fingerprint)
        accepted = commit_log.start_epoch(lease.epoch)
        spec = BuildSpec(dest.url, config.endpoint, layout, config, str(image_tokenizer), str(text_tokenizer),
                         tokenizer_ids, sha, stage_factory)
        n_shards = math.ceil(rows / config.inputs_per_shard)
        done = {shard_number(n): r for n, r in accepted.items() if n.startswith(f"{config.split}-")}
        redo = {i: r for i, r in done.items() if retry_failed and r.get("transient_errors", 0)}
        skip = frozenset(done) - frozenset(redo)
        log(f"build: {rows} inputs in {n_shards} shards; {len(skip)} already committed")
        tracker = ProgressTracker(dest, rows - sum(int(done[i]["inputs"]) for i in skip), n_shards - len(skip),
                                  progress)
        repeated = repeated_id_rows(manifest) if "id" in columns else {}   # become ledger rows, never stop a build
        descriptors = _descriptors(manifest, config.inputs_per_shard, skip, redo, dest, repeated)
        run = _Committer(commit_log, lease, tracker, config.commit_every_s)
        try:
            if config.runner == "ray":
                from clipforge.jobs.ray_build import run_on_ray
                run_on_ray(spec, descriptors, tracker, address, run.on_result, lambda d, err: failed_shard(spec, d, err))
            else:
                try:
                    run_tasks(build_shard_task, spec, descriptors, on_result=run.on_result,
                              on_failure=lambda d, err: failed_shard(spec, d, err), progress=tracker,
                              runner="local", attempts=config.task_attempts, name=_task_name)
                finally:
                    close_builders()
        finally:
            commit_log.flush(lease)
        tracker.close()
        collect_garbage(dest, config.gc_grace_s, accepted=commit_log.effective)
        paths = {"image": absolute_spec(image_tokenizer), "text": absolute_spec(text_tokenizer)}
        return _complete(dest, commit_log, config, tracker, paths)
    finally:
        lease.release()


def _task_name(d: dict) -> str:
    return f"shard {d['shard']}"


class _Committer:
    """The driver's side of every result: a late or duplicated attempt is dropped, the first good one is
    held and written to the log with the others every few seconds."""

    def __init__(self, commit_log: CommitLog, lease: RunLease, tracker: ProgressTracker, every_s: float):
        self.log, self.lease, self.tracker, self.every_s = commit_log, lease, tracker, every_s

    def on_result(self, d: dict, result: dict) -> None:
        run = result.pop("run", {})
        if d.get("replaces"):
            result["replaces"] = d["replaces"]
        if self.log.add(result):
            self.tracker.add({**result, "run": run})
        else:
            self.tracker.duplicates_dropped += 1
        self.log.flush(self.lease, every_s=self.every_s)


def _layout(config: BuildConfig, image_tokenizer: str, text_tokenizer: str) -> tuple[dict, dict]:
    from clipforge.tokenizer.sources import open_image_tokenizer, open_text_tokenizer

    tok = open_image_tokenizer(image_tokenizer, device="cpu")
    tok.fit_size(config.clips.size)
    h, w = tok.tokens_hw
    text = open_text_tokenizer(text_tokenizer)
    layout = {"frames": config.clips.frames, "frame_size": config.clips.size, "tokens_h": h, "tokens_w": w,
              "text_slot": config.text_slot, "image_vocab": tok.codebook_size}
    ids = {"image": {"id": tok.tokenizer_id, "sha256": tok.sha256, "dtype": config.tokenize_dtype},
           "text": {"id": text.tokenizer_id, "sha256": text.sha256}}
    return layout, ids


def _descriptors(manifest: str, per_shard: int, skip: frozenset, redo: dict, dest: Location,
                 repeated: dict[int, str]) -> Iterator[dict]:
    """Shard descriptors with their rows, streamed from the manifest (read once, in order)."""
    for shard, start, stop, rows in iter_shard_slices(manifest, per_shard, skip=skip):
        d = {"shard": shard, "start": start, "stop": stop, "rows": rows,
             "repeated_ids": {i: v for i, v in repeated.items() if start <= i < stop}}
        if shard in redo:
            d["attempts"] = previous_attempts(dest, redo[shard])
            d["replaces"] = redo[shard]["attempt"]
        yield d


def failed_shard(spec: BuildSpec, d: dict, err: BaseException) -> dict:
    """Every input of a shard whose task never succeeded becomes a transient ledger row."""
    rows = list(manifest_rows(d["rows"], first_index=d["start"], repeated_ids=d.get("repeated_ids")))
    message = f"the shard task failed {spec.config.task_attempts} times: {type(err).__name__}: {str(err)[:200]}"
    lost = [dict(r, error=message) for r in lost_inputs(rows, [])]
    record = spec.writer().write(d["shard"], lost, inputs=len(rows), attempts=d.get("attempts"),
                                 extra={"videos_decoded": 0, "clips": 0, "roundtrip_psnr": [],
                                        "rows": [d["start"], d["stop"]]})
    return {**record, "run": {"seconds": {}, "worker": "driver"}}


def _complete(dest: Location, commit_log: CommitLog, config: BuildConfig, tracker: ProgressTracker,
              paths: dict) -> dict:
    records = [r for name, r in sorted(commit_log.effective.items()) if name.startswith(f"{config.split}-")]
    info = DatasetInfo.read(dest)
    info.complete_build(asdict(config), config.text_slot, records, paths, tracker.payload)
    info.write(dest)
    write_wids_index(dest, records, config.split)
    return info.data


def with_overrides(config: BuildConfig, **changes) -> BuildConfig:
    """`config` with the given fields (of BuildConfig or its ClipConfig) changed; None leaves a field as
    it is. An unknown name is refused (a typo in a config file must not pass silently)."""
    unknown = [k for k in changes if k not in ClipConfig.__dataclass_fields__ and k not in BuildConfig.__dataclass_fields__]
    if unknown:
        raise ClipforgeError(f"unknown build setting(s): {', '.join(sorted(unknown))}")
    clip_changes = {k: v for k, v in changes.items() if k in ClipConfig.__dataclass_fields__ and v is not None}
    build_changes = {k: v for k, v in changes.items() if k in BuildConfig.__dataclass_fields__ and v is not None}
    return replace(config, clips=replace(config.clips, **clip_changes), **build_changes)
