"""ProLIP: fine-tune only CLIP's last visual projection, pulled towards its pretrained value.

Fahes et al., "CLIP's Visual Embedding Projector is a Few-shot Cornucopia" (arXiv 2410.05270); reference
astra-vision/ProLIP methods/ProLIP.py (methods_2026.md §5). On the raw pooled vision features x before the
projection (`featcache extract --pre-projection`), with W initialised from the stored projection W0:
    f = normalize(x W + b0)                   (ViT: W = visual.proj, b0 = 0; ResNet: W = c_projᵀ, b0 frozen)
    loss = CE(100 · f tᵀ, y) + λ · Σ (W − W0)²                 (MSELoss(reduction='sum'), :79,193-205)
λ = 1/N with N the shots per class (lambda_funct_1_N); Adam(lr 1e-5, eps 1e-4), CosineAnnealingLR(T_max =
steps), 300 full-batch steps, step s on augmented view (s + 1) mod V (:165-185). The ResNet layout W = c_projᵀ
gives the same updates as the reference's c_proj.weight (Adam is elementwise and the pull is a sum of squares).
Validation-free by default; `search` runs the reference's few-shot-val grid (lr outer, λ inner, strict >,
K-shot val; the winner retrained from W0 is the run the grid already made, training being deterministic).
Any class text scores: novel classes and other datasets go through the same fine-tuned projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Adapter, FitData, MethodError, TrainConfig, register

PRECISIONS = {"fp32": None, "fp16": torch.float16}


@dataclass
class ProLIPConfig(TrainConfig):
    epochs: int = field(
        default=300, metadata={"help": "optimisation steps (train_epoch 300), one augmented view each", "ge": 1}
    )
    batch_size: int = field(
        default=0,
        metadata={"help": "rows per step; 0: every support row in each step (the reference's full batch)", "ge": 0},
    )
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate (lr_v; validation-free config)", "gt": 0.0})
    eps: float = field(default=1e-4, metadata={"help": "Adam epsilon (the reference's 1e-4)", "gt": 0.0})
    optimizer: str = field(default="adam", metadata={"help": "the reference's Adam, no weight decay",
                                                     "choices": ["adam"]})  # fmt: skip
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine: CosineAnnealingLR with T_max = all steps; constant",
            "choices": ["cosine", "constant"],
        },
    )
    select: str = field(default="last", metadata={"help": "the last step (validation-free)", "choices": ["last"]})
    weight_decay: float = field(default=0.0, metadata={"help": "none: the pull to W0 is the regulariser", "ge": 0.0,
                                                       "le": 0.0})  # fmt: skip
    patience: int = field(default=0, metadata={"help": "no early stopping", "ge": 0, "le": 0})
    lam: float | None = field(
        default=None, metadata={"help": "weight of the pull Σ(W − W0)²; none: from lam_rule", "ge": 0.0}
    )
    lam_rule: str = field(
        default="1/N",
        metadata={"help": "λ with lam unset: 1/N (lambda_funct_1_N, the paper's) or 1/N^2 (lambda_funct_1_N2), N the "
                  "shots per class (the largest class count of the training rows)", "choices": ["1/N", "1/N^2"]},
    )  # fmt: skip
    search: bool = field(
        default=False,
        metadata={"help": "grid search lr x λ on val (the reference's few_shot_few_val, search_lr: True); false: "
                  "validation-free (the headline setting)"},
    )  # fmt: skip
    search_lr: list = field(
        default_factory=lambda: [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
        metadata={"help": "learning rates of the search (outer loop)", "gt": 0.0},
    )
    search_lam: list = field(
        default_factory=lambda: [10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0],
        metadata={"help": "λ values of the search (inner loop)", "ge": 0.0},
    )
    val_draw: str = field(
        default="k-shot",
        metadata={"help": "val rows the search scores: k-shot (the reference: K per class), dassl (min(K,4) per "
                  "class), full (the whole val split)", "choices": ["dassl", "k-shot", "full"]},
    )  # fmt: skip
    views: str = field(
        default="auto",
        metadata={"help": "cycle: step s trains on stored view (s+1) mod V (the reference's 300 views); clean: the "
                  "clean pre-projection features every step; auto: cycle when the store has views",
                  "choices": ["auto", "cycle", "clean"]},
    )  # fmt: skip
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32: the features' dtype (float32 from a store); fp16: W, features, text and Adam in "
                  "float16, as the reference runs (lr 1e-5 updates then often fall below float16's resolution)",
                  "choices": ["fp32", "fp16"]},
    )  # fmt: skip
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0.0})


def prolip_lambda(cfg: ProLIPConfig, shots: int) -> float:
    if cfg.lam is not None:
        return float(cfg.lam)
    return 1.0 / shots if cfg.lam_rule == "1/N" else 1.0 / shots**2


@register("prolip", ProLIPConfig)
class ProLIP(Adapter):
    selection = "validation-free"  # the paper's headline setting; search=true selects on K-shot val
    trainable = True  # by its own full-batch loop in setup; its state lives in buffers
    inputs = "pre-projection"

    def __init__(self, config: ProLIPConfig, dim: int = 512):
        super().__init__(config, dim)
        self.needs_val = bool(config.search)
        self.register_buffer("weight", torch.zeros(0, dim))  # W [W_in, D], the fine-tuned projection
        self.register_buffer("bias", torch.zeros(dim))  # b0, frozen (zeros for ViT)
        self.register_buffer("lam", torch.tensor(float("nan")))  # λ and lr used (the search's winners)
        self.register_buffer("lr", torch.tensor(float(config.lr)))
        self.seed = int(torch.randint(0, 2**62, ()))  # mini-batch order only (batch_size > 0)
        self.losses: list[float] = []  # per step, of the final run

    def uses_val(self) -> bool:
        return bool(self.config.search)

    def trainable_params(self) -> int:
        return int(self.weight.numel())

    def setup(self, data: FitData) -> None:
        cfg = self.config
        if data.projection is None:
            raise MethodError(
                "prolip needs the stored projection and pre-projection features: fit it with featcache fit (which "
                "reads Store.pre_projection_view()) on a store extracted with --pre-projection"
            )
        w0, b0 = (t.to(data.train_x.device) for t in data.projection)
        if data.train_x.shape[1] != w0.shape[0] or w0.shape[1] != data.text.shape[1]:
            raise MethodError(
                f"prolip: features [N, {data.train_x.shape[1]}], projection {tuple(w0.shape)} and text width "
                f"{data.text.shape[1]} do not fit; the features must be the pre-projection ones"
            )
        views = cfg.views
        if views == "auto":
            views = "cycle" if data.train_aug is not None else "clean"
        if views == "cycle" and data.train_aug is None:
            raise MethodError("views=cycle needs a store extracted with --augment-views (or use views=clean)")
        xs = data.train_aug.transpose(0, 1) if views == "cycle" else data.train_x[None]  # [V, N, W_in]
        shots = int(torch.bincount(data.train_y).max()) if len(data.train_y) else 1
        runs = [(float(cfg.lr), prolip_lambda(cfg, shots))]
        if cfg.search and data.val_x is not None and len(data.val_y):
            runs = [(float(lr), float(lam)) for lr in cfg.search_lr for lam in cfg.search_lam]
        best, best_acc = None, 0.0
        for lr, lam in runs:
            w, losses = self._train(xs, data.train_y, data.text, w0, b0, lr, lam)
            if len(runs) == 1:
                best = (w, losses, lr, lam)
                break
            with torch.no_grad():
                acc = (self._logits(data.val_x, data.text, w, b0).argmax(-1) == data.val_y).float().mean().item()
            if acc > best_acc:  # the reference's strict >, from 0
                best_acc, best = acc, (w, losses, lr, lam)
        if best is None:  # nothing scored on val: the configured lr and λ
            lr, lam = float(cfg.lr), prolip_lambda(cfg, shots)
            best = (*self._train(xs, data.train_y, data.text, w0, b0, lr, lam), lr, lam)
        w, self.losses, lr, lam = best
        self.weight, self.bias = w.to(data.train_x.dtype), b0.to(data.train_x.dtype).clone()
        self.lr, self.lam = torch.tensor(lr), torch.tensor(lam)

    def _train(self, xs, y, text, w0, b0, lr: float, lam: float) -> tuple[torch.Tensor, list[float]]:
        """One run from W0: `epochs` steps, step s on view (s + 1) mod V; returns (W, the loss of every step)."""
        cfg = self.config
        low = PRECISIONS[cfg.precision]
        if low is not None:
            xs, text, w0, b0 = xs.to(low), text.to(low), w0.to(low), b0.to(low)
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr, eps=cfg.eps)
        n = xs.shape[1]
        bs = n if cfg.batch_size == 0 else min(cfg.batch_size, n)
        per_epoch = math.ceil(n / bs) if n else 1
        total = cfg.epochs * per_epoch
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
            if cfg.schedule == "cosine"
            else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        )
        gen = torch.Generator().manual_seed(self.seed)
        losses = []
        with torch.enable_grad():
            for s in range(cfg.epochs):
                x = xs[(s + 1) % len(xs)]
                order = torch.randperm(n, generator=gen).to(x.device) if bs < n else None
                for i in range(0, n, bs):
                    idx = order[i : i + bs] if order is not None else slice(None)
                    ce = F.cross_entropy(self._logits(x[idx], text, w, b0), y[idx])
                    loss = ce + lam * (w - w0).pow(2).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
        return w.detach(), losses

    def _logits(self, x: torch.Tensor, text: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * F.normalize(x @ w + b, dim=-1) @ text.t()

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """images: raw pre-projection features [B, W_in] (Store.pre_projection_view()), text [C, D] unit-norm."""
        if self.weight.numel() and images.shape[1] != self.weight.shape[0]:
            raise MethodError(
                f"prolip scores pre-projection features [B, {self.weight.shape[0]}], got [B, {images.shape[1]}]; "
                "read them with Store.pre_projection_view() (featcache fit and eval do)"
            )
        w, b = self.weight.to(images.dtype), self.bias.to(images.dtype)
        return self._logits(images, text.to(images.dtype), w, b)
