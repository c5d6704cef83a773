"""Benchmark `clipforge audit`: seconds per million captions and peak memory, printed as JSON.

    .venv/bin/python bench/audit.py                  # 200,000 and 1,000,000 captions, 1 worker and all CPUs
    .venv/bin/python bench/audit.py --sizes 100000 --workers 1   # quicker

Captions are generated here (seeded): English templates with stock-site noise, mojibake, HTML, URLs,
prefixes, ~10% Chinese, and repeats, so every cleaning rule and the duplicate finder do real work.
Each run is a fresh child process, so that its peak RSS (ru_maxrss) is its own; cpu_seconds adds the
audit's worker processes. Other jobs on the machine inflate wall time (load_avg_1m is printed).
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize` for every script run from bench/:
# take the script's folder off the import path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = ["a man", "a woman", "a young girl", "an old man", "a dog", "a black cat", "two kids", "a chef",
            "a surfer", "a group of friends", "a businessman", "a horse", "a red car", "a drone", "a couple",
            "a teenager", "a panda", "a skateboarder", "a farmer", "a robot"]
VERBS = ["walking", "running", "dancing", "cooking", "riding a bike", "playing guitar", "swimming",
         "laughing", "talking on the phone", "reading a book", "jumping", "sleeping", "painting a wall",
         "flying", "driving", "eating pizza", "typing on a laptop", "climbing", "fishing", "singing"]
PLACES = ["in the park", "on the beach", "in a busy street", "in the kitchen", "at sunset", "in the snow",
          "in a forest", "on a mountain", "in an office", "at night in the city", "by the lake", "in the rain",
          "in a stadium", "on a boat", "in a garden", "in the desert"]
STYLES = ["", "", "", ", slow motion", ", close up", ", aerial view", ", 4k", " - stock footage", ", oil painting",
          ", time lapse", " royalty free"]
ZH_SUBJ = ["一个男人", "一个女人", "一只狗", "一只猫", "两个孩子", "一位厨师", "一辆红色的车", "一只熊猫"]
ZH_VERB = ["在公园里散步", "在海滩上奔跑", "在厨房做饭", "在雪地里玩耍", "在城市夜景中开车", "在湖边钓鱼"]
ZH_STYLE = ["", "", "，慢动作", "，油画风格", "，航拍视角"]


def _vocab(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "ber", "nal", "sto", "pe", "dru", "zen", "ho", "lia"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(n)]


def synth_captions(n: int, seed: int = 0) -> list[str]:
    """~5% exact repeats, ~5% near repeats (one word changed), ~10% Chinese, the rest mostly unique."""
    rng = random.Random(seed)
    vocab = _vocab(rng, 5000)
    zh_chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.05:  # exact repeat of an earlier caption
            out.append(out[rng.randrange(len(out))])
            continue
        if out and r < 0.10:  # near repeat: one word of an earlier caption replaced
            words = out[rng.randrange(len(out))].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            out.append(" ".join(words))
            continue
        if r < 0.20:
            out.append(rng.choice(ZH_SUBJ) + "".join(rng.choices(zh_chars, k=rng.randint(2, 8)))
                       + rng.choice(ZH_VERB) + rng.choice(ZH_STYLE))
            continue
        extra = " ".join(rng.choices(vocab, k=rng.randint(1, 6)))
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {extra} {rng.choice(PLACES)}{rng.choice(STYLES)}"
        text = text[0].upper() + text[1:]
        d = rng.random()
        if d < 0.03:
            text = text.encode("utf-8").decode("latin-1") + " café"  # mojibake-ish, non-ASCII
        elif d < 0.06:
            text = "The video shows " + text[0].lower() + text[1:]
        elif d < 0.08:
            text = text.replace(" and ", " &amp; ") + " &quot;HD&quot; <br>"
        elif d < 0.10:
            text += f" https://example.com/v/{rng.randrange(10**6)}"
        elif d < 0.11:
            text += " @user" + str(rng.randrange(1000))
        elif d < 0.12:
            text = "  " + text.replace(" ", "  ") + "\u200b"
        out.append(text)
    return out


def worker(in_path: str, out_dir: str, chunk_rows: int, workers: int) -> None:
    from clipforge.pipeline.text.audit import audit
    t0, c0 = time.perf_counter(), time.process_time()
    summary = audit(in_path, out_dir, chunk_rows=chunk_rows, workers=workers or None)
    seconds = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c0 + kids.ru_utime + kids.ru_stime
    print(json.dumps({"rows": summary["rows"], "workers": workers or "auto", "seconds": round(seconds, 2),
                      "cpu_seconds": round(cpu, 2),
                      "peak_rss_mb": round(me.ru_maxrss / 1024, 1),  # Linux reports KiB
                      "peak_rss_worker_mb": round(kids.ru_maxrss / 1024, 1) if kids.ru_maxrss else None,
                      "exact_rows": summary["duplicates"]["exact_rows"],
                      "near_rows": summary["duplicates"]["near_rows"], "changed": summary["changed"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200000,1000000", help="comma-separated caption counts")
    ap.add_argument("--chunk-rows", type=int, default=200_000)
    ap.add_argument("--workers", default="1,0", help="comma-separated worker counts (0 = audit's default)")
    ap.add_argument("--worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.chunk_rows, int(args.workers))
        return
    import pandas as pd
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            path = Path(tmp) / f"captions-{n}.parquet"
            pd.DataFrame({"id": [f"v{i}" for i in range(n)], "caption": synth_captions(n)}).to_parquet(path)
            for workers in args.workers.split(","):
                cmd = [sys.executable, __file__, "--worker", str(path), str(Path(tmp) / f"out-{n}-{workers}"),
                       "--chunk-rows", str(args.chunk_rows), "--workers", workers]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                res["seconds_per_million"] = round(res["seconds"] * 1e6 / n, 1)
                res["cpu_seconds_per_million"] = round(res["cpu_seconds"] * 1e6 / n, 1)
                runs.append(res)
    import platform
    import os
    biggest = [r for r in runs if r["rows"] == max(x["rows"] for x in runs)]
    best = min(biggest, key=lambda r: r["seconds"])
    print(json.dumps({"bench": "audit", "chunk_rows": args.chunk_rows, "cpus": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                      "seconds_per_million": best["seconds_per_million"], "workers": best["workers"],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in biggest), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
