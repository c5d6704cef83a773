"""Held-out quality of image-tokenizer training settings, measured side by side in one run.
Prints one JSON line per setting and, last, the baseline's figures beside the best one's.

    python bench/tokenizer_quality.py TRAIN_MANIFEST HELD_MANIFEST [--steps 1600 3200] \
        [--set stem_res_blocks=0 --set stem_res_blocks=1,code_dim=8] [--seeds 0 1] [--threads 1]

Every setting trains the `tiny` preset with the given VQConfig fields replaced (`--set`, comma-separated
`field=value`; the first `--set` is the baseline) for each `--steps` and `--seeds`, on the frames that
`clipforge tokenizer train-image` samples from TRAIN_MANIFEST, and is scored on HELD_MANIFEST's frames
(another synthetic seed, never seen): PSNR over all pixels, mean SSIM, codebook usage, and the last
training batch's PSNR (the gap to it says fitting from generalisation). docs/tokenizer.md ("3,200 and
6,400 steps") has the figures for the demo corpus against seed 1.
"""
from __future__ import annotations

import sys

# run as a script, this folder comes first on sys.path, where bench/tokenize.py would shadow the standard
# library's `tokenize` module
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path.pop(0)

import argparse
import json
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path


def parse_setting(text: str) -> dict:
    """'stem_res_blocks=1,code_dim=8' -> {'stem_res_blocks': 1, 'code_dim': 8}, typed like VQConfig's fields."""
    from clipforge.tokenizer.vq import PRESETS, VQConfig

    types = {f.name: type(getattr(PRESETS["tiny"], f.name)) for f in fields(VQConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown VQConfig field {key!r}")
        out[key] = types[key](value) if types[key] is not bool else value.lower() in ("1", "true", "yes")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_manifest")
    ap.add_argument("held_manifest")
    ap.add_argument("--steps", type=int, nargs="+", default=[1600])
    ap.add_argument("--set", dest="settings", action="append", default=None,
                    help="VQConfig fields to replace, e.g. stem_res_blocks=1,code_dim=8 (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-frames", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    from clipforge.jobs.tokenizers import sample_frames
    from clipforge.tokenizer.image_train import evaluate_image_tokenizer, train_image_tokenizer
    from clipforge.tokenizer.vq import PRESETS

    if a.threads:
        torch.set_num_threads(a.threads)
    train = sample_frames(a.train_manifest, 64, a.max_frames, progress=False)
    held = sample_frames(a.held_manifest, 64, a.max_frames, progress=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in a.settings or [""]:
            config = replace(PRESETS["tiny"], **parse_setting(text))
            for steps in a.steps:
                for seed in a.seeds:
                    out = Path(tmp) / f"run{len(results)}"
                    t0 = time.time()
                    tok = train_image_tokenizer(train, out, config, steps=steps, seed=seed, log=None)
                    seconds = time.time() - t0
                    m = evaluate_image_tokenizer(tok, held, out / "eval")
                    history = json.loads((out / "train_log.json").read_text())["history"]
                    row = {"set": text or "preset", "steps": steps, "seed": seed, "train_frames": len(train),
                           "held_frames": len(held), "psnr": round(m["psnr"], 2), "ssim": round(m["ssim"], 3),
                           "usage": round(m["usage"], 3), "train_batch_psnr": history[-1]["psnr"],
                           "train_seconds": round(seconds, 1)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    best = max(results, key=lambda r: r["psnr"])
    print(json.dumps({"baseline": results[0], "best": best,
                      "gain_db": round(best["psnr"] - results[0]["psnr"], 2)}))


if __name__ == "__main__":
    main()
