"""The filter language can only compare: it selects rows and runs nothing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from clipforge.pipeline.filters import FilterError, parse_filter

FRAME = pd.DataFrame({"rate": [0.5, 1.0, 2.0, None], "caption_tokens": [10, 70, 30, 5],
                      "mode": ["sequential", "interpolation", "sequential", None],
                      "caption_cut": [False, True, False, False], "span": [8.0, 4.0, 2.0, 1.0]})


@pytest.mark.parametrize("text, rows", [
    ("rate >= 1 and caption_tokens <= 64", [2]),
    ("mode == 'sequential'", [0, 2]),
    ('mode in ["interpolation", "other"]', [1]),
    ("mode not in ['sequential']", [1, 3]),
    ("not caption_cut", [0, 2, 3]),
    ("1 <= span < 8", [1, 2, 3]),
    ("2 > rate", [0, 1]),                     # missing values compare false
    ("(rate < 1 or span == 1.0) and not caption_cut", [0, 3]),
    ("caption_tokens > -1", [0, 1, 2, 3]),
])
def test_comparisons_select_the_same_rows_as_pandas_would(text, rows):
    mask = parse_filter(text, list(FRAME.columns))(FRAME)
    assert list(np.flatnonzero(mask)) == rows


@pytest.mark.parametrize("text, says", [
    ('@tarfile.os.system("id > F") == 0', "'@' is not allowed"),
    ("rate.__class__ == 1", "'.' is not allowed"),
    ("__import__('os').system('id') == 0", "'.' is not allowed"),
    ("__import__('os') == 0", "call is not allowed"),
    ("len(mode) > 3", "call is not allowed"),
    ("open == 1", "unknown column 'open'"),
    ("mode[0] == 's'", "subscript is not allowed"),
    ("rate + 1 > 2", "'+' is not allowed"),
    ("lambda: 1", "':' is not allowed"),
    ("no_such_column > 1", "unknown column 'no_such_column'"),
    ("rate >", "cannot parse"),
    ("", "empty"),
])
def test_anything_else_is_refused_naming_the_token(text, says):
    with pytest.raises(FilterError, match=pytest.importorskip("re").escape(says)):
        parse_filter(text, list(FRAME.columns))


def test_the_reshard_exploit_runs_nothing_and_says_why(tmp_path):
    proof = tmp_path / "F"
    res = subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "reshard", str(tmp_path / "in"),
                          str(tmp_path / "out"), "--filter", f'@tarfile.os.system("id > {proof}") == 0'],
                         capture_output=True, text=True)
    assert res.returncode == 2 and not proof.exists()
    assert res.stderr.count("\n") == 1 and "'@' is not allowed" in res.stderr, res.stderr
