"""Tip-Adapter (training-free) and Tip-Adapter-F (trainable cache keys), Zhang et al.

Cache keys K [N, D] = the few-shot train features (the mean of the augmented views when the store has them,
as the reference averages 10 views), values L = one-hot labels [N, C]:
    logits = 100 · v · tᵀ + α · exp(−β · (1 − v · Kᵀ)) · L
α, β are searched on the few-shot val split (β: 200 points from 0.1 to its scale, α: 20 points), never on
test. Tip-Adapter-F trains K (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256), keeps the best-val
epoch, then searches α, β again. For classes without cache entries (novel classes, another dataset's classes)
the cache term is zero and the logits are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, FitData, MethodError, TrainConfig, register

# per dataset: initial alpha, search scale [beta, alpha] (methods.md §2.4, from the reference configs)
DATASET_DEFAULTS = {
    "imagenet": (1.17, [7.0, 3.0]), "caltech101": (3.0, [12.0, 5.0]), "dtd": (2.0, [13.0, 13.0]),
    "eurosat": (2.0, [12.0, 10.0]), "fgvc_aircraft": (5.0, [30.0, 30.0]), "food101": (1.17, [10.0, 10.0]),
    "oxford_flowers": (10.0, [50.0, 50.0]), "oxford_pets": (1.17, [7.0, 3.0]), "stanford_cars": (3.0, [20.0, 10.0]),
    "sun397": (1.17, [12.0, 10.0]), "ucf101": (3.0, [7.0, 3.0]),
}  # fmt: skip


@dataclass
class TipAdapterConfig(TrainConfig):
    alpha: float = field(default=1.17, metadata={"help": "initial residual weight of the cache (per-dataset default)"})
    beta: float = field(default=1.0, metadata={"help": "initial sharpness of the cache affinities"})
    search_scale: list = field(default_factory=lambda: [7.0, 3.0], metadata={"help": "search ranges [beta, alpha]"})
    search_steps: list = field(default_factory=lambda: [200, 20], metadata={"help": "grid points [beta, alpha]"})
    search: bool = field(default=True, metadata={"help": "search alpha, beta on val (false: keep the initial ones)"})
    keys_from: str = field(default="auto", metadata={"help": "auto (mean of augmented views if stored), clean, aug"})
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)"})
    epochs: int = field(default=0, metadata={"help": "training-free"})

    @staticmethod
    def dataset_defaults(dataset: str) -> dict:
        if dataset not in DATASET_DEFAULTS:
            return {}
        alpha, scale = DATASET_DEFAULTS[dataset]
        return {"alpha": alpha, "search_scale": scale}


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    epochs: int = field(default=20, metadata={"help": "training epochs (the reference uses 100 for EuroSAT)"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    eps: float = field(default=1e-4, metadata={"help": "AdamW epsilon"})
    optimizer: str = field(default="adamw", metadata={"help": "adam, adamw or sgd"})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine"})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step"})

    @staticmethod
    def dataset_defaults(dataset: str) -> dict:
        out = TipAdapterConfig.dataset_defaults(dataset)
        return out | ({"epochs": 100} if dataset == "eurosat" else {})


@register("tip-adapter", TipAdapterConfig)
class TipAdapter(Adapter):
    needs_val = True
    trainable = False

    def __init__(self, config: TipAdapterConfig, dim: int = 512):
        super().__init__(config, dim)
        self.keys = nn.Parameter(torch.zeros(0, dim), requires_grad=self.trainable)
        self.register_buffer("key_labels", torch.zeros(0, dtype=torch.long))  # the one-hot values L, as labels
        self.register_buffer("num_classes", torch.tensor(0))
        self.register_buffer("alpha", torch.tensor(float(config.alpha)))
        self.register_buffer("beta", torch.tensor(float(config.beta)))

    def setup(self, data: FitData) -> None:
        cfg = self.config
        if cfg.keys_from not in ("auto", "clean", "aug"):
            raise MethodError(f"keys_from must be auto, clean or aug, got {cfg.keys_from!r}")
        use_aug = cfg.keys_from == "aug" or (cfg.keys_from == "auto" and data.train_aug is not None)
        if use_aug and data.train_aug is None:
            raise MethodError("keys_from=aug needs a store extracted with --augment-views")
        keys = F.normalize(data.train_aug.mean(1), dim=-1) if use_aug else data.train_x
        order = torch.argsort(data.train_y, stable=True)  # keys grouped by class: the value sum becomes a reshape
        self.keys = nn.Parameter(keys[order].clone(), requires_grad=self.trainable)
        self.key_labels = data.train_y[order].clone()
        self.num_classes = torch.tensor(data.num_classes)

    def finish(self, data: FitData) -> None:
        if self.config.search and data.val_x is not None:
            a, b = self.search(data.val_x, data.val_y, data.text)
            self.alpha.fill_(a)
            self.beta.fill_(b)

    def _class_sum(self, e: torch.Tensor) -> torch.Tensor:
        """e [B, N] (one column per key) -> e · L [B, C] without the one-hot matmul: keys are grouped by class,
        so with equal shots per class it is a reshape and a sum, else an index_add."""
        n_cls = int(self.num_classes)
        k = len(self.key_labels) // max(1, n_cls)
        if k * n_cls == len(self.key_labels) and torch.equal(
            self.key_labels[::k], torch.arange(n_cls, device=e.device)
        ):
            return e.view(e.shape[0], n_cls, k).sum(-1)
        return torch.zeros(e.shape[0], n_cls, dtype=e.dtype, device=e.device).index_add(1, self.key_labels, e)

    def cache_logits(self, images: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        """exp(−β(1 − v·Kᵀ))·L: [B, C_train]. Trained keys stay unnormalised, as in the reference."""
        return self._class_sum(torch.exp(-beta * (1.0 - images @ self.keys.t())))

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.config.logit_scale * images @ text.t()
        if self.key_labels.numel() == 0:
            return logits
        cache = self.cache_logits(images, self.beta)
        if class_ids is None:
            return logits + self.alpha * cache
        seen = class_ids >= 0
        extra = torch.zeros_like(logits)
        extra[:, seen] = cache[:, class_ids[seen]]
        return logits + self.alpha * extra

    @torch.no_grad()
    def search(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, chunk: int = 256) -> tuple[float, float]:
        """Tip-Adapter's grid (β outer, α inner, first best wins), scored on the given rows. Chunked over rows
        with preallocated buffers that stay in cache: the grid is 4,000 full logit computations."""
        cfg = self.config
        nb, na = int(cfg.search_steps[0]), int(cfg.search_steps[1])
        betas = [i * (cfg.search_scale[0] - 0.1) / nb + 0.1 for i in range(nb)]
        alphas = [i * (cfg.search_scale[1] - 0.1) / na + 0.1 for i in range(na)]
        correct = torch.zeros(nb, na, dtype=torch.long, device=x.device)
        rows = min(chunk, len(x))
        e_buf = torch.empty(rows, len(self.keys), device=x.device)
        logit_buf = torch.empty(rows, text.shape[0], device=x.device)
        for s in range(0, len(x), chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            clip = cfg.logit_scale * xs @ text.t()
            affinity = xs @ self.keys.t()
            e, logits = e_buf[: len(xs)], logit_buf[: len(xs)]
            for i, beta in enumerate(betas):
                torch.mul(affinity, beta, out=e).sub_(beta).exp_()
                cache = self._class_sum(e)
                for j, alpha in enumerate(alphas):
                    torch.add(clip, cache, alpha=alpha, out=logits)
                    correct[i, j] += (logits.argmax(-1) == ys).sum()
        best = int(torch.argmax(correct.flatten()))  # argmax returns the first maximum: β-major, as the reference
        return alphas[best % na], betas[best // na]


@register("tip-adapter-f", TipAdapterFConfig)
class TipAdapterF(TipAdapter):
    trainable = True
