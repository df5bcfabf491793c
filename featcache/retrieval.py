"""The only retrieval scoring code: text->item and item->text ranks, R@K, median and mean rank.

An item is an image or a video (a set of frames). Every path (cached features, the streaming Cross-Modal Adapter)
builds a `RetrievalSet` of unit-norm frame and caption embeddings and calls `evaluate_retrieval`.

Ranks are 1-based. Ties count against the query: the rank of a ground truth is 1 + the number of non-ground-truth
candidates scoring at least as high (a model that scores everything equally gets the worst rank, never the
best). item->text uses the best-ranked of the item's captions (Flickr30k/COCO have 5 per image), as the
standard evaluation does. Median rank is numpy's median (the mean of the two middle ranks for an even count),
as CLIP4Clip reports it.

Frame pooling: "mean" averages the unit-norm frame embeddings and renormalises (CLIP4Clip's meanP); "softmax" is
the text-conditioned pooling: per caption t, weights softmax(temperature * t.f) over the item's frames, pooled
p = sum_f w_f f, score t.p / |p| (temperature 5 multiplies the cosines). The softmax score never materialises
[captions, items, D]: |p|^2 = w^T G w with each item's [F, F] frame Gram matrix.

Everything is computed in blocks whose size is bounded by `budget` similarity entries, so 25,000 captions x
5,000 images never build more than one block of the similarity matrix at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FeatcacheError

POOLS = ("mean", "softmax")


@dataclass
class RetrievalSet:
    """Unit-norm embeddings of one retrieval split: frames [N, Fmax, D] padded (mask [N, Fmax]), captions [M, D]
    and the item of each caption [M]. Images have Fmax = 1."""

    frames: torch.Tensor
    mask: torch.Tensor
    captions: torch.Tensor
    caption_item: torch.Tensor
    video: bool = False

    @property
    def num_items(self) -> int:
        return int(self.frames.shape[0])


def group_frames(rows: torch.Tensor, row_item: torch.Tensor, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame rows [R, D] with their item index [R] (grouped, in order) -> padded [N, Fmax, D] and mask [N, Fmax]."""
    counts = torch.bincount(row_item, minlength=num_items)
    fmax = max(1, int(counts.max())) if len(counts) else 1
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(row_item), device=rows.device) - starts[row_item]
    frames = rows.new_zeros(num_items, fmax, rows.shape[-1])
    mask = torch.zeros(num_items, fmax, dtype=torch.bool, device=rows.device)
    frames[row_item, slot] = rows
    mask[row_item, slot] = True
    return frames, mask


def make_set(
    rows: torch.Tensor,
    row_item: torch.Tensor,
    captions: torch.Tensor,
    caption_item: torch.Tensor,
    num_items: int,
    video: bool,
) -> RetrievalSet:
    """A RetrievalSet from flat frame rows. Items left without frames (every frame skipped as unreadable) are
    dropped with their captions, so they are neither queries nor candidates."""
    frames, mask = group_frames(F.normalize(_float(rows), dim=-1), row_item, num_items)
    keep = mask.any(1)
    if not bool(keep.all()):
        new = torch.cumsum(keep.long(), 0) - 1
        ok = keep[caption_item]
        frames, mask = frames[keep], mask[keep]
        captions, caption_item = captions[ok], new[caption_item[ok]]
    return RetrievalSet(frames, mask, F.normalize(_float(captions), dim=-1), caption_item.long(), video)


def _float(t: torch.Tensor) -> torch.Tensor:
    """float16 storage -> float32 for scoring; float32/float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def pooled(rset: RetrievalSet) -> torch.Tensor:
    """Mean pooling: [N, D] unit-norm item embeddings."""
    m = rset.mask.to(rset.frames.dtype)[..., None]
    return F.normalize((rset.frames * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


class _Scorer:
    """score(caption rows, item rows) -> [mc, nc] similarities under the chosen pooling."""

    def __init__(self, rset: RetrievalSet, pool: str, temperature: float):
        if pool not in POOLS:
            raise FeatcacheError(f"unknown frame pooling '{pool}'; use one of: {', '.join(POOLS)}")
        self.rset, self.pool, self.temperature = rset, pool, float(temperature)
        if pool == "mean" or rset.frames.shape[1] == 1:
            self.items = pooled(rset)
            self.pool = "mean"  # one frame per item: both poolings are the same score
        else:
            self.gram = rset.frames @ rset.frames.transpose(1, 2)  # [N, F, F]
        self.fmax = 1 if self.pool == "mean" else int(rset.frames.shape[1])

    def __call__(self, cap: slice | torch.Tensor, items: slice | torch.Tensor) -> torch.Tensor:
        t = self.rset.captions[cap]
        if self.pool == "mean":
            return t @ self.items[items].T
        fr, mask, gram = self.rset.frames[items], self.rset.mask[items], self.gram[items]
        s = torch.einsum("md,nfd->mnf", t, fr)  # [mc, nc, F]
        w = (self.temperature * s).masked_fill(~mask, float("-inf")).softmax(-1)
        num = (w * s).sum(-1)
        den = torch.einsum("mnf,nfg,mng->mn", w, gram, w).clamp_min(1e-12).sqrt()
        return num / den


def _rank_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    if len(ranks) == 0:
        return {f"{prefix}_{k}": None for k in ("r1", "r5", "r10", "medr", "meanr")}
    return {
        f"{prefix}_r1": 100.0 * float(np.mean(ranks <= 1)),
        f"{prefix}_r5": 100.0 * float(np.mean(ranks <= 5)),
        f"{prefix}_r10": 100.0 * float(np.mean(ranks <= 10)),
        f"{prefix}_medr": float(np.median(ranks)),
        f"{prefix}_meanr": float(np.mean(ranks)),
    }


@torch.no_grad()
def text_to_item_ranks(rset: RetrievalSet, pool: str = "mean", temperature: float = 5.0, budget: int = 2**24):
    """For every caption, the rank of its item among all items."""
    score = _Scorer(rset, pool, temperature)
    n, m = rset.num_items, len(rset.caption_item)
    step = max(1, budget // max(1, n * score.fmax))
    out = []
    for i in range(0, m, step):
        s = score(slice(i, i + step), slice(None))  # [mc, N]
        gt = rset.caption_item[i : i + step]
        g = s.gather(1, gt[:, None])
        out.append((s >= g).sum(1))  # the ground truth itself counts once: rank = 1 + others >= it
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def item_to_text_ranks(rset: RetrievalSet, pool: str = "mean", temperature: float = 5.0, budget: int = 2**24):
    """For every item with captions, the rank of its best-ranked caption among all captions."""
    score = _Scorer(rset, pool, temperature)
    n, m = rset.num_items, len(rset.caption_item)
    own = _own_captions(rset.caption_item, n)  # [N, K] caption ids of each item, -1 padded
    step = max(1, budget // max(1, m * score.fmax))
    out = []
    for i in range(0, n, step):
        s = score(slice(None), slice(i, i + step)).T  # [nc, M]
        idx = own[i : i + step]
        valid = idx >= 0
        g = s.gather(1, idx.clamp_min(0)).masked_fill(~valid, float("-inf"))  # own captions' scores, from s itself
        best = g.amax(1, keepdim=True)
        ties = ((g == best) & valid).sum(1)  # own captions at the best score (counted by the >= below)
        r = 1 + (s >= best).sum(1) - ties
        out.append(r[valid.any(1)])
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.int64)


def _own_captions(caption_item: torch.Tensor, n: int) -> torch.Tensor:
    """[N, K]: the caption indices of each item (K = most captions of any item), padded with -1."""
    counts = torch.bincount(caption_item, minlength=n)
    order = torch.argsort(caption_item, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=order.device) - starts[caption_item[order]]
    own = torch.full((n, max(1, int(counts.max()) if n else 1)), -1, dtype=torch.long, device=order.device)
    own[caption_item[order], slot] = order
    return own


def evaluate_retrieval(
    rset: RetrievalSet, pool: str = "mean", temperature: float = 5.0, budget: int = 2**24
) -> dict[str, float | None]:
    """Both directions: t2i_/i2t_ (images) or t2v_/v2t_ (videos) r1, r5, r10 (percent), medr, meanr."""
    x = "v" if rset.video else "i"
    return {
        **_rank_metrics(text_to_item_ranks(rset, pool, temperature, budget), f"t2{x}"),
        **_rank_metrics(item_to_text_ranks(rset, pool, temperature, budget), f"{x}2t"),
    }


__all__ = ["RetrievalSet", "evaluate_retrieval", "group_frames", "make_set", "pooled", "POOLS"]
