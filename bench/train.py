"""Training and sampling throughput of the CogVideo-style model; JSON out.

    python bench/train.py                         # the demo's shape on this machine (CPU or GPU)
    python bench/train.py --preset 100m --device cuda --peak-tflops 989   # ~100M parameters, 160x160, 5 frames
    python bench/train.py --loader-only            # the shard loader alone, against what the 100m preset needs

Measures, on random tokens (the model's speed does not depend on what the tokens mean):
  train      tokens/s of the sequential phase (forward, backward, AdamW step), and on a GPU the model
             FLOPs utilisation: MFU = flops_per_token * tokens/s / peak
  sample     tokens/s of generating one video's codes with the KV cache (model.generate, guidance on)
             and without it (every new token re-runs the whole prefix, no guidance), over the
             first `--nocache-tokens` codes so the slow path stays short

  loader     (--loader-only) samples/s and tokens/s of the training shard loader (ShardStream: read,
             decode, build sequences, collate) per DataLoader worker, on shards of the `100m` preset's
             shape (5 frames of 20x20 codes, text slot 64), against the tokens/s one H100 trains at 40 %
             MFU (flops_per_token of the preset): `keeps_up` says whether `--workers-per-gpu` workers do

FLOPs per token are counted from the config (nanoGPT's estimate, PaLM appendix B): 6 x the parameters
a token passes through (both attention channels' QKV and projections, the MLP, the head; not the
embedding tables) + 6 x 2 x n_layer x n_embd x L for the attention scores and values of both channels,
counted densely over the whole L x L square, the usual convention (PaLM counts causal attention in full
too); the kernels skip much of it (the base channel runs frame by frame, the sequential plus channel
causally), so this count is the model's FLOPs, not the ones executed.
"""
from __future__ import annotations

import os
import sys

# bench/ holds a tokenize.py, which would shadow the standard library's `tokenize` (used by inspect, hence
# numpy and torch) when this script's folder heads sys.path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from clipforge.model.distributed import uses_bf16_autocast  # noqa: E402
from clipforge.model.config import CogVideoConfig  # noqa: E402
from clipforge.model.gpt import CogVideo  # noqa: E402

PRESETS = {
    # the demo's model: 64x64 frames -> 8x8 codes, text slot 24, 512 codes, ~1.3M parameters
    "demo": dict(text_vocab=400, image_vocab=512, n_layer=4, n_head=4, n_embd=128, text_slot=24,
                 tokens_h=8, tokens_w=8, window=4, shift=2),
    # the GPU target: ~100M parameters (114M) at 160x160 (20x20 codes), 5 frames, CogVideo's vocabularies (20,000 image codes)
    "100m": dict(text_vocab=8000, image_vocab=20000, n_layer=8, n_head=12, n_embd=768, text_slot=64,
                 tokens_h=20, tokens_w=20, window=10, shift=5),
}
# dense bf16 peak of common accelerators, TFLOP/s, for MFU when --peak-tflops is not given
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def flops_per_token(cfg: CogVideoConfig, phase: str = "sequential") -> float:
    C, L = cfg.n_embd, cfg.seq_len(phase)
    per_layer = 2 * (4 * C * C) + 8 * C * C          # base + plus (QKV, proj), MLP (4x)
    matmul_params = cfg.n_layer * per_layer + C * cfg.image_vocab
    channels = 1 if phase == "image" else 2
    return 6 * matmul_params + 6 * channels * cfg.n_layer * C * L


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(model, cfg, device, batch, steps, warmup, amp):
    L = cfg.seq_len("sequential")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if device.type == "cuda" else {}))
    tokens = torch.randint(0, cfg.vocab_size, (batch, L), device=device)
    targets = torch.randint(0, cfg.image_vocab, (batch, L), device=device)
    model.train()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        if amp:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = model(tokens, targets, phase="sequential")
        else:
            _, loss = model(tokens, targets, phase="sequential")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    per_step = sorted(times)[len(times) // 2]                 # median: robust to a busy neighbour
    return {"batch": batch, "seq_len": L, "steps": steps, "step_s": round(per_step, 4),
            "tokens_per_s": round(batch * L / per_step, 1)}


@torch.no_grad()
def bench_sample(model, cfg, device, nocache_tokens):
    model.eval()
    text = torch.randint(0, cfg.text_vocab, (cfg.text_slot,), device=device)
    null = torch.zeros(cfg.text_slot, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t = time.perf_counter()
    codes = model.generate(text, null, guidance=3.0, top_k=64, generator=gen)
    sync(device)
    cached_s = time.perf_counter() - t
    n_cached = codes.numel()
    # without the cache: the whole prefix again for every new token (the sequential phase's first frames)
    seq = torch.cat([text, torch.tensor([cfg.boi_id], device=device)]).view(1, -1)
    frame_len = cfg.tokens_h * cfg.tokens_w
    sync(device)
    t = time.perf_counter()
    made = 0
    while made < nocache_tokens:
        logits, _ = model(seq, phase="sequential")
        code = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=gen)
        seq = torch.cat([seq, code + cfg.text_vocab], dim=1)
        made += 1
        if made % frame_len == 0:
            seq = torch.cat([seq, torch.tensor([[cfg.boi_id]], device=device)], dim=1)
    sync(device)
    nocache_s = time.perf_counter() - t
    return {"kv_cache": {"tokens": n_cached, "seconds": round(cached_s, 3), "tokens_per_s": round(n_cached / cached_s, 1),
                         "guidance_rows": 2},
            "no_cache": {"tokens": made, "seconds": round(nocache_s, 3), "tokens_per_s": round(made / nocache_s, 1),
                         "guidance_rows": 1}}


def bench_loader(preset: str, samples: int, batches: int, workers: int, workers_per_gpu: int, root: str) -> dict:
    """The shard loader's throughput on synthetic shards of the preset's shape (written to `root`)."""
    import numpy as np
    import webdataset as wds

    from clipforge.model.data import SequenceBuilder, ShardStream, make_loader
    from clipforge.pipeline.storage.samples import encode_sample
    from clipforge.tokenizer.text import train_text_tokenizer

    cfg = CogVideoConfig(**PRESETS[preset])
    rng = np.random.default_rng(0)
    words = ["a", "red", "dog", "runs", "on", "the", "beach", "under", "blue", "sky", "slowly", "cat", "jumps"]
    captions = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    text = train_text_tokenizer(captions, os.path.join(root, "text.model"), vocab_size=60)
    urls, per_shard = [], 250
    for shard in range(max(1, samples // per_shard)):
        url = os.path.join(root, f"train-{shard:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(per_shard):
                caption = captions[(shard * per_shard + i) % len(captions)]
                vtok = rng.integers(0, cfg.image_vocab, (cfg.frames, cfg.tokens_h, cfg.tokens_w), dtype=np.uint16)
                meta = {"mode": "sequential", "rate": 1.0, "span": 4.0}
                sink.write(encode_sample(f"s{shard:04d}{i:04d}", meta, caption, vtok, text.encode_caption(caption)[0]))
        urls.append(url)
    stream = ShardStream(urls, SequenceBuilder(cfg, text, "sequential"), memory_mb=0)   # read from disk each time
    loader = iter(make_loader(stream, 8, workers))
    next(loader)   # start-up (workers, first shard) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t0
    samples_per_s = batches * 8 / seconds / max(1, workers)
    tokens_per_s = samples_per_s * cfg.seq_len("sequential")
    need = 0.4 * PEAKS["H100"] * 1e12 / flops_per_token(cfg)
    return {"preset": preset, "sequence_tokens": cfg.seq_len("sequential"), "workers_measured": max(1, workers),
            "samples_per_s_per_worker": round(samples_per_s, 1), "tokens_per_s_per_worker": round(tokens_per_s),
            "h100_tokens_per_s_at_40pct_mfu": round(need), "workers_per_gpu": workers_per_gpu,
            "keeps_up": tokens_per_s * workers_per_gpu >= need,
            "headroom": round(tokens_per_s * workers_per_gpu / need, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="dense peak of the device for MFU (default: by GPU name)")
    p.add_argument("--nocache-tokens", type=int, default=64)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (the trainer's --fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model before timing")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--loader-only", action="store_true", help="measure the shard loader alone (see above)")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers to measure with")
    p.add_argument("--workers-per-gpu", type=int, default=4)
    a = p.parse_args(argv)
    if a.loader_only:
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            result = {"loader": bench_loader("100m", 2000, 150, a.loader_workers, a.workers_per_gpu, root),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(result, indent=2))
        return result

    device = torch.device(a.device)
    torch.manual_seed(0)
    cfg = CogVideoConfig(**PRESETS[a.preset])
    model = CogVideo(cfg).to(device)
    model.gradient_checkpointing = a.grad_checkpoint
    amp = uses_bf16_autocast(device, not a.fp32)   # as the trainer decides: cuda, or a cpu with native bf16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run_model = torch.compile(model) if a.compile else model
    train = bench_train(run_model, cfg, device, a.batch, a.steps, a.warmup, amp)
    fpt = flops_per_token(cfg)
    peak = peak_tflops(device, a.peak_tflops)
    train["flops_per_token"] = fpt
    train["achieved_tflops"] = round(fpt * train["tokens_per_s"] / 1e12, 4)
    train["mfu"] = round(fpt * train["tokens_per_s"] / (peak * 1e12), 4) if peak else None
    sample = bench_sample(model, cfg, device, a.nocache_tokens)
    result = {"preset": a.preset, "params": model.get_num_params(), "config": cfg.to_dict(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "threads": torch.get_num_threads(), "amp_bf16": amp, "peak_tflops": peak, "train": train,
              "sample": sample, "torch": torch.__version__}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
