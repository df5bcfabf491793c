"""Fit seconds of every cached method on an ImageNet-sized synthetic store, on this machine.

The store has 1,000 classes, D = 512, 16 train / 4 val / 50 test rows per class. Base-to-novel with 16 shots
then trains on 500 base classes (8,000 train rows, 2,000 val rows) and tests on 25,000 base rows, the shape of
CoOp's ImageNet protocol. Images cluster around class means and the class text is only loosely aligned, so the
methods have something to learn (the accuracies are printed, but they say nothing about real data).

Goal: every method except the linear probe fits in under 10 s on a 2-core CPU. The same run then times the mm-attn
fast path against the straightforward attention at 1,000 classes (benchmarks/mm_attn_speed.py; goal >= 10x).

  python benchmarks/fit_speed.py [--classes 1000] [--dim 512] [--methods mm-attn,tip-adapter]
  python benchmarks/fit_speed.py --methods tip-adapter-f --set tip-adapter-f.precision=bf16 --no-step-bench
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.adapters import list_adapters
from featcache.api import fit_method
from featcache.importers import import_npz

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--classes", type=int, default=1000)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--shots", type=int, default=16)
# coop runs a backbone's text encoder, which a synthetic store has none of (benchmarks/stream_speed.py times it)
CACHED = [m for m in list_adapters() if m != "coop"]
parser.add_argument("--methods", default=",".join(CACHED), help="comma-separated")
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--no-step-bench", action="store_true", help="skip the mm-attn one-step comparison")
parser.add_argument(
    "--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
    help="a method option, e.g. tip-adapter-f.precision=bf16 (repeatable)",
)  # fmt: skip
args = parser.parse_args()
torch.set_num_threads(args.threads)


def synthetic_npz(path: Path, classes: int, dim: int, per_class=(16, 4, 50), seed: int = 0) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    text = F.normalize(0.3 * means + 0.7 * F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)
    arrays = {"text_features": text.numpy(), "classnames": np.array([f"class {i}" for i in range(classes)])}
    for split, k in zip(("train", "val", "test"), per_class, strict=True):
        labels = torch.arange(classes).repeat(k)
        x = F.normalize(means[labels] + 1.2 * torch.randn(len(labels), dim, generator=g) / dim**0.5, dim=-1)
        arrays[f"{split}_features"], arrays[f"{split}_labels"] = x.numpy(), labels.numpy()
    np.savez(path, **arrays)


with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    synthetic_npz(Path(tmp) / "s.npz", args.classes, args.dim)
    import_npz(Path(tmp) / "s.npz", "bench", cache_dir=tmp, dtype="float16")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; store built in {time.perf_counter() - t0:.1f} s"
    )
    print(f"{args.classes} classes, D={args.dim}, base-to-novel {args.shots}-shot, seed 1\n")
    print(f"{'method':<14} {'fit s':>8} {'epochs':>7} {'params':>9} {'base':>7} {'novel':>7} {'HM':>7}")
    for method in args.methods.split(","):
        opts = dict(s.split(".", 1)[1].split("=", 1) for s in args.set if s.split(".", 1)[0] == method)
        rec = fit_method(method, name="bench", cache_dir=tmp, shots=args.shots, seed=1, options=opts).record
        m = rec.metrics
        goal = "" if method == "linear-probe" or rec.fit_seconds < 10 else "  (goal: < 10 s)"
        goal += f"  [{', '.join(f'{k}={v}' for k, v in opts.items())}]" if opts else ""

        def fmt(x):
            return "n/a" if x is None else f"{x:.2f}"

        print(f"{method:<14} {rec.fit_seconds:8.2f} {rec.fit['epochs']:7d} {rec.trainable_params:9,d} "
              f"{fmt(m['base_acc']):>7} {fmt(m['novel_acc']):>7} {fmt(m['hm']):>7}{goal}")  # fmt: skip

if "mm-attn" in args.methods.split(",") and not args.no_step_bench:
    print("\nmm-attn, one training step at 1,000 classes: exact fast path vs nn.MultiheadAttention over C+1 tokens")
    subprocess.run([sys.executable, str(Path(__file__).with_name("mm_attn_speed.py")), "--repeats", "2"], check=True)
