"""Reading a training run's checkpoints back: the checkpoint dict and the model it holds (train.py writes them)."""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from clipforge.model.gpt import CogVideo, CogVideoConfig


def load_checkpoint(run: str | os.PathLike, device="cpu") -> dict:
    """A checkpoint dict from a RUN directory (its latest.json) or a ckpt_*.pt file."""
    path = Path(run)
    if path.is_dir():
        latest = path / "latest.json"
        if not latest.exists():
            raise FileNotFoundError(f"{run}: no latest.json (not a training run, or no checkpoint yet)")
        path = path / json.loads(latest.read_text(encoding="utf-8"))["ckpt"]
    return torch.load(path, map_location=device, weights_only=True)


def model_from_checkpoint(ckpt: dict, device="cpu") -> CogVideo:
    known = {f.name for f in fields(CogVideoConfig)}
    cfg = CogVideoConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    model = CogVideo(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device)
