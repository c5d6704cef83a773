"""`clipforge eval-synth RUN HELD_MANIFEST`: does the model draw what the caption says?

For every good row of a held-out synthetic corpus (`clipforge synth`, whose manifest keeps the ground
truth `color`, `shape`, `direction`), sample one video from RUN for the row's caption and score it with a
pixel detector that knows nothing about the model:

    the pixel detector of `clipforge.pipeline.video.synth_detector` (colour, shape, direction)

A caption's combination (colour, shape, direction) is "seen" when some row of the training manifest has
it, else "unseen"; scores are reported overall and for each group. As a ceiling, the same detector runs on
the held-out videos themselves, passed through the run's image tokenizer (encode, decode): what a
perfect model could score through this tokenizer.

Writes OUT/scores.json ({"scores": {...}, "rows": [...]}) and OUT/contact_sheet.png (one row of frames
per caption, in manifest order); returns the same dict.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from clipforge.model.config import SAMPLING
from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.video.synth_detector import ATTRIBUTES, detect, read_clip, score

def train_manifest_of(run: Path) -> str | None:
    """The manifest RUN's dataset was built from (latest.json -> dataset -> dataset.json -> manifest)."""
    from clipforge.pipeline.storage.dataset import DatasetInfo

    latest = json.loads((run / "latest.json").read_text(encoding="utf-8"))
    dataset = latest.get("dataset")
    if not dataset or not DatasetInfo.exists(dataset):
        return None
    return DatasetInfo.read(dataset, validate=False).manifest


def good_rows(manifest: str, limit: int | None = None):
    """The rows of a synthetic corpus's manifest that have a video (not `broken`), with their ground truth."""
    import pandas as pd

    rows = pd.read_parquet(manifest)
    missing = [c for c in ("caption", *ATTRIBUTES) if c not in rows.columns]
    if missing:
        raise ClipforgeError(f"{manifest}: no ground truth columns {missing} (write it with `clipforge synth`)")
    if "broken" in rows.columns:
        rows = rows[~rows["broken"].astype(bool)]
    rows = rows.reset_index(drop=True)
    return rows.iloc[:limit] if limit else rows


def eval_synth(run_dir: str, held_manifest: str, out: str | None = None, limit: int | None = None,
               seed: int = SAMPLING.seed, guidance: float = SAMPLING.guidance,
               temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
               train_manifest: str | None = None, device: str | None = None, batch: int = 16,
               ceiling: bool = True, top_p: float | None = SAMPLING.top_p, candidates: int = SAMPLING.candidates,
               image_run: str | None = None, log=print) -> dict:
    import torch

    from clipforge.model.run_folder import local_run
    from clipforge.model.sample import frame0_run, load_companion, load_run
    from clipforge.model.distributed import default_device
    from clipforge.pipeline.video.pictures import contact_sheet, write_png

    log = log or (lambda msg: None)
    t0 = time.time()
    run = local_run(run_dir)
    out_dir = Path(out) if out else run / "eval-synth"
    out_dir.mkdir(parents=True, exist_ok=True)
    held = good_rows(held_manifest, limit)
    train_manifest = train_manifest or train_manifest_of(run)
    if not train_manifest:
        raise ClipforgeError(f"{run}: cannot tell which manifest it trained on; pass --train-manifest")
    trained = good_rows(train_manifest)
    seen = set(zip(*(trained[a] for a in ATTRIBUTES)))
    leaked = set(held["caption"]) & set(trained["caption"])

    device = torch.device(device or default_device())
    ckpt, model, text, image = load_run(run, device)
    image_run = frame0_run(ckpt, image_run)
    frame0_model = load_companion(image_run, model, run, device)[0] if image_run else None
    cfg = model.config
    span = (ckpt.get("spans") or {}).get("sequential", (ckpt.get("spans") or {}).get("all"))
    null = torch.from_numpy(text.build_slot([], span, cfg.text_slot)[0])
    gen = torch.Generator(device=device).manual_seed(seed)

    rows, videos = [], []
    built = [text.build_slot(text.encode_caption(c)[0], span, cfg.text_slot) for c in held["caption"]]
    prompts_cut = sum(bool(cut) for _, cut in built)
    if prompts_cut:
        log(f"eval-synth: warning: {prompts_cut} of {len(held)} captions are longer than the run's "
            f"{cfg.text_slot}-token text slot; their ends are cut")
    for start in range(0, len(held), batch):
        part = held.iloc[start:start + batch]
        slots = torch.stack([torch.from_numpy(slot) for slot, _ in built[start:start + batch]])
        codes = model.generate(slots, null if guidance != 1.0 else None, guidance=guidance,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                               candidates=candidates, frame0_model=frame0_model)                   # (N, T, h, w)
        for (_, r), c in zip(part.iterrows(), codes.cpu().numpy().astype(np.uint16)):
            frames = image.decode(c)                                                  # (T, S, S, 3)
            truth = {a: str(r[a]) for a in ATTRIBUTES}
            rows.append({"caption": r["caption"], "truth": truth, "detected": detect(frames),
                         "combination": "seen" if tuple(truth.values()) in seen else "unseen"})
            videos.append(frames)
        log(f"eval-synth: {len(rows)}/{len(held)} sampled ({time.time() - t0:.0f}s)")

    scores = {"overall": score(rows), "seen": score([r for r in rows if r["combination"] == "seen"]),
              "unseen": score([r for r in rows if r["combination"] == "unseen"])}
    if ceiling:  # the held-out videos themselves, through the run's image tokenizer
        truth_rows = []
        for (_, r) in held.iterrows():
            frames = image.decode(image.encode(read_clip(r["video"], image.image_size, cfg.frames)))
            truth_rows.append({"truth": {a: str(r[a]) for a in ATTRIBUTES}, "detected": detect(frames)})
        scores["ceiling"] = score(truth_rows)
    scores.update({"run": str(run), "step": ckpt["step"], "phases": ckpt.get("phases"), "held_manifest": str(held_manifest),
                   "train_manifest": str(train_manifest), "captions_also_in_training": len(leaked), "prompts_cut": prompts_cut, "span": span,
                   "guidance": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "candidates": candidates, "image_run": image_run, "seed": seed, "seconds": round(time.time() - t0, 1)})
    write_png(out_dir / "contact_sheet.png", contact_sheet(videos))
    result = {"scores": scores, "rows": rows}
    (out_dir / "scores.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
