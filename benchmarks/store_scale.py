"""Store scale: does reading a few-shot draw from a huge split cost in proportion to the rows read?

Writes an ImageNet-train-sized split (1,281,167 rows x 512, float16, fletcher32, the store's own chunking) with
h5py, then times, from the page cache and (where `--drop-caches` may write /proc/sys/vm/drop_caches, as root)
from a cold cache: the labels (needed for any draw), a 1-shot and a 16-shot draw over 1,000 classes through
`Store.rows`, and the whole split through `Store.split`. Beside each: the bytes HDF5 must read (chunks touched x
chunk size), so the cost per row read is visible. Also prints the store sizes per million images.

  python benchmarks/store_scale.py                 # 1.28M rows: about 1.3 GB of disk for the run
  python benchmarks/store_scale.py --rows 200000   # quicker
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from featcache.protocols import fewshot_draw
from featcache.store import FINGERPRINT_FIELDS, FORMAT, Store, chunk_rows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=1_281_167)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--classes", type=int, default=1000)
parser.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: the store's own)")
parser.add_argument("--drop-caches", action="store_true", help="also time cold reads (root only)")
args = parser.parse_args()


def load() -> str:
    return "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def write_store(path: Path, n: int, d: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, classes, n))  # class-sorted like ImageNet's split files
    with h5py.File(path, "w") as f:
        f.attrs.update({k: "" for k in FINGERPRINT_FIELDS})
        f.attrs.update({"format": str(FORMAT), "complete": True, "dtype": "float16", "extra": "{}"})
        f.create_dataset("classnames", data=np.array([f"c{i}".encode() for i in range(classes)]))
        t = f.create_group("text")
        t.create_dataset("features", data=rng.standard_normal((1, classes, d)).astype(np.float32))
        t["features"].attrs["templates"] = '["a photo of a {}."]'
        t.create_dataset("ensemble", data=rng.standard_normal((classes, d)).astype(np.float32))
        t["ensemble"].attrs["ensemble_templates"] = '["a photo of a {}."]'
        g = f.create_group("splits/train")
        rows = args.chunk_rows or chunk_rows(2 * d)
        feats = g.create_dataset("features", (n, d), np.float16, chunks=(rows, d), fletcher32=True)
        for lo in range(0, n, 65536):
            hi = min(n, lo + 65536)
            x = rng.standard_normal((hi - lo, d)).astype(np.float32)
            feats[lo:hi] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        g.create_dataset("labels", data=labels, chunks=(min(n, 4096),), fletcher32=True)
        g.create_dataset("ids", data=np.array([b"%08d" % i for i in range(n)]), chunks=(min(n, 4096),),
                         fletcher32=True)  # fmt: skip
        g.attrs.update({"n_items": n, "items_done": n, "rows_done": n, "batch_start": 0, "complete": True})


def drop() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
    path = Path(tmp) / "big.h5"
    t, _ = timed(lambda: write_store(path, args.rows, args.dim, args.classes))
    rows_per_chunk = args.chunk_rows or chunk_rows(2 * args.dim)
    print(f"wrote {args.rows:,} x {args.dim} float16 in {t:.1f} s: {path.stat().st_size / 2**30:.2f} GiB, "
          f"{rows_per_chunk} rows per chunk  [{load()}]")  # fmt: skip
    modes = ["warm"] + (["cold"] if args.drop_caches and drop() else [])
    for mode in modes:
        for what, shots in [("labels", None), ("1-shot draw", 1), ("16-shot draw", 16), ("whole split", 0)]:
            if mode == "cold":
                drop()
            with Store.open(path) as st:
                if shots is None:
                    t, lab = timed(lambda st=st: st.labels("train"))
                    n_read, chunks = args.rows, -(-args.rows // 4096)
                    nbytes = args.rows * 8
                elif shots == 0:
                    t, _ = timed(lambda st=st: st.split("train"))
                    n_read = args.rows
                    nbytes = args.rows * 2 * args.dim
                else:
                    lab = st.labels("train").tolist()
                    idx, _ = fewshot_draw(lab, None, shots, 1)
                    t, _ = timed(lambda st=st, idx=idx: st.rows("train", idx))
                    n_read = len(idx)
                    touched = len({i // rows_per_chunk for i in idx})
                    nbytes = touched * rows_per_chunk * 2 * args.dim
            print(f"  {mode:4s} {what:13s} {n_read:>9,} rows  {t:7.3f} s  reads {nbytes / 2**20:8.1f} MiB  "
                  f"({t / max(1, n_read) * 1e6:6.2f} us/row)  [{load()}]")  # fmt: skip

print("store size per million images (D = 512, features only; labels and ids add about 0.03 GB):")
for dtype, b in (("float16", 2), ("float32", 4)):
    print(f"  {dtype}: {1e6 * 512 * b / 1e9:.2f} GB; with V augmented views x(1+V); with raw norms +0.004 GB x(1+V); "
          f"pre-projection ViT-B (W=768) +{1e6 * 768 * b / 1e9:.2f} GB x(1+V)")  # fmt: skip
print("  partial-backbone tokens (ViT-B/16: 197 x 768 float16 per image): 303 GB per million images")
