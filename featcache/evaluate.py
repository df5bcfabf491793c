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


TOP_K = 5


@torch.no_grad()
def evaluate(
    method: Adapter,
    x: torch.Tensor,
    y: torch.Tensor,
    text: torch.Tensor,
    class_ids: torch.Tensor | None = None,
    classnames: list[str] | None = None,
    batch_size: int = 4096,
) -> dict[str, float | None]:
    """Top-1 (`acc`, the argmax, as `accuracy`) and top-5 (`acc5`) accuracy in percent, from one scoring pass.

    Top-5 counts a row when its label is among the 5 highest logits (`topk`, as CLIP_benchmark does); with fewer
    than 5 classes it is top-C, i.e. 100 %. An argmax hit always counts, so acc5 >= acc even on tied logits. An
    empty set gives None for both (there is nothing to score)."""
    if len(y) == 0:
        return {"acc": None, "acc5": None}
    k = min(TOP_K, int(text.shape[0]))
    was_training = method.training
    method.eval()
    hits1 = hits5 = 0
    for i in range(0, len(x), batch_size):
        logits = method.score(x[i : i + batch_size], text, class_ids, classnames)
        yb = y[i : i + batch_size]
        top1 = logits.argmax(-1) == yb
        hits1 += int(top1.sum())
        hits5 += int((top1 | (logits.topk(k, dim=-1).indices == yb[:, None]).any(-1)).sum())
    method.train(was_training)
    return {"acc": 100.0 * hits1 / len(y), "acc5": 100.0 * hits5 / len(y)}


def base_novel_metrics(base: dict[str, float | None], novel: dict[str, float | None] | None) -> dict[str, float | None]:
    """A base-to-novel record's metrics from `evaluate` on the base and the novel classes (novel None: a method
    that cannot score them): base_acc, novel_acc, hm, then the same for top-5 (base_acc5, novel_acc5, hm5),
    rounded to 4 decimals; what does not apply is None."""
    out: dict[str, float | None] = {}
    for key, k in (("acc", ""), ("acc5", "5")):
        b, n = base.get(key), (novel or {}).get(key)
        out |= {f"base_acc{k}": _r(b), f"novel_acc{k}": _r(n), f"hm{k}": _r(harmonic_mean(b, n))}
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    if base is None or novel is None:
        return None
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
