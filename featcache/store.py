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
  /splits/<s>/skipped   [M] str, "<id>\t<error>" for items dropped by --skip-bad

Retrieval stores (attr extra = {"task": "retrieval", "video": ...}) have no class names or text group; each
split's rows are the frames (one per image) with `labels` = the index of their item, plus
  /splits/<s>/items             [N] str, item ids (image path or video id) in annotation order
  /splits/<s>/captions/features [M, D] unit-norm caption embeddings (the image dtype)
  /splits/<s>/captions/item     [M] int64, the item each caption describes
  /splits/<s>/captions/text     [M] str

A store is trusted because its fingerprint matches, never because the file exists. Writers work on
`<name>.partial` and rename it into place only when every split is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .errors import FingerprintMismatch, StoreError

FORMAT = 1
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
)
_STR = h5py.string_dtype()
log = logging.getLogger(__name__)
_CHUNK_ROWS = 4096


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATCACHE_HOME", "~/.cache/featcache")).expanduser()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


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
    """One split as tensors: features [N, D], labels [N] (and, if stored, augmented views [N, V, D])."""

    features: torch.Tensor
    labels: torch.Tensor
    aug: torch.Tensor | None = None


class Store:
    """Read access to a complete store. Use `Store.open(path, expect=...)`."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        self.fingerprint = {k: _attr(h5.attrs.get(k)) for k in FINGERPRINT_FIELDS}
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
        if _attr(h5.attrs.get("format")) != str(FORMAT) or not h5.attrs.get("complete", False):
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
        return [c.decode() if isinstance(c, bytes) else c for c in self._h5["classnames"][()]]

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
            a = d[()]
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

    def split(self, split: str, device: str | torch.device = "cpu", aug: bool = True) -> SplitData:
        """Read a whole split as float32 tensors (fast: one contiguous read per dataset)."""
        g = self._group(split)
        feats = torch.from_numpy(g["features"][()]).to(device=device, dtype=torch.float32)
        labels = torch.from_numpy(g["labels"][()].astype(np.int64)).to(device)
        views = None
        if aug and "aug" in g:
            views = torch.from_numpy(g["aug"][()]).to(device=device, dtype=torch.float32)
        return SplitData(feats, labels, views)

    def labels(self, split: str) -> torch.Tensor:
        """Labels only: cheap even for ImageNet's 1.28M training rows."""
        return torch.from_numpy(self._group(split)["labels"][()].astype(np.int64))

    def rows(self, split: str, rows: list[int], device: str | torch.device = "cpu", aug: bool = True) -> SplitData:
        """Some rows of a split, in the order given; only those rows are read from disk (a 16-shot draw reads
        16 rows per class, not the whole split)."""
        g = self._group(split)
        if not rows:
            d = int(g["features"].shape[1])
            empty = torch.empty(0, d, device=device)
            return SplitData(empty, torch.empty(0, dtype=torch.long, device=device), None)
        idx = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5py reads increasing, unique indices

        def read(name: str) -> torch.Tensor:
            return torch.from_numpy(g[name][uniq][inverse])

        feats = read("features").to(device=device, dtype=torch.float32)
        labels = read("labels").long().to(device)
        views = read("aug").to(device=device, dtype=torch.float32) if aug and "aug" in g else None
        return SplitData(feats, labels, views)

    def ids(self, split: str) -> list[str]:
        return [i.decode() if isinstance(i, bytes) else i for i in self._group(split)["ids"][()]]

    def skipped(self, split: str) -> list[tuple[str, str]]:
        g = self._group(split)
        if "skipped" not in g:
            return []
        rows = [s.decode() if isinstance(s, bytes) else s for s in g["skipped"][()]]
        return [tuple(r.split("\t", 1)) for r in rows]  # type: ignore[misc]

    def augment_views(self, split: str = "train") -> int:
        g = self._group(split)
        return int(g["aug"].shape[1]) if "aug" in g else 0

    def text(self, template: str | None = None) -> torch.Tensor:
        """Class text features [C, D]: the dataset's own template (None), 'ensemble', or a template string."""
        if template == "ensemble":
            return torch.from_numpy(self._h5["text/ensemble"][()])
        temps = self.templates
        if template is None:
            idx = 0
        elif template in temps:
            idx = temps.index(template)
        else:
            raise StoreError(f"{self.path}: no text features for template {template!r}; stored: {temps}")
        return torch.from_numpy(self._h5["text/features"][idx])

    def text_all(self) -> torch.Tensor:
        return torch.from_numpy(self._h5["text/features"][()])

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
            "templates": len(self.templates),
            "size_mb": round(self.path.stat().st_size / 2**20, 2),
            **({"extra": self.extra} if self.extra else {}),
        }


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


class StoreWriter:
    """Builds a store under `<path>.partial`; resumes an interrupted build; renames into place on `finalize`.

    Resuming: each split group records `items_done` (items consumed from the split's list) and `rows_done`
    (rows written; fewer when --skip-bad drops items). Both are updated only after a batch's data is written
    and flushed, so a killed run loses at most the batch in flight and a rerun recomputes exactly that.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any],
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.fingerprint = {k: str(fingerprint.get(k, "")) for k in FINGERPRINT_FIELDS}
        self.resumed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        h5 = None
        if self.tmp.exists():
            try:
                h5 = h5py.File(self.tmp, "a")
                check_fingerprint({k: _attr(h5.attrs.get(k)) for k in FINGERPRINT_FIELDS}, self.fingerprint, "")
                self.resumed = True
            except Exception as e:  # unreadable after a hard kill, or made with other settings: start over
                if h5 is not None:
                    h5.close()
                h5 = None
                log.warning("discarding unfinished %s (%s); starting it over", self.tmp.name, e)
                self.tmp.unlink()
        if h5 is None and self.path.exists():
            if overwrite:
                self.path.unlink()
            else:
                with h5py.File(self.path, "r") as old:
                    found = {k: _attr(old.attrs.get(k)) for k in FINGERPRINT_FIELDS}
                try:
                    check_fingerprint(found, self.fingerprint, str(self.path))
                except FingerprintMismatch as e:
                    raise FingerprintMismatch(str(e).split("; ")[0] + "; pass --overwrite to rebuild it") from None
        if h5 is None and self.path.exists():
            # add splits to a complete store: work on a copy so the complete file stays intact until the end
            shutil.copyfile(self.path, self.tmp)
            h5 = h5py.File(self.tmp, "a")
            h5.attrs["complete"] = False
        if h5 is None:
            h5 = h5py.File(self.tmp, "w")
            h5.attrs["format"] = str(FORMAT)
            h5.attrs["complete"] = False
            for k, v in self.fingerprint.items():
                h5.attrs[k] = v
            h5.attrs["extra"] = json.dumps(extra or {}, sort_keys=True)
        self.h5 = h5

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
        ensemble = torch.nn.functional.normalize(features[idx].float().mean(0), dim=-1)
        for name in ("classnames", "text"):
            if name in self.h5:
                del self.h5[name]
        self.h5.create_dataset("classnames", data=np.array(classnames, dtype=object), dtype=_STR)
        g = self.h5.create_group("text")
        d = g.create_dataset("features", data=features.float().cpu().numpy())
        d.attrs["templates"] = json.dumps(templates)
        e = g.create_dataset("ensemble", data=ensemble.cpu().numpy())
        e.attrs["ensemble_templates"] = json.dumps(ens)
        self.h5.flush()

    # -- image features ------------------------------------------------------------------------------
    def split_state(self, split: str) -> tuple[int, int, bool]:
        """(items_done, rows_done, complete) for a split; (0, 0, False) if it was never started."""
        g = self.h5.get("splits", {}).get(split) if "splits" in self.h5 else None
        if g is None:
            return 0, 0, False
        return int(g.attrs["items_done"]), int(g.attrs["rows_done"]), bool(g.attrs["complete"])

    def begin_split(self, split: str, n_items: int, dim: int, aug_views: int = 0) -> int:
        """Create (or reopen) a split sized for n_items rows; return how many items are already done."""
        splits = self.h5.require_group("splits")
        if split in splits:
            g = splits[split]
            if int(g.attrs["n_items"]) == n_items and int(g["features"].shape[1]) == dim:
                return int(g.attrs["items_done"])
            del splits[split]  # the item list changed (new split file?): this split starts over
        g = splits.create_group(split)
        dtype = np.float16 if self.fingerprint["dtype"] == "float16" else np.float32
        rows = max(1, min(n_items, _CHUNK_ROWS))
        g.create_dataset("features", (n_items, dim), dtype=dtype, maxshape=(None, dim), chunks=(rows, dim))
        g.create_dataset("labels", (n_items,), dtype=np.int64, maxshape=(None,), chunks=(rows,))
        g.create_dataset("ids", (n_items,), dtype=_STR, maxshape=(None,), chunks=(rows,))
        if aug_views:
            vrows = max(1, min(n_items, max(1, _CHUNK_ROWS // aug_views)))
            g.create_dataset(
                "aug", (n_items, aug_views, dim), dtype=dtype, maxshape=(None, aug_views, dim),
                chunks=(vrows, aug_views, dim),
            )  # fmt: skip
        g.attrs.update({"n_items": n_items, "items_done": 0, "rows_done": 0, "complete": False})
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
    ) -> None:
        """Append the rows of a batch that consumed `n_items` items (rows < items when items were skipped)."""
        g = self.h5["splits"][split]
        r0 = int(g.attrs["rows_done"])
        r1 = r0 + len(ids)
        if len(ids):
            g["features"][r0:r1] = features.detach().cpu().numpy().astype(g["features"].dtype, copy=False)
            g["labels"][r0:r1] = np.asarray(labels, dtype=np.int64)
            g["ids"][r0:r1] = np.array(ids, dtype=object)
            if aug is not None:
                g["aug"][r0:r1] = aug.detach().cpu().numpy().astype(g["aug"].dtype, copy=False)
        if skipped:
            rows = np.array([f"{i}\t{err}" for i, err in skipped], dtype=object)
            if "skipped" not in g:
                g.create_dataset("skipped", (0,), dtype=_STR, maxshape=(None,), chunks=(256,))
            d = g["skipped"]
            d.resize((d.shape[0] + len(rows),))
            d[-len(rows) :] = rows
        self.h5.flush()
        g.attrs["items_done"] = int(g.attrs["items_done"]) + n_items
        g.attrs["rows_done"] = r1
        self.h5.flush()

    # -- retrieval captions ----------------------------------------------------------------------------
    def begin_captions(
        self, split: str, captions: list[str], caption_item: list[int], items: list[str], dim: int
    ) -> int:
        """Create (or reopen) a split's caption table; return how many caption embeddings are already written."""
        g = self.h5["splits"][split]
        if "captions" in g:
            c = g["captions"]
            if c["item"].shape[0] == len(captions) and c["features"].shape[1] == dim:
                return int(c.attrs["done"])
            del g["captions"]
        if "items" in g:
            del g["items"]
        g.create_dataset("items", data=np.array(items, dtype=object), dtype=_STR)
        c = g.create_group("captions")
        dtype = np.float16 if self.fingerprint["dtype"] == "float16" else np.float32
        rows = max(1, min(len(captions), _CHUNK_ROWS))
        c.create_dataset("features", (len(captions), dim), dtype=dtype, chunks=(rows, dim))
        c.create_dataset("item", data=np.asarray(caption_item, dtype=np.int64))
        c.create_dataset("text", data=np.array(captions, dtype=object), dtype=_STR)
        c.attrs.update({"done": 0, "complete": len(captions) == 0})
        self.h5.flush()
        return 0

    def write_captions(self, split: str, features: torch.Tensor) -> None:
        """Append the next batch of caption embeddings (resumable like image batches)."""
        c = self.h5["splits"][split]["captions"]
        r0 = int(c.attrs["done"])
        c["features"][r0 : r0 + len(features)] = features.detach().cpu().numpy().astype(c["features"].dtype)
        self.h5.flush()
        c.attrs["done"] = r0 + len(features)
        c.attrs["complete"] = r0 + len(features) == c["item"].shape[0]
        self.h5.flush()

    def finish_split(self, split: str) -> None:
        g = self.h5["splits"][split]
        rows = int(g.attrs["rows_done"])
        for name in ("features", "labels", "ids", "aug"):
            if name in g and g[name].shape[0] != rows:
                d = g[name]
                d.resize((rows, *d.shape[1:]))
        g.attrs["complete"] = True
        self.h5.flush()

    def finalize(self) -> Path:
        """Check every split is complete, then atomically rename the partial file into place."""
        for name, g in self.h5.get("splits", {}).items():
            if not g.attrs["complete"] or ("captions" in g and not g["captions"].attrs["complete"]):
                raise StoreError(f"split '{name}' is incomplete; cannot finalize {self.path}")
        if not self.has_text() and json.loads(self.h5.attrs["extra"]).get("task") != "retrieval":
            raise StoreError(f"no text features written; cannot finalize {self.path}")
        self.h5.attrs["complete"] = True
        self.h5.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays for a later resume)."""
        if self.h5.id.valid:
            self.h5.close()
