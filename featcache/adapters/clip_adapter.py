"""CLIP-Adapter (Gao et al.): a 2-layer bottleneck MLP on the image feature, mixed residually.

A(x) = ReLU(W2 · ReLU(W1 · x)), W1: D -> D/4, W2: D/4 -> D, no biases; v' = n(r · A(v) + (1 - r) · v);
logits = 100 · v' · tᵀ. The text side is not adapted, so any class set can be scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, TrainConfig, register


@dataclass
class ClipAdapterConfig(TrainConfig):
    ratio: float = field(
        default=0.2, metadata={"help": "residual ratio r: weight on the adapter output", "ge": 0, "le": 1}
    )
    reduction: int = field(default=4, metadata={"help": "bottleneck width is D / reduction", "ge": 1})
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0})
    # methods.md gives no cached-feature schedule for CLIP-Adapter; featcache's choice: AdamW, early stopping on val
    optimizer: str = field(default="adamw", metadata={"help": "adam, adamw or sgd"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    epochs: int = field(default=200, metadata={"help": "maximum training epochs"})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step"})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine"})
    patience: int = field(default=20, metadata={"help": "early-stopping patience in epochs on val accuracy"})


@register("clip-adapter", ClipAdapterConfig)
class ClipAdapter(Adapter):
    selection = "few-shot-val"  # early stopping on val
    needs_val = True

    def __init__(self, config: ClipAdapterConfig, dim: int = 512):
        super().__init__(config, dim)
        hidden = dim // config.reduction
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, dim, bias=False), nn.ReLU()
        )

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        r = self.config.ratio
        v = F.normalize(r * self.fc(images) + (1 - r) * images, dim=-1)
        return self.config.logit_scale * v @ text.t()
