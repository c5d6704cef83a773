"""A user's folder is theirs: no command writes over or deletes a file it did not write in this run; and
captions that look like markup do not stop the audit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

CLI = [sys.executable, "-m", "clipforge.jobs.cli"]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


def _build_args(manifest, out, image_tokenizer, text_tokenizer):
    return ["build", manifest, "--out", out, "--image-tokenizer", image_tokenizer, "--text-tokenizer",
            text_tokenizer, "--size", "64", "--text-slot", "24", "--runner", "local", "--quiet"]


def test_build_into_a_users_project_folder_is_refused_and_touches_nothing(corpus, image_tokenizer, text_tokenizer,
                                                                         tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    pd.read_parquet(corpus).to_parquet(project / "manifest.parquet")
    pd.read_parquet(corpus).to_csv(project / "subset.csv", index=False)
    (project / "notes.txt").write_text("days of work")
    before = _snapshot(project)
    for manifest in (project, project / "manifest.parquet", project / "subset.csv"):
        res = _run(*_build_args(manifest, project, image_tokenizer, text_tokenizer))
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert _snapshot(project) == before
    assert "not empty and not a clipforge dataset" in res.stderr


def test_reshard_into_a_users_folder_is_refused(tmp_path):
    from clipforge.jobs.reshard import reshard
    from clipforge.pipeline.storage.dataset import DatasetError

    users = tmp_path / "users"
    users.mkdir()
    (users / "keep.bin").write_bytes(b"\0" * 10)
    from clipforge.pipeline.storage.dataset import check_output_folder
    from clipforge.pipeline.storage.fs import Location
    with pytest.raises(DatasetError, match="not empty and not a clipforge dataset"):
        check_output_folder(Location(users))
    with pytest.raises((DatasetError, FileNotFoundError, ValueError)):
        reshard([str(tmp_path / "no-dataset")], str(users), progress=False)
    assert (users / "keep.bin").read_bytes() == b"\0" * 10


def test_a_training_run_is_replaced_only_when_asked(tmp_path):
    from clipforge.model.run_folder import claim_local as claim_run_folder

    run = tmp_path / "run"
    run.mkdir()
    for name in ("latest.json", "log.jsonl", "ckpt_000100.pt"):
        (run / name).write_text("the first run")
    with pytest.raises(FileExistsError, match="--resume to continue it, or --overwrite"):
        claim_run_folder(run, overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_000100.pt", "latest.json", "log.jsonl"]
    claim_run_folder(run, overwrite=True)
    assert list(run.iterdir()) == []
    (run / "my-notes.md").write_text("mine")   # a folder holding anything else is refused even with overwrite
    with pytest.raises(FileExistsError, match="not a training run's"):
        claim_run_folder(run, overwrite=True)
    assert (run / "my-notes.md").read_text() == "mine"


def test_a_tokenizer_that_datasets_are_pinned_to_is_not_replaced(corpus, tmp_path):
    out = tmp_path / "text.model"
    out.write_bytes(b"the tokenizer a dataset was built with")
    res = _run("tokenizer", "train-text", corpus, "--out", out, "--vocab-size", "60")
    assert res.returncode == 2 and "already holds a text tokenizer" in res.stderr, res.stderr
    assert out.read_bytes() == b"the tokenizer a dataset was built with"
    image = tmp_path / "image"
    image.mkdir()
    (image / "weights.pt").write_bytes(b"weights")
    res = _run("tokenizer", "train-image", corpus, "--out", image, "--steps", "1")
    assert res.returncode == 2 and "already holds an image tokenizer" in res.stderr, res.stderr
    assert (image / "weights.pt").read_bytes() == b"weights"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "mine"
    (folder / "dataset").mkdir(parents=True)
    (folder / "dataset" / "thesis.tex").write_text("do not delete")
    res = _run("demo", "--out", folder)
    assert res.returncode == 2 and "not a folder clipforge demo made" in res.stderr, res.stderr
    assert (folder / "dataset" / "thesis.tex").read_text() == "do not delete"


def test_no_bucket_is_created_by_a_typo(s3_server, corpus, image_tokenizer, text_tokenizer):
    import pyarrow.fs as pafs

    res = _run(*_build_args(corpus, "s3://datasetz/ds", image_tokenizer, text_tokenizer))
    assert res.returncode != 0
    fs = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    buckets = [i.base_name for i in fs.get_file_info(pafs.FileSelector("/", recursive=False))]
    assert "datasetz" not in buckets and "datasets" in buckets


def test_the_audit_renders_captions_that_look_like_math(tmp_path):
    from clipforge.pipeline.text.audit import audit

    captions = [r"$\frac{1}{$ a cat", "$x^$ runs", r"a $\alpha_{$ b", "$$", "price $5 and $6"] * 3
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"video": [f"/v/{i}.mp4" for i in range(len(captions))], "caption": captions}).to_csv(manifest,
                                                                                                      index=False)
    audit(str(manifest), str(tmp_path / "audit"))
    html = (tmp_path / "audit" / "report.html").read_text()
    assert "<img" in html and json.loads((tmp_path / "audit" / "summary.json").read_text())


def _hostile_manifest(corpus, folder: Path) -> tuple[Path, list[int], list[int]]:
    """Good videos mixed with 30 hostile rows, as JSON Lines (mixed types per column). Returns the
    manifest, the rows that must give samples and the rows that must be ledger rows."""
    good = pd.read_parquet(corpus)
    good = good[~good["broken"]] if "broken" in good.columns else good
    videos = [str(v) for v in good["video"]][:3]
    folder.mkdir(parents=True, exist_ok=True)
    playlist = folder / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXTINF:1,\n{videos[0]}\n")
    secret = "http://alice:SECRETPW@127.0.0.1:9/v.mp4?X-Amz-Security-Token=SECRETTOKEN&X-Amz-Signature=SECRETSIG"
    hostile = [
        {"video": "http://[::1/v.mp4", "caption": "a red circle moves left"},
        {"video": "/videos/a\x00b.mp4", "caption": "a red circle moves left"},
        {"video": "", "caption": "a red circle moves left"},
        {"video": None, "caption": "a red circle moves left"},
        {"video": 12345, "caption": "a red circle moves left"},
        {"video": "ftp://example.invalid/v.mp4", "caption": "a red circle moves left"},
        {"video": "s3://", "caption": "a red circle moves left"},
        {"video": secret, "caption": "a red circle moves left"},
        {"video": "https://bob:SECRETPW@127.0.0.1:9/x.mp4", "caption": "a blue square"},
        {"video": str(playlist), "caption": "a playlist"},
        {"video": str(folder), "caption": "a folder"},
        {"video": str(folder / "missing.mp4"), "caption": "missing"},
        {"video": videos[0], "caption": None},
        {"video": videos[0], "caption": 12345},
        {"video": videos[0], "caption": ["a", "list"]},
        {"video": videos[0], "caption": {"a": "dict"}},
        {"video": videos[0], "caption": ""},
        {"video": videos[0], "caption": "\x00\x01\x02"},
        {"video": videos[1], "caption": "a red circle moves left", "start": 1e308, "end": 1e308},
        {"video": videos[1], "caption": "a red circle moves left", "start": 50, "end": 10},
        {"video": videos[1], "caption": "a red circle moves left", "start": "abc", "end": "def"},
        {"video": videos[1], "caption": "a red circle moves left", "start": -1e9, "end": -5},
        {"video": videos[2], "caption": "a red circle moves left", "id": "dup"},
        {"video": videos[2], "caption": "a red circle moves left", "id": "dup"},
        {"video": videos[2], "caption": "a red circle moves left", "id": "dup"},
        {"video": "../../../../etc/passwd", "caption": "a red circle moves left"},
        {"video": "/dev/zero", "caption": "a red circle moves left"},
        {"video": "file:///etc/hostname", "caption": "a red circle moves left"},
        {"video": "x" * 5000 + ".mp4", "caption": "a red circle moves left"},
        {"video": "http://127.0.0.1:9/" + "%00" * 10 + ".mp4", "caption": "a red circle moves left"},
    ]
    big = "a red circle moves left " * 900_000   # about 20 MB
    rows = [{"video": v, "caption": c} for v, c in zip(videos, ["a red circle moves left", big, "a blue square"])]
    rows += hostile
    # the first "dup" row keeps its id; the duplicates must be ledger rows
    manifest = folder / "hostile.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    must_sample = [0, 1, 2, 3 + 22]
    return manifest, must_sample, [3 + 23, 3 + 24]


def _check_hostile_build(out: Path, manifest: Path, must_sample: list[int], must_fail: list[int]) -> None:
    from clipforge.pipeline.storage.shards import read_index, read_ledger

    info = json.loads((out / "dataset.json").read_text())
    rows = manifest.read_text().count("\n")
    assert info["funnel"]["inputs"] == rows and info["funnel"]["accounted"], info["funnel"]
    index, ledger = read_index(out), read_ledger(out)
    assert set(must_sample) <= set(index.row_index), sorted(set(index.row_index))
    assert set(must_fail) <= set(ledger.row_index)
    assert set(index.row_index) | set(ledger.row_index) == set(range(rows))   # every row accounted
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (b"SECRETPW", b"SECRETTOKEN", b"SECRETSIG"):
                assert secret not in data, (path, secret)
            assert len(data) < 5_000_000, path   # the 20 MB caption is not copied into outputs


def test_a_hostile_manifest_builds_to_completion_in_process(corpus, image_tokenizer, text_tokenizer, tmp_path):
    manifest, must_sample, must_fail = _hostile_manifest(corpus, tmp_path / "in")
    res = _run(*_build_args(manifest, tmp_path / "ds", image_tokenizer, text_tokenizer), "--inputs-per-shard", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    _check_hostile_build(tmp_path / "ds", manifest, must_sample, must_fail)


@pytest.mark.ray
@pytest.mark.slow
def test_a_hostile_manifest_builds_to_completion_on_ray(corpus, image_tokenizer, text_tokenizer, tmp_path):
    manifest, must_sample, must_fail = _hostile_manifest(corpus, tmp_path / "in")
    args = _build_args(manifest, tmp_path / "ds", image_tokenizer, text_tokenizer)
    args[args.index("local")] = "ray"
    res = _run(*args, "--inputs-per-shard", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    _check_hostile_build(tmp_path / "ds", manifest, must_sample, must_fail)


def test_fetch_folders_of_killed_processes_are_removed(tmp_path, monkeypatch):
    import os
    import tempfile

    from clipforge.pipeline.video.decode_stage import FETCH_PREFIX, remove_stale_fetches

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{FETCH_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{FETCH_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "video.mp4").write_bytes(b"\0" * 1000)
    (tmp_path / "users-folder").mkdir()
    assert remove_stale_fetches() == 1
    assert not stale.exists() and live.exists() and (tmp_path / "users-folder").exists()
