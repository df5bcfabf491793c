"""The only accuracy code: every method, protocol and path is scored here."""

from __future__ import annotations

import torch

from .adapters.base import Adapter


@torch.no_grad()
def predict(
    method: Adapter,
    x: torch.Tensor,
    text: torch.Tensor,
    class_ids: torch.Tensor | None = None,
    classnames: list[str] | None = None,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Argmax class of every row, in mini-batches (memory stays bounded for 50,000-row test sets)."""
    was_training = method.training
    method.eval()
    out = [
        method.score(x[i : i + batch_size], text, class_ids, classnames).argmax(-1)
        for i in range(0, len(x), batch_size)
    ]
    method.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def accuracy(
    method: Adapter,
    x: torch.Tensor,
    y: torch.Tensor,
    text: torch.Tensor,
    class_ids: torch.Tensor | None = None,
    classnames: list[str] | None = None,
) -> float | None:
    """Top-1 accuracy in percent (None for an empty set: there is nothing to score)."""
    if len(y) == 0:
        return None
    return 100.0 * (predict(method, x, text, class_ids, classnames) == y).float().mean().item()


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    if base is None or novel is None:
        return None
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
