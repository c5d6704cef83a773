"""`clipforge build`: manifest → shard tasks → committed shards, in process or on a Ray cluster.

This module only wires. The unit of work is the shard (`clipforge.pipeline.build_shard.BuildShard`):
a task reads its own slice of the manifest, cleans captions, decodes, tokenizes and commits its shard
with a record. The driver holds shard descriptors (computed lazily from the row count) and a few
counters, never rows; it writes `dataset.json` with the run's fingerprint when the build starts and
completes it at the end, and rewrites `progress.json` every few seconds. The Ray wiring (task
submission that follows the cluster's size, GPU tokenizer workers) lives in `clipforge.jobs.ray_build`.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

from clipforge.pipeline.build_shard import BuildShard, previous_attempts
from clipforge.pipeline.manifest import (check_unique_ids, is_parquet, manifest_digest, parquet_rows,
                                         stage_manifest)
from clipforge.pipeline.storage.dataset import (FORMAT_VERSION, funnel_from_records, package_versions,
                                                write_wids_index)
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.shards import ShardCommitter, clean_stale, read_records, write_json
from clipforge.pipeline.text.captions import CleanCaption, CleanConfig
from clipforge.pipeline.tokenize import TokenizeClips
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode import DecodeVideo


@dataclass(frozen=True)
class BuildConfig:
    clips: ClipConfig = field(default_factory=ClipConfig)
    captions: CleanConfig = field(default_factory=CleanConfig)
    inputs_per_shard: int = 64          # manifest rows per shard: fixes which sample lands where
    text_slot: int = 64
    decode_timeout_s: float = 120.0     # per video; a hung decoder is killed after this
    decode_memory_mb: int = 8192        # address-space limit of the isolated decoder
    decode_workers: int = 0             # shard tasks at once; 0: every CPU the tokenizers leave free
    tokenize_batch: int = 32            # clips per image-tokenizer call (a GPU worker batches across shards)
    tokenize_workers: int = 0           # GPU tokenizer workers; 0: one per GPU share that fits the cluster
    tokenize_gpus: float = 1.0          # GPU share of one tokenizer worker (0.25: four per GPU)
    tokenize_cpus: float = 0.5          # CPU share of one tokenizer worker
    tokenize_dtype: str = "float32"     # float32 | bfloat16 (bf16 can flip nearest-code ties: recorded)
    roundtrip_qa: int = 2               # clips per shard decoded back to pictures for a PSNR in the record
    split: str = "train"
    runner: str = "ray"                 # ray | local (in-process, for debugging)
    endpoint: str | None = None         # S3-compatible endpoint (default: AWS_ENDPOINT_URL)


# config fields that change what lands in the shards: a resume with any of them different is refused
RUN_ONLY_FIELDS = ("decode_workers", "tokenize_workers", "tokenize_gpus", "tokenize_cpus", "runner", "endpoint",
                   "decode_timeout_s", "decode_memory_mb", "tokenize_batch")
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class BuildPlan:
    """What every shard task needs, small enough to ship to each worker."""
    manifest: str                # a Parquet manifest that workers slice by row groups
    out: str
    endpoint: str | None
    layout: dict
    config: BuildConfig
    image_tokenizer: str
    text_tokenizer: str
    tokenizer_ids: dict
    stage_factory: Callable | None = None   # plan -> [(name, stage)]: stand-in stages for benchmarks

    def committer(self) -> ShardCommitter:
        return ShardCommitter(Location(self.out, self.endpoint), self.layout, self.config.split)

    def shard_builder(self, image_encoder=None) -> BuildShard:
        c = self.config
        if self.stage_factory is not None:
            return BuildShard(self.manifest, self.committer(), self.stage_factory(self), roundtrip_qa=0)
        stages = [
            ("captions", CleanCaption(c.captions)),
            ("decode", DecodeVideo(c.clips, c.decode_timeout_s, c.decode_memory_mb)),
            ("tokenize", TokenizeClips(self.image_tokenizer, self.text_tokenizer, c.text_slot, c.tokenize_batch,
                                       dtype=c.tokenize_dtype, image_encoder=image_encoder)),
        ]
        return BuildShard(self.manifest, self.committer(), stages, roundtrip_qa=c.roundtrip_qa)


def build(manifest: str, out: str, image_tokenizer: str, text_tokenizer: str,
          config: BuildConfig = BuildConfig(), address: str | None = None, resume: bool = False,
          retry_failed: bool = False, progress: bool = True, log=print,
          stage_factory: Callable | None = None) -> dict:
    dest = Location(out, config.endpoint)
    started = dest.exists("dataset.json")
    if started and not (resume or retry_failed):
        raise FileExistsError(f"{out} already holds a dataset: pass --resume or --retry-failed, or pick another --out")
    layout, tokenizer_ids = _layout(config, image_tokenizer, text_tokenizer)
    rows, manifest_url = _prepare_manifest(manifest, dest, config)
    fingerprint = {"format_version": FORMAT_VERSION, "manifest": str(manifest),
                   "manifest_sha256": manifest_digest(manifest), "inputs": rows, "layout": layout,
                   "tokenizers": tokenizer_ids, "config": _fingerprint_config(config)}
    if started:
        _check_fingerprint(dest, fingerprint)
    else:
        write_json(dest, "dataset.json", {"format": "clipforge-dataset", "format_version": FORMAT_VERSION,
                                          "complete": False, "fingerprint": fingerprint,
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    plan = BuildPlan(manifest_url, dest.url, config.endpoint, layout, config, str(image_tokenizer),
                     str(text_tokenizer), tokenizer_ids, stage_factory)
    committer = plan.committer()
    n_shards = math.ceil(rows / config.inputs_per_shard)
    done = _committed_shards(dest, config.split, retry_failed)
    todo = n_shards - len(done)
    log(f"build: {rows} inputs in {n_shards} shards; {len(done)} already committed")
    tracker = ProgressTracker(dest, rows - sum(done.values()), todo, progress)
    if todo:
        descriptors = _descriptors(rows, config.inputs_per_shard, set(done), committer, retry_failed)
        if config.runner == "ray":
            from clipforge.jobs.ray_build import run_on_ray
            run_on_ray(plan, descriptors, todo, tracker, address)
        else:
            builder = plan.shard_builder()
            try:
                for record in builder(descriptors):
                    tracker.add(record)
            finally:
                for _, stage in builder.stages:
                    getattr(stage, "close", lambda: None)()
    tracker.close()
    clean_stale(dest, config.split)   # no attempt can still be running: drop parts no record names
    paths = {"image": _absolute(image_tokenizer), "text": _absolute(text_tokenizer)}
    return _complete(dest, fingerprint, config, tracker, paths)


def _absolute(path) -> str:
    return str(path) if "://" in str(path) else os.path.abspath(str(path))


def _layout(config: BuildConfig, image_tokenizer: str, text_tokenizer: str) -> tuple[dict, dict]:
    from clipforge.tokenizer.image import ImageTokenizer
    from clipforge.tokenizer.text import TextTokenizer

    tok = ImageTokenizer.load(image_tokenizer)
    h, w = tok.tokens_hw
    if tok.image_size != config.clips.size:
        raise ValueError(f"the image tokenizer takes {tok.image_size}px frames but clips are {config.clips.size}px: "
                         f"set --size {tok.image_size}")
    text = TextTokenizer(text_tokenizer)
    layout = {"frames": config.clips.frames, "frame_size": config.clips.size, "tokens_h": h, "tokens_w": w,
              "text_slot": config.text_slot, "image_vocab": tok.codebook_size}
    ids = {"image": {"id": tok.tokenizer_id, "sha256": tok.sha256, "dtype": config.tokenize_dtype},
           "text": {"id": text.tokenizer_id, "sha256": text.sha256}}
    return layout, ids


def _prepare_manifest(manifest: str, dest: Location, config: BuildConfig) -> tuple[int, str]:
    """(rows, URL of a Parquet manifest workers can slice). Other formats are copied to Parquet in the
    output once, chunk by chunk, so that no worker parses a whole CSV for its 64 rows."""
    manifest = str(manifest)
    if is_parquet(manifest):
        url = manifest
    else:
        dest.makedirs("")
        with dest.open_output("manifest.parquet") as f:
            stage_manifest(manifest, f, rows_per_group=max(config.inputs_per_shard, 65536 // config.inputs_per_shard
                                                          * config.inputs_per_shard))
        url = dest.child_url("manifest.parquet")
    rows, columns = parquet_rows(url)
    missing = [c for c in ("video", "caption") if c not in columns]
    if missing:
        raise ValueError(f"{manifest}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(columns)})")
    if "id" in columns:
        check_unique_ids(url)
    if rows == 0:
        raise ValueError(f"{manifest}: the manifest has no rows")
    return rows, url


def _fingerprint_config(config: BuildConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in RUN_ONLY_FIELDS}


def _check_fingerprint(dest: Location, fingerprint: dict) -> None:
    try:
        old = json.loads(dest.read_text("dataset.json")).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old is None:
        raise ValueError(f"{dest.url}: dataset.json has no run fingerprint (an older or foreign dataset): "
                         f"cannot resume it safely; build into a new --out")
    for field_name in ("format_version", "manifest_sha256", "inputs", "layout", "tokenizers", "config"):
        # compared as JSON, as stored: a tuple in the config is a list in dataset.json
        a = json.loads(json.dumps(old.get(field_name), default=str))
        b = json.loads(json.dumps(fingerprint[field_name], default=str))
        if a != b:
            detail = _first_difference(a, b)
            raise ValueError(f"--resume refused: this run's {field_name} differs from the dataset's ({detail})")


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'}: was {a!r}, now {b!r}"


def _committed_shards(dest: Location, split: str, retry_failed: bool) -> dict[int, int]:
    """shard index -> inputs, for shards whose record names parts that are all there (no tar bytes read).
    With `retry_failed`, shards with transient failures are not counted as done."""
    done = {}
    sizes = {**dest.sizes("shards"), **dest.sizes("index"), **dest.sizes("ledger")}   # three listings in all
    for record in read_records(dest, split):
        if retry_failed and record.get("transient_errors", 0):
            continue
        if all(sizes.get(f["name"]) == f["bytes"] for f in record["files"].values()):
            done[int(record["shard"].rsplit("-", 1)[1])] = int(record["inputs"])
    return done


def _descriptors(rows: int, per_shard: int, done: set[int], committer: ShardCommitter,
                 retry_failed: bool) -> Iterator[dict]:
    for shard in range(math.ceil(rows / per_shard)):
        if shard in done:
            continue
        d = {"shard": shard, "start": shard * per_shard, "stop": min(rows, (shard + 1) * per_shard)}
        if retry_failed:
            d["attempts"] = previous_attempts(committer, shard)
        yield d


class ProgressTracker:
    """Aggregates shard records as they arrive: the bar (rate, ETA) and `progress.json`. Holds counters
    only, so its memory does not grow with the corpus."""

    def __init__(self, dest: Location, inputs_todo: int, shards_todo: int, show: bool):
        from tqdm import tqdm

        self.dest, self.inputs_todo, self.shards_todo = dest, inputs_todo, shards_todo
        self.bar = tqdm(total=inputs_todo, desc="inputs", unit="video", disable=not show, smoothing=0.05)
        self.t0 = time.monotonic()
        self.last_write = 0.0
        self.shards = self.inputs = self.samples = self.videos_decoded = 0
        self.failures: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.decode_workers: Counter = Counter()
        self.tokenize_workers: Counter = Counter()
        self.retried = 0
        self.task_errors, self.task_error_messages = 0, []
        self.write(force=True)

    def add(self, record: dict) -> None:
        self.shards += 1
        self.inputs += record["inputs"]
        self.samples += record["samples"]
        self.videos_decoded += record.get("videos_decoded", 0)
        self.failures.update(record.get("errors_by_reason", {}))
        run = record.get("run", {})
        self.stage_seconds.update(run.get("seconds", {}))
        if run.get("worker"):
            self.decode_workers[run["worker"]] += 1
        self.tokenize_workers.update(run.get("tokenize_workers", {}))
        self.bar.update(record["inputs"])
        self.write()

    def task_error(self, err: Exception) -> None:
        """A shard task that raised (it is retried): the first few messages go to progress.json."""
        self.task_errors += 1
        if len(self.task_error_messages) < 5:
            self.task_error_messages.append(" ".join(f"{type(err).__name__}: {err}".split())[:300])

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_EVERY_S:
            return
        self.last_write = now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.inputs / elapsed
        payload = {
            "elapsed_s": round(elapsed, 3), "shards_done": self.shards, "shards_todo": self.shards_todo,
            "inputs_done": self.inputs, "inputs_todo": self.inputs_todo, "samples": self.samples,
            "videos_decoded": self.videos_decoded,
            "inputs_per_s": round(rate, 3), "samples_per_s": round(self.samples / elapsed, 3),
            "eta_s": round((self.inputs_todo - self.inputs) / rate, 1) if rate > 0 else None,
            "failures_by_reason": dict(sorted(self.failures.items())),
            "stage_seconds": {k: round(v, 3) for k, v in sorted(self.stage_seconds.items())},
            "stage_inputs_per_s": {k: round(self.inputs / v, 3) for k, v in sorted(self.stage_seconds.items()) if v},
            "workers": {"decode": dict(sorted(self.decode_workers.items())),
                        "tokenize": dict(sorted(self.tokenize_workers.items()))},
            "shard_retries": self.retried, "task_errors": self.task_errors,
            "task_error_messages": self.task_error_messages,
        }
        try:
            write_json(self.dest, "progress.json", payload)
        except OSError:
            pass   # progress is advisory: a full disk or a flaky store must not stop the build
        self.payload = payload

    def close(self) -> None:
        self.bar.close()
        self.write(force=True)


def _complete(dest: Location, fingerprint: dict, config: BuildConfig, tracker: ProgressTracker,
              paths: dict) -> dict:
    records = read_records(dest, config.split)
    info = json.loads(dest.read_text("dataset.json"))
    info.update({
        "complete": True, "format": "clipforge-dataset", "format_version": FORMAT_VERSION,
        "manifest": fingerprint["manifest"], "config": asdict(config), "layout": fingerprint["layout"],
        "sequence": {"text_slot": config.text_slot, "frames": fingerprint["layout"]["frames"],
                     "tokens_per_frame": fingerprint["layout"]["tokens_h"] * fingerprint["layout"]["tokens_w"],
                     "tokens": config.text_slot + fingerprint["layout"]["frames"] * fingerprint["layout"]["tokens_h"]
                     * fingerprint["layout"]["tokens_w"]},
        # where the tokenizers were read from, so that `train` and `sample` find them (not part of the
        # fingerprint: the same tokenizer may sit elsewhere on a resume)
        "tokenizers": {kind: {**ids, "path": paths[kind]} for kind, ids in fingerprint["tokenizers"].items()},
        "packages": package_versions(),
        "shards": [{"name": r["shard"], "tar": r["files"]["tar"]["name"], "samples": r["samples"],
                    "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "funnel": funnel_from_records(records, fingerprint["inputs"]),
        # every (dtype, device class) that encoded some shard of this dataset
        "encode_settings": [json.loads(x) for x in sorted({json.dumps(r.get("encode_settings") or {}, sort_keys=True)
                                                            for r in records})],
        "run": getattr(tracker, "payload", {}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_json(dest, "dataset.json", info)
    write_wids_index(dest, records, config.split)
    return info


def with_overrides(config: BuildConfig, **changes) -> BuildConfig:
    clip_changes = {k: v for k, v in changes.items() if k in ClipConfig.__dataclass_fields__ and v is not None}
    build_changes = {k: v for k, v in changes.items() if k in BuildConfig.__dataclass_fields__ and v is not None}
    return replace(config, clips=replace(config.clips, **clip_changes), **build_changes)

