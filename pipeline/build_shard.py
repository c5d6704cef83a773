"""The unit of work of `clipforge build`: one shard, from its rows of the manifest to its record.

`BuildShard` is a stage over shard descriptors (`{"shard", "start", "stop", "rows"}`, where `rows` is the
shard's slice of the manifest, read by the driver as it streams the manifest once): for each, it runs the
row stages (clean captions → decode → tokenize) in this process and writes one attempt of the shard with
`ShardWriter`. It yields the attempt's record, with per-stage time and the worker's identity; the driver
alone decides whether that record is committed (`clipforge.pipeline.storage.commits`). The driver holds
descriptors in flight and records, never the corpus, so its memory does not grow with it (datatrove's
executor works the same way: each task owns its output and a completion record).

Nothing here imports Ray; `clipforge.jobs.build` runs `BuildShard` in process or as Ray tasks.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from clipforge.pipeline.manifest import manifest_rows
from clipforge.pipeline.schema import is_ok, mark_error
from clipforge.pipeline.chain import BuildConfig, build_stages
from clipforge.pipeline.stages import Stage
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.shards import ShardWriter, read_ledger_part


class TimedStage:
    """Wraps a stage's output iterator and counts the time spent producing its rows, upstream included;
    the exclusive time of a stage is its total minus its upstream's."""

    def __init__(self, rows: Iterator[dict]):
        self.rows, self.seconds, self.count = rows, 0.0, 0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            row = next(self.rows)
        finally:
            self.seconds += time.perf_counter() - t
        self.count += 1
        return row


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class BuildShard:
    """Stage over shard descriptors; yields each shard attempt's record (uncommitted).

    `stages` are `Stage`s over row dicts (`clipforge.pipeline.chain.build_stages`). `roundtrip_clips` clips
    per shard are marked, after the stage that produces clips, for a decode-back PSNR by the tokenizer.
    """

    def __init__(self, writer: ShardWriter, stages: list[Stage], roundtrip_clips: int = 2,
                 describe_worker: Callable[[], dict] | None = None):
        self.writer, self.stages = writer, stages
        self.roundtrip_clips = roundtrip_clips
        self.describe_worker = describe_worker or (lambda: {})

    def __call__(self, descriptors: Iterable[dict]) -> Iterator[dict]:
        for d in descriptors:
            yield self.build(d)

    def build(self, d: dict) -> dict:
        t0 = time.perf_counter()
        counts_before = self._stage_counts()
        inputs = list(manifest_rows(d["rows"], first_index=d["start"], repeated_ids=d.get("repeated_ids")))
        read_s = time.perf_counter() - t0
        stream: Iterator[dict] = iter(inputs)
        timed: list[tuple[str, TimedStage]] = []
        decoded_inputs: set[int] = set()
        for stage in self.stages:
            stream = TimedStage(iter(stage(stream)))
            timed.append((stage.name, stream))
            if stage.produces_clips:
                stream = self._after_clips(stream, decoded_inputs)
        rows = list(stream)
        rows += lost_inputs(inputs, rows)
        stage_seconds, upstream = {"manifest": read_s}, 0.0
        for name, t in timed:
            stage_seconds[name] = max(0.0, t.seconds - upstream)
            upstream = t.seconds
        qa = [r["roundtrip_psnr"] for r in rows if is_ok(r) and r.get("roundtrip_psnr") is not None]
        t1 = time.perf_counter()
        record = self.writer.write(
            d["shard"], rows, inputs=len(inputs), attempts=d.get("attempts"),
            extra={"videos_decoded": len(decoded_inputs),
                   "clips": sum(1 for r in rows if r.get("clip_index") is not None),
                   "roundtrip_psnr": [round(float(v), 3) for v in qa],
                   "encode_settings": self._encode_settings(),
                   "rows": [d["start"], d["stop"]]})
        stage_seconds["write"] = time.perf_counter() - t1
        # run facts: not part of the record (which must not depend on timing), but returned to the driver
        counts = {name: {k: v - counts_before.get(name, {}).get(k, 0) for k, v in after.items()}
                  for name, after in self._stage_counts().items()}
        return {**record, "run": {"seconds": stage_seconds, "stage_counts": counts, "worker": worker_identity(),
                                  **self.describe_worker()}}

    def _after_clips(self, rows: Iterator[dict], decoded_inputs: set) -> Iterator[dict]:
        marked = 0
        for row in rows:
            if is_ok(row) and row.get("clip_index") is not None:
                decoded_inputs.add(row["row_index"])
                if marked < self.roundtrip_clips:
                    row = {**row, "roundtrip_qa": True}
                    marked += 1
            yield row

    def _encode_settings(self) -> dict:
        """The image encoder's dtype and device class: bf16 and the device can flip nearest-code ties."""
        for stage in self.stages:
            settings = stage.encode_settings
            if settings is not None:
                return {k: settings.get(k) for k in ("dtype", "device", "device_name")}
        return {}

    def _stage_counts(self) -> dict[str, dict]:
        return {stage.name: stage.stats() for stage in self.stages}

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def lost_inputs(inputs: list[dict], rows: list[dict]) -> list[dict]:
    """Ledger rows for inputs that no stage returned (a bug): nothing may vanish silently."""
    seen = {r.get("row_index") for r in rows}
    return [mark_error(r, "build", "internal_error", "the input's rows never came back from the pipeline")
            for r in inputs if r["row_index"] not in seen]


def previous_attempts(out, record: dict | None) -> dict[int, int]:
    """row_index -> attempts so far, for inputs that failed in the committed attempt of a shard redone."""
    if record is None:
        return {}
    ledger = read_ledger_part(out, record)
    return {int(i): int(n) + 1 for i, n in zip(ledger["row_index"], ledger["attempts"])}


@dataclass(frozen=True)
class BuildSpec:
    """What every shard task of one run needs (where to write, the layout, the configuration, the
    tokenizers), small enough to ship to each worker."""
    out: str
    endpoint: str | None
    layout: dict
    config: BuildConfig
    image_tokenizer: str
    text_tokenizer: str
    tokenizer_ids: dict
    fingerprint: str                         # the hash every record of this run carries
    stage_factory: Callable | None = None    # spec -> [Stage]: stand-in stages for benchmarks

    def writer(self) -> ShardWriter:
        return ShardWriter(Location(self.out, self.endpoint), self.layout, self.config.split, self.fingerprint)

    def shard_builder(self, image_encoder=None) -> BuildShard:
        if self.stage_factory is not None:
            return BuildShard(self.writer(), self.stage_factory(self), roundtrip_clips=0)
        stages = build_stages(self.config, self.image_tokenizer, self.text_tokenizer, image_encoder=image_encoder)
        return BuildShard(self.writer(), stages, roundtrip_clips=self.config.roundtrip_clips)


_builders: dict = {}       # per process: one BuildShard (and its decode child) for the current run


def shard_builder_for(spec: BuildSpec, encoder_factory: Callable | None = None) -> BuildShard:
    """This process's BuildShard for `spec` (made once, reused across its shard tasks); with
    `encoder_factory`, its tokenizer sends frames to the encoder the factory makes."""
    key = (spec.out, spec.fingerprint, encoder_factory is not None)
    builder = _builders.get(key)
    if builder is None:
        close_builders()
        builder = _builders[key] = spec.shard_builder(image_encoder=encoder_factory() if encoder_factory else None)
    return builder


def build_shard_task(spec: BuildSpec, descriptor: dict) -> dict:
    """The body of a shard task in process: one attempt's record, uncommitted."""
    return shard_builder_for(spec).build(descriptor)


def close_builders() -> None:
    for builder in _builders.values():
        builder.close()
    _builders.clear()
