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
    from clipforge.model.checkpoint import claim_run_folder

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
