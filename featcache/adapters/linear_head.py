"""Linear heads over the cached features, text-initialised: what zs-lp, clap and lp++ share.

A head holds one weight row per training class. Scoring a set of target classes (`class_ids`, -1 for a class it
was never trained on) takes the trained row of every mapped class and, for the others, falls back to what the
reference has for them: the class text itself (zero-shot). These methods run their reference's own optimisation
loop in `setup` (per-class penalties, multiplier updates, full-batch steps with a separate step for the class
multipliers: none of which the shared loop has), so their state lives in buffers and the shared loop, which
trains parameters, has nothing to do. Randomness (batch order, view draws, initial biases) comes from a seed
drawn when the method is built: `create_adapter(..., seed=s)` makes a fit reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, FitData, MethodError


def cosine_logits(images: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · n(v) · n(W)ᵀ: the CLIP classifier with class vectors W [C, D] (the reference normalises both)."""
    return scale * F.normalize(images, dim=-1) @ F.normalize(weight, dim=-1).t()


def target_rows(trained: torch.Tensor, fallback: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor:
    """Per target class: the trained row of its training class, or the fallback row (its text) when class_ids
    is -1. class_ids None means the training classes in order."""
    if class_ids is None:
        return trained
    seen = (class_ids >= 0)[:, None]
    return torch.where(seen, trained[class_ids.clamp(min=0)], fallback.to(trained.dtype))


def class_mean(values: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of the rows of each class: values [N, ...] -> [C, ...] (0 for a class without rows)."""
    sums = torch.zeros(num_classes, *values.shape[1:], dtype=values.dtype, device=values.device)
    sums.index_add_(0, y, values)
    counts = torch.bincount(y, minlength=num_classes).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *[1] * (values.dim() - 1))


def training_views(
    data: FitData, views: str, reference: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a head trains on, by the reference's view policy (features [M, D], labels [M]):
    each: every stored augmented view is a sample of its own (M = N·V; CLAP's 20-view cache);
    one: one stored view per image, drawn once (LP++'s single augmented pass);
    clean: the clean train features; auto: `reference` when the store has views, else clean."""
    if views == "auto":
        views = reference if data.train_aug is not None else "clean"
    if views != "clean" and data.train_aug is None:
        raise MethodError(f"views={views} needs a store extracted with --augment-views (or use views=clean)")
    if views == "clean":
        return data.train_x, data.train_y
    aug = data.train_aug
    n, v, _ = aug.shape
    if views == "each":
        return aug.reshape(n * v, -1), data.train_y.repeat_interleave(v)
    if views == "one":
        pick = torch.randint(v, (n,), generator=gen).to(aug.device)
        return aug[torch.arange(n, device=aug.device), pick], data.train_y
    raise MethodError(f"unknown views '{views}'")


class LinearHead(Adapter):
    """A linear head: `weight` [C, D] (buffers, sized at fit time) and the seed of its own training loop."""

    trainable = True  # gradient-trained, by the method's own loop in setup (see the module docstring)
    class_agnostic = True

    def __init__(self, config, dim: int = 512):
        super().__init__(config, dim)
        self.register_buffer("weight", torch.zeros(0, dim))
        self.seed = int(torch.randint(0, 2**62, ()))  # from the RNG create_adapter seeds

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def trainable_params(self) -> int:
        return int(self.weight.numel())
