"""ZS-LP and CLAP: a linear probe initialised with the class text, trained on augmented views; CLAP adds a
class-wise penalty that keeps each class vector near its text (Silva-Rodríguez et al., CVPR 2024).

Reference jusiro/CLAP trainers/adapters.py. With base text t_c (the class's text embedding) and W init = t:
    logits = 100 · n(v) · n(W)ᵀ                                                  (forward_lp, :343-354)
    ZS-LP:  loss = CE                                                            (CONSTRAINT none)
    CLAP:   loss = CE + mean_c λ_c · ||W_c − t_c||²                               (zero_shot_constraint, :219-230)
    λ_c = mean over the class's training views of the zero-shot softmax probability of class c (:232-252),
    fixed (the shipped `l2` default) or, with multipliers=adaptive, after every epoch (outer_step, :254-284):
    h_c = ||W_c − t_c||², λ_c ← max(0, λ_c + ρ_c h_c), ρ_c ← h_c (ρ starts at 0).
Training (configs/trainers/SGD_lr1e-1_B256_ep300.yaml with Dassl's defaults): SGD lr 0.1, momentum 0.9, no weight
decay, 300 epochs, one warm-up epoch at 1e-5, then Dassl's cosine (T_max 300) stepped once per epoch; each epoch
shuffles the pool of training views (every stored view its own sample, as the reference's 20-view cache) and
takes floor(N/256) batches of 256 (one batch when N < 256), N the number of images (run_epoch, :431-456). No
validation: the last epoch is kept. Classes without a trained row (novel classes, other datasets) score with
their text, at the same scale 100. The store keeps only unit-norm text features, while the reference's base is
the raw, unnormalised text-encoder output (the mean over templates): see the `text_norm` option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import FitData, TrainConfig, register
from .linear_head import LinearHead, class_mean, cosine_logits, target_rows, training_views


@dataclass
class ZsLpConfig(TrainConfig):
    epochs: int = field(default=300, metadata={"help": "training epochs (MAX_EPOCH 300)", "ge": 0})
    batch_size: int = field(default=256, metadata={"help": "rows per step (TRAIN_X.BATCH_SIZE)", "ge": 1})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate (OPTIM.LR)", "gt": 0.0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Dassl default)", "ge": 0.0, "lt": 1.0})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay (OPTIM.WEIGHT_DECAY)", "ge": 0.0})
    optimizer: str = field(default="sgd", metadata={"help": "the reference's SGD", "choices": ["sgd"]})
    schedule: str = field(
        default="dassl-cosine",
        metadata={"help": "dassl-cosine: warmup_epochs at warmup_lr, then lr·(1 + cos(π(e − warmup)/epochs))/2 per "
                  "epoch (Dassl's ConstantWarmupScheduler over CosineAnnealingLR); constant: lr throughout",
                  "choices": ["dassl-cosine", "constant"]},
    )  # fmt: skip
    warmup_epochs: int = field(default=1, metadata={"help": "constant warm-up epochs (WARMUP_EPOCH)", "ge": 0})
    warmup_lr: float = field(default=1e-5, metadata={"help": "warm-up learning rate (WARMUP_CONS_LR)", "ge": 0.0})
    select: str = field(
        default="last", metadata={"help": "validation-free: the last epoch (the reference reports epoch 300)",
                                  "choices": ["last"]},
    )  # fmt: skip
    views: str = field(
        default="auto",
        metadata={"help": "each: every stored augmented view is a sample of its own (the reference: 20 views); "
                  "clean: the clean train features; auto: each when the store has views, else clean. The "
                  "reference's views are raw and normalised in its forward; the store's are stored normalised, "
                  "which is the same after that normalisation",
                  "choices": ["auto", "each", "clean"]},
    )  # fmt: skip
    text_norm: float = field(
        default=1.0,
        metadata={"help": "norm of the base text vectors t = text_norm · (unit-norm class text). The reference "
                  "uses the raw text-encoder output, whose norm (backbone-dependent, not in the store) sets the "
                  "effective step on the direction of W (lr / norm²) and the size of CLAP's penalty; 1.0 trains "
                  "and penalises in unit-norm text space (featcache's departure); set the backbone's raw text "
                  "norm to follow the reference's dynamics. The direction is the store's class text: the dataset's "
                  "template (the reference's CUSTOM_TEMPLATES), or with --template ensemble the normalised mean of "
                  "normalised templates where the reference averages raw ones (its ImageNet setting)", "gt": 0.0},
    )  # fmt: skip
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0.0})


@dataclass
class ClapConfig(ZsLpConfig):
    constraint: str = field(
        default="l2",
        metadata={"help": "penalty per class: l2 ||W_c − t_c||² (the shipped default) or cosine 1 − cos(W_c, t_c)",
                  "choices": ["l2", "cosine"]},
    )  # fmt: skip
    multipliers: str = field(
        default="fixed",
        metadata={"help": "fixed: λ from the zero-shot fit of the training views, kept (the shipped experiments); "
                  "adaptive: the augmented-Lagrangian outer step after every epoch ('adaptative' in the reference)",
                  "choices": ["fixed", "adaptive"]},
    )  # fmt: skip
    lambda_init: str = field(
        default="zero-shot",
        metadata={"help": "zero-shot: mean zero-shot probability of the true class per class; balanced: 1; "
                  "corrected: zero-shot rescaled to sum to C; constant: all equal to the zero-shot mean",
                  "choices": ["zero-shot", "balanced", "corrected", "constant"]},
    )  # fmt: skip


def dassl_lr(cfg: ZsLpConfig, epoch: int) -> float:
    """The learning rate of an epoch: Dassl's constant warm-up (WARMUP_RECOUNT), then cosine with T_max = epochs."""
    if cfg.schedule == "constant":
        return cfg.lr
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def zero_shot_multipliers(
    x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, scale: float, kind: str
) -> torch.Tensor:
    """CLAP's initial λ [C] (init_lagrangian_multipliers): per class, the mean over its rows of the zero-shot
    softmax probability of that class; variants balanced, corrected, constant."""
    c = len(base)
    if kind == "balanced":
        return torch.ones(c, dtype=x.dtype, device=x.device)
    prob = torch.softmax(cosine_logits(x, base, scale), -1)
    lam = class_mean(prob, y, c).diagonal().clone()
    if kind == "corrected":
        lam = lam * (c / lam.sum())
    elif kind == "constant":
        lam = torch.full_like(lam, float(lam.mean()))
    return lam


def penalty(weight: torch.Tensor, base: torch.Tensor, lam: torch.Tensor, constraint: str) -> torch.Tensor:
    """mean_c λ_c · distance(W_c, t_c): squared L2 or 1 − cosine (zero_shot_constraint)."""
    if constraint == "l2":
        dist = (weight - base).pow(2).sum(-1)
    else:
        dist = 1.0 - F.cosine_similarity(weight, base, dim=-1)
    return (lam * dist).mean()


def lagrangian_step(
    weight: torch.Tensor, base: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PHR outer step (outer_step): h = ||W − t||² per class, λ ← max(0, λ + ρ h), ρ ← h."""
    h = (weight - base).pow(2).sum(-1)
    return (lam + rho * h).clamp(min=0.0), h


@register("zs-lp", ZsLpConfig)
class ZsLp(LinearHead):
    selection = "validation-free"
    constrained = False

    def __init__(self, config: ZsLpConfig, dim: int = 512):
        super().__init__(config, dim)
        self.register_buffer("lam", torch.zeros(0))  # CLAP's multipliers (empty for ZS-LP)

    def setup(self, data: FitData) -> None:
        cfg, gen = self.config, self.generator()
        x, y = training_views(data, cfg.views, "each", gen)
        n_img, dev = len(data.train_y), x.device
        base = cfg.text_norm * data.text.to(x.dtype)
        weight = base.clone().requires_grad_(True)
        lam = rho = None
        if self.constrained:
            lam = zero_shot_multipliers(x, y, base, cfg.logit_scale, cfg.lambda_init)
            rho = torch.zeros_like(lam)
        opt = torch.optim.SGD([weight], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        bs = min(cfg.batch_size, len(x))
        steps = n_img // cfg.batch_size if n_img >= cfg.batch_size else 1  # Dassl: drop_last when N >= batch
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                for group in opt.param_groups:
                    group["lr"] = dassl_lr(cfg, epoch)
                perm = torch.randperm(len(x), generator=gen).to(dev)
                for s in range(steps):
                    idx = perm[s * bs : (s + 1) * bs]
                    loss = F.cross_entropy(cosine_logits(x[idx], weight, cfg.logit_scale), y[idx])
                    if lam is not None:
                        loss = loss + penalty(weight, base, lam, cfg.constraint)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if lam is not None and cfg.multipliers == "adaptive":
                    lam, rho = lagrangian_step(weight.detach(), base, lam, rho)
        self.weight = weight.detach().clone()
        if lam is not None:
            self.lam = lam.clone()

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        return cosine_logits(images, target_rows(self.weight, text, class_ids), self.config.logit_scale)


@register("clap", ClapConfig)
class Clap(ZsLp):
    constrained = True
