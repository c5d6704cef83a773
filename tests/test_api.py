"""The public API: `import clipforge` lists it, and docs/api.md's example runs as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import clipforge

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_help_lists_the_api():
    text = subprocess.run([sys.executable, "-c", "import clipforge; help(clipforge)"], capture_output=True,
                          text=True, check=True, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"}).stdout
    for name in ("build", "reshard", "verify", "audit", "open_dataset", "train", "sample", "BuildConfig",
                 "TrainConfig", "SamplingConfig", "ReshardConfig", "ClipforgeError"):
        assert re.search(rf"\b{name}\b", text), name
    assert set(clipforge.__all__) >= {"build", "open_dataset", "TrainConfig"}


@pytest.mark.slow
def test_the_api_doc_example_runs(corpus, text_tokenizer, image_tokenizer, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    scope = {"MANIFEST": str(corpus), "TEXT_TOKENIZER": str(text_tokenizer),
             "IMAGE_TOKENIZER": str(image_tokenizer), "WORK": str(tmp_path)}
    exec(compile(blocks[0], str(API_DOC), "exec"), scope)
    assert scope["info"]["funnel"]["samples"] > 0
    assert (tmp_path / "dataset" / "manifest.parquet").exists()   # the DataFrame, kept for a resume
    assert Path(scope["video"]["out"]).stat().st_size > 0
    # the same DataFrame resumes the same dataset; another one is refused, and its manifest is kept
    frame = scope["manifest"]
    again = clipforge.build(frame, str(tmp_path / "dataset"), str(image_tokenizer), str(text_tokenizer),
                            scope["config"], resume=True, progress=False, log=lambda *_: None)
    assert again["funnel"] == scope["info"]["funnel"]
    before = (tmp_path / "dataset" / "manifest.parquet").read_bytes()
    with pytest.raises(clipforge.ClipforgeError, match="another manifest"):
        clipforge.build(frame.head(2), str(tmp_path / "dataset"), str(image_tokenizer), str(text_tokenizer),
                        scope["config"], resume=True, progress=False)
    assert (tmp_path / "dataset" / "manifest.parquet").read_bytes() == before


def test_open_dataset_and_build_refuse_what_they_cannot_use(tmp_path):
    with pytest.raises(clipforge.ClipforgeError):
        clipforge.build(42, str(tmp_path / "out"), "tok", "text.model")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(clipforge.ClipforgeError):
        clipforge.build(pd.DataFrame({"video": ["a.mp4"], "caption": ["c"]}), str(tmp_path / "mine"), "tok",
                        "text.model")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
