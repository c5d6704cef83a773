"""`dataset.json`, the one place a dataset's metadata is defined; the funnel and `wids/<split>.json`.

`DatasetInfo` owns the file: every reader and writer (build, reshard, verify, train, eval-synth) goes
through it. Its shape:

- `format`, `format_version`, `complete` (False from the start of a build until it ends);
- `fingerprint`: what decides the bytes of the shards (manifest digest and row count, the configuration
  that matters, tokenizer ids and hashes, layout, the versions of clipforge, the decoders and FFmpeg),
  and `fingerprint_sha256`, the hash every commit record of the run carries; `--resume` with a different
  fingerprint is refused, naming the first field that differs;
- filled at the end: `layout`, `sequence`, `tokenizers` (with the paths they were read from), `config`,
  `packages`, `funnel`, `encode_settings`, `run` (the last progress), `finished`; a resharded dataset
  has `reshard` instead of a manifest funnel.

The funnel and the wids index are recomputed from the accepted commit records (not from a run's memory),
which keeps them right after `--resume` and `--retry-failed`, and reads no tar or index bytes.
"""
from __future__ import annotations

import json
import time
import os
import platform
from collections import Counter
from importlib import metadata

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.commits import fingerprint_sha256
from clipforge.pipeline.storage.fs import Location, as_location

FORMAT = "clipforge-dataset"
FORMAT_VERSION = 3
INFO_NAME = "dataset.json"
PACKAGES = ("clipforge", "torch", "numpy", "decord", "av", "webdataset", "ray", "pandas", "pyarrow", "ftfy",
            "sentencepiece")
# the fields of a fingerprint a resume compares, in the order a refusal names them
FINGERPRINT_FIELDS = ("format_version", "manifest_sha256", "inputs", "layout", "tokenizers", "config", "code")


class DatasetError(ClipforgeError):
    """A dataset that cannot be used as asked (missing, foreign, incomplete, another run's)."""


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_versions() -> dict:
    """The code that decides a shard's bytes: clipforge, the decoders and the FFmpeg libraries PyAV links."""
    versions = {k: v for k, v in package_versions().items() if k in ("clipforge", "decord", "av", "numpy", "torch")}
    try:
        import av
        versions["ffmpeg"] = {k: ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
                              for k, v in sorted(av.library_versions.items())}
    except ImportError:
        versions["ffmpeg"] = None
    return versions


def _as_json(value):
    """Compared as stored: a tuple in a config is a list in dataset.json."""
    return json.loads(json.dumps(value, default=str))


def first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'}: was {a!r}, now {b!r}"


class DatasetInfo:
    """`dataset.json` of one dataset, as a dict with named accessors (`info.data` is the whole file)."""

    def __init__(self, data: dict):
        self.data = data

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def exists(cls, dataset, endpoint: str | None = None) -> bool:
        return as_location(dataset, endpoint).exists(INFO_NAME)

    @classmethod
    def read(cls, dataset, endpoint: str | None = None, validate: bool = True) -> "DatasetInfo":
        """`dataset.json`; `validate=False` for readers that only need what it has (shards written by
        other tools may carry a minimal one)."""
        root = as_location(dataset, endpoint)
        try:
            data = json.loads(root.read_text(INFO_NAME))
        except FileNotFoundError:
            raise DatasetError(f"{root.url}: no {INFO_NAME} (is this a built clipforge dataset?)") from None
        except ValueError as err:
            raise DatasetError(f"{root.child_url(INFO_NAME)} is not valid JSON: {err}") from None
        info = cls(data)
        if validate:
            info.validate(root.url)
        return info

    def validate(self, where: str = "") -> None:
        if not isinstance(self.data, dict) or self.data.get("format") != FORMAT:
            raise DatasetError(f"{where}: {INFO_NAME} is not a clipforge dataset's")
        if self.layout is None:
            raise DatasetError(f"{where}: {INFO_NAME} has no layout")

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def fingerprint(self) -> dict | None:
        return self.data.get("fingerprint")

    @property
    def fingerprint_sha256(self) -> str | None:
        return self.data.get("fingerprint_sha256")

    @property
    def layout(self) -> dict | None:
        return self.data.get("layout") or (self.fingerprint or {}).get("layout")

    @property
    def tokenizers(self) -> dict:
        """{"image"|"text": {"id", "sha256", "path"?, "dtype"?}}."""
        return self.data.get("tokenizers") or (self.fingerprint or {}).get("tokenizers") or {}

    @property
    def tokenizer_hashes(self) -> dict:
        return {k: v.get("sha256") for k, v in self.tokenizers.items()}

    @property
    def funnel(self) -> dict:
        return self.data.get("funnel") or {}

    @property
    def manifest(self) -> str | None:
        return self.data.get("manifest") or (self.fingerprint or {}).get("manifest")

    # -- writing ---------------------------------------------------------------------------------
    @classmethod
    def started(cls, fingerprint: dict, started: str) -> "DatasetInfo":
        return cls({"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
                    "fingerprint": fingerprint, "fingerprint_sha256": fingerprint_sha256(fingerprint),
                    "layout": fingerprint["layout"], "started": started})

    def write(self, dataset, endpoint: str | None = None) -> None:
        as_location(dataset, endpoint).write_text(INFO_NAME, json.dumps(self.data, indent=2, sort_keys=True,
                                                                        default=str))

    def complete_build(self, config: dict, text_slot: int, records: list[dict], tokenizer_paths: dict,
                       run: dict) -> None:
        """The fields a finished build adds: settings, sequence geometry, where the tokenizers were read
        from, versions, the funnel summed from the committed records, encode settings, the last progress."""
        fingerprint = self.fingerprint
        layout = fingerprint["layout"]
        tokens_per_frame = layout["tokens_h"] * layout["tokens_w"]
        self.data.update({
            "complete": True, "manifest": fingerprint["manifest"], "config": config, "layout": layout,
            "sequence": {"text_slot": text_slot, "frames": layout["frames"], "tokens_per_frame": tokens_per_frame,
                         "tokens": text_slot + layout["frames"] * tokens_per_frame},
            # where the tokenizers were read from, so that `train` and `sample` find them (not part of the
            # fingerprint: the same tokenizer may sit elsewhere on a resume)
            "tokenizers": {kind: {**ids, "path": tokenizer_paths[kind]}
                           for kind, ids in fingerprint["tokenizers"].items()},
            "packages": package_versions(),
            "funnel": funnel_from_records(records, fingerprint["inputs"]),
            # every (dtype, device class) that encoded some shard of this dataset
            "encode_settings": [dict(s) for s in sorted({tuple(sorted((r.get("encode_settings") or {}).items()))
                                                         for r in records})],
            "run": run,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def check_resume(self, fingerprint: dict) -> None:
        """Refuse to continue a dataset with another run's fingerprint, naming the first field that differs."""
        old = self.fingerprint
        if old is None:
            raise DatasetError(f"{INFO_NAME} has no run fingerprint (an older or foreign dataset): cannot "
                               f"resume it safely; build into a new --out")
        for name in [*FINGERPRINT_FIELDS, *sorted(set(old) | set(fingerprint) - set(FINGERPRINT_FIELDS))]:
            a, b = _as_json(old.get(name)), _as_json(fingerprint.get(name))
            if a != b:
                raise DatasetError(f"--resume refused: this run's {name} differs from the dataset's "
                                   f"({first_difference(a, b)})")


# what a clipforge job writes at the top of a dataset folder: anything else there is the user's
OWN_NAMES = frozenset({INFO_NAME, "manifest.parquet", "progress.json", "lease", "commits", "shards", "index", "ledger", "wids",
                       "keymap.parquet"})


def build_fingerprint(manifest: str, manifest_sha256: str, inputs: int, layout: dict, tokenizers: dict,
                      config: dict) -> dict:
    """What makes a build's bytes: a resume must match it field for field (`check_resume`)."""
    return {"format_version": FORMAT_VERSION, "manifest": manifest, "manifest_sha256": manifest_sha256,
            "inputs": inputs, "layout": layout, "tokenizers": tokenizers, "config": config, "code": code_versions()}


def check_output_folder(dest: Location) -> None:
    """Refuse an output folder that holds anything but a clipforge dataset's own files: a job writes into
    a new or empty folder, or continues its own dataset, and never mixes its files with a user's."""
    import pyarrow.fs as pafs

    if dest.exists(INFO_NAME):
        return
    infos = dest.fs.get_file_info(pafs.FileSelector(dest.path(), allow_not_found=True, recursive=False))
    foreign = sorted(i.base_name for i in infos if i.base_name not in OWN_NAMES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DatasetError(f"{dest.url} is not empty and not a clipforge dataset (it holds {shown}): "
                           f"write into a new or empty folder")


def funnel_from_records(records: list[dict], inputs: int) -> dict:
    """inputs → videos decoded → clips → samples written, and failures by stage/reason.

    `videos_decoded` counts inputs whose video was decoded into clips (caption failures were never
    decoded and are not subtracted from anything else); `clips` counts every clip cut, whether it
    became a sample or failed later.
    """
    with_samples = sum(r["inputs_with_samples"] for r in records)
    without = sum(r["inputs_failed"] for r in records)
    failures: Counter = Counter()
    for r in records:
        failures.update(r.get("errors_by_stage_reason", {}))
    return {
        "inputs": inputs,
        "shards": len(records),
        "videos_decoded": sum(r.get("videos_decoded", 0) for r in records),
        "clips": sum(r.get("clips", r["samples"]) for r in records),
        "samples": sum(r["samples"] for r in records),
        "inputs_with_samples": with_samples,
        "inputs_without_samples": without,
        "accounted": with_samples + without == inputs,
        "failures": dict(sorted(failures.items())),
    }


def write_json(out: Location, name: str, payload: dict) -> None:
    out.write_text(name, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_wids_index(out: Location, records: list[dict], split: str = "train") -> None:
    """The shard list wids reads for random access (empty shards are left out: wids cannot index them).
    URLs are relative to the index file, so the dataset can be moved or read from an object store."""
    shardlist = [{"url": f"../{r['files']['tar']['name']}", "nsamples": r["samples"]} for r in records if r["samples"]]
    out.makedirs("wids")
    write_json(out, f"wids/{split}.json", {"__kind__": "wids-shard-index-v1", "name": f"clipforge-{split}",
                                            "wids_version": 1, "shardlist": shardlist})


def absolute(path) -> str:
    return str(path) if "://" in str(path) else os.path.abspath(str(path))
