"""How stable an image tokenizer's codes are over time, which is what the video model has to predict.
Prints one JSON object per tokenizer.

    python bench/code_stability.py HELD_MANIFEST TOKENIZER_DIR [TOKENIZER_DIR ...] [--videos 30]

For each of the first `--videos` videos of a synthetic manifest (`clipforge synth`), 5 frames over the
middle 90 % are encoded, and every token is classed by its 8x8 patch: foreground (some pixel differs
from the background, the median of the frames' borders, by 30 or more), background near the
foreground (within 2 tokens), or far background. Between consecutive frames it counts how often a
background token's code changes: far from the shape its pixels do not change at all, so any change
there is the encoder's context, not the picture. Also: how many distinct codes the far background takes
per video (a flat background could be one code), and how many codes stay the same between frames.
docs/tokenizer.md ("Local codes") has the figures for the default encoder and `--encoder-kernel 1`.
"""
from __future__ import annotations

import sys

# run as a script, this folder comes first on sys.path, where bench/tokenize.py would shadow the standard
# library's `tokenize` module
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path.pop(0)

import argparse
import json

import numpy as np


def stability(tokenizer_dir: str, manifest: str, videos: int = 30) -> dict:
    import pandas as pd
    from scipy.ndimage import binary_dilation

    from clipforge.pipeline.video.synth_detector import background_distance, read_clip
    from clipforge.tokenizer.image import ImageTokenizer

    tok = ImageTokenizer.load(tokenizer_dir, device="cpu")
    size, (h, w) = tok.image_size, tok.tokens_hw
    p = tok.downsample
    far_changed, near_changed, all_same, far_codes = [], [], [], []
    for video in pd.read_parquet(manifest).video.head(videos):
        frames = read_clip(video, size, 5)                                    # (5, S, S, 3)
        codes = tok.encode(frames)                                            # (5, h, w)
        fg = background_distance(frames).reshape(5, h, p, w, p).max((2, 4)) >= 30       # (5, h, w) per patch
        far = ~np.stack([binary_dilation(f, iterations=2) for f in fg])
        near = ~fg & ~far
        for f in range(1, 5):
            both = far[f] & far[f - 1]
            far_changed.append((codes[f] != codes[f - 1])[both].mean() if both.any() else np.nan)
            both = near[f] & near[f - 1]
            near_changed.append((codes[f] != codes[f - 1])[both].mean() if both.any() else np.nan)
            all_same.append((codes[f] == codes[f - 1]).mean())
        far_codes.append(len(np.unique(codes[far])))
    return {"tokenizer": tokenizer_dir, "config": {k: getattr(tok.config, k) for k in ("encoder_kernel", "padding")},
            "videos": int(len(far_codes)),
            "far_background_code_changed": round(float(np.nanmean(far_changed)), 4),
            "near_background_code_changed": round(float(np.nanmean(near_changed)), 4),
            "codes_same_as_previous_frame": round(float(np.mean(all_same)), 4),
            "far_background_codes_per_video": round(float(np.mean(far_codes)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest", help="manifest.parquet of `clipforge synth` (videos the tokenizer never saw)")
    ap.add_argument("tokenizers", nargs="+", metavar="TOKENIZER_DIR")
    ap.add_argument("--videos", type=int, default=30)
    a = ap.parse_args()
    for t in a.tokenizers:
        print(json.dumps(stability(t, a.manifest, a.videos)))


if __name__ == "__main__":
    main()
