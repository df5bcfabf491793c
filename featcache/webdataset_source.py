"""webdataset tar shards (the layout img2dataset writes and CLIP_benchmark reads) as a dataset source.

A first pass reads only the tar headers and the small label/caption members of each shard (never an image),
which gives the same ordered item list the folder sources give: shard order (the pattern's expansion order),
then order inside the shard. Members are grouped into samples by webdataset's own rule (`__key__` = the path
up to the first dot of the file name, consecutive members of one key form a sample). Images are then read in
place, by the byte offset of their member in the uncompressed tar, never unpacked. So the extractor's map-style
loader, its resume by row count and its row order work unchanged, and DataLoader workers split the work by
batches of consecutive rows, not by shard: any number of workers reads every sample exactly once, however
few shards there are, and the store does not depend on the number of workers.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __index__ and the like are not samples
INSTALL = "pip install 'featcache[webdataset]'"


@dataclass
class Sample:
    """One sample of a shard: its key, (offset, size) of every member by extension, the small members' text."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardRow:
    """A sample as a row: id `<shard>/<key>` (keys may repeat across shards, never within one), the image's
    location, and the label (`cls`) or caption text (`txt`) the listing pass read."""

    id: str
    shard: int
    offset: int
    size: int
    text: str


class TarImages:
    """Decodes a row's image straight out of its shard: `source[ref]` -> (PIL image, -1), as data.load_image
    expects. Each read opens the shard and reads `size` bytes at `offset`, so nothing is shared between the
    DataLoader's worker processes (an inherited file position would be)."""

    def __init__(self, paths: list[str], where: np.ndarray):
        self.paths, self.where = paths, where  # where: [N, 3] int64 (shard index, offset, size)

    def __getitem__(self, ref: int) -> tuple[Image.Image, int]:
        s, off, size = (int(v) for v in self.where[ref])
        with open(self.paths[s], "rb") as fh:
            fh.seek(off)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{self.paths[s]} is truncated (member at byte {off} needs {size} bytes)")
        img = Image.open(io.BytesIO(data))
        img.load()
        return img, -1


def _needs_webdataset():
    """webdataset's brace expansion and key rule (the optional extra); one line naming the install if missing."""
    try:
        from braceexpand import braceexpand
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise DataError(f"webdataset shards need the webdataset package: {INSTALL}") from None
    return braceexpand, base_plus_ext


def shard_names(pattern: str) -> list[str]:
    """The shard paths a brace pattern names (`shards/{00000..00099}.tar`), in expansion order."""
    braceexpand, _ = _needs_webdataset()
    return list(braceexpand(pattern))


def scan_shard(path: Path, name: str, small: tuple[str, ...]) -> list[Sample]:
    """The samples of one shard from its member headers, plus the `small` members' text (read at their offsets;
    images are never read here). A compressed shard is refused: images are read in place by offset."""
    _, base_plus_ext = _needs_webdataset()
    samples: list[Sample] = []
    seen: set[str] = set()
    with open(path, "rb") as fh:
        for fname, off, size in _members(fh, path, name):
            if _META.match(fname):
                continue
            key, ext = base_plus_ext(fname)
            if key is None:
                continue
            ext = ext.lower()
            if not samples or samples[-1].key != key:
                if key in seen:
                    raise DataError(f"shard {name}: the files of sample {key!r} are not consecutive; rewrite the shard")
                seen.add(key)
                samples.append(Sample(key))
            cur = samples[-1]
            if ext in cur.members:
                raise DataError(f"shard {name}: sample {key!r} holds two '.{ext}' files; rewrite the shard")
            cur.members[ext] = (off, size)
            if ext in small:
                fh.seek(off)
                cur.text[ext] = fh.read(size).decode("utf-8", errors="replace")
    return samples


def _members(fh: Any, path: Path, name: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a tar. Plain ustar headers (what webdataset's and
    img2dataset's writers produce for ASCII names) are parsed directly, 512 bytes per member and a seek over its
    data: 4x faster than tarfile, so an ImageNet-sized shard set lists in well under a minute. Anything else
    (pax or GNU long-name headers, base-256 sizes) goes through tarfile, which also refuses what is not a tar."""
    out, pos = [], 0
    while True:
        fh.seek(pos)
        hdr = fh.read(512)
        if (len(hdr) == 0 and pos > 0) or hdr == bytes(512):
            return out
        if len(hdr) < 512:  # truncated, empty or not a tar at all: tarfile says which
            return _members_tarfile(path, name)
        typ, size_field = hdr[156:157], hdr[124:136]
        try:
            ok = int(hdr[148:156].strip(b" \0") or b"-1", 8) == sum(hdr[:148]) + 256 + sum(hdr[156:])
            size = int(size_field.strip(b" \0") or b"0", 8)
        except ValueError:
            ok = False
        if not ok or typ not in (b"0", b"\0", b"5", b"1", b"2") or hdr[257:262] not in (b"ustar", bytes(5)):
            return _members_tarfile(path, name)
        fname = hdr[:100].split(b"\0", 1)[0]
        prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:263] == b"ustar\0" else b""  # GNU keeps times there
        if typ in (b"0", b"\0"):
            full = (prefix + b"/" + fname if prefix else fname).decode("utf-8", errors="surrogateescape")
            out.append((full, pos + 512, size))
        pos += 512 + -(-size // 512) * 512


def _members_tarfile(path: Path, name: str) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, "r:") as tf:
            return [(ti.name, ti.offset_data, ti.size) for ti in tf if ti.isreg()]
    except tarfile.ReadError as e:
        raise DataError(
            f"shard {name} is not an uncompressed tar file ({e}); decompress it (e.g. gunzip), "
            "featcache reads images in place from plain .tar shards"
        ) from None


def read_shards(
    root: Path, pattern: str, src: dict[str, Any], text_key: str, where: str, missing: Callable[[str], DataError]
) -> tuple[list[ShardRow], TarImages]:
    """Every sample of the split's shards as a row, in shard then in-shard order; `text_key` (`cls` or `txt`)
    must be in every sample, and so must an image (the first of `image_keys` present). `missing(what)` builds
    the error for absent shards (with the manifest's instructions)."""
    from .data import check_inside

    names = shard_names(pattern)
    check_inside(root, names, "shard", fix="the manifest's shard pattern must name paths inside it")
    lost = [n for n in names if not (root / n).is_file()]
    if lost:
        more = f" (and {len(lost) - 1} more of {len(names)})" if len(lost) > 1 else ""
        raise missing(f"shard {root / lost[0]} not found{more}")
    image_keys = tuple(k.lower() for k in src.get("image_keys", IMAGE_KEYS))
    rows: list[ShardRow] = []
    for s, name in enumerate(names):
        for smp in scan_shard(root / name, name, (text_key,)):
            img = next((k for k in image_keys if k in smp.members), None)
            if img is None:
                raise DataError(
                    f"{where}: sample {smp.key!r} of shard {name} has no image ({', '.join(image_keys)}); "
                    "set the source's image_keys to the extension its images use"
                )
            if text_key not in smp.text:
                raise DataError(
                    f"{where}: sample {smp.key!r} of shard {name} has no '.{text_key}' file; "
                    "every sample needs one (the source's label_key or caption_key names another extension)"
                )
            off, size = smp.members[img]
            rows.append(ShardRow(f"{name}/{smp.key}", s, off, size, smp.text[text_key]))
    where_arr = np.array([(r.shard, r.offset, r.size) for r in rows], dtype=np.int64).reshape(-1, 3)
    return rows, TarImages([str(root / n) for n in names], where_arr)


def parse_label(text: str, row_id: str, where: str) -> int:
    """A `cls` member holds the label index as text (CLIP_benchmark's and webdataset's convention)."""
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"{where}: sample {row_id} has label {text.strip()[:40]!r}, not a class index") from None


def parse_captions(text: str, per_line: bool) -> list[str]:
    """A `txt` member's captions: one per non-empty line (CLIP_benchmark writes an image's captions that way),
    or the whole text as one caption."""
    if not per_line:
        return [text.strip()] if text.strip() else []
    return [line.strip() for line in text.splitlines() if line.strip()]
