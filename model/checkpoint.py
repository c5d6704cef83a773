"""A training run's files: its checkpoints read back (the checkpoint dict and the model it holds), and the small
files train.py writes beside them (latest.json and summary.json, the tokenizers' copies, logs cut back on resume)."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import fields
from pathlib import Path

import torch

from clipforge.model.config import CogVideoConfig
from clipforge.model.gpt import CogVideo
from clipforge.pipeline.storage.atomic import atomic_write


def load_checkpoint(run: str | os.PathLike, device="cpu") -> dict:
    """A checkpoint dict from a RUN directory (its latest.json) or a ckpt_*.pt file."""
    from clipforge.model.run_folder import local_run

    path = local_run(run) if "://" in str(run) else Path(run)
    if path.is_dir():
        latest = path / "latest.json"
        if not latest.exists():
            raise FileNotFoundError(f"{run}: no latest.json (not a training run, or no checkpoint yet)")
        path = path / json.loads(latest.read_text(encoding="utf-8"))["ckpt"]
    return settled_train_config(renamed_phase_keys(torch.load(path, map_location=device, weights_only=True)))


def renamed_phase_keys(ckpt: dict) -> dict:
    """Checkpoints of clipforge 0.2 called a training phase a "stage": read them under today's names."""
    for old, new in (("stage", "phase"), ("stages", "phases")):
        if old in ckpt and new not in ckpt:
            ckpt[new] = ckpt.pop(old)
    train_config = ckpt.get("train_config")
    if isinstance(train_config, dict) and "stage" in train_config and "phase" not in train_config:
        train_config["phase"] = train_config.pop("stage")
    return ckpt


def settled_train_config(ckpt: dict) -> dict:
    """Checkpoints of clipforge 0.3 saved `lr` and `dropout` as None (defaults that then depended on
    init_from, since moved to TrainConfig.with_phase_defaults): read them as the values the run used, its
    schedule's rate and its model's dropout, so a resumed run keeps them."""
    train_config = ckpt.get("train_config")
    if not isinstance(train_config, dict):
        return ckpt
    if train_config.get("lr") is None and "scheduler" in ckpt:
        train_config["lr"] = ckpt["scheduler"]["base_lr"]
    if train_config.get("dropout") is None and "dropout" in (ckpt.get("model_config") or {}):
        train_config["dropout"] = ckpt["model_config"]["dropout"]
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> CogVideo:
    known = {f.name for f in fields(CogVideoConfig)}
    cfg = CogVideoConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    model = CogVideo(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str).encode("utf-8"))


def copy_tokenizers(specs: dict, run: Path) -> dict:
    """RUN/tokenizers/: the run's own copies, so that sampling needs RUN alone. Returns their specs
    relative to RUN (what latest.json records)."""
    from clipforge.tokenizer.sources import copy_into

    return {kind: copy_into(specs[kind], kind, run / "tokenizers") for kind in ("image", "text")}


def default_spans(spans: Counter) -> dict:
    """The most common span (seconds) per clip mode and overall, for the sampler's default prefix."""
    out = {}
    for mode in sorted({m for m, _ in spans}):
        sub = Counter({s: n for (m, s), n in spans.items() if m == mode})
        out[mode] = sub.most_common(1)[0][0]
    if spans:
        out["all"] = Counter({s: n for (_, s), n in spans.items()}).most_common(1)[0][0]
    return out


def truncate_jsonl(path: Path, last_step: int, key=lambda line: json.loads(line)["step"]) -> None:
    """Drop the lines a killed run wrote after its last checkpoint, so a resumed log reads as one run."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("".join(l + "\n" for l in lines if l.strip() and key(l) <= last_step), encoding="utf-8")



