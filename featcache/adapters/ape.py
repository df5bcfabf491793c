"""APE: adaptive prior refinement, a Tip-Adapter cache on the Q most discriminative feature channels, training-free.

Zhu et al., "Not All Features Matter: Enhancing Few-shot CLIP with Adaptive Prior Refinement" (ICCV 2023);
reference yangyangyang127/APE (main.py:28-103, utils.py:22-72). Channel criterion over F = [t_c; keys of c]
per class (K + 1 rows each): S_d = the mean over pairs of rows of different classes of F[i,m,d]·F[j,n,d],
V_d = the variance over classes of the text t[:, d] (unbiased), J = −w0·S + w1·V, channels = topk(J, Q). Keys K',
text t' and image v' restricted to those channels and renormalised; L one-hot values:
    p_k = softmax(K'_k · t'ᵀ),  D_k = Σ_c L_kc · log2((L_kc + 1e-6) / (p_kc + 1e-6))
    logits = 100 · v tᵀ + α · exp(−(β − β · v' K'ᵀ)) · (L ∘ exp(γ · D))
(the zero-shot term on all channels). β, α, γ: the reference's grid on validation (β outer, α, γ inner; first
best). APE-T is not offered: the reference ships it commented out (main.py:258-269) and as written it fails
whenever training_feat_num differs from training_free_feat_num (utils.py:122-132), i.e. on every dataset but
OxfordPets. For classes without cache entries (novel classes, another dataset's) the logits are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Adapter, FitData, MethodError, register
from .grid_search import (
    ROWS,
    SupportCacheConfig,
    affine_grid_counts,
    class_sum,
    equal_shots,
    support_cache,
    to_targets,
    unravel_best,
)

# per dataset (configs/<dataset>.yaml, methods_2026.md §6.4-6.5): criterion weights [w0, w1], Q, search scale and
# steps [beta, alpha, gamma]; the reference's Q values are for RN50's 1024 channels
_SCALE, _STEPS = [7.0, 7.0, 1.0], [200, 20, 20]
DATASET_DEFAULTS = {
    "caltech101": ([0.5, 0.5], 800, _SCALE, _STEPS),
    "dtd": ([0.5, 0.5], 400, _SCALE, _STEPS),
    "eurosat": ([0.9, 0.1], 700, [30.0, 5.0, 1.5], _STEPS),
    "fgvc_aircraft": ([0.1, 0.9], 800, [20.0, 10.0, 1.0], _STEPS),
    "food101": ([0.3, 0.7], 700, _SCALE, _STEPS),
    "imagenet": ([0.7, 0.3], 500, [7.0, 7.0, 0.5], [200, 20, 5]),
    "oxford_flowers": ([0.4, 0.6], 700, _SCALE, _STEPS),
    "oxford_pets": ([0.7, 0.3], 800, _SCALE, _STEPS),
    "stanford_cars": ([0.6, 0.4], 500, [10.0, 7.0, 1.0], _STEPS),
    "sun397": ([0.7, 0.3], 800, [10.0, 7.0, 1.0], _STEPS),
    "ucf101": ([0.3, 0.7], 700, [10.0, 7.0, 1.5], _STEPS),
}


@dataclass
class APEConfig(SupportCacheConfig):
    w: list = field(
        default_factory=lambda: [0.5, 0.5],
        metadata={"help": "criterion weights [w0 on the inter-class similarity, w1 on the text variance] "
                  "(w_training_free, per-dataset default)", "ge": 0.0},
    )  # fmt: skip
    feat_num: int = field(
        default=800,
        metadata={"help": "Q, channels kept (training_free_feat_num, per-dataset default, set for RN50's 1024 "
                  "channels); a Q above the feature width keeps every channel", "ge": 1},
    )  # fmt: skip
    search_scale: list = field(
        default_factory=lambda: list(_SCALE),
        metadata={"help": "search ranges [beta, alpha, gamma]: beta_i = i(s0-0.1)/n0 + 0.1, alpha likewise, "
                  "gamma_i = i·s2/n2 (main.py:74-93)", "gt": 0.0},
    )  # fmt: skip
    search_steps: list = field(
        default_factory=lambda: list(_STEPS), metadata={"help": "grid points [beta, alpha, gamma]", "ge": 1}
    )
    gamma: float = field(default=0.1, metadata={"help": "value reweighting with search=false (init_gamma)"})

    @staticmethod
    def dataset_defaults(dataset: str) -> dict:
        if dataset not in DATASET_DEFAULTS:
            return {}
        w, q, scale, steps = DATASET_DEFAULTS[dataset]
        return {"w": list(w), "feat_num": q, "search_scale": list(scale), "search_steps": list(steps)}


def ape_criterion(text: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, w: list[float]) -> torch.Tensor:
    """J [D] = −w0 · S + w1 · V (utils.py:48-65), in closed form: with s_c the sum of class c's rows of F (its
    text and its keys), Σ_{i≠j} s_i s_j = (Σ s)² − Σ s², over (Σ n)² − Σ n² pairs of rows (n_c = K_c + 1)."""
    s = text.clone().index_add_(0, labels, keys)  # [C, D]
    n = torch.bincount(labels, minlength=len(text)).to(text.dtype) + 1
    pairs = n.sum() ** 2 - (n**2).sum()
    sim = (s.sum(0) ** 2 - (s**2).sum(0)) / pairs
    return -w[0] * sim + w[1] * text.var(dim=0)


@register("ape", APEConfig)
class APE(Adapter):
    trainable = False
    selection = "val"

    def __init__(self, config: APEConfig, dim: int = 512):
        super().__init__(config, dim)
        self.needs_val = bool(config.search)
        self.register_buffer("channels", torch.zeros(0, dtype=torch.long))  # the Q selected channels
        self.register_buffer("keys", torch.zeros(0, 0))  # K' [N, Q], renormalised on the channels
        self.register_buffer("key_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("divergence", torch.zeros(0))  # D_k [N], in bits
        self.register_buffer("num_classes", torch.tensor(0))
        for name in ("alpha", "beta", "gamma"):
            self.register_buffer(name, torch.tensor(float(getattr(config, name))))

    def setup(self, data: FitData) -> None:
        cfg = self.config
        keys, labels = support_cache(data, cfg)  # grouped by class, as the reference's cache
        n_cls = data.num_classes
        q = min(int(cfg.feat_num), keys.shape[1])
        self.channels = ape_criterion(data.text, keys, labels, cfg.w).topk(q).indices
        self.keys = F.normalize(keys[:, self.channels], dim=-1)
        text = F.normalize(data.text[:, self.channels], dim=-1)
        p = (self.keys @ text.t()).softmax(1)
        onehot = F.one_hot(labels, n_cls).to(p.dtype)
        self.divergence = (onehot * torch.log2((onehot + 1e-6) / (p + 1e-6))).sum(1)
        self.key_labels = labels
        self.num_classes = torch.tensor(n_cls)

    def _affinity(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images[:, self.channels], dim=-1) @ self.keys.t()

    def cache_logits(self, images: torch.Tensor, beta, gamma) -> torch.Tensor:
        """exp(−(β − β · v' K'ᵀ)) · (L ∘ exp(γ D)): [B, C_train], ROWS rows at a time."""
        n_cls, k = int(self.num_classes), equal_shots(self.key_labels, int(self.num_classes))
        weight = (self.divergence * gamma).exp()
        out = [class_sum((-(beta - beta * self._affinity(x))).exp() * weight, self.key_labels, n_cls, k)
               for x in images.split(ROWS)]  # fmt: skip
        return torch.cat(out) if out else images.new_zeros(0, n_cls)

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.config.logit_scale * images @ text.t()
        if self.key_labels.numel() == 0:
            return logits
        cache = to_targets(self.cache_logits(images, self.beta, self.gamma), class_ids)
        return logits + cache * self.alpha

    def _grid(self) -> tuple[list[float], list[float], list[float]]:
        (s0, s1, s2), (n0, n1, n2) = self.config.search_scale, [int(n) for n in self.config.search_steps]
        betas = [i * (s0 - 0.1) / n0 + 0.1 for i in range(n0)]
        alphas = [i * (s1 - 0.1) / n1 + 0.1 for i in range(n1)]
        gammas = [i * s2 / n2 for i in range(n2)]
        return betas, alphas, gammas

    def finish(self, data: FitData) -> None:
        if not self.config.search or data.val_x is None:
            return
        if len(self.config.search_scale) != 3 or len(self.config.search_steps) != 3:
            raise MethodError("ape's search_scale and search_steps take 3 values each: beta, alpha, gamma")
        betas, alphas, gammas = self._grid()
        counts = self.grid_counts(data.val_x, data.val_y, data.text)  # [beta, alpha, gamma]
        b, a, g = unravel_best(counts, betas, alphas, gammas)
        self.alpha.fill_(a)
        self.beta.fill_(b)
        self.gamma.fill_(g)

    @torch.no_grad()
    def grid_counts(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Correct predictions [beta, alpha, gamma] over the reference's grid (main.py:74-93), exact: the cache
        term is computed once per (beta, gamma) and the alpha loop is affine_grid_counts."""
        betas, alphas, gammas = self._grid()
        n_cls, k = int(self.num_classes), equal_shots(self.key_labels, int(self.num_classes))
        alpha_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)[:, None]
        weights = [(self.divergence * g).exp() for g in gammas]
        counts = torch.zeros(len(betas), len(gammas), len(alphas), dtype=torch.long, device=x.device)
        for s in range(0, len(y), ROWS):
            xs, ys = x[s : s + ROWS], y[s : s + ROWS]
            clip = self.config.logit_scale * xs @ text.t()
            affinity = self._affinity(xs)
            for i, beta in enumerate(betas):
                e = (-(beta - beta * affinity)).exp()
                for j, w in enumerate(weights):
                    cache = class_sum(e * w, self.key_labels, n_cls, k)
                    counts[i, j] += affine_grid_counts(clip, [cache], alpha_t, ys)
        return counts.transpose(1, 2)
