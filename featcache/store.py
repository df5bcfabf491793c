"""The HDF5 feature store: one file per (backbone, dataset, split scheme).

Layout:
  /                     attrs: every fingerprint field, `format`, `complete`
  /classnames           [C] str
  /text/features        [T, C, D] float32, one row per template (attr `templates`, JSON list)
  /text/ensemble        [C, D] float32 (attr `ensemble_templates`)
  /splits/<s>/features  [N, D] float16 (or float32), unit-norm image features, rows in the split file's order
  /splits/<s>/labels    [N] int64
  /splits/<s>/ids       [N] str, item id (relative path or index) of each row
  /splits/<s>/aug       [N, V, D] augmented views (train only, when extracted with --augment-views V)
  /splits/<s>/norms     [N] float32, the norm of each raw (unnormalised) image feature: raw = features x norms
  /splits/<s>/aug_norms [N, V] float32, the same for the augmented views (Tip-Adapter averages raw views)
  /splits/<s>/pre       [N, W] raw pooled vision features before the last projection (--pre-projection; the
                        image dtype): ViT ln_post(token) before visual.proj, ResNet attnpool before c_proj
  /splits/<s>/pre_aug   [N, V, W] the same for the augmented views
  /projection/weight    [W, D] float32 and /projection/bias [D] float32 (zeros for ViT): features are
                        normalize(pre @ weight + bias); attr `source` names the module (--pre-projection)
  /splits/<s>/skipped   [M] str, "<id>\t<error>" for items dropped by --skip-bad

Retrieval stores (attr extra = {"task": "retrieval", "video": ...}) have no class names or text group; each
split's rows are the frames (one per image) with `labels` = the index of their item, plus
  /splits/<s>/items             [N] str, item ids (image path or video id) in annotation order
  /splits/<s>/captions/features [M, D] unit-norm caption embeddings, float32 (small; `dtype` is the images')
  /splits/<s>/captions/item     [M] int64, the item each caption describes
  /splits/<s>/captions/text     [M] str

Every dataset is chunked and carries HDF5's fletcher32 checksum, so a flipped bit on disk is an error on read
instead of a silently wrong feature; strings are therefore fixed-length UTF-8 (HDF5 filters refuse
variable-length types). Format 3 (format 2 plus raw-feature norms, optional pre-projection features and the
`pre_projection` fingerprint field). Format-2 stores still open for reading (they count as extracted without
--pre-projection, and methods that need raw norms say to re-extract); extending or resuming one needs a rebuild
(--overwrite). Format-1 stores (no checksums) must be rebuilt.

A store is trusted because its fingerprint matches, never because the file exists. Writers work on
`<name>.partial` under an inter-process lock (`<name>.lock`) and rename it into place only when every split
is complete.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from filelock import FileLock, Timeout

from .errors import FeatcacheError, FingerprintMismatch, StoreError

FORMAT = 3
READABLE_FORMATS = ("2", "3")  # format 2 lacks norms and pre-projection features; readers say what is missing
FINGERPRINT_FIELDS = (
    "featcache_version",
    "backbone",
    "weights",
    "weights_sha256",
    "preprocessing",
    "precision",
    "dataset",
    "manifest_sha256",
    "split_scheme",
    "augmentation",
    "dtype",
    "pre_projection",
)
# fields newer than format 2: what an older store's missing attribute means
FINGERPRINT_DEFAULTS = {"pre_projection": "off"}
PRE_PROJECTION_FIX = "re-extract with --pre-projection (featcache extract ... --pre-projection --overwrite)"
log = logging.getLogger(__name__)
_CHUNK_ROWS = 4096
# A chunk is what HDF5 reads, checksums and rewrites as a unit. Small chunks keep a few-shot draw proportional to
# the rows it reads (16 shots x 1,000 classes from ImageNet's 1.28M rows touch at most 16,000 chunks: with 16 KiB
# chunks about 250 MB, where 256 KiB chunks touch nearly every chunk of the 1.3 GB split) and the rewrite of a
# batch's chunks small; whole-split reads pay a few microseconds per chunk (benchmarks/store_scale.py).
_CHUNK_BYTES = 16 * 1024
_CALL_BYTES = 64 * 1024  # what one h5py read call costs in time, in bytes read (about 50 us at 1.3 GB/s)
# per-row datasets of a split: resized together at finish, checked together on resume
ROW_DATASETS = ("features", "labels", "ids", "aug", "norms", "aug_norms", "pre", "pre_aug")
_LOCK_WAIT_S = 1.0  # a writer that just finished releases at once; a live one is not waited for


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATCACHE_HOME", "~/.cache/featcache")).expanduser()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class StoreLock:
    """An inter-process lock on `<store>.lock`, held for a whole write.

    Two extractions of the same store would otherwise delete or rename each other's `.partial`. The lock is an
    OS file lock (filelock: flock on Unix), so the kernel drops it when its holder dies: there is no stale lock to
    clean up after a kill. The holder's pid goes into `<store>.lock.pid` so a refused run can say who holds it."""

    def __init__(self, path: str | Path, what: str = "featcache extract"):
        self.path = Path(path)
        self.what = what
        self._file = lock_path(self.path)
        self._pid = self._file.with_name(self._file.name + ".pid")
        self._lock = FileLock(self._file, timeout=_LOCK_WAIT_S)

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreError(f"{self._holder()} is writing {self.path}; wait for it to finish or stop it") from None
        try:
            self._pid.write_text(f"{os.getpid()} {self.what}\n")
        except OSError:  # a full disk must not keep the lock from working: the pid is only for the message
            pass
        return self

    def _holder(self) -> str:
        try:
            pid, what = self._pid.read_text().strip().split(" ", 1)
            return f"another {what} (pid {int(pid)})"
        except (OSError, ValueError):  # the holder is between taking the lock and writing its pid
            return "another featcache process"

    def release(self) -> None:
        if self._lock.is_locked:
            self._pid.unlink(missing_ok=True)  # before unlocking: the next holder writes its own
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def os_errno(e: BaseException | None) -> int | None:
    """The OS error number behind an exception, looking through its causes. h5py often raises a RuntimeError or
    an OSError without errno whose only trace of the cause is 'errno = 28' inside the HDF5 message text."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
            return e.errno
        m = re.search(r"errno = (\d+)", str(e))
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def write_error(e: BaseException, path: Path, resumable: bool = True) -> StoreError:
    """One line for a failed write, naming the real OS error: 'disk full' only for ENOSPC or EDQUOT (a guess
    from free space would call every I/O error on a nearly full disk a full disk)."""
    code = os_errno(e)
    again = (
        "rerun the same command: finished batches are kept and extraction resumes"
        if resumable
        else ("rerun the same command")
    )
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.exists() else float("nan")
        where = f"{free:.0f} MiB free in {path.parent}"
        return StoreError(f"{what} while writing {path.name} ({where}); free space and {again}")
    if code is not None:
        name = errno.errorcode.get(code, f"errno {code}")
        return StoreError(f"could not write {path}: {os.strerror(code)} ({name}); fix the cause and {again}")
    return StoreError(f"could not write {path}: {_first_line(e)}")


def close_after_failure(h5: h5py.File | None) -> None:
    """Close an HDF5 file without writing another byte to it.

    After a failed write (ENOSPC, EIO) HDF5's cached metadata is in an undefined state: flushing it again (an
    ordinary close, or HDF5's own cleanup at interpreter exit) fails again ("Slist already enabled?") and can
    crash the process. So the file's descriptor is first pointed at /dev/null and the close flushes into
    nothing; the file on disk stays as the last successful flush left it, and a resume validates it."""
    if h5 is None or not h5.id or not h5.id.valid:
        return
    try:
        fd = h5.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, int(fd))
        finally:
            os.close(null)
    except Exception:  # not the sec2 driver: an ordinary close is the best that can be done
        pass
    try:
        h5.close()
    except Exception:  # h5py can raise on close after an error; the file is gone from HDF5 either way
        pass


def _open_for_writing(path: Path, mode: str) -> h5py.File:
    """No raw-data chunk cache: every write reaches the file inside the call that makes it, so a failure is
    raised there. With a cache, checksummed chunks are written when a dataset handle is garbage-collected, where
    h5py can only print the error and go on ("Exception ignored in __dealloc__"), and HDF5 is left in a state in
    which no later close succeeds and the interpreter crashes at exit."""
    return h5py.File(path, mode, rdcc_nbytes=0)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # folders on some filesystems cannot be synced; a file that cannot is a real failure
        if path.is_file():
            raise
        log.debug("fsync %s: %s", path, e)
    finally:
        os.close(fd)


def read_checked(path: Path, d: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """d[sel], with a failed read (checksum mismatch, damaged metadata) turned into one line saying what to do."""
    try:
        return d[sel]
    except (OSError, RuntimeError) as e:
        msg = str(e).lower()
        why = "checksum failed" if "filter" in msg or "checksum" in msg else f"cannot read ({_first_line(e)})"
        raise StoreError(f"{path} is corrupt ({why} reading {d.name}); delete it and extract again") from e


def fixed_strings(values: list[str], width: int = 1) -> np.ndarray:
    """Fixed-length UTF-8 bytes, at least `width` wide: HDF5 checksums only fixed-size types."""
    enc = [v.encode() for v in values]
    return np.array(enc, dtype=f"S{max([width, 1, *map(len, enc)])}")


def _decode(a: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in a.tolist()]


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk for rows of `row_bytes` bytes: about 256 KiB, at most 4096 rows."""
    return max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // max(1, row_bytes)))


def _create(g: h5py.Group, name: str, shape=None, dtype=None, data=None, rows: int | None = None) -> h5py.Dataset:
    """A chunked, fletcher32-checksummed dataset, resizable along rows (chunking needs that for empty ones)."""
    if data is not None:
        data = np.asarray(data)
        shape, dtype = data.shape, data.dtype
    rows = rows or chunk_rows(int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
    chunks = (max(1, min(shape[0], rows)), *shape[1:])
    return g.create_dataset(
        name, shape, dtype=dtype, data=data, maxshape=(None, *shape[1:]), chunks=chunks, fletcher32=True
    )


def _fit_strings(g: h5py.Group, name: str, values: np.ndarray) -> h5py.Dataset:
    """The string dataset `name`, rebuilt wider if `values` do not fit its fixed width (rare: widths are sized
    from the item list up front)."""
    d = g[name]
    if values.dtype.itemsize <= d.dtype.itemsize:
        return d
    old = d[()].astype(values.dtype)
    del g[name]
    new = _create(g, name, old.shape, values.dtype, rows=d.chunks[0])
    new[...] = old
    return new


def check_fingerprint(found: dict[str, Any], expect: dict[str, Any] | None, where: str) -> None:
    """Raise FingerprintMismatch naming the first field of `expect` that differs from `found`."""
    for key, want in (expect or {}).items():
        have = found.get(key)
        if str(have) != str(want):
            hint = (
                "re-extract with this featcache version"
                if key == "featcache_version"
                else "re-extract (featcache extract ... --overwrite) or ask for the store that matches"
            )
            raise FingerprintMismatch(
                f"{where}: fingerprint field '{key}' differs: store has {_short(have)}, expected {_short(want)}; {hint}"
            )


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 90 else s[:87] + "...'"


@dataclass
class SplitData:
    """One split as tensors: features [N, D], labels [N] (and, if stored, augmented views [N, V, D] and the norms
    of the raw views [N, V]: raw view = aug x aug_norms)."""

    features: torch.Tensor
    labels: torch.Tensor
    aug: torch.Tensor | None = None
    aug_norms: torch.Tensor | None = None


class Store:
    """Read access to a complete store. Use `Store.open(path, expect=...)`."""

    inputs = "features"  # what split()/rows() read: the unit-norm features, or (a view) "pre-projection"

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        self.fingerprint = read_fingerprint(h5.attrs)
        self.extra = json.loads(_attr(h5.attrs.get("extra", "{}")))

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any] | None = None) -> Store:
        path = Path(path).expanduser()
        if not path.exists():
            part = partial_path(path)
            if part.exists():
                raise StoreError(f"{path}: extraction did not finish; rerun the same extract command to resume it")
            raise StoreError(f"no feature store at {path}; create it with `featcache extract` or `featcache import`")
        try:
            h5 = h5py.File(path, "r")
        except OSError as e:
            raise StoreError(f"{path}: not a readable HDF5 store ({e}); delete it and extract again") from e
        fmt = _attr(h5.attrs.get("format"))
        if fmt is not None and str(fmt) not in READABLE_FORMATS and h5.attrs.get("complete", False):
            h5.close()
            raise StoreError(
                f"{path}: written in store format {fmt} by an older featcache; this one reads formats "
                f"{', '.join(READABLE_FORMATS)} (checksummed); rebuild it: rerun the same `featcache extract` (or "
                "`featcache import`) with --overwrite"
            )
        if str(fmt) not in READABLE_FORMATS or not h5.attrs.get("complete", False):
            h5.close()
            raise StoreError(f"{path}: not a complete featcache store; delete it and extract again")
        store = cls(path, h5)
        try:
            check_fingerprint(store.fingerprint, expect, str(path))
        except FingerprintMismatch:
            h5.close()
            raise
        return store

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if s in self._h5.get("splits", {})]

    @property
    def task(self) -> str:
        return self.extra.get("task", "classification")

    @property
    def classnames(self) -> list[str]:
        if "classnames" not in self._h5:
            return []
        return _decode(self._read(self._h5["classnames"]))

    @property
    def templates(self) -> list[str]:
        if "text" not in self._h5:
            return []
        return json.loads(_attr(self._h5["text/features"].attrs["templates"]))

    @property
    def dim(self) -> int:
        if "text" in self._h5:
            return int(self._h5["text/features"].shape[-1])
        return int(next(iter(self._h5["splits"].values()))["features"].shape[-1])

    def retrieval_set(self, split: str, device: str | torch.device = "cpu"):
        """A retrieval split as a featcache.retrieval.RetrievalSet (frames grouped per item, captions)."""
        from .retrieval import make_set

        g = self._group(split)
        if "captions" not in g:
            raise StoreError(f"{self.path}: not a retrieval store (no captions); extract a retrieval dataset")
        c = g["captions"]

        def read(d: h5py.Dataset) -> torch.Tensor:
            a = self._read(d)
            return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a).to(device)

        return make_set(
            read(g["features"]),
            read(g["labels"]),
            read(c["features"]),
            read(c["item"]),
            int(g["items"].shape[0]),
            bool(self.extra.get("video", False)),
        )

    def num_captions(self, split: str) -> int:
        g = self._group(split)
        return int(g["captions/item"].shape[0]) if "captions" in g else 0

    def _group(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise StoreError(f"{self.path}: no '{split}' split (it has: {', '.join(self.splits) or 'none'})")
        return self._h5["splits"][split]

    def num_rows(self, split: str) -> int:
        return int(self._group(split)["labels"].shape[0])

    # -- which image tensors split()/rows() read ------------------------------------------------------
    @property
    def has_pre_projection(self) -> bool:
        return "projection" in self._h5

    def pre_projection_view(self) -> Store:
        """This store as a method on pre-projection features reads it (ProLIP): split() and rows() return the raw
        pooled features before the last visual projection (features [N, W], aug [N, V, W]). It shares this
        store's open file: close the store, not the view."""
        if not self.has_pre_projection:
            raise StoreError(f"{self.path} holds no pre-projection features; {PRE_PROJECTION_FIX}")
        view = copy.copy(self)
        view.inputs = "pre-projection"
        return view

    def _names(self) -> tuple[str, str]:
        return ("pre", "pre_aug") if self.inputs == "pre-projection" else ("features", "aug")

    def pre_features(self, split: str, device: str | torch.device = "cpu", aug: bool = True) -> SplitData:
        """A split's raw pre-projection features [N, W] (and views [N, V, W]) as float32."""
        return self.pre_projection_view().split(split, device, aug)

    def projection(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's last visual projection as (weight [W, D], bias [D]) float32: features are
        normalize(pre @ weight + bias) (ViT: visual.proj, bias 0; ResNet: attnpool.c_proj's weight.T and bias)."""
        if not self.has_pre_projection:
            raise StoreError(f"{self.path} holds no projection matrix; {PRE_PROJECTION_FIX}")
        g = self._h5["projection"]
        return tuple(
            torch.from_numpy(self._read(g[n])).to(device=device, dtype=torch.float32) for n in ("weight", "bias")
        )

    def projection_source(self) -> str | None:
        return _attr(self._h5["projection"].attrs.get("source")) if self.has_pre_projection else None

    def split(self, split: str, device: str | torch.device = "cpu", aug: bool = True) -> SplitData:
        """Read a whole split as float32 tensors (fast: one contiguous read per dataset)."""
        g = self._group(split)
        feat_name, aug_name = self._names()
        self._need(g, feat_name, split)
        feats = torch.from_numpy(self._read(g[feat_name])).to(device=device, dtype=torch.float32)
        labels = torch.from_numpy(self._read(g["labels"]).astype(np.int64)).to(device)
        views = norms = None
        if aug and aug_name in g:
            views = torch.from_numpy(self._read(g[aug_name])).to(device=device, dtype=torch.float32)
            if self.inputs == "features" and "aug_norms" in g:
                norms = torch.from_numpy(self._read(g["aug_norms"])).to(device=device, dtype=torch.float32)
        return SplitData(feats, labels, views, norms)

    def _need(self, g: h5py.Group, name: str, split: str) -> None:
        if name not in g:  # a pre-projection store whose split was added by an extraction without it
            raise StoreError(f"{self.path}: split '{split}' has no pre-projection features; {PRE_PROJECTION_FIX}")

    def labels(self, split: str) -> torch.Tensor:
        """Labels only: cheap even for ImageNet's 1.28M training rows."""
        return torch.from_numpy(self._read(self._group(split)["labels"]).astype(np.int64))

    def rows(self, split: str, rows: list[int], device: str | torch.device = "cpu", aug: bool = True) -> SplitData:
        """Some rows of a split, in the order given; only those rows are read from disk (a 16-shot draw reads
        16 rows per class, not the whole split)."""
        g = self._group(split)
        feat_name, aug_name = self._names()
        self._need(g, feat_name, split)
        if not rows:
            d = int(g[feat_name].shape[1])
            empty = torch.empty(0, d, device=device)
            return SplitData(empty, torch.empty(0, dtype=torch.long, device=device), None)
        idx = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5py reads increasing, unique indices

        def read(name: str) -> torch.Tensor:
            return torch.from_numpy(self._read_rows(g[name], uniq)[inverse])

        feats = read(feat_name).to(device=device, dtype=torch.float32)
        labels = read("labels").long().to(device)
        views = read(aug_name).to(device=device, dtype=torch.float32) if aug and aug_name in g else None
        norms = None
        if views is not None and self.inputs == "features" and "aug_norms" in g:
            norms = read("aug_norms").to(device=device, dtype=torch.float32)
        return SplitData(feats, labels, views, norms)

    def ids(self, split: str) -> list[str]:
        return _decode(self._read(self._group(split)["ids"]))

    def skipped(self, split: str) -> list[tuple[str, str]]:
        g = self._group(split)
        if "skipped" not in g:
            return []
        rows = _decode(self._read(g["skipped"]))
        return [tuple(r.split("\t", 1)) for r in rows]  # type: ignore[misc]

    def norms(self, split: str) -> torch.Tensor | None:
        """[N] norms of the raw image features (raw = features x norms), None in a store without them."""
        g = self._group(split)
        return torch.from_numpy(self._read(g["norms"])) if "norms" in g else None

    def augment_views(self, split: str = "train") -> int:
        g = self._group(split)
        return int(g["aug"].shape[1]) if "aug" in g else 0

    def text(self, template: str | None = None) -> torch.Tensor:
        """Class text features [C, D]: the dataset's own template (None), 'ensemble', or a template string."""
        if template == "ensemble":
            return torch.from_numpy(self._read(self._h5["text/ensemble"]))
        temps = self.templates
        if template is None:
            idx = 0
        elif template in temps:
            idx = temps.index(template)
        else:
            raise StoreError(f"{self.path}: no text features for template {template!r}; stored: {temps}")
        return torch.from_numpy(self._read(self._h5["text/features"], idx))

    def text_all(self) -> torch.Tensor:
        return torch.from_numpy(self._read(self._h5["text/features"]))

    def _read_rows(self, d: h5py.Dataset, uniq: np.ndarray) -> np.ndarray:
        """Rows `uniq` (increasing, unique) of a chunked dataset, reading only the chunks that hold them: each run
        of consecutive touched chunks is one slice, and the rows are picked from it in memory. h5py's own
        fancy indexing builds one selection per row, which costs more than the bytes themselves (a 16-shot draw
        from ImageNet's 1.28M rows took seconds); here the cost follows the chunks touched."""
        per = d.chunks[0] if d.chunks else d.shape[0]
        chunk = uniq // per
        runs = np.split(np.arange(len(uniq)), np.flatnonzero(np.diff(chunk) > 1) + 1)
        if len(runs) * _CALL_BYTES >= d.size * d.dtype.itemsize:  # small (labels, ids): one read beats many calls
            return self._read(d)[uniq]
        out = np.empty((len(uniq), *d.shape[1:]), dtype=d.dtype)
        for run in runs:
            lo, hi = int(chunk[run[0]]) * per, min(d.shape[0], (int(chunk[run[-1]]) + 1) * per)
            out[run] = self._read(d, np.s_[lo:hi])[uniq[run] - lo]
        return out

    def _read(self, d: h5py.Dataset, sel: Any = ()) -> np.ndarray:
        """Every read goes through here: a checksum failure becomes a StoreError naming the store and dataset."""
        return read_checked(self.path, d, sel)

    def summary(self) -> dict[str, Any]:
        """What `featcache ls/info` print: fingerprint, classes, splits and counts, size on disk."""
        return {
            "path": str(self.path),
            **self.fingerprint,
            "classes": len(self.classnames),
            "dim": self.dim,
            "splits": {s: self.num_rows(s) for s in self.splits},
            **({"captions": {s: self.num_captions(s) for s in self.splits}} if self.task == "retrieval" else {}),
            "augment_views": {s: self.augment_views(s) for s in self.splits if self.augment_views(s)},
            "skipped": {s: len(self.skipped(s)) for s in self.splits if self.skipped(s)},
            **(
                {"projection": {"source": self.projection_source(), "shape": list(self._h5["projection/weight"].shape)}}
                if self.has_pre_projection
                else {}
            ),
            "templates": len(self.templates),
            "size_mb": round(self.path.stat().st_size / 2**20, 2),
            **({"extra": self.extra} if self.extra else {}),
        }


def read_fingerprint(attrs: Any) -> dict[str, Any]:
    """The fingerprint fields of a file's attributes; a field newer than the file takes FINGERPRINT_DEFAULTS."""
    out = {k: _attr(attrs.get(k)) for k in FINGERPRINT_FIELDS}
    return {k: FINGERPRINT_DEFAULTS[k] if v is None and k in FINGERPRINT_DEFAULTS else v for k, v in out.items()}


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


class StoreWriter:
    """Builds a store under `<path>.partial`; resumes an interrupted build; renames into place on `finalize`.

    The writer holds `<path>.lock` from construction to `finalize`/`close`/`discard`, and touches the partial
    file (opens, deletes, renames it) only while holding it: a second writer is refused up front.

    Resuming: each split group records `items_done` (items consumed from the split's list), `rows_done` (rows
    written; fewer when --skip-bad drops items) and `batch_start` (first row of the last batch). They are
    updated only after a batch's data is written and flushed, so a killed run loses at most the batch in flight
    and a rerun recomputes exactly that. A partial is resumed only after `partial_problem` finds it sound.

    After any failed write the file is closed without another byte written (`close_after_failure`) and the
    error is raised as one StoreError line naming the real OS error.

    `overwrite` never deletes the existing store: the new one is built from scratch in the partial and replaces
    the old one only at `finalize`, so a run that fails (or is refused) leaves the old store as it was.
    `resume=False` always starts the partial over (imports write in one go).
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = True,
        what: str = "featcache extract",
    ):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.fingerprint = {k: str(fingerprint.get(k, FINGERPRINT_DEFAULTS.get(k, ""))) for k in FINGERPRINT_FIELDS}
        self.resumed = False
        self.resumable = resume
        self.h5: h5py.File | None = None
        self._failed = False
        self.lock = StoreLock(self.path, what).acquire()
        try:
            self.h5 = self._open(extra, overwrite)
        except BaseException as e:
            self.lock.release()
            if not isinstance(e, FeatcacheError) and os_errno(e) is not None:  # e.g. no space for the copy
                raise write_error(e, self.path, self.resumable) from e
            raise

    def _open(self, extra: dict[str, Any] | None, overwrite: bool) -> h5py.File:
        if self.tmp.exists():
            problem = partial_problem(self.tmp, self.fingerprint) if self.resumable else None
            if self.resumable and problem is None:
                self.resumed = True
                return _open_for_writing(self.tmp, "a")
            if problem is not None:
                log.warning("discarding %s %s (%s); starting over", problem[0], self.tmp.name, problem[1])
            self.tmp.unlink()  # we hold the lock: this partial is no live run's
        if self.path.exists() and not overwrite:
            try:
                with h5py.File(self.path, "r") as old:
                    found = read_fingerprint(old.attrs)
                    fmt = _attr(old.attrs.get("format"))
            except OSError as e:
                raise StoreError(f"{self.path}: not a readable HDF5 store ({e}); pass --overwrite to rebuild it") from e
            if str(fmt) != str(FORMAT):
                raise StoreError(
                    f"{self.path} was written in store format {fmt} by an older featcache (this one writes format "
                    f"{FORMAT}, checksummed); pass --overwrite to rebuild it"
                )
            try:
                check_fingerprint(found, self.fingerprint, str(self.path))
            except FingerprintMismatch as e:
                raise FingerprintMismatch(str(e).split("; ")[0] + "; pass --overwrite to rebuild it") from None
            # add splits to a complete store: work on a copy so the complete file stays intact until the end
            shutil.copyfile(self.path, self.tmp)
            h5 = _open_for_writing(self.tmp, "a")
            attrs = {"complete": False}
        else:
            h5 = _open_for_writing(self.tmp, "w")  # --overwrite too: a fresh file; the old store stays until finalize
            attrs = {"format": str(FORMAT), "complete": False, **self.fingerprint}
            attrs["extra"] = json.dumps(extra or {}, sort_keys=True)
        try:
            h5.attrs.update(attrs)
            h5.flush()
        except BaseException:
            close_after_failure(h5)
            raise
        return h5

    @contextmanager
    def _writing(self):
        """Around every write: after a failure the file is closed untouched and the error becomes one line."""
        if self._failed or self.h5 is None:
            raise StoreError(f"{self.tmp}: an earlier write failed; rerun the same command")
        try:
            yield
        except FeatcacheError:
            raise  # a refused value (shapes, incomplete splits): nothing was written
        except Exception as e:
            self._failed = True
            close_after_failure(self.h5)
            if isinstance(e, (OSError, RuntimeError)):  # what h5py and the OS raise
                raise write_error(e, self.path, self.resumable) from e
            raise

    # -- class names and text ------------------------------------------------------------------------
    def has_text(self) -> bool:
        return "text" in self.h5 and "ensemble" in self.h5["text"]

    def write_text(
        self,
        classnames: list[str],
        templates: list[str],
        features: torch.Tensor,
        ensemble_templates: list[str] | None = None,
    ) -> None:
        """features [T, C, D] unit-norm; the ensemble averages the listed templates' features and renormalises."""
        T, C, _ = features.shape
        if len(templates) != T or len(classnames) != C:
            raise StoreError(f"text features {tuple(features.shape)} do not match {T} templates x {C} classes")
        ens = ensemble_templates or templates
        idx = [templates.index(t) for t in ens]
        ensemble = torch.nn.functional.normalize(features[idx].float().mean(0), dim=-1).cpu().numpy()
        per_template = features.float().cpu().numpy()
        with self._writing():
            for name in ("classnames", "text"):
                if name in self.h5:
                    del self.h5[name]
            _create(self.h5, "classnames", data=fixed_strings(classnames))
            g = self.h5.create_group("text")
            d = _create(g, "features", data=per_template, rows=1)  # one template per chunk
            d.attrs["templates"] = json.dumps(templates)
            e = _create(g, "ensemble", data=ensemble)
            e.attrs["ensemble_templates"] = json.dumps(ens)
            self.h5.flush()

    def has_projection(self) -> bool:
        return "projection" in self.h5

    def write_projection(self, weight: torch.Tensor, bias: torch.Tensor | None, source: str) -> None:
        """The last visual projection, as features = normalize(pre @ weight + bias): weight [W, D], bias [D]."""
        w = weight.detach().float().cpu().numpy()
        b = np.zeros(w.shape[1], np.float32) if bias is None else bias.detach().float().cpu().numpy()
        if w.ndim != 2 or b.shape != (w.shape[1],) or not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise StoreError(f"projection must be a finite [W, D] weight with a [D] bias; got {w.shape}, {b.shape}")
        with self._writing():
            if "projection" in self.h5:
                del self.h5["projection"]
            g = self.h5.create_group("projection")
            _create(g, "weight", data=w)
            _create(g, "bias", data=b)
            g.attrs["source"] = source
            self.h5.flush()

    # -- image features ------------------------------------------------------------------------------
    def split_state(self, split: str) -> tuple[int, int, bool]:
        """(items_done, rows_done, complete) for a split; (0, 0, False) if it was never started."""
        g = self.h5.get("splits", {}).get(split) if "splits" in self.h5 else None
        if g is None:
            return 0, 0, False
        return int(g.attrs["items_done"]), int(g.attrs["rows_done"]), bool(g.attrs["complete"])

    def begin_split(
        self,
        split: str,
        n_items: int,
        dim: int,
        aug_views: int = 0,
        id_width: int = 16,
        norms: bool = False,
        pre_dim: int = 0,
    ) -> int:
        """Create (or reopen) a split sized for n_items rows; return how many items are already done.
        `id_width`: bytes of the longest item id (wider ids still fit, at the cost of a rewrite). `norms`: also
        keep the raw features' norms (and the views'); `pre_dim`: also keep pre-projection features of that width.
        Every batch must then bring them (write_batch refuses one that does not)."""
        with self._writing():
            splits = self.h5.require_group("splits")
            if split in splits:
                g = splits[split]
                same = int(g.attrs["n_items"]) == n_items and int(g["features"].shape[1]) == dim
                same = same and ("norms" in g) == norms and (int(g["pre"].shape[1]) if "pre" in g else 0) == pre_dim
                if same:
                    return int(g.attrs["items_done"])
                del splits[split]  # the item list changed (new split file?): this split starts over
            g = splits.create_group(split)
            dtype = np.float16 if self.fingerprint["dtype"] == "float16" else np.float32
            _create(g, "features", (n_items, dim), dtype)
            _create(g, "labels", (n_items,), np.int64)
            _create(g, "ids", (n_items,), f"S{max(1, id_width)}")
            if aug_views:
                _create(g, "aug", (n_items, aug_views, dim), dtype)
            if norms:
                _create(g, "norms", (n_items,), np.float32)
                if aug_views:
                    _create(g, "aug_norms", (n_items, aug_views), np.float32)
            if pre_dim:
                _create(g, "pre", (n_items, pre_dim), dtype)
                if aug_views:
                    _create(g, "pre_aug", (n_items, aug_views, pre_dim), dtype)
            g.attrs.update({"n_items": n_items, "items_done": 0, "rows_done": 0, "batch_start": 0, "complete": False})
            self.h5.flush()
            return 0

    def write_batch(
        self,
        split: str,
        n_items: int,
        features: torch.Tensor,
        labels: torch.Tensor | np.ndarray,
        ids: list[str],
        aug: torch.Tensor | None = None,
        skipped: list[tuple[str, str]] | None = None,
        *,
        norms: torch.Tensor | None = None,
        aug_norms: torch.Tensor | None = None,
        pre: torch.Tensor | None = None,
        pre_aug: torch.Tensor | None = None,
    ) -> None:
        """Append the rows of a batch that consumed `n_items` items (rows < items when items were skipped).
        `norms` [B] / `aug_norms` [B, V]: raw-feature norms; `pre` [B, W] / `pre_aug` [B, V, W]: pre-projection
        features; each exactly when begin_split created its dataset."""
        # off the device first: an error there (CUDA) is not a write error and must not abandon the file
        given = {"features": features, "aug": aug, "norms": norms, "aug_norms": aug_norms, "pre": pre,
                 "pre_aug": pre_aug}  # fmt: skip
        arrays = {k: v.detach().cpu().numpy() for k, v in given.items() if v is not None and len(ids)}
        with self._writing():
            g = self.h5["splits"][split]
            if len(ids):  # refused before a byte is written: a missing dataset would leave rows of zeros
                for name in ("aug", "norms", "aug_norms", "pre", "pre_aug"):
                    if (name in g) != (name in arrays):
                        what = "brings" if name in arrays else "lacks"
                        why = "has no such dataset" if name in arrays else "keeps one, so every batch must bring it"
                        raise StoreError(f"a batch for split '{split}' {what} '{name}' but the split {why}")
                for name in ("pre", "pre_aug"):
                    if name in arrays and g[name].dtype == np.float16 and np.abs(arrays[name]).max() >= 65504:
                        raise StoreError("pre-projection features exceed float16's range; extract with --dtype float32")
            r0 = int(g.attrs["rows_done"])
            r1 = r0 + len(ids)
            if len(ids):
                g["labels"][r0:r1] = np.asarray(labels, dtype=np.int64)
                names = fixed_strings(ids)
                _fit_strings(g, "ids", names)[r0:r1] = names
                for name, a in arrays.items():
                    g[name][r0:r1] = a.astype(g[name].dtype, copy=False)
            if skipped:
                rows = fixed_strings([f"{i}\t{err}" for i, err in skipped], 64)
                if "skipped" not in g:
                    _create(g, "skipped", (0,), rows.dtype, rows=256)
                d = _fit_strings(g, "skipped", rows)
                k = int(g.attrs["items_done"]) - r0  # items skipped by the batches already counted
                d.resize((k + len(rows),))  # a torn earlier try of this batch is overwritten, not appended to
                d[k:] = rows
            self.h5.flush()
            g.attrs["items_done"] = int(g.attrs["items_done"]) + n_items
            g.attrs["rows_done"] = r1
            g.attrs["batch_start"] = r0
            self.h5.flush()

    # -- retrieval captions ----------------------------------------------------------------------------
    def begin_captions(
        self, split: str, captions: list[str], caption_item: list[int], items: list[str], dim: int
    ) -> int:
        """Create (or reopen) a split's caption table; return how many caption embeddings are already written."""
        with self._writing():
            g = self.h5["splits"][split]
            if "captions" in g:
                c = g["captions"]
                if c["item"].shape[0] == len(captions) and c["features"].shape[1] == dim:
                    return int(c.attrs["done"])
                del g["captions"]
            if "items" in g:
                del g["items"]
            _create(g, "items", data=fixed_strings(items))
            c = g.create_group("captions")
            # float32 whatever the image dtype: captions are few next to the images, and float16 would cost
            # recall ties that a float32 evaluation (CLIP_benchmark) does not have
            _create(c, "features", (len(captions), dim), np.float32)
            _create(c, "item", data=np.asarray(caption_item, dtype=np.int64))
            _create(c, "text", data=fixed_strings(captions))
            c.attrs.update({"done": 0, "batch_start": 0, "complete": len(captions) == 0})
            self.h5.flush()
            return 0

    def write_captions(self, split: str, features: torch.Tensor) -> None:
        """Append the next batch of caption embeddings (resumable like image batches)."""
        feats = features.detach().cpu().numpy()
        with self._writing():
            c = self.h5["splits"][split]["captions"]
            r0 = int(c.attrs["done"])
            c["features"][r0 : r0 + len(features)] = feats.astype(c["features"].dtype)
            self.h5.flush()
            c.attrs["done"] = r0 + len(features)
            c.attrs["batch_start"] = r0
            c.attrs["complete"] = r0 + len(features) == c["item"].shape[0]
            self.h5.flush()

    def finish_split(self, split: str) -> None:
        with self._writing():
            g = self.h5["splits"][split]
            rows = int(g.attrs["rows_done"])
            for name in ROW_DATASETS:
                if name in g and g[name].shape[0] != rows:
                    d = g[name]
                    d.resize((rows, *d.shape[1:]))
            g.attrs["complete"] = True
            self.h5.flush()

    def finalize(self) -> Path:
        """Check every split is complete, then atomically rename the partial file into place (replacing an
        older store only now) and release the lock."""
        with self._writing():
            for name, g in self.h5.get("splits", {}).items():
                if not g.attrs["complete"] or ("captions" in g and not g["captions"].attrs["complete"]):
                    raise StoreError(f"split '{name}' is incomplete; cannot finalize {self.path}")
            if not self.has_text() and json.loads(self.h5.attrs["extra"]).get("task") != "retrieval":
                raise StoreError(f"no text features written; cannot finalize {self.path}")
            if self.fingerprint["pre_projection"] == "on" and not self.has_projection():
                raise StoreError(f"no projection matrix written; cannot finalize {self.path}")
            self.h5.attrs["complete"] = True
            self.h5.close()
            _fsync(self.tmp)  # on disk before it is renamed complete: a power cut leaves old or new, never half
            os.replace(self.tmp, self.path)
            _fsync(self.path.parent)
        self.lock.release()
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays for a later resume) and release the lock. Never
        raises: it runs while another error is on its way out."""
        try:
            if not self._failed and self.h5 is not None and self.h5.id and self.h5.id.valid:
                try:
                    self.h5.close()
                except Exception:
                    self._failed = True
                    close_after_failure(self.h5)
        finally:
            self.lock.release()

    def discard(self) -> None:
        """Close and delete the partial file, still under the lock (never another process's file)."""
        try:
            self._failed = True
            close_after_failure(self.h5)
            self.tmp.unlink(missing_ok=True)
        finally:
            self.lock.release()


def partial_problem(tmp: Path, fingerprint: dict[str, str]) -> tuple[str, str] | None:
    """Why a `.partial` left by an earlier run must not be resumed, as ("damaged" | "unfinished", reason), or
    None if it can be.

    A hard kill, a full disk or an I/O error can leave the file unreadable, its counts ahead of its data, or the
    chunk holding the last committed rows torn (a failed batch rewrites that chunk). So: it must open, have this
    format and fingerprint, counts consistent with the dataset shapes, and the last batch's rows (which include
    that chunk) plus the small datasets must read back with valid checksums."""
    try:
        with h5py.File(tmp, "r") as h5:
            if str(_attr(h5.attrs.get("format"))) != str(FORMAT):
                return "unfinished", f"store format {_attr(h5.attrs.get('format'))}, not {FORMAT}"
            try:
                check_fingerprint(read_fingerprint(h5.attrs), fingerprint, "")
            except FingerprintMismatch as e:
                return "unfinished", "made with other settings: " + str(e).split(": ", 1)[-1].split("; ")[0]
            damage = _damage(h5)
            return None if damage is None else ("damaged", damage)
    except Exception as e:  # unreadable: truncated, overwritten, "addr overflow" after a failed flush
        msg = _first_line(e)
        return "damaged", "checksum failed" if "filter returned failure" in msg else msg


def _damage(h5: h5py.File) -> str | None:
    for name in ("classnames", "text/features", "text/ensemble", "projection/weight", "projection/bias"):
        if name in h5:
            h5[name][()]
    for s, g in h5.get("splits", {}).items():
        n, items, rows = (int(g.attrs[k]) for k in ("n_items", "items_done", "rows_done"))
        start, complete = int(g.attrs.get("batch_start", 0)), bool(g.attrs["complete"])
        if not (0 <= rows <= items <= n and 0 <= start <= rows) or (complete and items != n):
            return f"split '{s}' counts are inconsistent ({items}/{n} items, {rows} rows)"
        lo = max(0, min(start, rows - 1))
        for name in ROW_DATASETS:
            if name not in g:
                if name not in ("features", "labels", "ids"):  # the optional ones
                    continue
                return f"split '{s}' has no {name}"
            size = g[name].shape[0]
            if size < rows or (complete and size != rows):
                return f"split '{s}' {name} holds {size} rows, its counts say {rows}"
            g[name][lo:rows]
        if "skipped" in g and g["skipped"].shape[0] < items - rows:
            return f"split '{s}' records fewer skipped items than it skipped"
        for name in ("skipped", "items"):
            if name in g:
                g[name][()]
        if "captions" in g:
            c = g["captions"]
            m, done, cs = int(c["item"].shape[0]), int(c.attrs["done"]), int(c.attrs.get("batch_start", 0))
            if not (0 <= cs <= done <= m) or c["features"].shape[0] != m or c["text"].shape[0] != m:
                return f"split '{s}' caption counts are inconsistent"
            c["features"][max(0, min(cs, done - 1)) : done]
            c["item"][()]
            c["text"][()]
    return None
