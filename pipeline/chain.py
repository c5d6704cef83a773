"""The build's configuration and its chain of stages, made in one place: `build`, `estimate` and tokenizer
training all call `build_stages`, so a pilot measures what the build does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from clipforge.pipeline.stages import ImageEncoder, Stage
from clipforge.pipeline.text.captions import CleanCaption, CleanConfig
from clipforge.pipeline.tokenize import TokenizeClips
from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode_stage import DecodeVideo


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build is configured by. The fields in `RUN_ONLY_FIELDS` change how a run goes, not
    what lands in the shards, and may differ on `--resume`."""
    clips: ClipConfig = field(default_factory=ClipConfig)
    captions: CleanConfig = field(default_factory=CleanConfig)
    inputs_per_shard: int = 64          # manifest rows per shard task: fixes which sample lands where
    text_slot: int = 64
    decode_timeout_s: float = 120.0     # per video; a hung decoder is killed after this
    decode_memory_mb: int = 8192        # address-space limit of the isolated decoder
    shard_tasks: int = 0                # shard tasks running at once; 0: every CPU the tokenizers leave free
    shard_timeout_s: float = 3600.0     # a shard task running longer is cancelled and run again
    task_attempts: int = 4              # tries of a shard task before its inputs become transient ledger rows
    tokenize_batch: int = 32            # clips per image-tokenizer call (a GPU worker batches across shards)
    tokenize_workers: int = 0           # GPU tokenizer workers; 0: as many as whole GPUs hold shares
    tokenize_gpus: float = 1.0          # GPU share of one tokenizer worker (0.4: two per GPU, never split)
    tokenize_cpus: float = 0.5          # CPU share of one tokenizer worker
    tokenize_dtype: str = "float32"     # float32 | bfloat16 | float16 (icetk only); can flip ties: recorded
    tokenize_timeout_s: float = 300.0   # a GPU worker that does not answer a call in this time is skipped
    tokenize_inflight_mb: int = 256     # frames a shard task has sent to GPU workers and not yet got back
    roundtrip_clips: int = 2            # clips per shard decoded back to pictures for a PSNR in the record
    gc_grace_s: float = 900.0           # unnamed attempt parts younger than this are never removed
    lease_ttl_s: float = 120.0          # a driver that has not renewed its lease for this long is gone
    commit_every_s: float = 2.0         # accepted records are written to the commit log at most this often
    split: str = "train"
    runner: str = "ray"                 # ray | local (in-process, for debugging)
    endpoint: str | None = None         # S3-compatible endpoint (default: AWS_ENDPOINT_URL)


# config fields that change how a run goes, not the bytes: they may differ on --resume
RUN_ONLY_FIELDS = ("shard_tasks", "shard_timeout_s", "task_attempts", "tokenize_workers", "tokenize_gpus",
                   "tokenize_cpus", "tokenize_timeout_s", "tokenize_inflight_mb", "runner", "endpoint",
                   "decode_timeout_s", "decode_memory_mb", "tokenize_batch", "gc_grace_s", "lease_ttl_s",
                   "commit_every_s")


def build_stages(config: BuildConfig, image_tokenizer: str | None = None, text_tokenizer: str | None = None,
                 image_encoder: ImageEncoder | None = None, decode: bool = True) -> list[Stage]:
    """The build's row stages, in order: clean captions → decode → tokenize (when tokenizers are given).
    `image_encoder` replaces the local image tokenizer (GPU workers); `decode=False` stops after captions."""
    stages: list[Stage] = [CleanCaption(config.captions)]
    if decode:
        stages.append(DecodeVideo(config.clips, config.decode_timeout_s, config.decode_memory_mb))
    if decode and (image_encoder is not None or image_tokenizer) and text_tokenizer:
        stages.append(TokenizeClips(image_tokenizer, text_tokenizer, config.text_slot, config.tokenize_batch,
                                    dtype=config.tokenize_dtype, image_encoder=image_encoder,
                                    inflight_bytes=config.tokenize_inflight_mb << 20))
    return stages
