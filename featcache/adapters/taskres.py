"""TaskRes (Yu et al., CVPR 2023): a learned per-class residual added to the frozen zero-shot text classifier.

    t' = b + alpha · x,   x = zeros [C, D] (trained),   logits = exp(logit_scale) · n(v) · n(t')ᵀ

Reference: geekyutao/TaskRes trainers/taskres.py (TaskResLearner: `base_text_features + alpha *
text_feature_residuals`, the residual initialised to zeros; CustomCLIP.forward normalises image and text, scale
exp(logit_scale) = 100), trained with Dassl: Adam (L2 weight decay 5e-4, Dassl's default), lr 2e-3 (ImageNet 2e-4),
batch 256 (a last partial batch dropped), cosine stepped per epoch after 1 warm-up epoch at 1e-5, 100 epochs for
1-4 shots and 200 for 8-16 (train_regular.sh), alpha 0.5 (Oxford Flowers 1.0), the last epoch reported: no
validation at all (methods_2026.md §4).

Departures, each an option:
- `base_norm`: the reference's base b is the mean of the *raw, unnormalised* per-template text embeddings
  (taskres.py:140), so its residual lives at the scale ‖b‖ of CLIP's raw text features; the store keeps only
  unit-norm text, so featcache's base is base_norm · t̂ (t̂ the store's class text: one template, or the
  normalised mean of normalised templates). For one template this is exact when base_norm = ‖b‖, since
  n(‖b‖ t̂ + alpha x) = n(b + alpha x): every gradient, and so every Adam step, is the reference's. Per-class norms
  differ a little and the store does not have them: base_norm is one number for all classes, default 1 (the
  residual in unit-norm space, where alpha and lr act ‖b‖ times more strongly than in the reference). For several
  templates (ImageNet: the 7 selected + "a photo of a {}.", taskres.py:125-129; `--template ensemble`) the
  direction of the raw mean differs from that of the normalised one as well.
- `views`: the reference re-encodes every image with a fresh random crop each epoch (Dassl TrainerX); from the
  cache each epoch takes one of the store's augmented views per image at random (auto), or the clean features
  when the store has none (or with views=clean).
- Base-to-novel is not in the reference (its residual exists only for the training classes; for ImageNet-A/R it
  keeps the rows of the classes present, taskres.py load_model): a target class that is a training class (by
  name) keeps its residual, any other gets a zero residual, i.e. zero-shot CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, FitData, TrainConfig, register

# train_regular.sh (RN50, the only backbone its scripts run few-shot): RESIDUAL_SCALE and the config's lr
DATASET_DEFAULTS = {"oxford_flowers": {"alpha": 1.0}, "imagenet": {"lr": 2e-4}}


@dataclass
class TaskResConfig(TrainConfig):
    alpha: float = field(
        default=0.5,
        metadata={"help": "residual scale (RESIDUAL_SCALE): 0.5 on every dataset but Oxford Flowers (1.0), as "
                  "train_regular.sh; train.py's unset default is 1.0", "ge": 0.0},
    )  # fmt: skip
    base_norm: float = field(
        default=1.0,
        metadata={"help": "norm given to the unit-norm store text before the residual is added. The reference adds "
                  "it to the raw (unnormalised) text features: base_norm = their norm ||b|| reproduces it exactly "
                  "for one template; 1 = the residual in unit-norm space", "gt": 0.0},
    )  # fmt: skip
    views: str = field(
        default="auto",
        metadata={"help": "auto: one random stored augmented view per image per epoch (the reference re-crops "
                  "online), the clean features if the store has none; clean: always the clean features",
                  "choices": ["auto", "clean"]},
    )  # fmt: skip
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0.0})
    optimizer: str = field(
        default="adam", metadata={"help": "adam (Dassl's, L2 weight decay), adamw or sgd",
                                  "choices": ["adam", "adamw", "sgd"]},
    )  # fmt: skip
    lr: float = field(default=2e-3, metadata={"help": "learning rate (ImageNet: 2e-4)", "gt": 0.0})
    weight_decay: float = field(
        default=5e-4, metadata={"help": "L2 weight decay (Dassl's default, the configs leave it)", "ge": 0.0}
    )
    epochs: int = field(
        default=200, metadata={"help": "epochs: 100 for 1-4 shots, 200 for 8-16 (train_regular.sh)", "ge": 0}
    )
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step", "ge": 1})
    drop_last: bool = field(default=True, metadata={"help": "drop a last partial batch, as Dassl's loader does"})
    schedule: str = field(
        default="dassl-cosine",
        metadata={"help": "dassl-cosine: cosine over the epochs stepped once per epoch after the warm-up (Dassl); "
                  "cosine (per step) or constant", "choices": ["dassl-cosine", "cosine", "constant"]},
    )  # fmt: skip
    warmup_epochs: int = field(default=1, metadata={"help": "warm-up epochs at warmup_lr (dassl-cosine)", "ge": 0})
    warmup_lr: float = field(default=1e-5, metadata={"help": "constant warm-up learning rate", "gt": 0.0})
    select: str = field(
        default="last", metadata={"help": "last (the reference reports the last epoch) or best-val",
                                  "choices": ["last", "best-val"]},
    )  # fmt: skip
    patience: int = field(default=0, metadata={"help": "early-stopping patience on val (0: off, the reference)",
                                               "ge": 0})  # fmt: skip

    @staticmethod
    def dataset_defaults(dataset: str) -> dict:
        return dict(DATASET_DEFAULTS.get(dataset, {}))

    @staticmethod
    def shots_defaults(shots: int) -> dict:
        return {"epochs": 100 if shots <= 4 else 200}


@register("taskres", TaskResConfig)
class TaskRes(Adapter):
    selection = "validation-free"

    def __init__(self, config: TaskResConfig, dim: int = 512):
        super().__init__(config, dim)
        self.residual = nn.Parameter(torch.zeros(0, dim))  # [C, D] once fitted

    def setup(self, data: FitData) -> None:
        self.residual = nn.Parameter(torch.zeros_like(data.text))  # the reference's zeros_like(base)

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        res = self.residual
        if class_ids is not None:  # a training class keeps its residual; any other class gets none (zero-shot)
            res = res[class_ids.clamp(min=0)] * (class_ids >= 0)[:, None].to(res.dtype)
        classifier = F.normalize(self.config.base_norm * text + self.config.alpha * res.to(text.dtype), dim=-1)
        return self.config.logit_scale * images @ classifier.t()
