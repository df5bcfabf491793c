"""featcache's cached zero-shot numbers against a float32 CLIP_benchmark evaluation of the same model on the same
files, count for count.

The reference is computed here, straight from the tiny open_clip model and the image files, the way
LAION-AI/CLIP_benchmark's metrics/zeroshot_classification.py and metrics/zeroshot_retrieval.py do it: per class,
encode every template's prompt with `model.encode_text` (full 77 tokens, no truncation), normalise each,
average, normalise the mean; logits = 100 · normalise(encode_image(x)) @ classifier; top-k via `logits.topk`
(the first k columns of topk(max k)). Retrieval: scores = texts @ imagesᵀ, positive pairs from the caption's
image, recall@k = 1 when a positive is among a query's top k (`topk` over the scores), averaged over queries.
featcache's side is `extract --dtype float32` and `fit --adapter zero-shot` records (class text and captions are
float32 whatever --dtype says)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import folder_manifest, write_images
from PIL import Image

from featcache.api import fit_method
from featcache.extract import extract
from featcache.store import Store

TINY = "featcache-tiny/random"
# 8 > 5 classes, so top-5 is not trivial; sorted, since an image_folder's labels follow the sorted folder names
CLASSES = sorted(["cat", "dog", "red fox", "owl", "koi carp", "bee", "newt", "ibis"])
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]


@torch.no_grad()
def _classifier(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP_benchmark's zero_shot_classifier: [D, C]."""
    weights = []
    for c in classnames:
        emb = F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


def _topk_counts(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[int]:
    """CLIP_benchmark's accuracy(), as counts (it divides by n afterwards)."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [int(correct[:k].reshape(-1).float().sum()) for k in topk]


@torch.no_grad()
def _encode_images(tiny, paths: list[Path]) -> torch.Tensor:
    x = torch.stack([tiny.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return F.normalize(tiny.model.encode_image(x), dim=-1)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    write_images(data / "toy" / "train", 1, CLASSES, seed=3)
    write_images(data / "toy" / "test", 6, CLASSES, size=(48, 40), seed=4)
    raw = folder_manifest("toy", CLASSES) | {"template": TEMPLATES[0], "templates": TEMPLATES}
    mpath = tmp_path / "toy.json"
    mpath.write_text(json.dumps(raw))
    return data, mpath


@pytest.mark.parametrize("template", [None, "ensemble"])
def test_zero_shot_top1_top5_equal_clip_benchmark_counts(folder, tmp_path, tiny, template):
    data, mpath = folder
    cache = tmp_path / "cache"
    path = extract(mpath, tiny, data_root=data, cache_dir=cache, workers=0, progress=False, dtype="float32")
    with Store.open(path) as st:
        assert st.fingerprint["dtype"] == "float32" and st.text().dtype == torch.float32
    rec = fit_method("zero-shot", dataset=str(mpath), backbone=TINY, cache_dir=cache, protocol="fewshot",
                     template=template).record  # fmt: skip
    n = len(CLASSES) * 6
    ours = [round(rec.metrics["acc"] * n / 100), round(rec.metrics["acc5"] * n / 100)]

    files = [(data / "toy" / "test" / c / f"{i:03d}.png", y) for y, c in enumerate(CLASSES) for i in range(6)]
    images = _encode_images(tiny, [p for p, _ in files])
    classifier = _classifier(tiny.model, tiny.tokenizer, CLASSES, TEMPLATES if template else TEMPLATES[:1])
    reference = _topk_counts(100.0 * images @ classifier, torch.tensor([y for _, y in files]))
    assert ours == reference
    assert 0 < reference[0] < reference[1] < n, reference  # neither count is trivial, so the match means something


def _recall_at_k(scores: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """CLIP_benchmark's recall_at_k (true positives among the top k / positives), per query."""
    top = torch.topk(scores, k, dim=1)[1]
    onehot = F.one_hot(top, num_classes=scores.shape[1])
    return (onehot * positive.view(scores.shape[0], 1, scores.shape[1])).sum(dim=(1, 2)) / positive.sum(dim=1)


WORDS = ["red", "green", "blue", "black", "white", "yellow", "pink", "grey", "teal", "tan"]


def _captions(tmp_path: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """(data root, manifest, rows): 10 random images with 2 captions each, a test split only."""
    data, words = tmp_path / "data", WORDS
    rows = []
    for i, w in enumerate(words):
        (data / "caps" / "images").mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(100 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(data / "caps" / "images" / f"{i}.png")
        rows += [(f"{i}.png", f"a {w} square"), (f"{i}.png", f"the {w} picture")]
    with open(data / "caps" / "test.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption"), *rows])
    manifest = {"id": "toycaps", "name": "toy captions", "task": "retrieval", "default_scheme": "files",
                "schemes": {"files": {"source": {"kind": "caption_file", "image_dirs": ["caps/images"],
                                                 "splits": {"test": "caps/test.csv"}}}}}  # fmt: skip
    mpath = tmp_path / "toycaps.json"
    mpath.write_text(json.dumps(manifest))
    return data, mpath, rows


def test_caption_and_class_text_features_are_float32_whatever_the_image_dtype(tmp_path, folder, tiny):
    import h5py

    data, mpath, _ = _captions(tmp_path)
    path = extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c16", workers=0, progress=False)  # float16
    with h5py.File(path) as f:
        assert f["splits/test/features"].dtype == np.float16 and f["splits/test/captions/features"].dtype == np.float32
    data, mpath = folder
    path = extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c16", workers=0, progress=False)
    with h5py.File(path) as f:
        assert f["splits/test/features"].dtype == np.float16
        assert f["text/features"].dtype == np.float32 and f["text/ensemble"].dtype == np.float32


def test_zero_shot_retrieval_recall_equals_clip_benchmark_counts(tmp_path, tiny):
    data, mpath, rows = _captions(tmp_path)
    words = WORDS
    cache = tmp_path / "cache"
    extract(mpath, tiny, data_root=data, cache_dir=cache, workers=0, progress=False, dtype="float32")
    m = fit_method("zero-shot", dataset=str(mpath), backbone=TINY, cache_dir=cache, protocol="retrieval").record.metrics

    images = _encode_images(tiny, [data / "caps" / "images" / f"{i}.png" for i in range(len(words))])
    with torch.no_grad():
        texts = F.normalize(tiny.model.encode_text(tiny.tokenizer([c for _, c in rows])), dim=-1)
    scores = texts @ images.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(rows)), torch.tensor([i // 2 for i in range(len(rows))])] = True
    for k in (1, 5, 10):
        t2i = int((_recall_at_k(scores, positive, k) > 0).sum())  # CLIP_benchmark's image_retrieval_recall@k
        i2t = int((_recall_at_k(scores.t(), positive.t(), k) > 0).sum())  # text_retrieval_recall@k
        assert round(m[f"t2i_r{k}"] * len(rows) / 100) == t2i, k
        assert round(m[f"i2t_r{k}"] * len(words) / 100) == i2t, k
    assert 0 < round(m["t2i_r1"] * len(rows) / 100) < len(rows)  # not trivial
