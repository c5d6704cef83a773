"""`clipforge build`: manifest → cleaned captions → decoded clips → tokens → committed shards.

This module only wires stages: the stages live in `pipeline/`, the one Ray adapter in `jobs/ray_stage.py`,
the shard commit protocol in `pipeline/shards.py`. The driver assembles each shard from the rows of its
input group as they arrive (in any order) and commits it as soon as all of that group's inputs are done.
"""
from __future__ import annotations

import functools
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from clipforge.pipeline.text.captions import CleanCaption, CleanConfig
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode import DecodeVideo
from clipforge.pipeline.manifest import manifest_rows, read_manifest
from clipforge.pipeline.schema import is_ok, mark_error
from clipforge.pipeline.storage.shards import ShardCommitter
from clipforge.pipeline.storage.dataset import write_dataset_info
from clipforge.pipeline.tokenize import TokenizeClips
from clipforge.jobs.ray_stage import StageSpec


@dataclass(frozen=True)
class BuildConfig:
    clips: ClipConfig = field(default_factory=ClipConfig)
    captions: CleanConfig = field(default_factory=CleanConfig)
    inputs_per_shard: int = 64          # manifest rows per shard: fixes which sample lands where
    text_slot: int = 64
    decode_timeout_s: float = 120.0     # per video; a hung decoder is killed after this
    decode_memory_mb: int = 8192        # address-space limit of the isolated decoder
    decode_workers: int = 0             # 0: one per CPU but one
    tokenize_batch: int = 32
    tokenize_workers: int = 0           # 0: one per GPU, or one on CPU
    split: str = "train"
    runner: str = "ray"                 # ray | local (in-process, for debugging)


def build(manifest: str, out: str, image_tokenizer: str, text_tokenizer: str,
          config: BuildConfig = BuildConfig(), address: str | None = None, resume: bool = False,
          retry_failed: bool = False, progress: bool = True, log=print) -> dict:
    out_dir = Path(out)
    if (out_dir / "dataset.json").exists() and not (resume or retry_failed):
        raise FileExistsError(f"{out} already holds a dataset: pass --resume or --retry-failed, or pick another --out")
    df = read_manifest(manifest)
    committer = ShardCommitter(out_dir, layout=_layout(config, image_tokenizer), split=config.split)
    groups = defaultdict(list)
    for row in manifest_rows(df):
        groups[row["row_index"] // config.inputs_per_shard].append(row)
    todo = {s: rows for s, rows in groups.items() if not _done(committer, s, retry_failed)}
    log(f"build: {len(df)} inputs in {len(groups)} shards; {len(groups) - len(todo)} already committed")
    rows = [r for s in sorted(todo) for r in todo[s]]
    if rows:
        if config.runner == "ray":
            _start_ray(address)
        specs = _stage_specs(config, image_tokenizer, text_tokenizer)   # sized by the cluster's resources
        stream = _run_ray(rows, specs) if config.runner == "ray" else _run_local(rows, specs)
        _assemble_and_commit(stream, todo, committer, progress, _previous_attempts(committer, todo))
    return write_dataset_info(out_dir, manifest=manifest, config=asdict(config), layout=committer.layout,
                              image_tokenizer=image_tokenizer, text_tokenizer=text_tokenizer,
                              inputs=len(df), split=config.split)


def _done(committer: ShardCommitter, shard: int, retry_failed: bool) -> bool:
    if not committer.committed(shard):
        return False
    if retry_failed:   # redo the whole shard, so a retried sample still lands in its own shard, once
        import json
        stats = json.loads(committer.paths(shard)["stats"].read_text())
        return stats.get("transient_errors", 0) == 0
    return True


def _previous_attempts(committer: ShardCommitter, shards) -> dict[int, int]:
    """row_index -> attempts so far, for inputs that failed in an earlier run of a shard being redone."""
    import pandas as pd

    attempts: dict[int, int] = {}
    for shard in shards:
        path = committer.paths(shard)["ledger"]
        if path.exists():
            for row_index, n in pd.read_parquet(path, columns=["row_index", "attempts"]).itertuples(index=False):
                attempts[int(row_index)] = int(n) + 1
    return attempts


def _layout(config: BuildConfig, image_tokenizer: str) -> dict:
    from clipforge.tokenizer.image import ImageTokenizer

    tok = ImageTokenizer.load(image_tokenizer)
    h, w = tok.tokens_hw
    if tok.image_size != config.clips.size:
        raise ValueError(f"the image tokenizer takes {tok.image_size}px frames but clips are {config.clips.size}px: "
                         f"set --size {tok.image_size}")
    return {"frames": config.clips.frames, "frame_size": config.clips.size, "tokens_h": h, "tokens_w": w,
            "text_slot": config.text_slot, "image_vocab": tok.codebook_size}


def _stage_specs(config: BuildConfig, image_tokenizer: str, text_tokenizer: str) -> list[StageSpec]:
    """Adding a step is one class in pipeline/ and one entry here."""
    cpus, gpus = _resources()
    return [
        StageSpec("captions", functools.partial(CleanCaption, config.captions), batch_size=256, num_cpus=0.25),
        StageSpec("decode", functools.partial(DecodeVideo, config.clips, config.decode_timeout_s,
                                              config.decode_memory_mb),
                  batch_size=1, concurrency=config.decode_workers or max(1, int(cpus) - 1), num_cpus=1.0),
        StageSpec("tokenize", functools.partial(TokenizeClips, image_tokenizer, text_tokenizer, config.text_slot,
                                                config.tokenize_batch),
                  batch_size=config.tokenize_batch, concurrency=config.tokenize_workers or max(1, int(gpus)),
                  num_cpus=0.5 if not gpus else 1.0, num_gpus=1.0 if gpus else 0.0),
    ]


def _resources() -> tuple[float, float]:
    try:
        import ray
        if ray.is_initialized():
            res = ray.cluster_resources()
            return float(res.get("CPU", 1)), float(res.get("GPU", 0))
    except ImportError:
        pass
    import torch
    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def _run_local(rows: list[dict], specs: list[StageSpec]) -> Iterator[dict]:
    stream: Iterable[dict] = iter(rows)
    for spec in specs:
        stream = spec.factory()(stream)
    yield from stream


def _start_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False   # our own bar counts inputs


def _run_ray(rows: list[dict], specs: list[StageSpec]) -> Iterator[dict]:
    import ray

    from clipforge.jobs.ray_stage import RayStage, batch_to_rows, rows_to_batch

    # small input blocks so that decoding spreads over all workers from the start
    blocks = [rows_to_batch(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    ds = ray.data.from_arrow(blocks)
    for spec in specs:
        ds = ds.map_batches(RayStage, fn_constructor_args=(spec,), batch_size=spec.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=spec.concurrency), num_cpus=spec.num_cpus,
                            num_gpus=spec.num_gpus, batch_format="pyarrow", zero_copy_batch=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch_to_rows(batch)


def _assemble_and_commit(stream: Iterator[dict], groups: dict[int, list[dict]], committer: ShardCommitter,
                         progress: bool, attempts: dict[int, int]) -> None:
    """Collect rows per shard; commit a shard once each of its inputs has failed or delivered all its clips."""
    from tqdm import tqdm

    shard_of = {r["row_index"]: s for s, rows in groups.items() for r in rows}
    pending = {s: {r["row_index"] for r in rows} for s, rows in groups.items()}
    got: dict[int, list[dict]] = defaultdict(list)
    arrived: dict[int, int] = defaultdict(int)
    bar = tqdm(total=len(shard_of), desc="inputs", unit="video", disable=not progress)
    for row in stream:
        idx = row["row_index"]
        shard = shard_of[idx]
        got[shard].append(row)
        arrived[idx] += 1
        # an input is complete when it failed before being split into clips, or all its clips came back
        total = row.get("clips_total")
        if (total is None and not is_ok(row)) or (total is not None and arrived[idx] >= total):
            if idx in pending[shard]:
                pending[shard].discard(idx)
                bar.update(1)
            if not pending[shard]:
                committer.write(shard, got.pop(shard), inputs=len(groups[shard]), attempts=attempts)
    bar.close()
    for shard, missing in pending.items():   # nothing may vanish silently: account for lost inputs
        if missing:
            lost = [mark_error(r, "build", "internal_error", "the input's rows never came back from the pipeline")
                    for r in groups[shard] if r["row_index"] in missing]
            committer.write(shard, got.pop(shard, []) + lost, inputs=len(groups[shard]), attempts=attempts)


def with_overrides(config: BuildConfig, **changes) -> BuildConfig:
    clip_changes = {k: v for k, v in changes.items() if k in ClipConfig.__dataclass_fields__ and v is not None}
    build_changes = {k: v for k, v in changes.items() if k in BuildConfig.__dataclass_fields__ and v is not None}
    return replace(config, clips=replace(config.clips, **clip_changes), **build_changes)
