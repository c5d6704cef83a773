"""Bad invocations: each says what is wrong in one line, naming the file or setting, with no traceback.
`docs/errors.md` lists the same invocations and what the user sees."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from clipforge.jobs.cli import main


def _invocations(tmp: Path, corpus: Path, image_tokenizer: Path, text_tokenizer: Path) -> list[list[str]]:
    empty_csv = tmp / "empty.csv"
    empty_csv.write_text("")
    no_caption = tmp / "nocaption.csv"
    no_caption.write_text("video\n/a.mp4\n")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("a: [\n b")
    unknown_key = tmp / "unknown.toml"
    unknown_key.write_text("no_such_setting = 1\n")
    video = tmp / "v.mp4"
    video.write_bytes(b"\0" * 100)
    users = tmp / "users"
    users.mkdir(exist_ok=True)
    (users / "notes.txt").write_text("mine")
    tok = ["--image-tokenizer", str(image_tokenizer), "--text-tokenizer", str(text_tokenizer), "--size", "64"]
    return [
        ["build", str(tmp / "missing.parquet"), "--out", str(tmp / "o1"), *tok],
        ["build", str(empty_csv), "--out", str(tmp / "o2"), *tok],
        ["build", str(no_caption), "--out", str(tmp / "o3"), *tok],
        ["build", str(corpus), "--out", str(tmp / "o4"), "--image-tokenizer", str(video), "--text-tokenizer",
         str(text_tokenizer)],
        ["build", str(corpus), "--out", str(tmp / "o5"), "--image-tokenizer", str(image_tokenizer),
         "--text-tokenizer", str(video), "--size", "64"],
        ["build", str(corpus), "--out", str(tmp / "o6"), "--image-tokenizer", str(tmp / "nowhere"),
         "--text-tokenizer", str(text_tokenizer)],
        ["build", str(corpus), "--out", str(tmp / "o7"), *tok[:4], "--size", "32"],
        ["build", str(corpus), "--out", str(users), *tok],
        ["build", str(corpus), "--out", str(tmp / "o8"), *tok, "--config", str(bad_yaml)],
        ["build", str(corpus), "--out", str(tmp / "o9"), *tok, "--config", str(unknown_key)],
        ["build", str(corpus), "--out", str(tmp / "o10"), *tok, "--config", str(tmp / "none.toml")],
        ["verify", str(tmp / "not-a-dataset")],
        ["verify", str(users)],
        ["gc", str(users)],
        ["reshard", str(tmp / "not-a-dataset"), str(tmp / "r1")],
        ["reshard", str(tmp / "x"), str(tmp / "r2"), "--filter", '@tarfile.os.system("id") == 0'],
        ["reshard", str(tmp / "x"), str(tmp / "r3"), "--filter", "rate >"],
        ["reshard", str(tmp / "x"), str(tmp / "r4"), "--filter", "no_such_column == 1"],
        ["captions", "clean", str(tmp / "missing.csv"), str(tmp / "c.parquet")],
        ["captions", "clean", str(empty_csv), str(tmp / "c.parquet")],
        ["tokenizer", "train-text", str(corpus), "--out", str(text_tokenizer)],
        ["tokenizer", "train-image", str(corpus), "--out", str(image_tokenizer)],
        ["tokenizer", "train-image", str(corpus), "--out", str(tmp / "t1"), "--preset", "cogview3"],
        ["audit", str(tmp / "missing.parquet"), "--out", str(tmp / "a1")],
        ["train", str(tmp / "not-a-dataset"), "--out", str(tmp / "run")],
        ["sample", str(tmp / "no-run"), "--prompt", "a cat", "--out", str(tmp / "s.mp4")],
        ["demo", "--out", str(users)],
        ["estimate", str(empty_csv)],
    ]


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:   # sys.exit("message") prints the message to stderr, as Python would
            code = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                err.write(exit_.code + "\n")
    return code, err.getvalue()


def test_every_bad_invocation_is_one_line_without_a_traceback(corpus, image_tokenizer, text_tokenizer, tmp_path):
    invocations = _invocations(tmp_path, corpus, image_tokenizer, text_tokenizer)
    assert len(invocations) >= 25
    seen = []
    for argv in invocations:
        code, err = run_cli(argv)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
        seen.append((argv[0], code, lines))
        assert code != 0, (argv, err)
        assert "Traceback" not in err, (argv, err)
        if lines and lines[0].startswith("usage:"):   # argparse's own refusal: its usage, then one error line
            lines = lines[-1:]
        assert len(lines) == 1 and ": error: " in lines[0], (argv, err)


@pytest.mark.parametrize("argv, says", [
    (["verify", "/nonexistent-dataset"], "dataset.json"),
])
def test_messages_name_what_is_wrong(argv, says):
    code, err = run_cli(argv)
    assert code != 0 and says in err
