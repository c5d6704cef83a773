"""The recipe at fixed step counts, with train's defaults only; JSON out.

    python bench/recipe.py --work /tmp/recipe                 # defaults, then the old defaults as baseline
    python bench/recipe.py --work /tmp/recipe --no-baseline   # defaults only (about 20 min on 2 CPU cores)

Runs docs/model.md's recipe data (1,500 square videos, 16 of 96 combinations left out, a `tiny` image
tokenizer, 64x64 frames, text slot 40; reused when --work already holds it), then the issue's commands
with nothing but the defaults:

    clipforge train data --out img --phase image --steps 700
    clipforge train data --out seq --phase sequential --init-from img --steps 1300
    clipforge eval-synth seq held/manifest.parquet --train-manifest corpus/manifest.parquet

and scores 96 held-out captions of another seed (`eval-synth`: colour, shape, direction, all three; frame 0
drawn by the image-phase run the sequential one started from, the default sampler). The baseline is the
same commands with 0.3.0's defaults spelled out (batch 8; the image phase at 1e-3; the sequential
phase with the base frozen at CogVideo's fine-tuning rate 2e-4, the image run's dropout, warmup 50).
Goal: `all` >= 0.80 with the defaults.
"""
from __future__ import annotations

import os
import sys

# bench/ holds a tokenize.py, which would shadow the standard library's `tokenize` when this folder heads sys.path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

LEFT_OUT = ("red-circle-left,red-square-up,green-square-right,green-triangle-down,blue-triangle-up,blue-circle-left,"
            "yellow-circle-down,yellow-square-right,magenta-square-left,magenta-triangle-up,cyan-triangle-right,"
            "cyan-circle-down,orange-circle-up,orange-square-left,white-square-down,white-triangle-right")
OLD_IMAGE = ["--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "50"]
OLD_SEQUENTIAL = ["--batch-size", "8", "--lr", "2e-4", "--warmup-steps", "50", "--freeze-base", "--dropout", "0.1"]


def clipforge(*args: str, log: Path | None = None) -> str:
    """Run one clipforge command; its stdout (the last line is the command's JSON where it prints one)."""
    cmd = [sys.executable, "-m", "clipforge.jobs.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if log is not None:
        log.write_text(res.stdout + res.stderr, encoding="utf-8")
    if res.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def prepare(work: Path) -> dict:
    """The recipe's corpus, held-out captions, tokenizers and dataset (kept when already complete)."""
    seconds = {}
    steps = [
        ("corpus", ["synth", "corpus", "--videos", "1500", "--seed", "0", "--max-seconds", "4", "--leave-out",
                    LEFT_OUT, "--sizes", "64x64,96x96,128x128,144x144"], "corpus/manifest.parquet"),
        ("held", ["synth", "held", "--videos", "96", "--seed", "1", "--max-seconds", "8"], "held/manifest.parquet"),
        ("text tokenizer", ["tokenizer", "train-text", "corpus/manifest.parquet", "--out", "tok/text.model",
                            "--vocab-size", "400"], "tok/text.model"),
        ("image tokenizer", ["tokenizer", "train-image", "corpus/manifest.parquet", "--out", "tok/image", "--preset",
                             "tiny", "--encoder-kernel", "1", "--padding", "replicate", "--lr", "1.5e-3"],
         "tok/image/weights.pt"),
        ("build", ["build", "corpus/manifest.parquet", "--out", "data", "--image-tokenizer", "tok/image",
                   "--text-tokenizer", "tok/text.model", "--size", "64", "--mode", "both", "--text-slot", "40",
                   "--inputs-per-shard", "64", "--runner", "local", "--quiet"], "data/dataset.json"),
    ]
    for name, args, made in steps:
        if (work / made).exists():
            continue
        t0 = time.time()
        clipforge(*args)
        seconds[name] = round(time.time() - t0, 1)
    return seconds


def recipe(name: str, image_flags: list, sequential_flags: list) -> dict:
    """Both training phases at the issue's step counts, then eval-synth; the scores and the seconds."""
    img, seq = f"{name}-img", f"{name}-seq"
    t0 = time.time()
    clipforge("train", "data", "--out", img, "--phase", "image", "--steps", "700", "--overwrite", *image_flags,
              log=Path(f"{img}.log"))
    t1 = time.time()
    clipforge("train", "data", "--out", seq, "--phase", "sequential", "--init-from", img, "--steps", "1300",
              "--overwrite", *sequential_flags, log=Path(f"{seq}.log"))
    t2 = time.time()
    scores = json.loads(clipforge("eval-synth", seq, "held/manifest.parquet", "--train-manifest",
                                  "corpus/manifest.parquet", "--out", f"{name}-eval"))
    return {"flags": {"image": image_flags, "sequential": sequential_flags},
            "overall": scores["overall"], "unseen": scores["unseen"], "ceiling": scores["ceiling"]["all"],
            "seconds": {"image": round(t1 - t0, 1), "sequential": round(t2 - t1, 1), "eval": round(time.time() - t2, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="working folder (its recipe data is reused)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the old defaults' run")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    result = {"prepare_seconds": prepare(work), "defaults": recipe("defaults", [], [])}
    if not args.no_baseline:
        result["baseline"] = recipe("baseline", OLD_IMAGE, OLD_SEQUENTIAL)
    result["goal"] = {"all_three_at_least": 0.80, "met": result["defaults"]["overall"]["all"] >= 0.80}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
