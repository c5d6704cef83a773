"""clipforge: turn raw videos and captions into tokenized text-to-video training corpora (the CogVideo
method), and train the bundled CogVideo-style model on them.

The public API, for notebooks and scripts (the `clipforge` command calls the same functions):

    build(manifest, out, image_tokenizer, text_tokenizer, config)   a dataset of WebDataset shards
    reshard(inputs, output, config)                                  merge, split, shuffle, filter, hold out
    verify(dataset)                                                  check a dataset end to end
    audit(manifest_or_dataset, out)                                  a caption-quality report
    open_dataset(dataset)                                            its samples, decoded, on any filesystem
    train(dataset, run, config)                                      train the model on a dataset
    sample(run, prompt, out)                                         a video from text

Configurations: BuildConfig (with ClipConfig and CleanConfig), ReshardConfig, TrainConfig,
SamplingConfig, CogVideoConfig. A mistake in what is given raises ClipforgeError (a ValueError) with a
one-line message. docs/api.md walks through all of it.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable

from clipforge.model.config import CogVideoConfig, SamplingConfig, TrainConfig
from clipforge.pipeline.chain import BuildConfig
from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.reshard import ReshardConfig
from clipforge.pipeline.text.captions import CleanConfig
from clipforge.pipeline.video.clips import ClipConfig

__version__ = "0.3.0"

__all__ = ["build", "reshard", "verify", "audit", "open_dataset", "train", "sample", "BuildConfig", "ClipConfig",
           "CleanConfig", "ReshardConfig", "TrainConfig", "SamplingConfig", "CogVideoConfig", "ClipforgeError",
           "__version__"]

MANIFEST_COPY = "manifest.parquet"   # where build() keeps a DataFrame manifest, inside the dataset


def build(manifest, out: str, image_tokenizer: str, text_tokenizer: str, config: BuildConfig | None = None,
          **options) -> dict:
    """Build a dataset at `out` (a folder or an s3:// / gs:// URL) from `manifest`: a path or URL of a
    Parquet, CSV, TSV or JSON Lines file with `video` and `caption` columns, or a pandas DataFrame (kept
    in the dataset as manifest.parquet, so the build can be resumed). `options` are those of
    `clipforge.jobs.build.build`: address (a Ray cluster), resume, retry_failed, take_over, progress.
    Returns the completed dataset.json as a dict (its "funnel" says what became of every input)."""
    from clipforge.jobs.build import build as build_job

    config = config or BuildConfig()
    if not isinstance(manifest, (str, os.PathLike)):
        manifest = _stored_manifest(manifest, out, config.endpoint)
    return build_job(str(manifest), out, image_tokenizer, text_tokenizer, config, **options)


def _stored_manifest(frame, out: str, endpoint: str | None) -> str:
    """Write a DataFrame manifest into the dataset folder once; a different one for the same dataset is
    refused rather than replacing the manifest an earlier build of it used."""
    import pandas as pd

    from clipforge.pipeline.storage.dataset import check_output_folder
    from clipforge.pipeline.storage.fs import Location

    if not isinstance(frame, pd.DataFrame):
        raise ClipforgeError(f"manifest must be a path, a URL or a pandas DataFrame, not {type(frame).__name__}")
    dest = Location(out, endpoint)
    check_output_folder(dest)
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    data = buffer.getvalue()
    if dest.exists(MANIFEST_COPY):
        if dest.read_bytes(MANIFEST_COPY) != data:
            raise ClipforgeError(f"{dest.url} was built from another manifest (its {MANIFEST_COPY} differs from "
                                 f"this DataFrame): build into a new folder")
    else:
        dest.write_bytes(MANIFEST_COPY, data)
    return dest.child_url(MANIFEST_COPY)


def reshard(inputs, output: str, config: ReshardConfig | None = None, **options) -> dict:
    """Merge, split, shuffle, filter datasets into `output`, optionally holding out a validation split
    grouped by source video. `inputs`: one dataset or a list. `options`: address, endpoint, resume,
    take_over, progress. Returns the output's dataset.json as a dict."""
    from clipforge.jobs.reshard import reshard as reshard_job

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    return reshard_job([str(i) for i in inputs], str(output), config or ReshardConfig(), **options)


def verify(dataset: str, **options) -> dict:
    """Check every committed shard of a dataset against its records, index and ledger; returns a report
    whose "problems" list is empty when all is well. `options`: split, address, endpoint."""
    from clipforge.jobs.verify import verify_dataset

    return verify_dataset(str(dataset), **options)


def audit(source: str, out: str, **options) -> dict:
    """A caption-quality report (HTML, JSON and plots in `out`) of a manifest or a built dataset.
    `options`: text_tokenizer_path (token lengths against the text slot), slot."""
    from clipforge.pipeline.text.audit import audit as audit_job

    return audit_job(str(source), str(out), **options)


def open_dataset(dataset: str, split: str | None = "train", endpoint: str | None = None,
                 shuffle: int = 0) -> "Iterable[dict]":
    """A webdataset pipeline over a dataset's committed shards (local, file://, s3://, gs://), in commit
    order, yielding decoded samples: {"key", "meta", "caption", "vtok" (uint16 [T, h, w] codes), "ttok"
    (int32 text ids)}. `shuffle` > 0 shuffles within a buffer of that many samples."""
    from clipforge.pipeline.storage.shards import dataset_samples

    return dataset_samples(dataset, split, endpoint, shuffle)


def train(dataset: str, run: str, config: TrainConfig | None = None, **options) -> dict:
    """Train the CogVideo-style model on a built dataset into the folder `run` (checkpoints, log, the
    tokenizers). `options`: resume, overwrite. Returns a summary (steps, losses, tokens/s)."""
    from clipforge.model.train import train as train_job

    return train_job(str(dataset), str(run), config or TrainConfig(), **options)


def sample(run: str, prompt: str, out: str, config: SamplingConfig | None = None, **options) -> dict:
    """Generate a video for `prompt` with a trained run and write it to `out` (.mp4 or .gif). `config`
    says how codes are drawn; `options` are those of `clipforge.model.sample.sample` (frames_out, fps,
    image_run, interp_run, device)."""
    from clipforge.model.sample import sample as sample_job

    config = config or SamplingConfig()
    return sample_job(str(run), prompt, str(out), **{**dataclasses.asdict(config), **options})
