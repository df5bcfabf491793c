"""Extraction speed: is featcache's extract pipeline limited by the model or by its data path?

One run, one machine, one model, one batch size. It measures:
  1. pipeline throughput (images/s): featcache.extract.extract() on a synthetic image folder written here
     (N random-content 500x375 JPEGs over a few classes): decode from disk, preprocess, forward, HDF5 write;
  2. forward throughput (images/s): backbone.encode_images on pre-decoded, pre-processed batches, warmed up;
  3. their ratio, pipeline / forward. Goal >= 0.9: the model's forward pass, not decoding, preprocessing or
     writing, should be the limit, or extraction wastes the hardware it runs on;
  4. store read speed: Store.open(path).split("train") on a synthetic 50,000 x 512 float16 split, and on the
     extracted store. Goal well under a second: adapting and evaluating on the cache should feel instant;
  5. the read cost of the store's fletcher32 checksums: Store.split on two 50,000 x 512 stores written directly
     with h5py, identical but for the filter, in float16 and float32 (`--checksum-only` runs just this).

The backbone is loaded once, outside every timing, and passed to extract(). Weights are random (nothing can be
downloaded here); speed does not depend on their values. The JPEGs and stores were just written, so they are
read from the page cache: this measures the pipeline, not a cold disk. The pipeline figure includes extract()'s
fixed costs (data loader workers starting, class-text encoding, creating and finalizing the HDF5 file).
Pipeline and forward runs alternate, and each figure is the best of --repeats runs, with every run printed:
shared machines are noisy, and the fastest run is the best estimate of what the hardware can do.

  python benchmarks/extract_speed.py
  python benchmarks/extract_speed.py --backbone featcache-tiny/random --images 2000 --batch-size 256
  python benchmarks/extract_speed.py --checksum-only
"""

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.backbones import load_backbone
from featcache.data import load_image
from featcache.extract import extract
from featcache.manifests import parse_manifest
from featcache.store import FINGERPRINT_FIELDS, FORMAT, Store, StoreWriter, chunk_rows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backbone", default="ViT-B-32/random")
parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs to extract")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--workers", type=int, default=2, help="data loader workers for extract()")
parser.add_argument("--device", default="auto")
parser.add_argument("--precision", default="auto")
parser.add_argument("--classes", type=int, default=4)
parser.add_argument("--repeats", type=int, default=3, help="timed runs of 1 and 2; the best is reported")
parser.add_argument("--checksum-only", action="store_true", help="only 5: the checksum's read cost (seconds)")
parser.add_argument("--rows", type=int, default=50_000, help="rows of the stores read in 4 and 5")
parser.add_argument("--nproc", type=int, default=0, help="6: also extract under torchrun with this many processes")
args = parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_jpegs(root: Path, n: int, classes: int, seed: int = 0) -> list[Path]:
    """n 500x375 JPEGs: smooth random colour fields plus grain, ~75 KB each, like a typical photo file."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        px = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (375, 500, 3))
        paths.append(d / f"{i:06d}.jpg")
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def write_store(path: Path, rows: int = 50_000, dim: int = 512, classes: int = 100) -> Path:
    """A complete store with one float16 train split of `rows` unit-norm rows, written through StoreWriter."""
    g = torch.Generator().manual_seed(0)
    names = [f"class{c}" for c in range(classes)]
    w = StoreWriter(path, {"backbone": "synthetic", "dataset": "synthetic", "dtype": "float16"})
    w.write_text(names, ["a photo of a {}."], F.normalize(torch.randn(1, classes, dim, generator=g), dim=-1))
    w.begin_split("train", rows, dim)
    feats = F.normalize(torch.randn(rows, dim, generator=g), dim=-1)
    labels = torch.randint(0, classes, (rows,), generator=g)
    w.write_batch("train", rows, feats, labels, [f"img{i:06d}" for i in range(rows)])
    w.finish_split("train")
    return w.finalize()


def write_raw_store(path: Path, rows: int, dim: int, dtype: str, checksum: bool) -> Path:
    """A complete store written directly with h5py, chunked as StoreWriter chunks: two such files differ only in
    the fletcher32 filter, so their read times differ only by what the checksum costs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({k: "synthetic" for k in FINGERPRINT_FIELDS} | {"dtype": dtype, "extra": "{}"})
        f.attrs.update({"format": str(FORMAT), "complete": True})
        g = f.create_group("splits/train")
        chunk = min(rows, chunk_rows(dim * np.dtype(dtype).itemsize))
        g.create_dataset("features", data=x.astype(dtype), chunks=(chunk, dim), maxshape=(None, dim),
                         fletcher32=checksum)  # fmt: skip
        g.create_dataset("labels", data=np.arange(rows, dtype=np.int64) % 100, chunks=(min(rows, chunk_rows(8)),),
                         maxshape=(None,), fletcher32=checksum)  # fmt: skip
    return path


def checksum_read_cost(tmp: Path, rows: int, dim: int = 512, repeats: int = 9) -> None:
    """5. Store.split on the same split with and without fletcher32, side by side: reads of the two files
    alternate (both see the same machine state) after a warm-up read (both come from the page cache: this is the
    checksum's CPU cost, not the disk's); best of `repeats` each."""
    load0 = os.getloadavg()
    print(f"checksum read cost: Store.split('train') on {rows:,} x {dim}, page cache, alternating, best of {repeats}")
    for dtype in ("float16", "float32"):
        paths = {c: write_raw_store(tmp / f"raw-{dtype}-{c}.h5", rows, dim, dtype, c) for c in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(repeats + 1):
            for checksum, path in paths.items():
                t0 = time.perf_counter()
                with Store.open(path) as st:
                    st.split("train")
                if r:  # the first round only warms the page cache
                    times[checksum].append(time.perf_counter() - t0)
        for path in paths.values():
            path.unlink()
        plain, summed = min(times[False]), min(times[True])
        mb = rows * dim * np.dtype(dtype).itemsize / 2**20
        print(f"  {dtype}  ({mb:5.1f} MiB)  plain {plain:.4f} s   fletcher32 {summed:.4f} s   "
              f"{summed - plain:+.4f} s ({100 * (summed / plain - 1):+.0f} %)")  # fmt: skip
    load1 = os.getloadavg()
    print(f"  load avg (1, 5, 15 min) before {' '.join(f'{v:.2f}' for v in load0)}, after "
          f"{' '.join(f'{v:.2f}' for v in load1)} on {os.cpu_count()} cpus")  # fmt: skip


if args.checksum_only:
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        print(f"torch {torch.__version__} | h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})")
        checksum_read_cost(tmp, args.rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise SystemExit(0)


def multi_process(tmp: Path, manifest_raw: dict, nproc: int) -> None:
    """6. The same extraction as a CLI command in one process and under torchrun with `nproc` processes (gloo on
    CPU, one GPU per process on CUDA). Each wall time includes starting Python and loading the model, so a no-op
    rerun (the store is up to date) is timed too and subtracted: what remains is the extraction itself. Assembly
    (rank 0 copying the shards into the store) is included in the torchrun figure."""
    import json
    import subprocess
    import sys

    mfile = tmp / "bench_manifest.json"
    mfile.write_text(json.dumps(manifest_raw))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = ["extract", "--manifest", str(mfile), "--data-root", str(tmp), "--backbone", args.backbone,
              "--batch-size", str(args.batch_size), "--device", args.device, "--quiet"]  # fmt: skip

    def run(cmd: list[str], cache: Path, workers: int) -> float:
        t0 = time.perf_counter()
        argv = [*cmd, *common, "--cache-dir", str(cache), "--workers", str(workers)]
        r = subprocess.run(argv, capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"extraction failed: {r.stderr[-2000:]}")
        return time.perf_counter() - t0

    one = [sys.executable, "-m", "cli.main"]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "cli.main"]  # fmt: skip
    load0 = os.getloadavg()
    w1, wn = args.workers, max(0, args.workers // nproc)  # the same decode workers in all
    t1, idle1 = run(one, tmp / "one", w1), run(one, tmp / "one", w1)
    tn, idlen = run(many, tmp / "many", wn), run(many, tmp / "many", wn)
    x1, xn = max(1e-9, t1 - idle1), max(1e-9, tn - idlen)
    print(f"6. whole commands, {N} images: 1 process {t1:.1f} s (start-up {idle1:.1f} s), {nproc} processes under "
          f"torchrun {tn:.1f} s (start-up {idlen:.1f} s)")  # fmt: skip
    print(f"   extraction alone: 1 process {fmt(N / x1)} images/s; {nproc} processes {fmt(N / xn)} images/s in all, "
          f"{fmt(N / xn / nproc)} per process; speed-up {x1 / xn:.2f}x")  # fmt: skip
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if gpus >= nproc:
        why = "one GPU per process: the speed-up is bounded by the slowest rank's share and the assembly copy"
    else:
        why = (f"{nproc} processes share {cpus} CPU cores and no GPU each: a speed-up needs a device (or cores) "
               "per process; here the figure shows the overhead of sharding and assembly")  # fmt: skip
    print(f"   limited by: {why}  [load avg {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after]")


def fmt(rate: float) -> str:
    return f"{rate:,.1f}" if rate < 1000 else f"{rate:,.0f}"


def report(what: str, n: int, times: list[float], unit: str, note: str = "") -> float:
    """Print the best (fastest) of the timed runs, and every run's rate so the machine's noise is visible."""
    best, runs = min(times), ", ".join(fmt(n / t) for t in times)
    print(f"{what:34s} {fmt(n / best):>10s} {unit}  ({n} in {best:.3f} s{note}; runs: {runs})")
    return n / best


# -- setup (not timed) --------------------------------------------------------------------------------------------
bb = load_backbone(args.backbone, device=args.device, precision=args.precision)
B, N = args.batch_size, args.images
load0 = os.getloadavg()[0]
print(
    f"torch {torch.__version__} | device {bb.device} | precision {bb.precision} | torch threads "
    f"{torch.get_num_threads()} | cpus {os.cpu_count()} | load avg {load0:.2f}"
)
print(f"backbone {bb.id} ({bb.image_size}px, dim {bb.embed_dim}) | {N} images | batch {B} | workers {args.workers}")
tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
try:
    files = write_jpegs(tmp / "images" / "train", N, args.classes)
    kb = sum(p.stat().st_size for p in files) / len(files) / 1e3
    print(f"data: {N} JPEGs 500x375, {kb:.0f} KB mean, {args.classes} classes, in {tmp}")
    manifest_raw = {
        "id": "bench_synthetic",
        "name": "synthetic JPEGs (benchmark)",
        "classnames": [f"class{c}" for c in range(args.classes)],
        "template": "a photo of a {}.",
        "templates": ["a photo of a {}."],
        "default_scheme": "folder",
        "schemes": {
            "folder": {
                "source": {"kind": "image_folder", "image_dirs": ["images"], "splits": {"train": "train"}},
                "counts": {"train": N},
            }
        },
    }
    manifest = parse_manifest(manifest_raw)

    x = torch.stack([bb.preprocess(load_image(str(files[i % N]), None)) for i in range(B)])
    for _ in range(3):  # warm-up: first calls pay for kernel selection and allocation
        bb.encode_images(x)
    sync(bb.device)

    # -- 1 + 2, interleaved so both see the same machine state; best of --repeats (shared VMs are noisy) ------------
    iters = math.ceil(N / B)
    pipe_t, fwd_t = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()  # pipeline: decode + preprocess + forward + HDF5 write, into a fresh store
        store = extract(
            manifest, bb, data_root=tmp, cache_dir=tmp / f"cache{r}", batch_size=B, workers=args.workers,
            progress=False,
        )  # fmt: skip
        pipe_t.append(time.perf_counter() - t0)
        sync(bb.device)
        t0 = time.perf_counter()  # forward only: same batch size, same number of batches, no data path
        for _ in range(iters):
            bb.encode_images(x)
        sync(bb.device)
        fwd_t.append(time.perf_counter() - t0)
    pipe = report("pipeline  extract()", N, pipe_t, "images/s")
    fwd = report("forward   encode_images()", iters * B, fwd_t, "images/s")

    # -- 3. ratio --------------------------------------------------------------------------------------------------
    ratio = pipe / fwd
    verdict = "met, the model is the limit" if ratio >= 0.9 else "NOT met, time goes outside the forward pass"
    print(f"{'ratio     pipeline/forward':34s} {ratio:10.2f}           (goal >= 0.90: {verdict})")

    # -- 4. store reads: Store.open(path).split("train") --------------------------------------------------------------
    synth = write_store(tmp / "synthetic.h5", rows=args.rows)
    for name, path in (("synthetic", synth), ("extracted", store)):
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with Store.open(path) as st:
                n, d = st.split("train").features.shape
            ts.append(time.perf_counter() - t0)
        report(f"read      {name} {n}x{d}", n, ts, "rows/s  ", "; goal < 1 s")
    load1 = os.getloadavg()[0]
    print(f"load avg (1 min) {load0:.2f} before, {load1:.2f} after (other processes on the cpus skew every figure)")

    # -- 5. what the checksums cost on read -----------------------------------------------------------------------
    checksum_read_cost(tmp, args.rows)

    # -- 6. one process vs --nproc under torchrun, each a whole `featcache extract` command -------------------------
    if args.nproc > 1:
        multi_process(tmp, manifest_raw, args.nproc)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
