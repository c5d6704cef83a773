"""The `clipforge` command: help for every job, one-line errors, --config files."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipforge.jobs.cli_args import build_parser

# at least these commands (and actions) exist; every one the parser has is checked
COMMANDS = [["synth"], ["clips"], ["reshard"], ["gc"], ["estimate"], ["captions", "clean"], ["audit"],
            ["tokenizer", "train-text"], ["tokenizer", "train-image"], ["tokenizer", "eval-image"], ["build"],
            ["verify"], ["train"], ["sample"], ["eval-synth"], ["demo"]]
JOBS = ("synth", "clips", "captions", "audit", "tokenizer", "build", "verify", "train", "sample", "demo")


def run(*args, check=False):
    return subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", *args], capture_output=True, text=True, check=check)


def test_the_installed_command_lists_the_jobs():
    """The one real run of the installed `clipforge` entry point (the rest of the help is checked in process)."""
    exe = Path(sys.executable).with_name("clipforge")
    assert exe.exists(), f"{exe}: the package is not installed with its entry point"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in JOBS:
        assert name in res.stdout


def _leaf_commands(parser, path=()):
    """Every runnable command as its words (`["tokenizer", "train-text"]`), by walking the sub-parsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield list(path)
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_commands(sub, (*path, name))


def test_every_command_and_action_has_help(capsys):
    """`--help` on the top level, on each command and on each action of `captions` and `tokenizer`: exit
    status 0, and a command's help shows --config."""
    def help_of(*words):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*words, "--help"])
        assert exit_.value.code == 0, words
        return capsys.readouterr().out

    top = help_of()
    for name in JOBS:
        assert name in top
    commands = list(_leaf_commands(build_parser()))
    missing = [c for c in COMMANDS if c not in commands]
    assert not missing, missing
    for command in commands:
        assert "--config" in help_of(*command), command
    for group in {c[0] for c in commands if len(c) > 1}:     # a command with actions lists them
        out = help_of(group)
        assert all(c[1] in out for c in commands if c[0] == group), group


def test_bad_input_exits_nonzero_with_one_line(tmp_path):
    res = run("build", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "ds"),
              "--image-tokenizer", str(tmp_path), "--text-tokenizer", str(tmp_path / "t.model"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("clipforge: error:")


def test_clips_on_a_missing_video_reports_the_reason(tmp_path):
    res = run("clips", str(tmp_path / "missing.mp4"))
    assert res.returncode == 1
    assert json.loads(res.stdout)["failure"]["reason"] == "missing"


def test_config_file_supplies_flags(tmp_path, corpus):
    video = __import__("pandas").read_parquet(corpus).video[0]
    cfg = tmp_path / "clips.toml"
    cfg.write_text(f'video = "{video}"\nsize = 48\nmode = "both"\nout = "{tmp_path / "frames"}"\n')
    res = run("clips", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["clips"] and plan["clips"][0]["crop"] and (tmp_path / "frames" / "contact_sheet.png").exists()
    import numpy as np
    assert np.load(tmp_path / "frames" / plan["clips"][0]["frames_file"]).shape == (5, 48, 48, 3)
    yaml_cfg = tmp_path / "bad.yaml"
    yaml_cfg.write_text("no_such_flag: 1\n")
    res = run("clips", video, "--config", str(yaml_cfg))
    assert res.returncode == 2 and "no_such_flag" in res.stderr


def test_estimate_runs_a_pilot(corpus, image_tokenizer, text_tokenizer):
    res = run("estimate", str(corpus), "--sample", "4", "--size", "64", "--image-tokenizer", str(image_tokenizer),
              "--text-tokenizer", str(text_tokenizer), "--workers", "8")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert est["inputs"] == 10 and est["pilot_inputs"] == 4
    # the pilot is the manifest's seeded sample; each good video there (1-3 s) gives one sequential clip,
    # each broken one a failure: expected samples scale the good fraction to all 10 inputs
    pilot = __import__("pandas").read_parquet(corpus).sample(n=4, random_state=0)
    good = int((~pilot["broken"]).sum())
    assert 0 < good < 4                                    # the sample holds both kinds, or this proves little
    assert est["pilot"]["clips"] == good and sum(est["pilot"]["failures"].values()) == 4 - good, est["pilot"]
    assert est["expected_samples"] == round(good / 4 * 10)
    assert est["failure_rate"] == (4 - good) / 4
    assert est["wall_hours"] > 0 and est["expected_bytes"] is not None and est["expected_bytes"] > 0


def test_train_image_with_a_local_encoder(tmp_path, corpus):
    """--encoder-kernel and --padding reach the saved tokenizer: a flat frame comes back as one code."""
    import numpy as np

    from clipforge.tokenizer.image import ImageTokenizer

    out = tmp_path / "vq"
    res = run("tokenizer", "train-image", str(corpus), "--out", str(out), "--steps", "3", "--batch-size", "4",
              "--max-frames", "40", "--encoder-kernel", "1", "--padding", "replicate")
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "config.json").read_text())
    assert (saved["encoder_kernel"], saved["padding"], saved["name"]) == (1, "replicate", "tiny")
    codes = ImageTokenizer.load(out).encode(np.full((1, 64, 64, 3), 25, np.uint8))
    assert len(np.unique(codes)) == 1
