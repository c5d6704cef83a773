"""One typed KEY.json schema: readers that infer types from the first samples read every sample.

The dataset is built from real video files, with broken files among the inputs, and its first captions
are clean while later ones are dirty (so `caption_flags` is empty first and filled later, the case that
broke type inference before)."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import webdataset as wds

from clipforge.jobs.build import BuildConfig, build, with_overrides
from clipforge.pipeline.storage.samples import SOURCE_INFO_FIELDS
from clipforge.pipeline.storage.shards import read_index, shard_urls


@pytest.fixture(scope="module")
def clean_then_dirty(corpus, image_tokenizer, text_tokenizer, tmp_path_factory):
    df = pd.read_parquet(corpus)
    dirty = df["caption"].astype(str).str.contains(r"[<&@]|http|Ã", regex=True)
    ordered = pd.concat([df[~dirty], df[dirty]], ignore_index=True)
    ordered["extra_note"] = [None if i % 2 else f"note {i}" for i in range(len(ordered))]   # null, then text
    manifest = tmp_path_factory.mktemp("ordered") / "manifest.parquet"
    ordered.to_parquet(manifest)
    out = tmp_path_factory.mktemp("schema") / "ds"
    config = with_overrides(BuildConfig(), size=64, mode="both", inputs_per_shard=3, text_slot=24, runner="local")
    build(str(manifest), str(out), str(image_tokenizer), str(text_tokenizer), config, progress=False)
    return out


def _metas(ds) -> list[dict]:
    return [json.loads(s["json"]) for s in wds.WebDataset(shard_urls(ds), shardshuffle=False, empty_check=False)]


def _shape(value):
    """A value's type, recursively (list element types included)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", sorted({json.dumps(_shape(v)) for v in value})]
    return type(value).__name__


def test_every_sample_has_the_same_keys_and_types(clean_then_dirty):
    metas = _metas(clean_then_dirty)
    assert len(metas) > 4
    flags = [m["caption_flags"] for m in metas]
    assert flags[0] == "" and any(flags), "the fixture must start clean and turn dirty"
    first = _shape(metas[0])
    for m in metas:
        shape = _shape(m)
        # lists hold one element type; empty lists would type as nothing, so none is empty
        for key in ("frame_indices", "timestamps", "crop"):
            assert len(shape[key][1]) == 1, (key, m[key])
        assert {k: v for k, v in shape.items() if k not in ("frame_indices", "timestamps", "crop")} == \
            {k: v for k, v in first.items() if k not in ("frame_indices", "timestamps", "crop")}
    assert not any(v is None for m in metas for v in m.values())
    assert set(metas[0]["source_info"]) == set(SOURCE_INFO_FIELDS)


def test_hugging_face_datasets_reads_every_sample(clean_then_dirty, tmp_path):
    # a fresh process, offline, with its own cache: what a user's notebook does
    code = (
        "import json, sys, datasets\n"
        "ds = datasets.load_dataset('webdataset', data_files={'train': json.loads(sys.argv[1])}, split='train',"
        " cache_dir=sys.argv[2])\n"
        "print(json.dumps({'rows': ds.num_rows, 'keys': sorted(ds['__key__']),"
        " 'flags': [r['caption_flags'] for r in ds['json']]}))\n"
    )
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(shard_urls(clean_then_dirty)), str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    index = read_index(clean_then_dirty)
    assert got["rows"] == len(index) and got["keys"] == sorted(index.key)
    assert got["flags"][0] == "" and any(got["flags"])


def test_audit_of_a_missing_input_says_so(tmp_path):
    res = subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "audit", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "a")], capture_output=True, text=True)
    assert res.returncode == 2 and "no such file" in res.stderr, res.stderr
