"""Partial-backbone cache: the vision tokens entering block L+1, stored once.

Blocks before the first adapted block never change (layer-wise MMA adapts blocks 5-12 and prompts nothing
earlier), so for an un-augmented image their output is a constant: cache it (float16) and train by running only
blocks L+1.. . The text half is the same idea within one run: layer-mma's text prompts are fixed hard prompts, so
the (EOT-truncated) text tokens entering its first adapted text block are computed once per run (`text_prefix`)
and each step runs only the adapted text blocks (`encode_text_from_prefix`). With `augment_views`, a fixed
number of random-resized-crop + flip views per training image are cached too (each epoch samples one), which
trades the references' fresh crop per step for speed, as Tip-Adapter does with its 10 views.

Disk cost per image and view: tokens x width x 2 bytes; ViT-B/16 at L = 4: 197 x 768 x 2 = 302,592 bytes
(about 296 KiB), so 16 shots of ImageNet's 1,000 classes take 4.8 GB per view.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..backbones import Backbone, load_backbone
from ..data import ImageDataset, augment_transform, collate, default_data_root, resolve_split
from ..errors import DataError, StoreError
from ..extract import augmentation_tag, store_path
from ..fsio import durable_rename
from ..manifests import load_manifest
from ..store import (
    StoreLock,
    check_fingerprint,
    close_after_failure,
    fixed_strings,
    os_errno,
    read_checked,
    write_error,
)
from ..text import TextInput, embed_text, run_text_blocks, text_head
from .inject import vision_tower


def vision_tokens(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, T, W] tokens entering block layer+1 (1-indexed), i.e. after open_clip's embedding and `layer` blocks."""
    visual, blocks = vision_tower(model)
    if not getattr(visual.transformer, "batch_first", True):
        raise TypeError("the partial cache needs a batch-first open_clip vision transformer")
    x = visual._embeds(images)
    for blk in blocks[:layer]:
        x = blk(x)
    return x


def encode_from_tokens(model: torch.nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Image features from cached tokens: the remaining blocks, then open_clip's own pooling and projection."""
    visual, blocks = vision_tower(model)
    x = tokens
    for blk in blocks[layer:]:
        x = blk(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def text_prefix(model: torch.nn.Module, tokens: torch.Tensor, layer: int) -> TextInput:
    """The EOT-truncated text tokens entering text block layer+1 (1-indexed): the embedding and `layer` blocks.
    A constant for a run when nothing in those blocks or the embedding is learned (layer-mma's hard prompts)."""
    return run_text_blocks(model, embed_text(model, tokens), 0, layer)


def encode_text_from_prefix(model: torch.nn.Module, prefix: TextInput, layer: int) -> torch.Tensor:
    """Text features from `text_prefix(model, tokens, layer)`: the remaining blocks, open_clip's LayerNorm, pooling
    and projection; equal to `model.encode_text(tokens)`."""
    return text_head(model, run_text_blocks(model, prefix, layer))


def tokens_path(cache_dir, backbone_id: str, dataset: str, scheme: str, layer: int) -> Path:
    p = store_path(cache_dir, backbone_id, dataset, scheme)
    return p.with_name(p.stem + f"__tokens{layer}.h5")


def _fingerprint(bb: Backbone, manifest, scheme: str, layer: int, views: int, seed: int) -> dict[str, str]:
    return {**bb.fingerprint(), "featcache_version": __version__, "dataset": manifest.id,
            "manifest_sha256": manifest.sha256, "split_scheme": scheme, "cache_layer": str(layer),
            "augmentation": augmentation_tag(views, seed)}  # fmt: skip


@torch.no_grad()
def extract_tokens(
    dataset: str,
    backbone: str | Backbone,
    layer: int,
    *,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    split_scheme: str | None = None,
    splits: list[str] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    augment_views: int = 0,
    augment_seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Write the token cache for (backbone, dataset, layer); written as `.partial`, renamed when complete."""
    manifest = load_manifest(dataset)
    scheme = manifest.scheme(split_scheme)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    splits = list(splits or scheme.splits)
    resolved = {s: resolve_split(manifest, scheme, s, root) for s in splits}
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device=device, precision="fp32")
    _, blocks = vision_tower(bb.model)
    if not 0 < layer < len(blocks):
        raise StoreError(f"--cache-layer must lie in 1..{len(blocks) - 1} for {bb.id}")
    path = tokens_path(cache_dir, bb.id, manifest.id, scheme.name, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    probe = vision_tokens(bb.model, torch.zeros(1, 3, bb.image_size, bb.image_size, device=bb.device), layer)
    T, W = probe.shape[1:]
    aug = augment_transform(bb.preprocess_cfg)
    with StoreLock(path, "featcache extract --cache-layer"):  # never truncate or rename another run's partial
        f = h5py.File(tmp, "w", rdcc_nbytes=0)  # writes fail where they are made (see store._open_for_writing)
        try:
            _write_tokens(f, bb, manifest, scheme.name, layer, resolved, (T, W), aug, augment_views, augment_seed,
                          batch_size, workers, progress)  # fmt: skip
            f.close()
            durable_rename(tmp, path)
        except BaseException as e:  # close without flushing again (see store.close_after_failure)
            close_after_failure(f)
            tmp.unlink(missing_ok=True)  # not resumable: a half-written token cache is only wasted disk
            if isinstance(e, (OSError, RuntimeError)) and os_errno(e) is not None:  # the OS said no: one line
                raise write_error(e, path, resumable=False) from e
            raise
    return path


def _write_tokens(f, bb, manifest, scheme, layer, resolved, shape, aug, augment_views, augment_seed, batch_size,
                  workers, progress) -> None:  # fmt: skip
    """Every dataset chunked and fletcher32-checksummed, like the feature store's."""
    T, W = shape
    for k, v in _fingerprint(bb, manifest, scheme, layer, augment_views, augment_seed).items():
        f.attrs[k] = v
    for split, items in resolved.items():
        n, views = len(items.items), augment_views if split == "train" else 0
        g = f.create_group(f"splits/{split}")
        toks = g.create_dataset("tokens", (n, T, W), dtype=np.float16, chunks=(1, T, W), fletcher32=True)
        vt = None
        if views:
            vt = g.create_dataset("aug", (n, views, T, W), dtype=np.float16, chunks=(1, 1, T, W), fletcher32=True)
        rows = max(1, min(n, 4096))
        labels = np.array([it.label for it in items.items], dtype=np.int64)
        g.create_dataset("labels", data=labels, chunks=(rows,), maxshape=(None,), fletcher32=True)
        ids = fixed_strings([it.id for it in items.items])
        g.create_dataset("ids", data=ids, chunks=(rows,), maxshape=(None,), fletcher32=True)
        ds = ImageDataset(items.items, items.source, bb.preprocess, split=split, aug=aug if views else None,
                          aug_views=views, aug_seed=augment_seed)  # fmt: skip
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        for batch in tqdm(loader, desc=f"tokens {split}", unit="batch", disable=not progress):
            if batch["bad"]:
                raise DataError(f"unreadable image {batch['bad'][0][1]}")
            lo, hi = batch["pos"][0], batch["pos"][-1] + 1
            toks[lo:hi] = vision_tokens(bb.model, batch["x"].to(bb.device), layer).cpu().numpy()
            if vt is not None:
                v = batch["views"]
                out = vision_tokens(bb.model, v.flatten(0, 1).to(bb.device), layer)
                vt[lo:hi] = out.view(v.shape[0], views, T, W).cpu().numpy()
    f.attrs["complete"] = True


class TokenCache:
    """Read access to a token cache, checked against the backbone and dataset it must come from."""

    def __init__(self, path: Path, expect: dict[str, str]):
        if not path.exists():
            raise StoreError(f"no token cache at {path}; create it with featcache extract ... --cache-layer N")
        self.h5 = h5py.File(path, "r")
        found = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.h5.attrs.items()}
        check_fingerprint(found, expect, str(path))
        self.path = path

    def rows(self, split: str, rows: list[int], aug: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.h5["splits"][split]
        idx = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        toks = torch.from_numpy(read_checked(self.path, g["tokens"], uniq)[inverse])
        views = torch.from_numpy(read_checked(self.path, g["aug"], uniq)[inverse]) if aug and "aug" in g else None
        return toks, views

    def close(self) -> None:
        self.h5.close()


def open_tokens(bb: Backbone, manifest, scheme: str, layer: int, cache_dir) -> TokenCache:
    expect = {k: v for k, v in _fingerprint(bb, manifest, scheme, layer, 0, 0).items() if k != "augmentation"}
    return TokenCache(tokens_path(cache_dir, bb.id, manifest.id, scheme, layer), expect)
