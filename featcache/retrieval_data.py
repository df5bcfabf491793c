"""Read a retrieval dataset (image-caption or video-caption) into items, the frames to encode and the captions.

Only annotation files are parsed and image files listed (never decoded), and the expected counts are checked
first, so a wrong annotation file or a partial download fails before any compute.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import IMAGE_EXTS, Item, _first_dir, _missing, check_inside
from .errors import DataError
from .manifests import Manifest, Scheme


@dataclass(frozen=True)
class RetrievalSplit:
    """One split: items (images or videos), the frames to encode (label = item index) and all captions."""

    split: str
    items: list[str]  # image path relative to the image dir, or video id, in annotation order
    frames: list[Item]  # Item(id=relative frame/image path, label=item index, ref=absolute path), grouped by item
    captions: list[str]  # grouped by item in item order
    caption_item: list[int]  # item index of each caption
    source: Any = None  # decoder for ImageDataset; None: plain files


def resolve_retrieval_split(manifest: Manifest, scheme: Scheme, split: str, data_root: str | Path) -> RetrievalSplit:
    """Items and captions from the annotation files, counts checked, then the image/frame files located."""
    root = Path(data_root).expanduser()
    if manifest.task != "retrieval":
        raise DataError(f"{manifest.id} is a {manifest.task} dataset, not a retrieval one")
    if split not in scheme.splits:
        raise DataError(f"{manifest.id} ({scheme.name}) has no '{split}' split; it has: {', '.join(scheme.splits)}")
    kind = scheme.source["kind"]
    if kind == "webdataset":
        return _webdataset(manifest, scheme, split, root)
    reader = {"karpathy_json": _karpathy, "caption_file": _caption_file, "video_frames": _video_captions}[kind]
    items, caps = reader(manifest, scheme, split, root)
    _check_counts(manifest, scheme, split, len(items), sum(map(len, caps)))
    what = {"karpathy_json": "annotation file item", "caption_file": "caption file item", "video_frames": "video id"}
    dirs = scheme.source["frame_dirs" if kind == "video_frames" else "image_dirs"]
    check_inside(root, items, what[kind], [root / d for d in dirs])  # before any file is looked for
    if kind == "video_frames":
        frames = _video_frames(manifest, scheme, items, root)
    else:
        frames = _image_files(manifest, scheme, items, root)
    captions = [c for cs in caps for c in cs]
    caption_item = [i for i, cs in enumerate(caps) for _ in cs]
    return RetrievalSplit(split, items, frames, captions, caption_item)


def _webdataset(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> RetrievalSplit:
    """Tar shards: one item per sample (id `<shard>/<key>`), its captions from its `txt` member."""
    from .webdataset_source import parse_captions, read_shards

    src, where = scheme.source, f"{manifest.id} ({scheme.name}) {split}"
    missing = functools.partial(_missing, manifest, scheme)
    rows, images = read_shards(root, src["splits"][split], src, src.get("caption_key", "txt"), where, missing)
    caps = [parse_captions(r.text, src.get("captions", "lines") == "lines") for r in rows]
    _check_counts(manifest, scheme, split, len(rows), sum(map(len, caps)))
    frames = [Item(r.id, i, i) for i, r in enumerate(rows)]
    captions = [c for cs in caps for c in cs]
    caption_item = [i for i, cs in enumerate(caps) for _ in cs]
    return RetrievalSplit(split, [r.id for r in rows], frames, captions, caption_item, images)


def _check_counts(manifest: Manifest, scheme: Scheme, split: str, n_items: int, n_captions: int) -> None:
    for what, n, want in (
        ("items", n_items, scheme.counts.get(split)),
        ("captions", n_captions, scheme.caption_counts.get(split)),
    ):
        if want is not None and n != want:
            raise DataError(
                f"{manifest.id} ({scheme.name}) {split}: found {n} {what}, expected {want}; the annotation files "
                f"are partial or not the ones the manifest describes. {scheme.instructions}".strip()
            )


def _absent(manifest: Manifest, scheme: Scheme, what: str) -> DataError:
    """Like data._missing, but for images and frames, which --download never fetches."""
    return DataError(f"{manifest.id} ({scheme.name}): {what}. {scheme.instructions or 'see the manifest homepage'}")


def _group(pairs: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """(item, caption) rows -> items in order of first appearance, each with its captions in row order."""
    caps: dict[str, list[str]] = {}
    for item, cap in pairs:
        caps.setdefault(item, []).append(cap)
    return list(caps), list(caps.values())


def _karpathy(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> tuple[list[str], list[list[str]]]:
    src = scheme.source
    check_inside(root, [src["annotation_file"]], "annotation file", fix="the manifest's paths must be inside it")
    af = root / src["annotation_file"]
    if not af.is_file():
        raise _missing(manifest, scheme, f"annotation file {af} not found")
    want, keep = set(src["splits"][split]), src.get("captions_per_image")
    items, caps = [], []
    try:
        for im in json.loads(af.read_text())["images"]:
            if im["split"] in want:
                items.append(f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"])
                caps.append([s["raw"].strip() for s in im["sentences"]][:keep])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{af}: not a Karpathy split file (images with filename, split, sentences) ({e!r})") from e
    return items, caps


def _caption_file(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> tuple[list[str], list[list[str]]]:
    check_inside(root, [scheme.source["splits"][split]], "caption file", fix="the manifest's paths must be inside it")
    f = root / scheme.source["splits"][split]
    if not f.is_file():
        raise _missing(manifest, scheme, f"caption file {f} not found")
    return _group(_read_table(f, ("image", "caption")))


def _video_captions(manifest: Manifest, scheme: Scheme, split: str, root: Path) -> tuple[list[str], list[list[str]]]:
    spec = scheme.source["splits"][split]
    cols = (spec.get("video_column", "video_id"), spec.get("caption_column", "caption"))
    names = [spec[k] for k in ("pairs", "videos", "captions") if k in spec]
    check_inside(root, names, "annotation file", fix="the manifest's paths must be inside it")
    files = {k: root / spec[k] for k in ("pairs", "videos", "captions") if k in spec}
    for f in files.values():
        if not f.is_file():
            raise _missing(manifest, scheme, f"annotation file {f} not found")
    if "pairs" in files:
        return _group(_read_table(files["pairs"], cols, spec.get("captions_key")))
    videos = list(dict.fromkeys(v for (v,) in _read_table(files["videos"], cols[:1])))
    index = {v: i for i, v in enumerate(videos)}
    caps: list[list[str]] = [[] for _ in videos]
    for v, c in _read_table(files["captions"], cols, spec.get("captions_key")):
        if v in index:
            caps[index[v]].append(c)
    return videos, caps


def _read_table(path: Path, columns: tuple[str, ...], key: str | None = None) -> list[tuple[str, ...]]:
    """Rows of `columns` from a CSV with a header, or a JSON list of objects / arrays (under `key` if given)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            lacking = [c for c in columns if c not in (reader.fieldnames or [])]
            if lacking:
                raise DataError(f"{path}: needs header columns {list(columns)}, has {reader.fieldnames}")
            return [tuple(str(row[c]) for c in columns) for row in reader]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data = data[key] if key else data
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not valid JSON with a list{f' under {key!r}' if key else ''} ({e!r})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows{f' under {key!r}' if key else ''}")
    out = []
    for i, row in enumerate(data):
        if isinstance(row, dict) and all(c in row for c in columns):
            out.append(tuple(str(row[c]) for c in columns))
        elif isinstance(row, list) and len(row) >= len(columns):
            out.append(tuple(str(x) for x in row[: len(columns)]))
        elif isinstance(row, str) and len(columns) == 1:
            out.append((row,))
        else:
            raise DataError(f"{path}: row {i} is not an object with {list(columns)} or a [{', '.join(columns)}] list")
    return out


def _image_files(manifest: Manifest, scheme: Scheme, items: list[str], root: Path) -> list[Item]:
    """One Item per image; every file must exist (a stat each, no decoding)."""
    if not items:
        return []
    dirs = scheme.source["image_dirs"]
    base = _first_dir(root, dirs, lambda d: (d / items[0]).is_file())
    if base is None:
        tried = ", ".join(str(root / d) for d in dirs)
        raise _absent(manifest, scheme, f"images not found (looked for {items[0]} under {tried})")
    lost = [p for p in items if not (base / p).is_file()]
    if lost:
        raise _absent(manifest, scheme, f"{len(lost)} of {len(items)} images missing under {base}, e.g. {lost[0]}")
    return [Item(p, i, str(base / p)) for i, p in enumerate(items)]


def _video_frames(manifest: Manifest, scheme: Scheme, videos: list[str], root: Path) -> list[Item]:
    """Each video's frames in file-name order; more than max_frames: CLIP4Clip's uniform choice."""
    if not videos:
        return []
    dirs, cap = scheme.source["frame_dirs"], scheme.source["max_frames"]
    base = _first_dir(root, dirs, lambda d: (d / videos[0]).is_dir()) or root / dirs[0]
    lost = [v for v in videos if not (base / v).is_dir()]
    if lost:
        more = f" (and {len(lost) - 1} more videos)" if len(lost) > 1 else ""
        hint = f"extract frames at 1 fps, e.g. ffmpeg -i {lost[0]}.mp4 -vf fps=1 {base / lost[0]}/%04d.jpg"
        raise _absent(manifest, scheme, f"video {lost[0]} has no frame folder {base / lost[0]}{more}; {hint}")
    frames = []
    for i, v in enumerate(videos):
        d = base / v
        names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_EXTS))
        if not names:
            raise _absent(manifest, scheme, f"frame folder {d} of video {v} holds no images")
        if len(names) > cap:
            names = [names[j] for j in np.linspace(0, len(names) - 1, num=cap, dtype=int)]
        frames += [Item(f"{v}/{n}", i, str(d / n)) for n in names]
    return frames
