"""Tip-X: Tip-Adapter plus an affinity from the KL divergence of zero-shot class distributions, training-free.

Udandarao et al., "SuS-X: Training-Free Name-Only Transfer of Vision-Language Models" (ICCV 2023); reference
vishaal27/SuS-X tipx.py, the affinity part on few-shot support keys. With τ = 0.5, q_j = softmax(K_j tᵀ / τ) per
support key, p_i = softmax(v_i tᵀ / τ) per image (t: the training classes' text):
    KL_ij = Σ_c p_ic (log p_ic − log q_jc),  A_cos = v Kᵀ
    A_kl = −(min-max rescale of KL to the range of A_cos)                     (tipx.py:60-66, 93-94)
    logits = 100 · v tᵀ + γ · A_kl L + α · exp(−(β − β · A_cos)) L           (tipx.py:100)
α, β, γ: the reference's grid on validation (α outer, β, γ inner; first best). The rescaling is frozen at fit
time from validation: its slope and offset come from the val KL and cosine ranges, so an image's logits do not
depend on the other images scored with it. The reference rescales the test KL by the test KL matrix's own range
to the *val* cosine range (its bug 2, tipx.py:117); only the slope matters for the prediction (with equal shots
the offset adds the same to every class), and the val slope is the one γ was searched with. `kl_range=batch`
gives the reference's test-time rescaling per scored batch. For classes without cache entries (novel classes,
another dataset's) both terms are zero and the logits are zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Adapter, FitData, MethodError, register
from .grid_search import (
    ROWS,
    SupportCacheConfig,
    affine_grid_counts,
    class_sum,
    combine,
    equal_shots,
    support_cache,
    to_targets,
    unravel_best,
)


@dataclass
class TipXConfig(SupportCacheConfig):
    temperature: float = field(
        default=0.5, metadata={"help": "softmax temperature of the class distributions (tipx.py:139)", "gt": 0.0}
    )
    search_scale: list = field(
        default_factory=lambda: [50.0, 50.0, 30.0],
        metadata={"help": "search ranges [beta, alpha, gamma]: beta_i = i(s0-1)/n0 + 1, alpha_i = i(s1-0.1)/n1 + "
                  "0.1, gamma_i = i(s2-0.1)/n2 + 0.1 (tipx.py:71-76)", "gt": 0.0},
    )  # fmt: skip
    search_steps: list = field(
        default_factory=lambda: [200, 20, 50], metadata={"help": "grid points [beta, alpha, gamma]", "ge": 1}
    )
    search: bool = field(
        default=True,
        metadata={"help": "search alpha, beta, gamma on val (false: keep the ones set; without val rows the KL "
                  "rescaling then comes from the support keys' own ranges)"},
    )  # fmt: skip
    gamma: float = field(default=0.1, metadata={"help": "KL-affinity weight with search=false"})
    kl_range: str = field(
        default="val",
        metadata={"help": "val: rescale the KL with the val KL and cosine ranges, frozen at fit (per-image "
                  "logits); batch: as the reference scores test (tipx.py:113-125): the scored batch's own KL range "
                  "to the val cosine range (featcache scores 4,096 rows at a time, so this is the reference's "
                  "exactly when the test split fits one batch)", "choices": ["val", "batch"]},
    )  # fmt: skip
    kl_rows: str = field(
        default="all",
        metadata={"help": "all: the KL of every row; reference: as get_kl_divergence_sims (tipx.py:30-41, its bug "
                  "1), the rows after the last full block of 100 keep KL 0, in val during the search and in each "
                  "scored batch (an image's logits then depend on its position)", "choices": ["all", "reference"]},
    )  # fmt: skip


def rescale(x: torch.Tensor, x_lo, x_hi, t_lo, t_hi) -> torch.Tensor:
    """scale_ of tipx.py:60-66 with given ranges: x mapped from [x_lo, x_hi] onto [t_lo, t_hi]."""
    span = x_hi - x_lo
    y = (x - x_lo) / (span if float(span) > 0 else 1.0)  # a constant KL (degenerate) maps to t_lo
    return y * (t_hi - t_lo) + t_lo


@register("tip-x", TipXConfig)
class TipX(Adapter):
    trainable = False
    selection = "val"

    def __init__(self, config: TipXConfig, dim: int = 512):
        super().__init__(config, dim)
        if config.kl_range not in ("val", "batch") or config.kl_rows not in ("all", "reference"):
            raise MethodError("tip-x: kl_range is val or batch, kl_rows is all or reference")
        self.needs_val = bool(config.search)
        self.register_buffer("keys", torch.zeros(0, dim))
        self.register_buffer("key_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("num_classes", torch.tensor(0))
        self.register_buffer("class_text", torch.zeros(0, dim))  # the classes the distributions are over
        self.register_buffer("ranges", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # KL lo, hi; cosine lo, hi (val)
        for name in ("alpha", "beta", "gamma"):
            self.register_buffer(name, torch.tensor(float(getattr(config, name))))

    def setup(self, data: FitData) -> None:
        self.keys, self.key_labels = support_cache(data, self.config)
        self.num_classes = torch.tensor(data.num_classes)
        self.class_text = data.text.clone()

    def _shots(self) -> int:
        return equal_shots(self.key_labels, int(self.num_classes))

    def _kl(self, x: torch.Tensor, tail: bool) -> torch.Tensor:
        """KL(p_i ‖ q_j) [B, N] = Σ_c p_ic log p_ic − p_i · log q_j. `tail`: zero the rows after the last full
        block of 100 (the reference's bug 1, when kl_rows=reference)."""
        tau = self.config.temperature
        p = (x @ self.class_text.t() / tau).softmax(-1)
        log_q = (self.keys @ self.class_text.t() / tau).softmax(-1).log()
        kl = (p * p.log()).sum(-1, keepdim=True) - p @ log_q.t()
        if tail and self.config.kl_rows == "reference":
            kl[len(kl) // 100 * 100 :] = 0
        return kl

    def _kl_term(self, kl: torch.Tensor, kl_lo, kl_hi) -> torch.Tensor:
        """A_kl L [B, C_train]: the negated KL rescaled onto the val cosine range, summed per class."""
        scaled = rescale(kl, kl_lo, kl_hi, self.ranges[2], self.ranges[3])
        return class_sum(-scaled, self.key_labels, int(self.num_classes), self._shots())

    def _cache(self, x: torch.Tensor, beta) -> torch.Tensor:
        """exp(−(β − β A_cos)) L [B, C_train], Tip-Adapter's cache term."""
        e = (-(beta - beta * (x @ self.keys.t()))).exp()
        return class_sum(e, self.key_labels, int(self.num_classes), self._shots())

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.config.logit_scale * images @ text.t()
        if self.key_labels.numel() == 0 or len(images) == 0:
            return logits
        kl = self._kl(images, tail=True)
        if self.config.kl_range == "batch":
            kl_lo, kl_hi = kl.min(), kl.max()
        else:
            kl_lo, kl_hi = self.ranges[0], self.ranges[1]
        xs, kls = images.split(ROWS), kl.split(ROWS)
        kl_term = to_targets(torch.cat([self._kl_term(k, kl_lo, kl_hi) for k in kls]), class_ids)
        cache = to_targets(torch.cat([self._cache(x, self.beta) for x in xs]), class_ids)
        return combine(logits, [kl_term, cache], [self.gamma, self.alpha])

    def _grid(self) -> tuple[list[float], list[float], list[float]]:
        (s0, s1, s2), (n0, n1, n2) = self.config.search_scale, [int(n) for n in self.config.search_steps]
        betas = [i * (s0 - 1) / n0 + 1 for i in range(n0)]
        alphas = [i * (s1 - 0.1) / n1 + 0.1 for i in range(n1)]
        gammas = [i * (s2 - 0.1) / n2 + 0.1 for i in range(n2)]
        return betas, alphas, gammas

    def finish(self, data: FitData) -> None:
        """Freeze the KL rescaling from the val rows (without val rows, search=false: from the support keys
        themselves), then search alpha, beta, gamma on val."""
        if len(self.config.search_scale) != 3 or len(self.config.search_steps) != 3:
            raise MethodError("tip-x's search_scale and search_steps take 3 values each: beta, alpha, gamma")
        x = data.val_x if data.val_x is not None and len(data.val_x) else self.keys
        kl = self._kl(x, tail=True)
        cos = x @ self.keys.t()
        self.ranges = torch.stack([kl.min(), kl.max(), cos.min(), cos.max()]).to(self.ranges.dtype)
        if not self.config.search or x is self.keys:
            return
        counts = self.grid_counts(x, data.val_y, data.text, kl)  # [alpha, beta, gamma]
        betas, alphas, gammas = self._grid()
        a, b, g = unravel_best(counts, alphas, betas, gammas)
        self.alpha.fill_(a)
        self.beta.fill_(b)
        self.gamma.fill_(g)

    @torch.no_grad()
    def grid_counts(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Correct predictions [alpha, beta, gamma] over the reference's grid (tipx.py:78-111), exact: per beta,
        the logits are affine in (gamma, alpha), scored by affine_grid_counts."""
        betas, alphas, gammas = self._grid()
        coefs = torch.tensor([[g, a] for a in alphas for g in gammas], dtype=x.dtype, device=x.device)
        counts = torch.zeros(len(betas), len(alphas) * len(gammas), dtype=torch.long, device=x.device)
        for s in range(0, len(y), ROWS):
            xs, ys = x[s : s + ROWS], y[s : s + ROWS]
            clip = self.config.logit_scale * xs @ text.t()
            kl_term = self._kl_term(kl[s : s + ROWS], self.ranges[0], self.ranges[1])
            for i, beta in enumerate(betas):
                counts[i] += affine_grid_counts(clip, [kl_term, self._cache(xs, beta)], coefs, ys)
        return counts.view(len(betas), len(alphas), len(gammas)).transpose(0, 1)
