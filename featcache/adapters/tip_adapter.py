"""Tip-Adapter (training-free) and Tip-Adapter-F (trainable cache keys), Zhang et al.

Cache keys K [N, D] = the few-shot train features (with augmented views in the store: the mean of the raw views,
then normalised, as the reference's build_cache_model averages 10 raw encoder outputs; `view_mean`), values
L = one-hot labels [N, C]:
    logits = 100 · v · tᵀ + α · exp(−β · (1 − v · Kᵀ)) · L
α, β are searched on the few-shot val split (β: 200 points from 0.1 to its scale, α: 20 points), never on
test. Tip-Adapter-F trains K (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256), keeps the best-val
epoch, then searches α, β again. For classes without cache entries (novel classes, another dataset's classes)
the cache term is zero and the logits are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Adapter, FitData, MethodError, TrainConfig, register
from .grid_search import VIEW_MEAN_HELP, view_mean

# per dataset: initial alpha, search scale [beta, alpha] (methods.md §2.4, from the reference configs)
DATASET_DEFAULTS = {
    "imagenet": (1.17, [7.0, 3.0]), "caltech101": (3.0, [12.0, 5.0]), "dtd": (2.0, [13.0, 13.0]),
    "eurosat": (2.0, [12.0, 10.0]), "fgvc_aircraft": (5.0, [30.0, 30.0]), "food101": (1.17, [10.0, 10.0]),
    "oxford_flowers": (10.0, [50.0, 50.0]), "oxford_pets": (1.17, [7.0, 3.0]), "stanford_cars": (3.0, [20.0, 10.0]),
    "sun397": (1.17, [12.0, 10.0]), "ucf101": (3.0, [7.0, 3.0]),
}  # fmt: skip


@dataclass
class TipAdapterConfig(TrainConfig):
    alpha: float = field(
        default=1.17, metadata={"help": "initial residual weight of the cache (per-dataset default)", "ge": 0}
    )
    beta: float = field(default=1.0, metadata={"help": "initial sharpness of the cache affinities", "ge": 0})
    search_scale: list = field(
        default_factory=lambda: [7.0, 3.0], metadata={"help": "search ranges [beta, alpha]", "gt": 0}
    )
    search_steps: list = field(
        default_factory=lambda: [200, 20], metadata={"help": "grid points [beta, alpha]", "ge": 1}
    )
    search: bool = field(default=True, metadata={"help": "search alpha, beta on val (false: keep the initial ones)"})
    keys_from: str = field(
        default="auto",
        metadata={"help": "auto (mean of augmented views if stored), clean, aug", "choices": ["auto", "clean", "aug"]},
    )
    view_mean: str = field(default="raw", metadata={"help": VIEW_MEAN_HELP, "choices": ["raw", "normalised"]})
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0})
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32: exact. bf16: the image-key affinity matmuls (forward, and Tip-Adapter-F's key gradient) "
            "take bfloat16 inputs and round the affinities to bfloat16 (|error| <= 2^-9); keys, optimiser and the "
            "rest stay float32. The reference runs its whole model in float16 on GPU (clip_model.dtype); bf16 "
            "is the CPU's fast reduced precision (about 3x faster matmuls on avx512_bf16)",
            "choices": ["fp32", "bf16"],
        },
    )
    epochs: int = field(default=0, metadata={"help": "training-free", "ge": 0})

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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
ROWS = 256  # rows per chunk when scoring without gradients: a [256, N] affinity block stays in cache


def _affinity(x: torch.Tensor, keys: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    """x Kᵀ [B, N], in float32 (low=None) or from `low`-precision inputs, returned as a float32 tensor."""
    if low is None:
        return x @ keys.t()
    return (x.to(low) @ keys.to(low).t()).float()  # .to() is a no-op on tensors already in `low`


class _CacheExp(torch.autograd.Function):
    """exp(−β(1 − x Kᵀ)) for training, summed per class when the keys are k per class in class order (k > 0; else
    the [B, N] exp is returned for the caller to sum). The affinity buffer becomes the exp in place (the same
    operations, in the same order, as torch.exp(-beta * (1.0 - x @ keys.t()))), and backward turns the saved exp
    into the affinity gradient β·E·dE in place, so a step allocates one [B, N] buffer instead of six."""

    @staticmethod
    def forward(ctx, x, keys, beta, low, k):
        ctx.dtypes = x.dtype, keys.dtype
        if low is not None:  # cast once; backward's matmuls reuse the low-precision copies
            x, keys = x.to(low), keys.to(low)
        e = _affinity(x, keys, low).neg_().add_(1.0).mul_(-beta).exp_()
        ctx.save_for_backward(x, keys, e)
        ctx.beta, ctx.low, ctx.k = beta, low, k
        return e.view(e.shape[0], -1, k).sum(-1) if k else e

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, keys, e = ctx.saved_tensors
        if ctx.k:
            e.view(e.shape[0], -1, ctx.k).mul_(dout[..., None])  # the class sum's gradient, then exp'
        else:
            e.mul_(dout)
        da = e.mul_(-ctx.beta).neg_()  # d/dA of −β(1 − A), in the order autograd applies it
        dx = _affinity(da, keys.t(), ctx.low).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        # dAᵀ x: contiguous like the keys, so it becomes their .grad without the copy autograd's (xᵀ dA)ᵀ needs
        dk = _affinity(da.t(), x.t(), ctx.low).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dx, dk, None, None, None


@register("tip-adapter", TipAdapterConfig)
class TipAdapter(Adapter):
    selection = "few-shot-val"  # alpha/beta search on val (Tip-Adapter-F also keeps its best-val epoch)
    needs_val = True
    trainable = False

    def __init__(self, config: TipAdapterConfig, dim: int = 512):
        super().__init__(config, dim)
        if config.precision not in PRECISIONS:
            raise MethodError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
        self._low = PRECISIONS[config.precision]
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
        keys = view_mean(data.train_aug, data.train_aug_norms, cfg.view_mean) if use_aug else data.train_x
        order = torch.argsort(data.train_y, stable=True)  # keys grouped by class: the value sum becomes a reshape
        self.keys = nn.Parameter(keys[order].clone(), requires_grad=self.trainable)
        self.key_labels = data.train_y[order].clone()
        self.num_classes = torch.tensor(data.num_classes)

    def finish(self, data: FitData) -> None:
        if self.config.search and data.val_x is not None:
            a, b = self.search(data.val_x, data.val_y, data.text)
            self.alpha.fill_(a)
            self.beta.fill_(b)

    def _shots(self) -> int:
        """k if the keys are k per class, grouped in class order (the value sum is then a reshape), else 0."""
        n_cls = int(self.num_classes)
        k = len(self.key_labels) // max(1, n_cls)
        ok = k > 0 and k * n_cls == len(self.key_labels)
        return k if ok and torch.equal(self.key_labels[::k], torch.arange(n_cls, device=self.key_labels.device)) else 0

    def _class_sum(self, e: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """e [B, N] (one column per key) -> e · L [B, C] without the one-hot matmul: keys are grouped by class,
        so with equal shots per class it is a reshape and a sum, else an index_add."""
        k = self._shots() if k is None else k
        if k:
            return e.view(e.shape[0], -1, k).sum(-1)
        n_cls = int(self.num_classes)
        return torch.zeros(e.shape[0], n_cls, dtype=e.dtype, device=e.device).index_add(1, self.key_labels, e)

    def cache_logits(self, images: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        """exp(−β(1 − v·Kᵀ))·L: [B, C_train]. Trained keys stay unnormalised, as in the reference.
        With gradients (training) one autograd Function; without, ROWS rows at a time in one reused buffer."""
        beta, k = float(beta), self._shots()
        if torch.is_grad_enabled() and (images.requires_grad or self.keys.requires_grad):
            out = _CacheExp.apply(images, self.keys, beta, self._low, k)
            return out if k else self._class_sum(out, k)
        out = [
            self._class_sum(_affinity(xs, self.keys, self._low).neg_().add_(1.0).mul_(-beta).exp_(), k)
            for xs in images.split(ROWS)
        ]
        return torch.cat(out) if out else images.new_zeros(0, int(self.num_classes))

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

    def _grid(self) -> tuple[list[float], list[float]]:
        cfg = self.config
        nb, na = int(cfg.search_steps[0]), int(cfg.search_steps[1])
        betas = [i * (cfg.search_scale[0] - 0.1) / nb + 0.1 for i in range(nb)]
        alphas = [i * (cfg.search_scale[1] - 0.1) / na + 0.1 for i in range(na)]
        return betas, alphas

    def search(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
        """Tip-Adapter's grid (β outer, α inner, first best wins), scored on the given rows."""
        betas, alphas = self._grid()
        best = int(torch.argmax(self._grid_counts(x, y, text).flatten()))  # first maximum: β-major, as the reference
        return alphas[best % len(alphas)], betas[best // len(alphas)]

    @torch.no_grad()
    def _grid_counts(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, chunk: int = ROWS) -> torch.Tensor:
        """Correct predictions [β, α] over the grid: the same counts as scoring all 4,000 logit matrices
        (`_grid_counts_dense`), with less work for the α loop:

        logit_c(α) = clip_c + α cache_c is linear in α, so a class below the true class's logit at both ends of
        the α range (by a margin far above float rounding) is below it at every α of the grid and cannot be the
        argmax. Only the few remaining (row, class) pairs are compared at each α, computed with the same op
        (torch.add with alpha: one fused multiply-add) as the full logits, with argmax's first-index tie rule."""
        betas, alphas = self._grid()
        correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=x.device)
        k, a_lo, a_hi = self._shots(), min(alphas), max(alphas)
        a_abs = max(abs(a_lo), abs(a_hi))
        alpha_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)[:, None]
        e_buf = torch.empty(min(chunk, len(x)), len(self.keys), device=x.device)
        for s in range(0, len(x), chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            n, rows = len(xs), torch.arange(len(xs), device=x.device)
            clip = self.config.logit_scale * xs @ text.t()
            affinity = _affinity(xs, self.keys, self._low)
            e, clip_y, clip_max = e_buf[:n], clip[rows, ys], float(clip.abs().max())
            for i, beta in enumerate(betas):
                torch.mul(affinity, beta, out=e).sub_(beta).exp_()
                cache = self._class_sum(e, k)  # >= 0
                cache_y = cache[rows, ys]
                lo, hi = torch.add(clip, cache, alpha=a_lo), torch.add(clip, cache, alpha=a_hi)
                lo_y, hi_y = torch.add(clip_y, cache_y, alpha=a_lo), torch.add(clip_y, cache_y, alpha=a_hi)
                margin = 64 * torch.finfo(clip.dtype).eps * (clip_max + a_abs * float(cache.max()))  # >> rounding
                threat = (lo >= (lo_y - margin)[:, None]) | (hi >= (hi_y - margin)[:, None])
                threat[rows, ys] = False
                r, c = threat.nonzero(as_tuple=True)
                if len(r) == 0:
                    correct[i] += n
                    continue
                # [α, pair]: clip + α cache as one fused multiply-add each, the same rounding as torch.add(alpha=α)
                lc = torch.addcmul(clip[r, c], alpha_t, cache[r, c])
                ly = torch.addcmul(clip_y[r], alpha_t, cache_y[r])
                beats = (lc > ly).logical_or_((lc == ly).logical_and_(c < ys[r]))  # argmax takes the first max
                wrong = torch.zeros(len(alphas), n, dtype=torch.long, device=x.device).index_add_(1, r, beats.long())
                correct[i] += n - (wrong > 0).sum(1)
        return correct

    @torch.no_grad()
    def _grid_counts_dense(self, x, y, text, chunk: int = ROWS) -> torch.Tensor:
        """The grid scored the direct way (every logit matrix, then argmax), for tests."""
        betas, alphas = self._grid()
        correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=x.device)
        for s in range(0, len(x), chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            clip = self.config.logit_scale * xs @ text.t()
            affinity = _affinity(xs, self.keys, self._low)
            for i, beta in enumerate(betas):
                cache = self._class_sum((affinity * beta).sub_(beta).exp_())
                for j, alpha in enumerate(alphas):
                    correct[i, j] += (torch.add(clip, cache, alpha=alpha).argmax(-1) == ys).sum()
        return correct


@register("tip-adapter-f", TipAdapterFConfig)
class TipAdapterF(TipAdapter):
    trainable = True
