"""The optimizer and the learning-rate schedule of training (nanoGPT's choices)."""
from __future__ import annotations

import math

import torch

from clipforge.model.config import TrainConfig
from clipforge.model.gpt import CogVideo


class Schedule:
    """Linear warmup, then cosine decay to min_lr at `horizon` (re-estimated under max_minutes)."""

    def __init__(self, config: TrainConfig):
        self.base_lr = config.lr   # filled by TrainConfig.with_phase_defaults
        self.min_lr = config.min_lr if config.min_lr is not None else self.base_lr / 10
        self.warmup = max(1, min(config.warmup_steps, config.steps // 10))
        self.horizon = config.steps

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.horizon - self.warmup))
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (self.base_lr - self.min_lr)

    def state(self) -> dict:
        return {"horizon": self.horizon, "warmup": self.warmup, "base_lr": self.base_lr, "min_lr": self.min_lr}


def adamw(model: CogVideo, config: TrainConfig, lr: float, device: torch.device) -> tuple[torch.optim.Optimizer, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},  # nanoGPT:
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]                  # no decay on
    fused = {"fused": True} if device.type == "cuda" else {}                                         # biases, norms
    return torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), **fused), params
