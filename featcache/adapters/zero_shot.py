"""Zero-shot CLIP: logits = 100 · v · tᵀ, with t from one template or the ensemble (chosen by --template).
Under the retrieval protocol it is CLIP's own retrieval: captions against images (or pooled video frames)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Adapter, TrainConfig, register


@dataclass
class ZeroShotConfig(TrainConfig):
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0})
    epochs: int = field(default=0, metadata={"help": "nothing to train", "ge": 0})
    pool: str = field(
        default="mean",
        metadata={
            "help": "retrieval, videos: frame pooling, mean (CLIP4Clip meanP) or softmax (text-conditioned)",
            "choices": ["mean", "softmax"],
        },
    )
    temperature: float = field(
        default=5.0,
        metadata={"help": "retrieval, softmax pooling: weights softmax(temperature * caption.frame)", "ge": 0},
    )


@register("zero-shot", ZeroShotConfig)
class ZeroShot(Adapter):
    selection = "validation-free"
    trainable = False
    needs_train = False  # no few-shot draw: any store with a test split, under any protocol, shots recorded as 0

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.config.logit_scale * images @ text.t()
