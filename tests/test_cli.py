"""The `clipforge` command: help for every job, one-line errors, --config files."""
import json
import subprocess
import sys

import pytest

COMMANDS = [["synth"], ["clips"], ["reshard"], ["estimate"], ["captions", "clean"], ["audit"], ["tokenizer", "train-text"],
            ["tokenizer", "train-image"], ["tokenizer", "eval-image"], ["build"], ["verify"], ["train"],
            ["sample"], ["demo"]]


def run(*args, check=False):
    return subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", *args], capture_output=True, text=True, check=check)


def test_top_level_help_lists_the_jobs():
    out = run("--help", check=True).stdout
    for name in ("synth", "clips", "captions", "audit", "tokenizer", "build", "verify", "train", "sample", "demo"):
        assert name in out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_job_has_help(command):
    res = run(*command, "--help")
    assert res.returncode == 0 and "--config" in res.stdout


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
