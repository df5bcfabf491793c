"""Shared math of the training-free methods that add weighted terms to zero-shot logits and search the weights on
validation (GDA, APE, Tip-X): exact top-1 counts over a grid of weights, the references' first-best rule, and
per-class sums of per-key affinities.

Every reference scores each grid point by building its logit matrix and taking the top-1 class. The logits of
these methods are affine in the searched weights (`base + term_1 · c_1 + term_2 · c_2`), so a (row, class) pair
that is below the true class at every corner of the weight box, by a margin far above float rounding, is below it
at every grid point and cannot be predicted; only the few remaining pairs are compared at each point, with the
same elementwise operations (so the same rounding) as the full logits and argmax's first-index tie rule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import FitData, MethodError, TrainConfig

ROWS = 256  # rows per chunk: a [256, N] affinity block stays in cache
PAIRS = 1 << 22  # grid points x pairs compared at once


def combine(base: torch.Tensor, terms: list[torch.Tensor], coefs: list) -> torch.Tensor:
    """base + terms[0] * coefs[0] + terms[1] * coefs[1] + ..., left to right, as the references write it."""
    out = base
    for t, c in zip(terms, coefs, strict=True):
        out = out + t * c
    return out


@torch.no_grad()
def affine_grid_counts(
    base: torch.Tensor, terms: list[torch.Tensor], coefs: torch.Tensor, y: torch.Tensor, chunk: int = ROWS
) -> torch.Tensor:
    """Correct top-1 predictions [G] of logits_g = combine(base, terms, coefs[g]) for every row g of coefs [G, J]:
    the counts of `(combine(base, terms, coefs[g]).argmax(-1) == y).sum()` without G logit matrices."""
    coefs = coefs.to(base.dtype)
    n_grid, n_terms = coefs.shape
    lo, hi = coefs.min(0).values, coefs.max(0).values
    corners = list(itertools.product(*[(lo[j], hi[j]) for j in range(n_terms)]))
    c_abs = coefs.abs().max(0).values
    eps = torch.finfo(base.dtype).eps
    correct = torch.zeros(n_grid, dtype=torch.long, device=base.device)
    for s in range(0, len(y), chunk):
        b, ts, ys = base[s : s + chunk], [t[s : s + chunk] for t in terms], y[s : s + chunk]
        n, rows = len(ys), torch.arange(len(ys), device=base.device)
        bound = float(b.abs().max()) + sum(float(c_abs[j]) * float(ts[j].abs().max()) for j in range(n_terms))
        margin = 64 * eps * bound  # far above the rounding of a few multiply-adds of this size
        threat = torch.zeros_like(b, dtype=torch.bool)
        for corner in corners:  # the logit difference is affine in the weights: its maximum is at a corner
            logit = combine(b, ts, list(corner))
            threat |= logit >= (logit[rows, ys] - margin)[:, None]
        threat[rows, ys] = False
        r, c = threat.nonzero(as_tuple=True)
        wrong = torch.zeros(n_grid, n, dtype=torch.long, device=base.device)
        block = max(1, PAIRS // n_grid)
        for p in range(0, len(r), block):
            rr, cc = r[p : p + block], c[p : p + block]
            yy = ys[rr]
            w = [coefs[:, j, None] for j in range(n_terms)]
            lc = combine(b[rr, cc][None], [t[rr, cc][None] for t in ts], w)  # [G, pairs]
            ly = combine(b[rr, yy][None], [t[rr, yy][None] for t in ts], w)
            beats = (lc > ly) | ((lc == ly) & (cc < yy))  # argmax returns the first maximum
            wrong.index_add_(1, rr, beats.long())
        correct += n - (wrong > 0).sum(1)
    return correct


def first_best(counts: torch.Tensor) -> int | None:
    """Flat index of the first maximum of `counts` (in the reference's loop order), as `if acc > best` from
    best = 0 picks it; None when no point scores at all (the reference then keeps its initial values)."""
    flat = counts.flatten()
    if flat.numel() == 0 or int(flat.max()) <= 0:
        return None
    return int(torch.argmax(flat))


def equal_shots(labels: torch.Tensor, num_classes: int) -> int:
    """k if `labels` are k per class grouped in class order (a class sum is then a reshape), else 0."""
    k = len(labels) // max(1, num_classes)
    if k == 0 or k * num_classes != len(labels):
        return 0
    want = torch.arange(num_classes, device=labels.device).repeat_interleave(k)
    return k if torch.equal(labels, want) else 0


def class_sum(e: torch.Tensor, labels: torch.Tensor, num_classes: int, shots: int = 0) -> torch.Tensor:
    """e [B, N] (one column per key) -> [B, C], the sum of each class's columns: e @ one_hot(labels) without the
    one-hot matmul (a reshape when the keys are `shots` per class in class order, else an index_add)."""
    if shots:
        return e.view(e.shape[0], num_classes, shots).sum(-1)
    out = torch.zeros(e.shape[0], num_classes, dtype=e.dtype, device=e.device)
    return out.index_add_(1, labels, e)


VIEW_MEAN_HELP = (
    "how augmented views become one key: raw (the reference's build_cache_model: the mean of the raw encoder "
    "outputs, then L2-normalised; raw view = stored unit view x its stored norm) or normalised (featcache's "
    "earlier key: the mean of the unit-norm views, renormalised; for stores extracted before the norms were kept)"
)


def view_mean(aug: torch.Tensor, norms: torch.Tensor | None, how: str = "raw") -> torch.Tensor:
    """One unit-norm key per image [N, D] from its views [N, V, D]. raw: normalize(mean_v(norm_v · unit_v)), the
    mean of the raw features as Tip-Adapter, APE and Tip-X compute it (views with larger raw norms weigh more);
    normalised: normalize(mean_v(unit_v))."""
    if how not in ("raw", "normalised"):
        raise MethodError(f"view_mean must be raw or normalised, got {how!r}")
    if how == "normalised":
        return F.normalize(aug.mean(1), dim=-1)
    if norms is None:
        raise MethodError(
            "view_mean=raw (the reference's mean of raw views) needs the views' raw norms, which this store lacks "
            "(extracted by an older featcache); re-extract it (featcache extract ... --overwrite) or --set "
            "view_mean=normalised"
        )
    return F.normalize((aug * norms[..., None].to(aug.dtype)).mean(1), dim=-1)


def keys_from_views(
    train_x: torch.Tensor,
    train_aug: torch.Tensor | None,
    views: str,
    norms: torch.Tensor | None = None,
    how: str = "raw",
) -> torch.Tensor:
    """Cache keys [N, D] for the APE/Tip-X family: `mean` averages the augmented views (`view_mean`, by `how`),
    `clean` takes the plain train features, `auto` is `mean` when the store has views."""
    if views not in ("auto", "mean", "clean"):
        raise MethodError(f"views must be auto, mean or clean, got {views!r}")
    if views == "mean" or (views == "auto" and train_aug is not None):
        if train_aug is None:
            raise MethodError("views=mean needs a store extracted with --augment-views")
        return view_mean(train_aug, norms, how)
    return train_x


@dataclass
class SupportCacheConfig(TrainConfig):
    """Options APE and Tip-X share: how the support keys are made, which val rows the search scores."""

    views: str = field(
        default="auto",
        metadata={"help": "cache keys: mean (the reference averages 10 views into one key, see view_mean), clean "
                  "(the plain train features), auto (mean when the store has views)",
                  "choices": ["auto", "mean", "clean"]},
    )  # fmt: skip
    view_mean: str = field(default="raw", metadata={"help": VIEW_MEAN_HELP, "choices": ["raw", "normalised"]})
    val_draw: str = field(
        default="full",
        metadata={"help": "val rows the search scores: full (the reference: the whole val split; on ImageNet it "
                  "selects on the test split, featcache never does: use --val-from train), dassl (min(K,4) per "
                  "class), k-shot (K per class)", "choices": ["dassl", "k-shot", "full"]},
    )  # fmt: skip
    search: bool = field(default=True, metadata={"help": "search beta, alpha, gamma on val (false: keep the ones set)"})
    alpha: float = field(default=1.0, metadata={"help": "cache weight with search=false (init_alpha)", "ge": 0.0})
    beta: float = field(default=1.0, metadata={"help": "affinity sharpness with search=false (init_beta)", "ge": 0.0})
    gamma: float = field(default=0.1, metadata={"help": "third weight with search=false (init_gamma)", "ge": 0.0})
    logit_scale: float = field(default=100.0, metadata={"help": "CLIP's frozen exp(logit_scale)", "gt": 0.0})
    epochs: int = field(default=0, metadata={"help": "training-free", "ge": 0})


def support_cache(data: FitData, cfg: SupportCacheConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [N, D], labels [N]) grouped by class (stable), as the references build their cache: the class sums
    of the values then become reshapes."""
    keys = keys_from_views(data.train_x, data.train_aug, cfg.views, data.train_aug_norms, cfg.view_mean)
    order = torch.argsort(data.train_y, stable=True)
    return keys[order].clone(), data.train_y[order].clone()


def unravel_best(counts: torch.Tensor, *axes: list[float]) -> tuple[float, ...]:
    """The grid values of the first best point of `counts` (shape: len of each axis, in the reference's loop
    order); zeros when nothing scored (the references' initial best_* = 0)."""
    best = first_best(counts)
    if best is None:
        return tuple(0.0 for _ in axes)
    idx = []
    for n in reversed([len(a) for a in axes]):
        best, i = divmod(best, n)
        idx.append(i)
    return tuple(a[i] for a, i in zip(axes, reversed(idx), strict=True))


def to_targets(extra: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor:
    """extra [B, C_train], one column per training class, as columns of the target classes: target class c takes
    column class_ids[c]; a class never trained on (-1) gets zeros, so its logit stays zero-shot."""
    if class_ids is None:
        return extra
    seen = class_ids >= 0
    out = extra.new_zeros(extra.shape[0], len(class_ids))
    out[:, seen] = extra[:, class_ids[seen]]
    return out
