"""Image-tokenizer encode speed: frames/s per preset on CPU and (when present) CUDA, FLOPs per frame, the
fraction of the GPU's bf16 peak, a sweep over micro-batch size, bf16 and channels-last, and the time spent
copying frames to the device. Prints one JSON object.

    python bench/tokenize.py                          # both presets, every device found, default sweep
    python bench/tokenize.py --presets tiny --device cpu --seconds 2
    python bench/tokenize.py --checkpoint DIR         # a trained tokenizer instead of random weights
    python bench/tokenize.py --presets icetk --icetk ~/.icetk_models   # icetk's own weights (160 px, 20x20)

Speed does not depend on the weights (every frame costs the same convolutions and one nearest-code
search), so random weights of the preset's shape are the default. Each configuration is warmed up once,
then timed over whole `encode` calls (uint8 frames in host memory -> uint16 codes in host memory, i.e.
what the build pays) until `--seconds` have passed. On a shared machine the figures move with the load:
the load average is recorded beside them.
"""
from __future__ import annotations

import sys

# run as a script, this file's folder comes first on sys.path, where this file would shadow the standard
# library's `tokenize` module (which numpy and torch import through `inspect`)
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path.pop(0)

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from clipforge.tokenizer.icetk import IceImageTokenizer
from clipforge.tokenizer.icetk_net import IceImageNetwork
from clipforge.tokenizer.image import ImageTokenizer
from clipforge.tokenizer.sources import open_image_tokenizer
from clipforge.tokenizer.vq import PRESETS

ICETK = "icetk"   # icetk's network (random weights unless --icetk names its files): CogVideo's 160 px frames

# dense bf16 tensor-core peak (TFLOP/s) by device-name fragment, from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0,
                    "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "V100": 0.0}


def bf16_peak(name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):   # longest match: "H100 SXM" before "H100"
        if key in name:
            return BF16_PEAK_TFLOPS[key] * 1e12 or None
    return None


def flops_per_frame(tok: ImageTokenizer) -> dict:
    """Counted, not estimated: torch's FlopCounterMode over one frame's encoder and nearest-code search."""
    from torch.utils.flop_counter import FlopCounterMode

    s = tok.image_size
    x = torch.zeros((1, s, s, 3), dtype=torch.uint8, device=tok.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as total:
            tok.codes_from_device_frames(x)
        xf = x.permute(0, 3, 1, 2).float()
        with FlopCounterMode(display=False) as enc:
            if isinstance(tok, IceImageTokenizer):   # its encoder, then the residual downsamplers
                tok.model.encode_features(xf, tok.level)
            else:
                tok.model.encoder(xf)
    return {"total": int(total.get_total_flops()), "encoder": int(enc.get_total_flops()),
            "nearest_code": int(total.get_total_flops() - enc.get_total_flops())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(tok: ImageTokenizer, frames: np.ndarray, seconds: float) -> dict:
    tok.encode(frames[:tok.batch_size])             # warm-up: kernels, staging buffers, allocator
    sync(tok.device)
    n, t0 = 0, time.perf_counter()
    while True:
        tok.encode(frames)
        sync(tok.device)
        n += len(frames)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"frames": n, "seconds": round(elapsed, 3), "frames_per_s": round(n / elapsed, 2)}


def time_h2d(tok: ImageTokenizer, frames: np.ndarray, seconds: float) -> dict | None:
    """Copy-only and compute-only time per frame on CUDA; the encode path overlaps the two, so the
    encode time is close to the larger one when the overlap works."""
    if tok.device.type != "cuda":
        return None
    bs = tok.batch_size
    host = torch.from_numpy(frames[:bs].copy()).pin_memory()
    dev = host.to(tok.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = max(1, int(seconds * 50))
    start.record()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    end.record()
    sync(tok.device)
    copy_s = start.elapsed_time(end) / 1e3 / (reps * bs)
    with torch.no_grad():
        tok.codes_from_device_frames(dev)
        start.record()
        for _ in range(reps):
            tok.codes_from_device_frames(dev)
        end.record()
    sync(tok.device)
    compute_s = start.elapsed_time(end) / 1e3 / (reps * bs)
    return {"h2d_us_per_frame": round(copy_s * 1e6, 3), "compute_us_per_frame": round(compute_s * 1e6, 3),
            "h2d_fraction_of_compute": round(copy_s / compute_s, 4),
            "device_resident_frames_per_s": round(1 / compute_s, 1)}


def tokenizer_variant(base, device, bs, dtype, channels_last):
    if isinstance(base, IceImageTokenizer):
        return IceImageTokenizer(base.model, base.sha256, image_size=base.image_size, device=device,
                                 batch_size=bs, dtype=dtype)
    return ImageTokenizer(base.config, base.model, device=device, batch_size=bs, dtype=dtype,
                          channels_last=channels_last)


def bench_device(preset: str, device: str, batches: list[int], dtypes: list[str], layouts: list[bool],
                 frames_per_call: int, seconds: float, checkpoint: str | None) -> dict:
    torch.manual_seed(0)
    if preset == ICETK:
        base = (open_image_tokenizer(f"icetk:{checkpoint}", device=device) if checkpoint
                else IceImageTokenizer(IceImageNetwork(), "random-weights", device=device))
        layouts = [False]     # icetk's arithmetic is NCHW
    cfg = base if preset == ICETK else PRESETS[preset]
    if preset != ICETK and checkpoint:
        base = ImageTokenizer.load(checkpoint, device=device)
        if base.config.name != preset:
            raise SystemExit(f"--checkpoint is a {base.config.name!r} tokenizer, not {preset!r}")
    elif preset != ICETK:
        base = ImageTokenizer(cfg, device=device)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(frames_per_call, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    flops = flops_per_frame(base)
    name = torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else platform.processor() or "cpu"
    peak = bf16_peak(name) if base.device.type == "cuda" else None
    sweep = []
    for dtype in dtypes:
        for channels_last in layouts:
            for bs in batches:
                if preset == ICETK and dtype == "float16" and device == "cpu":
                    continue
                tok = tokenizer_variant(base, device, bs, dtype, channels_last)
                try:
                    row = {"batch": bs, "dtype": dtype, "channels_last": channels_last,
                           **time_encode(tok, frames, seconds)}
                except RuntimeError as err:     # e.g. an op without a bf16 kernel on this CPU
                    sweep.append({"batch": bs, "dtype": dtype, "channels_last": channels_last,
                                  "error": f"{type(err).__name__}: {str(err)[:200]}"})
                    continue
                achieved = row["frames_per_s"] * flops["total"]
                row["tflops"] = round(achieved / 1e12, 4)
                if peak:
                    row["fraction_of_bf16_peak"] = round(achieved / peak, 4)
                h2d = time_h2d(tok, frames, min(seconds, 1.0))
                if h2d:
                    row.update(h2d)
                sweep.append(row)
                print(f"{preset} {device} {json.dumps(row)}", file=sys.stderr, flush=True)
    ok = [r for r in sweep if "frames_per_s" in r]
    best = max(ok, key=lambda r: r["frames_per_s"]) if ok else None
    return {"preset": preset, "device": device, "device_name": name, "image_size": cfg.image_size,
            "tokens_hw": list(cfg.tokens_hw), "codebook_size": cfg.codebook_size,
            "weights": "random" if not checkpoint else checkpoint,
            "flops_per_frame": flops, "bf16_peak_tflops": peak / 1e12 if peak else None,
            "frames_per_call": frames_per_call, "best": best, "sweep": sweep}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,cogview2,icetk")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per configuration (at least one call)")
    p.add_argument("--cpu-batches", default="16,64", help="micro-batch sizes swept on CPU")
    p.add_argument("--gpu-batches", default="64,256,1024", help="micro-batch sizes swept on CUDA")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float16 too for icetk on CUDA (its fp16=True)")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--frames", type=int, default=0, help="frames per encode call (default: 2 micro-batches "
                   "on CUDA, 1 on CPU for cogview2, 4 for tiny)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint", help="a trained tokenizer directory (its preset is benchmarked)")
    p.add_argument("--icetk", metavar="PATH", help="icetk's ice_image.pt or its folder, for the icetk preset")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if a.device == "cuda":
            raise SystemExit("--device cuda: CUDA is not available here")
        devices.remove("cuda")
    layouts = [{"nchw": False, "channels_last": True}[x] for x in a.layouts.split(",")]
    dtypes = a.dtypes.split(",")
    presets = a.presets.split(",")
    if a.checkpoint:
        presets = [json.load(open(os.path.join(a.checkpoint, "config.json")))["name"]]
    results = []
    for preset in presets:
        for device in devices:
            batches = [int(b) for b in (a.gpu_batches if device == "cuda" else a.cpu_batches).split(",")]
            size = 160 if preset == ICETK else PRESETS[preset].image_size
            per_call = a.frames or (2 * max(batches) if device == "cuda" else max(batches) * (1 if size > 64 else 4))
            results.append(bench_device(preset, device, batches, dtypes, layouts, per_call, a.seconds,
                                        a.icetk if preset == ICETK else a.checkpoint))
    out = {"bench": "tokenize", "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "gpu_note": None if torch.cuda.is_available() else "no CUDA device here: GPU figures not measured",
           "results": results}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
