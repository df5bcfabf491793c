"""Read a dataset source (as its manifest describes it) into an ordered item list, and load its images.

The item order is the split file's order: the few-shot protocol samples by position, so it must match
CoOp/Dassl. Nothing here knows about protocols; it only lists and decodes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .manifests import Manifest, Scheme

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Item:
    """One row-to-be: id (stored in the cache), label, and where the pixels come from (path or index)."""

    id: str
    label: int
    ref: str | int


@dataclass
class SplitItems:
    """The items of one split plus the object that decodes them (None for plain files)."""

    split: str
    items: list[Item]
    source: Any = None


def default_data_root() -> Path:
    return Path(os.environ.get("FEATCACHE_DATA", "~/data")).expanduser()


def _missing(manifest: Manifest, scheme: Scheme, what: str) -> DataError:
    how = (scheme.instructions or "See the manifest's homepage.").rstrip(".") + "."
    dl = " Or rerun with --download." if scheme.download and "--download" not in how else ""
    return DataError(f"{manifest.id} ({scheme.name}): {what}. {how}{dl}")


_ROOTS = tuple({os.sep, os.altsep or os.sep})


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def outside(root: Path, paths: list[str], bases: list[Path] | None = None) -> str | None:
    """The first of `paths` (each relative to every folder in `bases`, default the root itself) that leads out
    of `root`, or None. Symlinks are followed wherever they lead (a data root's owner puts them there); what is
    refused is an absolute path or a '..' that climbs out. Cheap enough for 1.28M items: only a path that is
    absolute or holds '..' is looked at further; one with a '..' component must also mean on disk what it
    says on paper (resolving it equals resolving its normalised form), so a '..' after a symlink cannot climb
    out of the symlink's target."""
    top = os.path.abspath(root)
    starts = [os.path.abspath(b) for b in bases] if bases else [top]
    nt = os.name == "nt"  # drive letters: C:x is absolute there
    for p in [p for p in paths if ".." in p or p.startswith(_ROOTS) or (nt and os.path.isabs(p))]:
        dots = ".." in p.replace("\\", "/").split("/")
        for start in starts:
            norm = os.path.normpath(os.path.join(start, p))
            if not _within(norm, top):
                return p
            if dots and os.path.realpath(os.path.join(start, p)) != os.path.realpath(norm):
                return p
    return None


def check_inside(
    root: Path, paths: list[str], what: str, bases: list[Path] | None = None, fix: str = "items must be paths inside it"
) -> None:
    """Refuse, naming it, the first path that leads out of the data root (see `outside`)."""
    bad = outside(root, paths, bases)
    if bad is not None:
        raise DataError(f"{what} {bad!r} resolves outside the data root {os.path.abspath(root)}; {fix}")


def _first_dir(root: Path, dirs: list[str], probe: Callable[[Path], bool]) -> Path | None:
    for d in dirs:
        p = root / d
        if p.is_dir() and probe(p):
            return p
    return None


def download(manifest: Manifest, scheme: Scheme, data_root: Path) -> None:
    """Fetch what the scheme's `download` entry names (torchvision datasets, split files)."""
    dl = scheme.download
    if not dl:
        raise DataError(
            f"{manifest.id} ({scheme.name}) cannot be downloaded automatically. {scheme.instructions}".strip()
        )
    if dl.get("kind") == "torchvision":
        import torchvision.datasets as tvd

        cls = getattr(tvd, dl["class"], None)
        if cls is None:
            raise DataError(f"this torchvision has no dataset class {dl['class']}; upgrade torchvision")
        root = data_root / dl["root"]
        root.mkdir(parents=True, exist_ok=True)
        for kwargs in dl.get("calls", [{}]):
            try:
                cls(root=str(root), download=True, **kwargs)
            except Exception as e:
                raise DataError(f"download of {manifest.id} via torchvision.{dl['class']} failed: {e}") from e
    zips: dict[str, Path] = {}  # url -> the archive, fetched once however many of its members are wanted
    try:
        for f in dl.get("files", []):
            target = data_root / f["path"]
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".download")
            try:
                if "gdrive_id" in f:
                    from torchvision.datasets.utils import download_file_from_google_drive

                    download_file_from_google_drive(f["gdrive_id"], str(tmp.parent), tmp.name)
                elif "member" in f:  # one file out of a zip archive, wherever it sits inside it
                    if f["url"] not in zips:
                        fd, name = tempfile.mkstemp(suffix=".zip.download", dir=target.parent)
                        os.close(fd)
                        zips[f["url"]] = Path(name)
                        urllib.request.urlretrieve(f["url"], name)
                    with zipfile.ZipFile(zips[f["url"]]) as z:
                        hits = [n for n in z.namelist() if n == f["member"] or n.endswith("/" + f["member"])]
                        if not hits:
                            raise FileNotFoundError(f"{f['url']} has no member {f['member']}")
                        with z.open(hits[0]) as src, open(tmp, "wb") as out:
                            shutil.copyfileobj(src, out)
                else:
                    urllib.request.urlretrieve(f["url"], tmp)
                os.replace(tmp, target)  # never a half-downloaded file under the real name
            except Exception as e:
                tmp.unlink(missing_ok=True)
                raise DataError(f"could not download {target.name} for {manifest.id}: {e}; fetch it by hand") from e
    finally:
        for z in zips.values():
            z.unlink(missing_ok=True)


def resolve_split(manifest: Manifest, scheme: Scheme, split: str, data_root: str | Path) -> SplitItems:
    """List a split's items in the source's order and check the count against the manifest."""
    root = Path(data_root).expanduser()
    if split not in scheme.splits:
        raise DataError(f"{manifest.id} ({scheme.name}) has no '{split}' split; it has: {', '.join(scheme.splits)}")
    kind = scheme.source["kind"]
    reader = {
        "split_json": _split_json,
        "image_folder": _image_folder,
        "list_file": _list_file,
        "torchvision": _torchvision,
        "sklearn_digits": _sklearn_digits,
        "webdataset": _webdataset,
    }[kind]
    out = reader(manifest, scheme, split, root)
    want = scheme.counts.get(split)
    if want is not None and len(out.items) != want:
        raise DataError(
            f"{manifest.id} ({scheme.name}) {split}: found {len(out.items)} items, expected {want}; "
            "the download is partial or the files are not the ones the manifest describes. "
            f"{scheme.instructions}".strip()
        )
    n = len(manifest.classnames)
    bad = [it for it in out.items if not 0 <= it.label < n]
    if bad:
        raise DataError(f"{manifest.id} {split}: item {bad[0].id} has label {bad[0].label}, outside 0..{n - 1}")
    return out


def _split_json(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    src = scheme.source
    check_inside(root, [src["split_file"]], "split file", fix="the manifest's split_file must be a path inside it")
    sf = root / src["split_file"]
    if not sf.is_file():
        raise _missing(manifest, scheme, f"split file {sf} not found")
    try:
        data = json.loads(sf.read_text())
        rows = data[split]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(f"{sf}: not a CoOp split file with a '{split}' list ({e})") from e
    if not rows:
        return SplitItems(split, [])
    check_inside(root, [str(r[0]) for r in rows], "split file item", [root / d for d in src["image_dirs"]])
    first = rows[0][0]
    img_dir = _first_dir(root, src["image_dirs"], lambda d: (d / first).exists())
    if img_dir is None:
        tried = ", ".join(str(root / d) for d in src["image_dirs"])
        raise _missing(manifest, scheme, f"images not found (looked for {first} under {tried})")
    for p, lab, *rest in rows:  # the file's own class names must agree with the manifest's label order
        if rest and 0 <= int(lab) < len(manifest.classnames) and rest[0] != manifest.classnames[int(lab)]:
            raise DataError(
                f"{sf}: item {p} has label {lab} named {rest[0]!r}, but the manifest names label {lab} "
                f"{manifest.classnames[int(lab)]!r}; the split file does not belong to this manifest"
            )
    items = [Item(str(p), int(lab), str(img_dir / p)) for p, lab, *_ in rows]
    return SplitItems(split, items)


def _image_folder(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    src = scheme.source
    sub = src["splits"][split]
    base = _first_dir(root, src["image_dirs"], lambda d: (d / sub).is_dir())
    if base is None:
        tried = ", ".join(str(root / d / sub) for d in src["image_dirs"])
        raise _missing(manifest, scheme, f"image folder not found (tried {tried})")
    split_dir = base / sub
    class_dirs = src.get("class_dirs") or _class_folders(manifest, scheme, split_dir)
    items = []
    for label, cdir in enumerate(class_dirs):
        d = split_dir / cdir
        if not d.is_dir():
            raise _missing(manifest, scheme, f"class folder {d} not found")
        for name in sorted(os.listdir(d)):
            if name.lower().endswith(IMAGE_EXTS):
                items.append(Item(f"{sub}/{cdir}/{name}", label, str(d / name)))
    return SplitItems(split, items)


def _class_folders(manifest: Manifest, scheme: Scheme, split_dir: Path) -> list[str]:
    """The class folders in label order. Folders named exactly like the manifest's class names take their
    class's label, whatever order the names are listed in; otherwise (ImageNet's wnids, say) the sorted folder
    names are the classes in the manifest's order, torchvision ImageFolder's convention. A count that differs is
    an error: it would silently give images the labels of other classes."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    names = manifest.classnames
    if set(found) == set(names):
        return list(names)
    if len(found) != len(names):
        raise DataError(
            f"{manifest.id} ({scheme.name}): {split_dir} holds {len(found)} class folders but the manifest lists "
            f"{len(names)} classes; name the folders after the classes, or list them in the source's class_dirs"
        )
    return found


def _list_file(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    src = scheme.source
    fname = src["splits"][split]
    base = _first_dir(root, src["dirs"], lambda d: (d / fname).is_file())
    if base is None:
        tried = ", ".join(str(root / d / fname) for d in src["dirs"])
        raise _missing(manifest, scheme, f"list file not found (tried {tried})")
    keys = src.get("class_keys") or manifest.classnames
    index = {k: i for i, k in enumerate(keys)}
    items = []
    for n, line in enumerate((base / fname).read_text().splitlines(), 1):
        if not line.strip():
            continue
        img_id, _, key = line.strip().partition(" ")
        if key not in index:
            raise DataError(f"{base / fname}:{n}: class '{key}' is not in the manifest's class list")
        rel = f"{src['image_subdir']}/{img_id}{src['image_ext']}"
        items.append(Item(rel, index[key], str(base / rel)))
    check_inside(root, [it.id for it in items], "list file item", [base])
    return SplitItems(split, items)


def _webdataset(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    """Tar shards: the label of each sample is its `cls` member (featcache.webdataset_source)."""
    from .webdataset_source import parse_label, read_shards

    src, where = scheme.source, f"{manifest.id} ({scheme.name}) {split}"
    missing = functools.partial(_missing, manifest, scheme)
    rows, images = read_shards(root, src["splits"][split], src, src.get("label_key", "cls"), where, missing)
    items = [Item(r.id, parse_label(r.text, r.id, where), i) for i, r in enumerate(rows)]
    return SplitItems(split, items, images)


def _torchvision(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    import torchvision.datasets as tvd

    src = scheme.source
    cls = getattr(tvd, src["class"], None)
    if cls is None:
        raise DataError(f"this torchvision has no dataset class {src['class']}; upgrade torchvision")
    kwargs = {**src.get("kwargs", {}), **src["splits"][split]}
    ds_root = root / kwargs.pop("root", src["root"])
    if "download" in inspect.signature(cls).parameters:
        kwargs["download"] = False
    try:
        ds = cls(root=str(ds_root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        what = f"torchvision.{src['class']} found no data under {ds_root} ({e})"
        raise _missing(manifest, scheme, what) from e
    targets = _targets(ds)
    files = getattr(ds, "_image_files", None)
    if files is not None and len(files) == len(targets):
        ids = [os.path.relpath(str(f), ds_root) for f in files]
    else:
        ids = [f"{split}/{i}" for i in range(len(targets))]
    items = [Item(ids[i], int(t), i) for i, t in enumerate(targets)]
    return SplitItems(split, items, ds)


def _targets(ds: Any) -> list[int]:
    """Labels of a torchvision dataset without decoding images, whatever attribute the class uses."""
    for attr in ("targets", "_labels", "y", "labels"):
        v = getattr(ds, attr, None)
        if v is not None and len(v) == len(ds):
            return [int(t) for t in v]
    for attr in ("samples", "_samples"):
        if hasattr(ds, attr):
            return [int(t) for _, t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


def _sklearn_digits(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> SplitItems:
    from sklearn.datasets import load_digits

    spec = scheme.source["splits"][split]
    d = load_digits()
    mod, res = int(spec["mod"]), set(spec["residues"])
    items = [Item(f"digits/{i:04d}", int(d.target[i]), i) for i in range(len(d.target)) if i % mod in res]
    return SplitItems(split, items, _Digits(d.images))


class _Digits:
    """scikit-learn's 8x8 digits (values 0..16) as RGB PIL images; the backbone's transform upscales them."""

    def __init__(self, images: np.ndarray):
        self.images = (images * (255.0 / 16.0)).round().astype(np.uint8)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), -1


def load_image(ref: str | int, source: Any) -> Image.Image:
    """Decode one item to an RGB PIL image (raises on a corrupt or missing file)."""
    if source is None:
        with Image.open(ref) as im:
            return im.convert("RGB")
    img = source[ref][0]
    return img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)).convert("RGB")


def augment_transform(preprocess_cfg: dict[str, Any]) -> Callable:
    """Random resized crop (scale 0.08-1, bicubic) + horizontal flip + CLIP normalisation."""
    from torchvision import transforms as T

    size = preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC
    )
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"]),
        ]
    )


def view_seed(base_seed: int, split: str, index: int) -> int:
    """A per-item seed, so augmented views are the same whatever the batching, workers or resume point."""
    h = hashlib.sha256(f"{base_seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63)


class ImageDataset(torch.utils.data.Dataset):
    """Items -> (position, clean tensor, [V views], error). Errors are returned, not raised, so the
    extractor decides whether a bad image stops the run (naming the file) or is skipped and recorded."""

    def __init__(
        self,
        items: list[Item],
        source: Any,
        preprocess: Callable,
        offset: int = 0,
        split: str = "train",
        aug: Callable | None = None,
        aug_views: int = 0,
        aug_seed: int = 0,
    ):
        self.items, self.source, self.preprocess = items, source, preprocess
        self.offset, self.split = offset, split
        self.aug, self.aug_views, self.aug_seed = aug, aug_views, aug_seed
        self.preprocess_seed: int | None = None  # set: `preprocess` (a random crop) is seeded per item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            img = load_image(item.ref, self.source)
            if self.preprocess_seed is None:
                x = self.preprocess(img)
            else:  # the same crop for this item whatever the batching, worker or process that loads it
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(self.preprocess_seed, self.split, self.offset + i))
                    x = self.preprocess(img)
            views = None
            if self.aug_views:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(self.aug_seed, self.split, self.offset + i))
                    views = torch.stack([self.aug(img) for _ in range(self.aug_views)])
            return i, x, views, None
        except Exception as e:  # corrupt, truncated, missing: reported by the caller with the file name
            where = item.ref if isinstance(item.ref, str) else item.id
            return i, None, None, f"{where}: {type(e).__name__}: {e}".splitlines()[0]


def collate(batch: list) -> dict[str, Any]:
    """Stack the good items; keep positions and errors of the bad ones."""
    good = [b for b in batch if b[3] is None]
    out: dict[str, Any] = {
        "pos": [b[0] for b in good],
        "bad": [(b[0], b[3]) for b in batch if b[3] is not None],
        "n": len(batch),
        "x": torch.stack([b[1] for b in good]) if good else None,
        "views": torch.stack([b[2] for b in good]) if good and good[0][2] is not None else None,
    }
    return out
