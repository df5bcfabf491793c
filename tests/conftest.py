"""Shared fixtures: the tiny random-init backbone, a digits store, and small image datasets written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = "featcache-tiny/random"


@pytest.fixture(scope="session")
def tiny():
    from featcache.backbones import load_backbone

    return load_backbone(TINY, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory, tiny) -> Path:
    """The digits dataset extracted once through the tiny backbone (all three splits)."""
    from featcache.extract import extract

    cache = tmp_path_factory.mktemp("cache")
    return extract("digits", tiny, cache_dir=cache, workers=0, batch_size=256, progress=False)


def write_images(root: Path, n_per_class: int, classes: list[str], size=(40, 30), seed=0) -> list[str]:
    """Random RGB PNGs under root/<class>/<i>.png; returns the relative paths in class, then index order."""
    rng = np.random.default_rng(seed)
    rel = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
            rel.append(f"{c}/{i:03d}.png")
    return rel


def folder_manifest(image_dir: str, classes: list[str], counts: dict[str, int] | None = None) -> dict:
    """A user manifest for DATA_ROOT/<image_dir>/{train,test}/<class>/<file>."""
    return {
        "id": "toyfolder",
        "name": "toy folder",
        "classnames": classes,
        "template": "a photo of a {}.",
        "templates": ["a photo of a {}.", "a drawing of a {}."],
        "default_scheme": "folder",
        "schemes": {
            "folder": {
                "source": {
                    "kind": "image_folder",
                    "image_dirs": [image_dir],
                    "splits": {"train": "train", "test": "test"},
                },
                "counts": counts or {},
                "instructions": "Put the images under DATA_ROOT/toy/{train,test}/<class>/.",
            }
        },
    }


@pytest.fixture
def toy_folder(tmp_path) -> tuple[Path, Path]:
    """(data_root, manifest path) for a 3-class image folder dataset: 4 train and 2 test images per class."""
    classes = ["cat", "dog", "red fox"]
    data = tmp_path / "data"
    write_images(data / "toy" / "train", 4, classes, seed=1)
    write_images(data / "toy" / "test", 2, classes, seed=2)
    mpath = tmp_path / "toy.json"
    mpath.write_text(json.dumps(folder_manifest("toy", classes, {"train": 12, "test": 6})))
    return data, mpath


def synthetic_store(path: Path, classes: int = 10, dim: int = 32, per_class=(40, 10, 30), seed: int = 0,
                    aug_views: int = 0) -> Path:  # fmt: skip
    """A store with learnable structure: images cluster around class means; the class text is only weakly
    aligned with them, so zero-shot is mediocre and fitted methods can do clearly better."""
    import torch

    from featcache.store import FINGERPRINT_FIELDS, StoreWriter

    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize
    means = n(torch.randn(classes, dim, generator=g), dim=-1)
    text = n(0.25 * means + 0.75 * n(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)
    fp = {k: "synthetic" for k in FINGERPRINT_FIELDS} | {"dtype": "float32", "dataset": "synthetic"}
    w = StoreWriter(path, fp)
    w.write_text([f"class {i}" for i in range(classes)], ["{}", "a {}"], torch.stack([text, text]))
    for split, k in zip(("train", "val", "test"), per_class, strict=True):
        labels = torch.arange(classes).repeat(k)  # interleaved: 0,1,2,...,0,1,2,... (first appearance order)
        x = n(means[labels] + 0.8 * torch.randn(len(labels), dim, generator=g) / dim**0.5, dim=-1)
        views = aug_views if split == "train" else 0
        w.begin_split(split, len(labels), dim, views, norms=True)
        aug = aug_norms = None
        if views:
            aug = n(x[:, None] + 0.1 * torch.randn(len(labels), views, dim, generator=g), dim=-1)
            # raw-view norms from their own generator (the features stay what they were): Tip-Adapter's raw mean
            aug_norms = 5 + 10 * torch.rand(len(labels), views, generator=torch.Generator().manual_seed(seed + 1))
        w.write_batch(split, len(labels), x, labels, [f"{split}/{i}" for i in range(len(labels))], aug,
                      norms=torch.ones(len(labels)), aug_norms=aug_norms)  # fmt: skip
        w.finish_split(split)
    return w.finalize()


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("synth") / "synthetic.h5")


@pytest.fixture(scope="session")
def pre_store(tmp_path_factory, tiny) -> Path:
    """digits through the tiny ViT with --pre-projection and 2 augmented views, float32 (exact comparisons)."""
    from featcache.extract import extract

    cache = tmp_path_factory.mktemp("pre")
    return extract("digits", tiny, cache_dir=cache, workers=0, batch_size=512, progress=False, pre_projection=True,
                   augment_views=2, dtype="float32")  # fmt: skip


class NotATensor:
    """A plain Python object: torch.save pickles it by reference, and weights_only loading must refuse it."""


def flip_chunk_bytes(path: Path, dataset: str, at: int = 8) -> None:
    """Corrupt four bytes inside the first chunk of an HDF5 dataset (what a bad disk sector does)."""
    import h5py

    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + at)
        b = fh.read(4)
        fh.seek(off + at)
        fh.write(bytes(x ^ 0x5A for x in b))
