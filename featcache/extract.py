"""The one-time pass: (backbone, dataset) -> a fingerprinted HDF5 store of unit-norm CLIP features."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, shards
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


def last_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The vision tower's last projection as (weight [W, D], bias [D] or None, source), so that features =
    pre @ weight + bias (methods_2026.md 5.1). ViT: visual.proj, no bias. ResNet: attnpool.c_proj (weight
    transposed, its bias). Other towers (timm, HF) are refused: featcache does not know their last projection."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and visual.proj is not None:
        return visual.proj.detach(), None, "visual.proj"
    if isinstance(visual, ModifiedResNet) and getattr(visual, "attnpool", None) is not None:
        c = visual.attnpool.c_proj
        return c.weight.detach().t(), c.bias.detach(), "visual.attnpool.c_proj"
    raise DataError(
        f"--pre-projection needs an open_clip VisionTransformer (with proj) or ModifiedResNet vision tower; this "
        f"backbone's is {type(visual).__name__}; extract without --pre-projection"
    )


@contextmanager
def without_projection(model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The vision tower with its last projection taken out for the block, so one forward pass returns the
    pre-projection tensor; yields the projection to apply to it. ViT: open_clip skips `pooled @ proj` when proj is
    None. ResNet: c_proj's weight enters F.multi_head_attention_forward as out_proj (a module hook never fires),
    so it is swapped for an identity (exact: x·1 + 0) and applied afterwards as the same F.linear."""
    visual = model.visual
    weight, bias, source = last_projection(model)
    if source == "visual.proj":
        proj = visual.proj
        visual.proj = None
        try:
            yield lambda pre: pre @ proj
        finally:
            visual.proj = proj
        return
    pool = visual.attnpool
    c_proj = pool.c_proj
    ident = torch.nn.Linear(c_proj.in_features, c_proj.in_features).to(c_proj.weight.device, c_proj.weight.dtype)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(c_proj.in_features))
        ident.bias.zero_()
    pool.c_proj = ident.requires_grad_(False)
    try:
        yield lambda pre: F.linear(pre, c_proj.weight, c_proj.bias)
    finally:
        pool.c_proj = c_proj


@torch.no_grad()
def encode_batch(
    bb: Backbone, images: torch.Tensor, pre_projection: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward pass: (unit-norm features [B, D] float32, the raw features' norms [B], and with
    `pre_projection` the raw pre-projection features [B, W] float32, else None). The features are those of
    `bb.encode_images` (the same operations under the same autocast; for a ResNet with `pre_projection`, to float
    rounding: c_proj then runs as its own F.linear after the identity out-projection)."""
    pre = None
    with bb._autocast():
        x = images.to(bb.device, non_blocking=True)
        if pre_projection:
            with without_projection(bb.model) as project:
                pre = bb.model.encode_image(x)
            f = project(pre)
        else:
            f = bb.model.encode_image(x)
    f = f.float()
    return F.normalize(f, dim=-1), f.norm(dim=-1), None if pre is None else pre.float()


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
    pre_projection: bool = False,
) -> Path:
    """Extract (or resume, or extend) a store and return its path. Reruns with the same settings are no-ops.
    `pre_projection`: also keep the raw pooled features before the last visual projection, and that projection
    (ProLIP trains it); a fingerprint field, so a store made without it is another store.

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
    spec = backbone.spec if isinstance(backbone, Backbone) else parse_backbone(backbone)
    path = store_path(cache_dir, spec.id, manifest.id, scheme.name)
    existing = None if overwrite else _existing(path)
    if not pre_projection and existing and existing[0].get("pre_projection") == "on":
        pre_projection = True  # the store keeps more than asked: extend it as it is rather than refuse it
    _, size, local_rank = shards.world()  # under torchrun: this rank's share, one GPU per local rank
    if size > 1 and download_data:
        raise DataError(
            "--download runs in one process: fetch the data first (the same extract command with "
            "--download, outside torchrun, or your own copy), then rerun under torchrun without it"
        )
    shards.check_layout(path, size)
    if size > 1 and not isinstance(backbone, Backbone):
        bb_device = shards.rank_device(bb_device, local_rank)
    wanted = {
        "featcache_version": __version__,
        "backbone": spec.id,
        "precision": bb_precision,
        "dataset": manifest.id,
        "manifest_sha256": manifest.sha256,
        "split_scheme": scheme.name,
        "augmentation": augmentation_tag(augment_views, augment_seed),
        "dtype": dtype,
        "pre_projection": "on" if pre_projection else "off",
    }
    if not overwrite and spec.kind in ("tag", "random", "hf-hub") and _up_to_date(existing, wanted, splits):
        log.info("%s is up to date", path)
        return path  # before the items are listed: a finished webdataset or ImageNet store answers at once

    root = Path(data_root).expanduser() if data_root else default_data_root()
    if download_data:
        download(manifest, scheme, root)
    if retrieval:  # rows are the images (or video frames), labelled with their item; captions beside them
        from .retrieval_data import resolve_retrieval_split

        captioned = {s: resolve_retrieval_split(manifest, scheme, s, root) for s in splits}
        resolved = {s: SplitItems(s, r.frames, r.source) for s, r in captioned.items()}
    else:
        captioned = {}
        resolved = {s: resolve_split(manifest, scheme, s, root) for s in splits}

    bb = (
        backbone
        if isinstance(backbone, Backbone)
        else load_backbone(spec.id, device=str(bb_device), precision=precision)
    )
    projection = last_projection(bb.model) if pre_projection else None  # an unsupported tower: before any write
    fingerprint = {**wanted, **bb.fingerprint()}
    extra = {"task": "retrieval", "video": scheme.source["kind"] == "video_frames"} if retrieval else None
    pre_dim = int(projection[0].shape[0]) if projection is not None else 0

    def encode(split: str) -> tuple:  # _extract_split's settings for a split: views of training images only
        return batch_size, workers, augment_views if split == "train" else 0, augment_seed, skip_bad, pre_dim

    if size > 1:
        return _extract_sharded(path, fingerprint, extra, overwrite, bb, manifest, splits, resolved, captioned,
                                projection, encode, progress)  # fmt: skip
    with _writing(StoreWriter(path, fingerprint, extra=extra, overwrite=overwrite)) as writer:
        _write_heads(writer, bb, manifest, projection)
        for split in splits:
            _extract_split(writer, bb, resolved[split], *encode(split), progress)
            if retrieval:
                _extract_captions(writer, bb, captioned[split], progress)
        return writer.finalize()


@contextmanager
def _writing(writer: StoreWriter) -> Iterator[StoreWriter]:
    """Close the writer on any failure (the partial keeps every finished batch; rerunning resumes), with a full
    disk seen outside the writer reported as one line (the writer reports its own)."""
    try:
        yield writer
    except BaseException as e:
        writer.close()
        if not isinstance(e, FeatcacheError) and os_errno(e) in (errno.ENOSPC, errno.EDQUOT):
            raise write_error(e, writer.path) from e
        raise


def _write_heads(writer: StoreWriter, bb: Backbone, manifest: Manifest, projection: tuple | None) -> None:
    """What a store holds besides its rows: the class-text features (classification) and the last projection."""
    if manifest.task != "retrieval" and not writer.has_text():
        templates = text_prompts(manifest)
        writer.write_text(
            manifest.classnames, templates, encode_class_texts(bb, manifest.classnames, templates),
            ensemble_templates=manifest.templates,
        )  # fmt: skip
    if projection is not None and not writer.has_projection():
        writer.write_projection(*projection)


def _extract_sharded(path, fingerprint, extra, overwrite, bb, manifest, splits, resolved, captioned, projection,
                     encode, progress) -> Path:  # fmt: skip
    """Under torchrun (see featcache.shards): this rank's share of every split into its shard, then rank 0
    assembles the store in split-file order, writes texts and captions, and removes the shards."""
    rank, size, _ = shards.world()
    created = shards.init_group(bb.device)
    count = shards.Progress(path, rank, size)
    total = sum(len(resolved[s].items) for s in splits)
    bar = tqdm(total=total, unit="img", desc=f"{size} ranks", disable=not progress or rank != 0, smoothing=0.1)
    try:
        base = 0
        shard = shards.shard_path(path, rank, size)
        with _writing(StoreWriter(shard, fingerprint, extra=extra, what=f"featcache extract (rank {rank})")) as sw:
            for split in splits:
                items = resolved[split]
                lo, hi = shards.share(len(items.items), rank, size)

                def seen(done: int, b: int = base) -> None:
                    if count.report(b + done) and rank == 0:  # the other ranks' files, once a second
                        bar.n = count.total()
                        bar.refresh()

                part = SplitItems(split, items.items[lo:hi], items.source)
                _extract_split(sw, bb, part, *encode(split), False, offset=lo, on_batch=seen)
                base += hi - lo
            count.report(base, force=True)
            sw.close()  # a shard is never finalized: rank 0 copies it
        shards.barrier()
        if rank == 0:
            bar.n = total
            bar.close()
            with _writing(StoreWriter(path, fingerprint, extra=extra, overwrite=overwrite)) as writer:
                _write_heads(writer, bb, manifest, projection)
                for split in splits:
                    items = resolved[split].items
                    begin = {
                        "dim": bb.embed_dim,
                        "aug_views": encode(split)[2],
                        "norms": True,
                        "id_width": max((len(it.id.encode()) for it in items), default=1),
                        "pre_dim": encode(split)[5],
                    }
                    shards.copy_shards(writer, path, size, split, len(items), begin)
                    if manifest.task == "retrieval":
                        _extract_captions(writer, bb, captioned[split], progress)
                writer.finalize()
            shards.remove_shards(path, size)
        shards.barrier()  # every rank returns once the store is in place
        return path
    finally:
        bar.close()
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


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


def _existing(path: Path) -> tuple[dict[str, Any], list[str]] | None:
    """(fingerprint, splits) of a complete store at `path`, read once; None when there is none to reuse."""
    if not path.exists():
        return None
    try:
        with Store.open(path) as st:
            return dict(st.fingerprint), list(st.splits)
    except (StoreError, OSError):
        return None


def _up_to_date(existing: tuple[dict[str, Any], list[str]] | None, wanted: dict[str, Any], splits: list[str]) -> bool:
    if existing is None:
        return False
    try:
        check_fingerprint(existing[0], wanted, "")
    except StoreError:
        return False
    return all(s in existing[1] for s in splits)


def _extract_split(writer, bb, split_items, batch_size, workers, views, aug_seed, skip_bad, pre_dim, progress,
                   offset: int = 0, on_batch: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """A split's rows, resuming after the last finished batch. `offset`: the index of the first item in the whole
    split (a torchrun rank's share starts there), so each image keeps its one-process augmentation seeds;
    `on_batch(items done)` after every batch."""
    split, items = split_items.split, split_items.items
    done, _, complete = writer.split_state(split)
    if complete and done == len(items):
        return
    id_width = max((len(it.id.encode()) for it in items), default=1)
    done = writer.begin_split(split, len(items), bb.embed_dim, views, id_width=id_width, norms=True, pre_dim=pre_dim)
    todo = items[done:]
    ds = ImageDataset(
        todo, split_items.source, bb.preprocess, offset=offset + done, split=split,
        aug=augment_transform(bb.preprocess_cfg) if views else None, aug_views=views, aug_seed=aug_seed,
    )  # fmt: skip
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share its cores
    n_workers = min(8, max(1, (os.cpu_count() or 1) // per_node)) if workers is None else workers
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
            rows: dict[str, torch.Tensor | None] = {}
            if batch["x"] is not None:
                feats, rows["norms"], rows["pre"] = encode_batch(bb, batch["x"], pre_dim > 0)
                if batch["views"] is not None:
                    v = batch["views"]
                    aug, norms, pre = encode_batch(bb, v.flatten(0, 1), pre_dim > 0)
                    aug = aug.view(v.shape[0], v.shape[1], -1)
                    rows["aug_norms"] = norms.view(v.shape[0], v.shape[1])
                    rows["pre_aug"] = None if pre is None else pre.view(v.shape[0], v.shape[1], -1)
            good = [todo[p] for p in batch["pos"]]
            skipped = [(todo[p].id, err) for p, err in batch["bad"]]
            for _, err in skipped:
                log.warning("skipped %s", err)
            writer.write_batch(
                split, batch["n"], feats, [it.label for it in good], [it.id for it in good], aug, skipped, **rows
            )
            bar.update(batch["n"])
            done += batch["n"]
            if on_batch is not None:
                on_batch(done)
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


__all__ = ["extract", "store_path", "encode_class_texts", "text_prompts", "encode_batch", "last_projection"]
