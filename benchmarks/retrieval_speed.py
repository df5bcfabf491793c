"""Retrieval evaluation speed: from the cache vs re-encoding through the backbone, and recall at COCO's size.

1. A synthetic image-caption set (N images x 5 captions, PNGs written to a temporary folder) is extracted once
   through the backbone (timed on its own); then retrieval is evaluated twice: from the store (read the cached
   embeddings, rank) and by re-encoding every image and caption through the backbone (what the research code does
   at every evaluation). Printed as a ratio.
2. Recall@K / median / mean rank in both directions for 5,000 images x 25,000 captions (D = 512, random unit
   vectors), computed in blocks of at most 2^24 similarities (64 MiB in float32): nothing quadratic is built
   beyond one block of the similarity matrix.

  python benchmarks/retrieval_speed.py [--backbone featcache-tiny/random] [--images 200] [--threads 2]
"""

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.api import fit_method
from featcache.backbones import load_backbone
from featcache.extract import extract
from featcache.manifests import load_manifest
from featcache.results import versions
from featcache.retrieval import evaluate_retrieval, make_set
from featcache.retrieval_data import resolve_retrieval_split
from featcache.streaming.retrieval_trainer import encode_retrieval_split

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backbone", default="featcache-tiny/random")
parser.add_argument("--images", type=int, default=200)
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--gallery", type=int, default=5000, help="images in the recall timing")
args = parser.parse_args()
torch.set_num_threads(args.threads)


def write_dataset(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        (root / "imgs").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows += [(f"{i}.png", f"photo number {i}, caption {k}") for k in range(5)]
    with open(root / "test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    manifest = {
        "id": "bench_captions", "name": "synthetic captions", "task": "retrieval", "default_scheme": "files",
        "schemes": {"files": {"source": {"kind": "caption_file", "image_dirs": ["imgs"],
                                         "splits": {"test": "test.csv"}}, "counts": {"test": n}}},
    }  # fmt: skip
    (root / "m.json").write_text(json.dumps(manifest))
    return root / "m.json"


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    mpath = write_dataset(root / "data", args.images)
    bb = load_backbone(args.backbone, device="cpu", precision="fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backbone {args.backbone}")
    t0 = time.perf_counter()
    extract(mpath, bb, data_root=root / "data", cache_dir=root / "cache", workers=0, progress=False)
    t_extract = time.perf_counter() - t0
    versions()  # one-time imports (sklearn, open_clip versions for the record) stay out of both timings

    t0 = time.perf_counter()
    cached = fit_method("zero-shot", dataset=str(mpath), backbone=args.backbone, cache_dir=root / "cache",
                        protocol="retrieval").record.metrics  # fmt: skip
    t_cache = time.perf_counter() - t0

    m = load_manifest(mpath)
    t0 = time.perf_counter()
    split = resolve_retrieval_split(m, m.scheme(), "test", root / "data")
    direct = evaluate_retrieval(encode_retrieval_split(bb, split, 1, 0, video=False))
    t_direct = time.perf_counter() - t0
    print(f"\n{args.images} images x 5 captions: extraction once {t_extract:.2f} s")
    print(f"  evaluate from the cache:     {t_cache:.3f} s  (t2i R@1 {cached['t2i_r1']:.2f})")
    print(f"  evaluate by re-encoding:     {t_direct:.3f} s  (t2i R@1 {direct['t2i_r1']:.2f})")
    print(f"  ratio: {t_direct / t_cache:.1f}x faster from the cache")

g = torch.Generator().manual_seed(0)
n, d = args.gallery, 512
images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
captions = F.normalize(images.repeat_interleave(5, 0) + 1.5 * torch.randn(5 * n, d, generator=g) / d**0.5, dim=-1)
rset = make_set(images, torch.arange(n), captions, torch.arange(n).repeat_interleave(5), n, video=False)
t0 = time.perf_counter()
metrics = evaluate_retrieval(rset)
t_recall = time.perf_counter() - t0
print(f"\nrecall, {n:,} images x {5 * n:,} captions, both directions: {t_recall:.2f} s "
      f"(blocks of at most 2^24 similarities; the full matrix would be {n * 5 * n * 4 / 2**20:.0f} MiB)")  # fmt: skip
print("  " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
