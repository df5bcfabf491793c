"""GDA: Gaussian discriminant analysis on the image features added to zero-shot logits, training-free (ICLR 2024).

Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation"; reference mrflogs/ICLR24. Every
augmented view of the K-shot train images is a sample of its own (each unit-norm). Class means μ [C, D] and one
shared precision P, by the reference's shrinkage ("KS") estimator (main_few_shots.py:56-60), with Z the
class-centred views [N, D] and Σ = torch.cov(Zᵀ):
    P = D · pinv((N − 1) Σ + tr(Σ) I)
    W = P μᵀ [D, C],  b_c = log(1/C) − ½ μ_c P μ_cᵀ
    logits = 100 · v tᵀ + α · (v W + b)
α is the first best of [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100] on validation (strict >, main_few_shots.py:67-79).
Under base2novel the reference fits the base classes without shrinkage, P = pinv(mean_c cov(views of c))
(main_base2new.py:55-57), and builds each novel class from the support views (main_base2new.py:85-111): for the
novel text w, X = its 64 nearest support views, μ_w = mean(X ∪ 16 copies of w), S_w = (X − w)ᵀ(X − w),
P_w = D · pinv(S_w + tr(S_w)/(k − 1) I); the novel classes share P = mean_w P_w, with the same α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Adapter, FitData, MethodError, TrainConfig, register
from .grid_search import affine_grid_counts, first_best

NOVEL_CHUNK = 64  # novel classes whose D x D pseudo-inverses are computed at once (memory, not a per-class loop)


@dataclass
class GDAConfig(TrainConfig):
    alpha_grid: list = field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0],
        metadata={"help": "alpha candidates, searched in this order, first best wins (main_few_shots.py:67-79)",
                  "ge": 0.0},
    )  # fmt: skip
    alpha: float = field(
        default=0.1,
        metadata={"help": "alpha with search=false, and the one kept when no candidate scores above 0 on val "
                  "(the reference's initial best_alpha)", "ge": 0.0},
    )  # fmt: skip
    search: bool = field(default=True, metadata={"help": "search alpha on val (false: use alpha, no val needed)"})
    covariance: str = field(
        default="auto",
        metadata={"help": "shrunk: the KS estimator D·pinv((N-1)Σ + tr(Σ)I) of main_few_shots.py; class-mean: "
                  "pinv of the mean per-class covariance, main_base2new.py's base classifier; auto: class-mean "
                  "under --protocol base2novel, shrunk otherwise (as the reference scripts do)",
                  "choices": ["auto", "shrunk", "class-mean"]},
    )  # fmt: skip
    views: str = field(
        default="auto",
        metadata={"help": "each: every stored augmented view is its own sample (the reference: 10 views, each "
                  "normalised); clean: the plain train features only; auto: each when the store has views. The "
                  "store's views are RandomResizedCrop scale 0.08-1, the reference's 0.5-1 (0.08-1 on ImageNet)",
                  "choices": ["auto", "each", "clean"]},
    )  # fmt: skip
    novel_topk: int = field(
        default=64, metadata={"help": "support views nearest each novel text (main_base2new.py:85; at most N)", "ge": 2}
    )
    novel_text_repeat: int = field(
        default=16, metadata={"help": "copies of the novel text in its mean (main_base2new.py:89)", "ge": 0}
    )
    val_draw: str = field(
        default="full",
        metadata={"help": "val rows alpha is searched on: full (the reference: the whole val split; on ImageNet "
                  "it selects on the test split, featcache never does: use --val-from train), dassl (min(K,4) per "
                  "class), k-shot (K per class)", "choices": ["dassl", "k-shot", "full"]},
    )  # fmt: skip
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0.0})
    epochs: int = field(default=0, metadata={"help": "training-free", "ge": 0})


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [C, D], counts [C]) of the rows of each class."""
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return sums / counts.clamp(min=1)[:, None].to(x.dtype), counts


def shrunk_precision(z: torch.Tensor) -> torch.Tensor:
    """The reference's KS estimator on class-centred rows z [N, D]: D · pinv((N − 1) Σ + tr(Σ) I), Σ = cov(zᵀ)."""
    n, d = z.shape
    if n < 2:
        raise MethodError("GDA needs at least 2 feature rows to estimate a covariance")
    sigma = torch.cov(z.t())
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return d * torch.linalg.pinv((n - 1) * sigma + sigma.trace() * eye, hermitian=True)


def class_mean_precision(z: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """pinv of the mean over classes of each class's unbiased covariance (main_base2new.py:56-57); z is centred
    on each row's class mean, so Σ_c cov_c = Σ_i z_i z_iᵀ / (n_{y_i} − 1)."""
    if int(counts.min()) < 2:
        raise MethodError(
            "covariance=class-mean needs at least 2 rows per class (extract with --augment-views, as the reference "
            "uses 10 views, or use --set covariance=shrunk)"
        )
    w = 1.0 / (counts[y] - 1).to(z.dtype)
    return torch.linalg.pinv((z * w[:, None]).t() @ z / len(counts), hermitian=True)


def discriminant(mus: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = P μᵀ [D, C] and b_c = log(1/C) − ½ μ_c P μ_cᵀ (uniform prior; main_few_shots.py:62-64)."""
    w = precision @ mus.t()
    b = math.log(1.0 / len(mus)) - 0.5 * (mus * w.t()).sum(-1)
    return w, b


def novel_discriminant(
    support: torch.Tensor, text: torch.Tensor, k: int, repeat: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """main_base2new.py:85-111 for novel class texts [Cn, D] from the support views [N, D]: means from each text's
    k nearest views plus `repeat` copies of the text, the mean of the per-class KS precisions around the text.
    The reference hard-codes D = 512 (the factor and the identity); here D is the feature width."""
    k = min(k, len(support))
    if k < 2:
        raise MethodError("GDA's novel classes need at least 2 support views")
    n_cls, d = text.shape
    idx = (text @ support.t()).topk(k, dim=1).indices  # [Cn, k]
    eye = torch.eye(d, dtype=text.dtype, device=text.device)
    mus, p_sum = [], torch.zeros(d, d, dtype=text.dtype, device=text.device)
    for s in range(0, n_cls, NOVEL_CHUNK):
        x, w = support[idx[s : s + NOVEL_CHUNK]], text[s : s + NOVEL_CHUNK, None]  # [c, k, D], [c, 1, D]
        mus.append(torch.cat([x, w.expand(-1, repeat, -1)], dim=1).mean(1))
        zc = x - w
        cov = zc.transpose(1, 2) @ zc / (k - 1)  # the reference's covariance(vecs, mu=w)
        tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        p_sum += (d * torch.linalg.pinv((k - 1) * cov + tr[:, None, None] * eye, hermitian=True)).sum(0)
    return discriminant(torch.cat(mus), p_sum / n_cls)


@register("gda", GDAConfig)
class GDA(Adapter):
    trainable = False
    selection = "val"

    def __init__(self, config: GDAConfig, dim: int = 512):
        super().__init__(config, dim)
        self.needs_val = bool(config.search)
        self.register_buffer("weight", torch.zeros(dim, 0))  # W [D, C]
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("alpha", torch.tensor(float(config.alpha)))
        # the views the statistics came from: novel classes are built from them at evaluation time (float16
        # when that is lossless, as for the default float16 stores)
        self.register_buffer("support", torch.zeros(0, dim))
        self._novel: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (text, W, b) last built

    def _views(self, data: FitData) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.config.views
        if mode not in ("auto", "each", "clean"):
            raise MethodError(f"views must be auto, each or clean, got {mode!r}")
        if mode == "each" and data.train_aug is None:
            raise MethodError("views=each needs a store extracted with --augment-views")
        if mode == "clean" or data.train_aug is None:
            return data.train_x, data.train_y
        n, v, d = data.train_aug.shape
        return data.train_aug.reshape(n * v, d), data.train_y.repeat_interleave(v)

    def setup(self, data: FitData) -> None:
        cfg = self.config
        if cfg.covariance not in ("auto", "shrunk", "class-mean"):
            raise MethodError(f"covariance must be auto, shrunk or class-mean, got {cfg.covariance!r}")
        x, y = self._views(data)
        mus, counts = class_means(x, y, data.num_classes)
        z = x - mus[y]
        kind = cfg.covariance
        if kind == "auto":
            kind = "class-mean" if data.protocol == "base2novel" else "shrunk"
        precision = shrunk_precision(z) if kind == "shrunk" else class_mean_precision(z, y, counts)
        self.weight, self.bias = discriminant(mus, precision)
        half = x.to(torch.float16)
        self.support = half if torch.equal(half.to(x.dtype), x) else x.clone()
        self._novel = None

    def finish(self, data: FitData) -> None:
        if not self.config.search or data.val_x is None:
            return
        alphas = torch.tensor(self.config.alpha_grid, dtype=data.val_x.dtype, device=data.val_x.device)
        clip = self.config.logit_scale * data.val_x @ data.text.t()
        gda = data.val_x @ self.weight + self.bias
        best = first_best(affine_grid_counts(clip, [gda], alphas[:, None], data.val_y))
        if best is not None:
            self.alpha.fill_(float(alphas[best]))

    def _novel_classifier(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthesised classifier for a class set the method has no statistics for, built once per text."""
        last = self._novel
        if last is not None and (last[0].shape, last[0].device) == (text.shape, text.device):
            if torch.equal(last[0], text):
                return last[1], last[2]
        cfg = self.config
        w, b = novel_discriminant(self.support.to(text.dtype), text, cfg.novel_topk, cfg.novel_text_repeat)
        self._novel = (text.clone(), w, b)
        return w, b

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training classes use their fitted discriminant (a subset through class_ids, e.g. ImageNet-A's 200);
        a class set with any class never trained on (novel classes, another dataset's) gets the reference's
        synthesised novel classifier over all of its classes, built from the support views."""
        logits = self.config.logit_scale * images @ text.t()
        if self.weight.shape[1] == 0:
            return logits
        if class_ids is None:
            w, b = self.weight, self.bias
        elif bool((class_ids >= 0).all()):
            w, b = self.weight[:, class_ids], self.bias[class_ids]
        else:
            w, b = self._novel_classifier(text)
        return logits + self.alpha * (images @ w + b)
