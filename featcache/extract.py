"""The one-time pass: (backbone, dataset) -> a fingerprinted HDF5 store of unit-norm CLIP features."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .backbones import Backbone, backbone_slug, load_backbone, parse_backbone, pick_device, pick_precision
from .data import ImageDataset, SplitItems, augment_transform, collate, default_data_root, download, resolve_split
from .errors import DataError, FeatcacheError, StoreError
from .manifests import Manifest, load_manifest
from .store import Store, StoreWriter, check_fingerprint, default_cache_dir, os_errno, write_error

log = logging.getLogger(__name__)


def store_path(cache_dir: str | Path | None, backbone_id: str, dataset_id: str, scheme: str) -> Path:
    """Where the store for (backbone, dataset, split scheme) lives."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / backbone_slug(backbone_id) / f"{dataset_id}__{scheme}.h5"


def augmentation_tag(views: int, seed: int) -> str:
    return "none" if views <= 0 else f"train: rrc(0.08-1,bicubic)+hflip x{views} seed={seed}"


def text_prompts(manifest: Manifest) -> list[str]:
    """All templates stored: the dataset's own (CoOp) template first, then the ensemble's others."""
    return [manifest.template] + [t for t in manifest.templates if t != manifest.template]


def encode_class_texts(backbone: Backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[T, C, D] unit-norm text features, one row per template."""
    prompts = [t.format(c) for t in templates for c in classnames]
    return backbone.encode_texts(prompts).view(len(templates), len(classnames), -1)


def extract(
    dataset: str | Path | Manifest,
    backbone: str | Backbone,
    *,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    splits: list[str] | None = None,
    split_scheme: str | None = None,
    batch_size: int = 128,
    workers: int | None = None,
    download_data: bool = False,
    augment_views: int = 0,
    augment_seed: int = 0,
    skip_bad: bool = False,
    dtype: str = "float16",
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Extract (or resume, or extend) a store and return its path. Reruns with the same settings are no-ops.

    Every option is checked and every input resolved (manifest, split items, device, backbone) before anything
    is written, so a refused command never touches the store: with `overwrite` the old store is replaced only
    when the new one is complete."""
    _check_options(dtype, batch_size, workers, augment_views)
    manifest = dataset if isinstance(dataset, Manifest) else load_manifest(dataset)
    scheme = manifest.scheme(split_scheme)
    splits = list(splits or scheme.splits)
    retrieval = manifest.task == "retrieval"
    if retrieval and augment_views:
        raise DataError("--augment-views applies to classification datasets; retrieval stores keep clean views")
    bb_device = backbone.device if isinstance(backbone, Backbone) else pick_device(device)
    bb_precision = backbone.precision if isinstance(backbone, Backbone) else pick_precision(precision, bb_device)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    if download_data:
        download(manifest, scheme, root)
    if retrieval:  # rows are the images (or video frames), labelled with their item; captions beside them
        from .retrieval_data import resolve_retrieval_split

        captioned = {s: resolve_retrieval_split(manifest, scheme, s, root) for s in splits}
        resolved = {s: SplitItems(s, r.frames, r.source) for s, r in captioned.items()}
    else:
        resolved = {s: resolve_split(manifest, scheme, s, root) for s in splits}

    spec = backbone.spec if isinstance(backbone, Backbone) else parse_backbone(backbone)
    path = store_path(cache_dir, spec.id, manifest.id, scheme.name)
    wanted = {
        "featcache_version": __version__,
        "backbone": spec.id,
        "precision": bb_precision,
        "dataset": manifest.id,
        "manifest_sha256": manifest.sha256,
        "split_scheme": scheme.name,
        "augmentation": augmentation_tag(augment_views, augment_seed),
        "dtype": dtype,
    }
    if not overwrite and spec.kind in ("tag", "random", "hf-hub") and _up_to_date(path, wanted, splits):
        log.info("%s is up to date", path)
        return path

    bb = (
        backbone
        if isinstance(backbone, Backbone)
        else load_backbone(spec.id, device=str(bb_device), precision=precision)
    )
    fingerprint = {**wanted, **bb.fingerprint()}
    extra = {"task": "retrieval", "video": scheme.source["kind"] == "video_frames"} if retrieval else None
    writer = StoreWriter(path, fingerprint, extra=extra, overwrite=overwrite)
    try:
        if not retrieval and not writer.has_text():
            templates = text_prompts(manifest)
            writer.write_text(
                manifest.classnames, templates, encode_class_texts(bb, manifest.classnames, templates),
                ensemble_templates=manifest.templates,
            )  # fmt: skip
        for split in splits:
            views = augment_views if split == "train" else 0
            _extract_split(writer, bb, resolved[split], batch_size, workers, views, augment_seed, skip_bad, progress)
            if retrieval:
                _extract_captions(writer, bb, captioned[split], progress)
        return writer.finalize()
    except BaseException as e:
        writer.close()  # the partial file keeps every finished batch; rerunning resumes
        if not isinstance(e, FeatcacheError) and os_errno(e) in (errno.ENOSPC, errno.EDQUOT):
            raise write_error(e, path) from e  # a full disk seen outside the writer (it reports its own)
        raise


def _check_options(dtype: str, batch_size: int, workers: int | None, augment_views: int) -> None:
    """Refuse bad values up front: a negative --augment-views used to reach the data loader and be reported as
    an unreadable image, and a bad --workers used to fail only after --overwrite had cleared the store."""
    if dtype not in ("float16", "float32"):
        raise StoreError(f"unknown dtype '{dtype}'; use float16 or float32")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise DataError(f"--workers must be 0 or more, got {workers}")
    if augment_views < 0:
        raise DataError(f"--augment-views must be 0 or more, got {augment_views}")


def _up_to_date(path: Path, wanted: dict[str, Any], splits: list[str]) -> bool:
    if not path.exists():
        return False
    try:
        with Store.open(path) as st:
            check_fingerprint(st.fingerprint, wanted, str(path))
            return all(s in st.splits for s in splits)
    except StoreError:
        return False


def _extract_split(writer, bb, split_items, batch_size, workers, views, aug_seed, skip_bad, progress) -> None:
    split, items = split_items.split, split_items.items
    done, _, complete = writer.split_state(split)
    if complete and done == len(items):
        return
    id_width = max((len(it.id.encode()) for it in items), default=1)
    done = writer.begin_split(split, len(items), bb.embed_dim, views, id_width=id_width)
    todo = items[done:]
    ds = ImageDataset(
        todo, split_items.source, bb.preprocess, offset=done, split=split,
        aug=augment_transform(bb.preprocess_cfg) if views else None, aug_views=views, aug_seed=aug_seed,
    )  # fmt: skip
    n_workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=n_workers, collate_fn=collate,
        pin_memory=bb.device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    bar = tqdm(total=len(items), initial=done, unit="img", desc=f"{split}", disable=not progress, smoothing=0.1)
    try:
        for batch in loader:
            if batch["bad"] and not skip_bad:
                raise DataError(
                    f"unreadable image {batch['bad'][0][1]}; fix or remove it, or rerun with --skip-bad "
                    "(finished batches are kept)"
                )
            feats = aug = None
            if batch["x"] is not None:
                feats = bb.encode_images(batch["x"])
                if batch["views"] is not None:
                    v = batch["views"]
                    aug = bb.encode_images(v.flatten(0, 1)).view(v.shape[0], v.shape[1], -1)
            good = [todo[p] for p in batch["pos"]]
            skipped = [(todo[p].id, err) for p, err in batch["bad"]]
            for _, err in skipped:
                log.warning("skipped %s", err)
            writer.write_batch(
                split, batch["n"], feats, [it.label for it in good], [it.id for it in good], aug, skipped
            )
            bar.update(batch["n"])
    finally:
        bar.close()
    writer.finish_split(split)


def _extract_captions(writer, bb, rs, progress: bool, batch_size: int = 256) -> None:
    """Caption embeddings of a retrieval split, written in resumable batches after its images."""
    done = writer.begin_captions(rs.split, rs.captions, rs.caption_item, rs.items, bb.embed_dim)
    bar = tqdm(total=len(rs.captions), initial=done, unit="cap", desc=f"{rs.split} captions", disable=not progress)
    try:
        for i in range(done, len(rs.captions), batch_size):
            batch = rs.captions[i : i + batch_size]
            writer.write_captions(rs.split, bb.encode_texts(batch, batch_size))
            bar.update(len(batch))
    finally:
        bar.close()


__all__ = ["extract", "store_path", "encode_class_texts", "text_prompts"]
