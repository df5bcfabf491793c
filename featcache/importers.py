"""Bring features made elsewhere into an ordinary store: a plain .npz, or a Tip-Adapter cache folder."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .errors import StoreError
from .store import StoreWriter, default_cache_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def imported_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Imported stores are addressed by name: <cache_dir>/imported/<name>.h5."""
    if not _NAME_RE.match(name):
        raise StoreError(f"invalid store name {name!r}; use letters, digits, '.', '_' or '-'")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "imported" / f"{name}.h5"


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _as_float(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().float()
    if not torch.isfinite(t).all():
        raise StoreError(f"{what} contains NaN or infinite values")
    return t


def _labels(x, n: int, n_classes: int, what: str) -> np.ndarray:
    lab = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if lab.ndim == 2:  # one-hot
        lab = lab.argmax(1)
    lab = lab.astype(np.int64).reshape(-1)
    if len(lab) != n:
        raise StoreError(f"{what}: {len(lab)} labels for {n} feature rows")
    if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
        raise StoreError(f"{what}: labels must lie in 0..{n_classes - 1} (there are {n_classes} class names)")
    return lab


def write_imported(
    name: str,
    classnames: list[str],
    splits: dict[str, tuple[torch.Tensor, np.ndarray]],
    text: torch.Tensor,
    source_files: list[Path],
    source_kind: str,
    cache_dir: str | Path | None = None,
    backbone: str = "unknown",
    dtype: str = "float16",
    overwrite: bool = False,
    extra: dict | None = None,
    pre: dict[str, torch.Tensor] | None = None,
    projection: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Path:
    """Normalise and write features from elsewhere; the fingerprint ties the store to the source files.
    `pre` (per split, raw pre-projection features [N, W]) with `projection` (weight [W, D], bias [D] or None):
    what ProLIP trains on; every split must have them, and they must reproduce the features."""
    path = imported_path(name, cache_dir)
    if path.exists() and not overwrite:
        raise StoreError(f"a store named '{name}' already exists at {path}; pass --overwrite or pick another --name")
    C = len(classnames)
    if text.dim() == 2:
        text = text.unsqueeze(0)
    if text.dim() != 3 or text.shape[1] != C:
        raise StoreError(f"text features must be [C, D] or [T, C, D] with C = {C} classes; got {tuple(text.shape)}")
    D = text.shape[-1]
    for s, (f, _) in splits.items():
        if f.dim() != 2 or f.shape[1] != D:
            raise StoreError(f"{s} features must be [N, {D}] to match the text features; got {tuple(f.shape)}")
    if (pre is None) != (projection is None):
        raise StoreError("pre-projection features need the projection matrix and vice versa; give both or neither")
    if pre is not None:
        _check_pre(splits, pre, projection, D)
    fingerprint = {
        "featcache_version": __version__,
        "backbone": backbone,
        "weights": "unknown (imported)",
        "weights_sha256": _sha256_files(source_files),
        "preprocessing": "unknown (imported)",
        "precision": "unknown (imported)",
        "dataset": name,
        "manifest_sha256": hashlib.sha256(json.dumps(classnames).encode()).hexdigest(),
        "split_scheme": "imported",
        "augmentation": "unknown (imported)",
        "dtype": dtype,
        "pre_projection": "on" if pre is not None else "off",
    }
    # the old store (with --overwrite) is replaced only once the new one is complete
    writer = StoreWriter(
        path, fingerprint, extra={"source": source_kind, **(extra or {})}, overwrite=True, resume=False,
        what="featcache import",
    )  # fmt: skip
    try:
        T = text.shape[0]
        templates = ["{}"] if T == 1 else [f"imported template {i} {{}}" for i in range(T)]
        writer.write_text(classnames, templates, F.normalize(text, dim=-1))
        if projection is not None:
            writer.write_projection(projection[0], projection[1], "imported")
        for s, (feats, labels) in splits.items():
            p = None if pre is None else pre[s]
            writer.begin_split(s, len(labels), D, norms=True, pre_dim=0 if p is None else p.shape[1])
            ids = [f"{s}/{i}" for i in range(len(labels))]
            writer.write_batch(s, len(labels), F.normalize(feats, dim=-1), labels, ids, norms=feats.norm(dim=-1), pre=p)
            writer.finish_split(s)
        return writer.finalize()
    except BaseException:
        writer.discard()  # an import is written in one go: nothing to resume
        raise


def _check_pre(splits: dict, pre: dict, projection: tuple, dim: int) -> None:
    """Every split has pre-projection rows, and normalize(pre @ weight + bias) is the split's features: a projection
    from another model would make ProLIP start from a classifier that is not CLIP's."""
    weight, bias = projection
    if weight.dim() != 2 or weight.shape[1] != dim or (bias is not None and tuple(bias.shape) != (dim,)):
        raise StoreError(f"projection_weight must be [W, {dim}] (and projection_bias [{dim}]); got "
                         f"{tuple(weight.shape)}" + ("" if bias is None else f", {tuple(bias.shape)}"))  # fmt: skip
    for s in set(pre) - set(splits):
        raise StoreError(f"{s}_pre given without {s}_features")
    for s, (feats, _) in splits.items():
        if s not in pre:
            raise StoreError(f"{s}_features has no {s}_pre; give pre-projection features for every split or none")
        p = pre[s]
        if p.dim() != 2 or p.shape != (feats.shape[0], weight.shape[0]):
            raise StoreError(f"{s}_pre must be [{feats.shape[0]}, {weight.shape[0]}]; got {tuple(p.shape)}")
        proj = p @ weight + (0 if bias is None else bias)
        gap = (F.normalize(proj, dim=-1) - F.normalize(feats, dim=-1)).abs().max().item() if len(p) else 0.0
        if gap > 1e-2:
            raise StoreError(f"{s}_pre @ projection_weight (+ bias) does not give {s}_features (max |difference| "
                             f"{gap:.3g} after normalising); pass the projection that made them")  # fmt: skip


def import_npz(
    file: str | Path,
    name: str,
    cache_dir: str | Path | None = None,
    backbone: str = "unknown",
    dtype: str = "float16",
    overwrite: bool = False,
) -> Path:
    """An .npz with text_features, classnames and the features/labels of at least one split (train_*, val_*,
    test_*: a test-only import serves zero-shot and `eval` of saved runs); optionally `<split>_pre` (raw
    pre-projection features, every split) with `projection_weight` [W, D] (+ `projection_bias`)."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise StoreError(f"no such file: {file}")
    try:
        z = np.load(file, allow_pickle=False)
    except Exception as e:
        raise StoreError(f"{file}: not a readable .npz file ({e})") from e
    keys = set(z.files)
    for need in ("text_features", "classnames"):
        if need not in keys:
            raise StoreError(f"{file}: missing array '{need}' (has: {', '.join(sorted(keys))})")
    if not any(f"{s}_features" in keys for s in ("train", "val", "test")):
        raise StoreError(f"{file}: no split to import; give train_features/train_labels, val_* or test_* "
                         f"(has: {', '.join(sorted(keys))})")  # fmt: skip
    classnames = [str(c) for c in _array(z, "classnames", file).tolist()]
    splits = {}
    for s in ("train", "val", "test"):
        if f"{s}_features" in keys:
            if f"{s}_labels" not in keys:
                raise StoreError(f"{file}: has {s}_features but no {s}_labels")
            f = _as_float(_array(z, f"{s}_features", file), f"{s}_features")
            splits[s] = (f, _labels(_array(z, f"{s}_labels", file), f.shape[0], len(classnames), f"{s}_labels"))
    text = _as_float(_array(z, "text_features", file), "text_features")
    pre = {
        s: _as_float(_array(z, f"{s}_pre", file), f"{s}_pre") for s in ("train", "val", "test") if f"{s}_pre" in keys
    }
    projection = None
    if "projection_weight" in keys:
        bias = _as_float(_array(z, "projection_bias", file), "projection_bias") if "projection_bias" in keys else None
        projection = (_as_float(_array(z, "projection_weight", file), "projection_weight"), bias)
    return write_imported(name, classnames, splits, text, [file], "npz", cache_dir, backbone, dtype, overwrite,
                          pre=pre or None, projection=projection)  # fmt: skip


def _array(z, key: str, file: Path) -> np.ndarray:
    """One array of an .npz; object arrays are refused, never unpickled (a pickle can run any code)."""
    try:
        return z[key]
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise StoreError(
            f"{file}: array '{key}' holds Python objects (dtype=object), which featcache does not unpickle; save "
            "it as a numeric or string array (e.g. np.array(names, dtype=str))"
        ) from e


def _load_pt(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise StoreError(f"missing file {path}")
    try:  # files saved on a GPU machine load on a CPU-only one
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(f"{path}: cannot be read with torch.load(weights_only=True) ({e})") from e


def import_tip(
    folder: str | Path,
    name: str,
    classnames_file: str | Path,
    text_features_file: str | Path,
    shots: int | None = None,
    cache_dir: str | Path | None = None,
    backbone: str = "unknown",
    dtype: str = "float16",
    overwrite: bool = False,
) -> Path:
    """A Tip-Adapter cache folder: keys_{K}shots.pt [D, N], values_{K}shots.pt one-hot [N, C], val_f/val_l,
    test_f/test_l. Tip-Adapter's keys are already the K-shot set (averaged over its augmented views)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StoreError(f"no such folder: {folder}")
    found = sorted(
        int(m.group(1)) for p in folder.glob("keys_*shots.pt") if (m := re.match(r"keys_(\d+)shots", p.stem))
    )
    if not found:
        raise StoreError(f"{folder}: no keys_<K>shots.pt file; is this a Tip-Adapter cache folder?")
    if shots is None:
        if len(found) > 1:
            raise StoreError(f"{folder}: caches for {found} shots; choose one with --shots")
        shots = found[0]
    if shots not in found:
        raise StoreError(f"{folder}: no keys_{shots}shots.pt (found shots: {found})")
    classnames = _read_classnames(Path(classnames_file).expanduser())
    C = len(classnames)
    keys = _as_float(_load_pt(folder / f"keys_{shots}shots.pt"), "keys")
    values = _load_pt(folder / f"values_{shots}shots.pt")
    if values.dim() != 2 or values.shape[1] != C:
        raise StoreError(f"values_{shots}shots.pt must be one-hot [N, {C}]; got {tuple(values.shape)}")
    if keys.dim() != 2 or keys.shape[1] != values.shape[0]:
        if keys.dim() == 2 and keys.shape[0] == values.shape[0]:
            keys = keys.t()  # tolerate [N, D]
        else:
            raise StoreError(f"keys_{shots}shots.pt must be [D, N] with N = {values.shape[0]}; got {tuple(keys.shape)}")
    train = keys.t().contiguous()
    splits = {"train": (train, _labels(values, train.shape[0], C, "values"))}
    files = [folder / f"keys_{shots}shots.pt", folder / f"values_{shots}shots.pt"]
    for s, fname, lname in (("val", "val_f.pt", "val_l.pt"), ("test", "test_f.pt", "test_l.pt")):
        if (folder / fname).exists():
            f = _as_float(_load_pt(folder / fname), fname)
            splits[s] = (f, _labels(_load_pt(folder / lname), f.shape[0], C, lname))
            files += [folder / fname, folder / lname]
    tf = Path(text_features_file).expanduser()
    text = _as_float(_load_text(tf), tf.name)
    if text.dim() == 2 and text.shape[0] != C and text.shape[1] == C:
        text = text.t()  # Tip-Adapter keeps clip_weights as [D, C]
    return write_imported(
        name, classnames, splits, text, files + [tf], "tip-adapter", cache_dir, backbone, dtype, overwrite,
        extra={"tip_shots": shots},
    )  # fmt: skip


def _load_text(path: Path):
    if not path.is_file():
        raise StoreError(f"no such file: {path}")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise StoreError(f"{path}: not a plain numeric .npy array ({_first(e)}); save it without objects") from e
    return _load_pt(path)


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_classnames(path: Path) -> list[str]:
    if not path.is_file():
        raise StoreError(f"no such file: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        names = json.loads(text)
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise StoreError(f"{path}: expected one class name per line (or a JSON list of strings)")
    return names
