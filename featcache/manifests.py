"""Datasets as data: load and validate the JSON manifests in `data_manifests/` (format: its README.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ManifestError

SPLITS = ("train", "val", "test")
TASKS = ("classification", "retrieval")
SOURCE_KINDS = {
    "split_json": {"split_file": str, "image_dirs": list},
    "image_folder": {"image_dirs": list, "splits": dict},
    "list_file": {"dirs": list, "image_subdir": str, "image_ext": str, "splits": dict},
    "torchvision": {"class": str, "root": str, "splits": dict},
    "sklearn_digits": {"splits": dict},
    "karpathy_json": {"annotation_file": str, "image_dirs": list, "splits": dict},
    "caption_file": {"image_dirs": list, "splits": dict},
    "video_frames": {"frame_dirs": list, "max_frames": int, "splits": dict},
    "webdataset": {"splits": dict},
}
RETRIEVAL_KINDS = ("karpathy_json", "caption_file", "video_frames")
EITHER_KINDS = ("webdataset",)  # classification (`cls` labels) or retrieval (`txt` captions), by the task
KARPATHY_SPLITS = ("train", "val", "test", "restval")
VIDEO_SPLIT_KEYS = ("pairs", "videos", "captions", "video_column", "caption_column", "captions_key")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Scheme:
    """One way of reading a dataset into named splits."""

    name: str
    source: dict[str, Any]
    counts: dict[str, int]
    description: str = ""
    download: dict[str, Any] | None = None
    instructions: str = ""
    caption_counts: dict[str, int] = field(default_factory=dict)  # retrieval: expected captions per split

    @property
    def splits(self) -> list[str]:
        if self.source["kind"] == "split_json":
            return list(self.counts) or list(SPLITS)
        return list(self.source["splits"])


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest. `sha256` hashes its canonical JSON (part of a store's fingerprint)."""

    id: str
    name: str
    classnames: list[str]
    template: str
    templates: list[str]
    default_scheme: str
    schemes: dict[str, Scheme]
    homepage: str = ""
    license: str = ""
    task: str = "classification"
    path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        canon = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()

    def scheme(self, name: str | None = None) -> Scheme:
        name = name or self.default_scheme
        if name not in self.schemes:
            raise ManifestError(
                f"dataset '{self.id}' has no split scheme '{name}'; choose one of: {', '.join(self.schemes)}"
            )
        return self.schemes[name]


def manifest_dir() -> Path:
    """The bundled manifests: the source checkout's `data_manifests/`, or the copy installed in the package."""
    src = Path(__file__).resolve().parent.parent / "data_manifests"
    if src.is_dir():
        return src
    return Path(str(resources.files("featcache") / "data_manifests"))


def list_datasets() -> list[str]:
    return sorted(p.stem for p in manifest_dir().glob("*.json"))


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Load a bundled manifest by id (`dtd`) or a user's manifest by path (`my_data.json`)."""
    p = Path(name_or_path).expanduser()
    if not (p.suffix == ".json" or p.exists()):
        p = manifest_dir() / f"{name_or_path}.json"
        if not p.exists():
            raise ManifestError(
                f"unknown dataset '{name_or_path}'; known: {', '.join(list_datasets())} "
                "(or pass your own manifest with --manifest FILE)"
            )
    if not p.exists():
        raise ManifestError(f"manifest file not found: {p}")
    if not p.is_file():
        raise ManifestError(f"{p} is not a file; give the path of a dataset manifest (JSON) or a dataset id")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p}: not valid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"could not read manifest {p}: {getattr(e, 'strerror', None) or e}") from None
    return parse_manifest(raw, where=str(p))


def parse_manifest(raw: Any, where: str = "<manifest>") -> Manifest:
    """Validate a manifest dict; raise ManifestError naming the first bad field."""

    def bad(fieldname: str, why: str) -> ManifestError:
        return ManifestError(f"{where}: field '{fieldname}' {why}")

    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: a manifest must be a JSON object")
    raw_in = raw  # hashed as written: filling in retrieval defaults must not change the fingerprint
    task = raw.get("task", "classification")
    if task not in TASKS:
        raise bad("task", f"must be one of {list(TASKS)}, got {task!r}")
    retrieval = task == "retrieval"
    if retrieval:  # captions are the texts: no class names or prompt templates needed (validated when given)
        raw = {"classnames": [], "template": "{}", "templates": ["{}"], **raw}
    for key in ("id", "name", "classnames", "template", "templates", "default_scheme", "schemes"):
        if key not in raw:
            raise bad(key, "is missing")
    for key in ("id", "name", "template", "default_scheme"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise bad(key, "must be a non-empty string")
    for key in ("homepage", "license", "task"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, "must be a string")
    if not _ID_RE.match(raw["id"]):
        raise bad("id", f"must match [a-z0-9][a-z0-9_-]*, got {raw['id']!r}")
    names = raw["classnames"]
    if not isinstance(names, list) or not (names or retrieval) or not all(isinstance(c, str) and c for c in names):
        raise bad("classnames", "must be a non-empty list of non-empty strings")
    if not isinstance(raw.get("allow_duplicate_classnames", False), bool):
        raise bad("allow_duplicate_classnames", "must be true or false")
    if len(set(names)) != len(names) and not raw.get("allow_duplicate_classnames", False):
        dup = next(c for c in names if names.count(c) > 1)
        raise bad("classnames", f"has a duplicate class name {dup!r} (set allow_duplicate_classnames if intended)")
    if raw["template"].count("{}") != 1:
        raise bad("template", "must contain exactly one '{}'")
    temps = raw["templates"]
    if not isinstance(temps, list) or not temps:
        raise bad("templates", "must be a non-empty list of strings")
    for i, t in enumerate(temps):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise bad(f"templates[{i}]", "must be a string with exactly one '{}'")
    if not isinstance(raw["schemes"], dict) or not raw["schemes"]:
        raise bad("schemes", "must be a non-empty object")
    for n in raw["schemes"]:
        if not _ID_RE.match(n):  # it names the store file, <cache>/<backbone>/<id>__<scheme>.h5
            raise bad("schemes", f"has a scheme named {n!r}; scheme names must match [a-z0-9][a-z0-9_-]*")
    schemes = {n: _parse_scheme(n, s, len(names), task, bad) for n, s in raw["schemes"].items()}
    if raw["default_scheme"] not in schemes:
        raise bad("default_scheme", f"must be one of {list(schemes)}, got {raw['default_scheme']!r}")
    return Manifest(
        id=raw["id"],
        name=raw["name"],
        classnames=list(names),
        template=raw["template"],
        templates=list(temps),
        default_scheme=raw["default_scheme"],
        schemes=schemes,
        homepage=raw.get("homepage", ""),
        license=raw.get("license", ""),
        task=task,
        path=where,
        raw=raw_in,
    )


def _parse_scheme(name: str, s: Any, n_classes: int, task: str, bad) -> Scheme:
    pre = f"schemes.{name}"
    if not isinstance(s, dict):
        raise bad(pre, "must be an object")
    src = s.get("source")
    if not isinstance(src, dict):
        raise bad(f"{pre}.source", "must be an object")
    kind = src.get("kind")
    if kind not in SOURCE_KINDS:
        raise bad(f"{pre}.source.kind", f"must be one of {sorted(SOURCE_KINDS)}, got {kind!r}")
    if kind not in EITHER_KINDS and (kind in RETRIEVAL_KINDS) != (task == "retrieval"):
        other = "retrieval" if kind in RETRIEVAL_KINDS else "classification"
        raise bad(f"{pre}.source.kind", f"'{kind}' is a {other} source, but the manifest's task is '{task}'")
    for key, typ in SOURCE_KINDS[kind].items():
        if not isinstance(src.get(key), typ) or isinstance(src.get(key), bool):
            raise bad(f"{pre}.source.{key}", f"must be a {typ.__name__} for kind '{kind}'")
    for key in ("image_dirs", "dirs", "frame_dirs"):
        if key in src and (not src[key] or not all(isinstance(d, str) for d in src[key])):
            raise bad(f"{pre}.source.{key}", "must be a non-empty list of paths")
    if "splits" in src:
        if not src["splits"]:
            raise bad(f"{pre}.source.splits", "must name at least one split")
        for sp in src["splits"]:
            if sp not in SPLITS:
                raise bad(f"{pre}.source.splits.{sp}", f"is not a split name; use one of {list(SPLITS)}")
    for key in ("class_dirs", "class_keys"):
        if key in src:
            v = src[key]
            if not isinstance(v, list) or len(v) != n_classes or not all(isinstance(x, str) for x in v):
                raise bad(f"{pre}.source.{key}", f"must be a list of {n_classes} strings (one per class)")
    if kind in RETRIEVAL_KINDS:
        _check_retrieval_source(f"{pre}.source", src, bad)
    if kind == "webdataset":
        _check_webdataset_source(f"{pre}.source", src, task, bad)
    if "caption_counts" in s and task != "retrieval":
        raise bad(f"{pre}.caption_counts", "is only for retrieval manifests")
    counts = s.get("counts", {})
    for ckey in ("counts", "caption_counts"):
        cs = s.get(ckey, {})
        if not isinstance(cs, dict):
            raise bad(f"{pre}.{ckey}", "must be an object mapping split to a count")
        for sp, c in cs.items():
            if sp not in SPLITS:
                raise bad(f"{pre}.{ckey}.{sp}", f"is not a split name; use one of {list(SPLITS)}")
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise bad(f"{pre}.{ckey}.{sp}", f"must be a non-negative integer, got {c!r}")
            if "splits" in src and sp not in src["splits"]:
                raise bad(f"{pre}.{ckey}.{sp}", "counts a split the source does not have")
    dl = s.get("download")
    if dl is not None:
        if not isinstance(dl, dict):
            raise bad(f"{pre}.download", "must be an object")
        if dl.get("kind", "files") not in ("torchvision", "files"):
            raise bad(f"{pre}.download.kind", "must be 'torchvision' or 'files'")
        if dl.get("kind") == "torchvision":
            if not isinstance(dl.get("class"), str) or not isinstance(dl.get("root"), str):
                raise bad(f"{pre}.download", "of kind 'torchvision' needs 'class' and 'root' strings")
            if not isinstance(dl.get("calls", [{}]), list):
                raise bad(f"{pre}.download.calls", "must be a list of kwargs objects")
        for i, f in enumerate(dl.get("files", [])):
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise bad(f"{pre}.download.files[{i}]", "needs a 'path'")
            if not (isinstance(f.get("url"), str) or isinstance(f.get("gdrive_id"), str)):
                raise bad(f"{pre}.download.files[{i}]", "needs a 'url' or a 'gdrive_id'")
            if "member" in f and not (isinstance(f["member"], str) and f["member"] and isinstance(f.get("url"), str)):
                raise bad(f"{pre}.download.files[{i}].member", "must be a file name inside the zip at 'url'")
    for key in ("description", "instructions"):
        if key in s and not isinstance(s[key], str):
            raise bad(f"{pre}.{key}", "must be a string")
    for where, path in _paths(pre, src, dl):
        if not inside_path(path):
            raise bad(where, f"must be a relative path that stays inside --data-root, got {path!r}")
    return Scheme(
        name=name,
        source=src,
        counts=dict(counts),
        description=s.get("description", ""),
        download=dl,
        instructions=s.get("instructions", ""),
        caption_counts=dict(s.get("caption_counts", {})),
    )


def inside_path(path: str) -> bool:
    """Whether a manifest path stays inside the folder it is relative to: not absolute, and no '..' that climbs
    above it."""
    norm = os.path.normpath(path)
    return not os.path.isabs(path) and norm != ".." and not norm.startswith(".." + os.sep)


def _paths(pre: str, src: dict[str, Any], dl: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field, value) of every path a scheme names: each is joined to --data-root (or a folder inside it)."""
    out = [(f"{pre}.source.{k}", src[k]) for k in ("split_file", "image_subdir", "root", "annotation_file")
           if isinstance(src.get(k), str)]  # fmt: skip
    for key in ("image_dirs", "dirs", "frame_dirs", "class_dirs"):
        out += [(f"{pre}.source.{key}[{i}]", d) for i, d in enumerate(src.get(key) or []) if isinstance(d, str)]
    kwargs = src.get("kwargs")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("root"), str):
        out.append((f"{pre}.source.kwargs.root", kwargs["root"]))
    for sp, spec in (src.get("splits") or {}).items():
        if isinstance(spec, str) and src["kind"] != "karpathy_json":
            out.append((f"{pre}.source.splits.{sp}", spec))
        elif isinstance(spec, dict):
            out += [(f"{pre}.source.splits.{sp}.{k}", spec[k]) for k in ("root", "pairs", "videos", "captions")
                    if isinstance(spec.get(k), str)]  # fmt: skip
    if dl:
        if isinstance(dl.get("root"), str):
            out.append((f"{pre}.download.root", dl["root"]))
        out += [(f"{pre}.download.files[{i}].path", f["path"]) for i, f in enumerate(dl.get("files", []))]
    return out


def _check_retrieval_source(pre: str, src: dict[str, Any], bad) -> None:
    """The per-split specs of the retrieval kinds (the common fields are checked by the caller)."""
    kind = src["kind"]
    for sp, spec in src["splits"].items():
        where = f"{pre}.splits.{sp}"
        if kind == "karpathy_json":
            if not isinstance(spec, list) or not spec or not all(x in KARPATHY_SPLITS for x in spec):
                raise bad(where, f"must be a non-empty list of Karpathy split names from {list(KARPATHY_SPLITS)}")
        elif kind == "caption_file":
            if not isinstance(spec, str) or not spec.endswith((".csv", ".json")):
                raise bad(where, "must be the path of a .csv or .json caption file")
        else:
            if not isinstance(spec, dict) or not all(isinstance(v, str) and v for v in spec.values()):
                raise bad(where, "must be an object of non-empty strings")
            extra = sorted(set(spec) - set(VIDEO_SPLIT_KEYS))
            if extra:
                raise bad(f"{where}.{extra[0]}", f"is not a known key; use {list(VIDEO_SPLIT_KEYS)}")
            lists = [k for k in ("videos", "captions") if k in spec]
            if ("pairs" in spec) == bool(lists) or len(lists) == 1:
                raise bad(where, "needs either 'pairs' or both 'videos' and 'captions'")
            for key in ("pairs", "videos", "captions"):
                if key in spec and not spec[key].endswith((".csv", ".json")):
                    raise bad(f"{where}.{key}", "must be the path of a .csv or .json file")
    cpi = src.get("captions_per_image")
    if kind == "karpathy_json" and cpi is not None and (not isinstance(cpi, int) or isinstance(cpi, bool) or cpi < 1):
        raise bad(f"{pre}.captions_per_image", f"must be a positive integer or null, got {cpi!r}")
    if kind == "video_frames" and src["max_frames"] < 1:
        raise bad(f"{pre}.max_frames", f"must be a positive integer, got {src['max_frames']!r}")


def _check_webdataset_source(pre: str, src: dict[str, Any], task: str, bad) -> None:
    """Shard patterns per split and the optional member names (featcache.webdataset_source)."""
    for sp, pattern in src["splits"].items():
        if not isinstance(pattern, str) or not pattern.endswith(".tar"):
            raise bad(f"{pre}.splits.{sp}", "must be a shard pattern ending in .tar, e.g. 'shards/{00000..00099}.tar'")
    keys = src.get("image_keys")
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys)):
        raise bad(f"{pre}.image_keys", "must be a non-empty list of extensions, e.g. ['jpg', 'png', 'webp']")
    own, other = ("caption_key", "label_key") if task == "retrieval" else ("label_key", "caption_key")
    if other in src or (task != "retrieval" and "captions" in src):
        raise bad(f"{pre}.{other if other in src else 'captions'}", f"does not apply to a {task} manifest")
    if own in src and not (isinstance(src[own], str) and src[own]):
        raise bad(f"{pre}.{own}", "must be a member extension, e.g. 'cls' or 'txt'")
    if src.get("captions", "lines") not in ("lines", "whole"):
        raise bad(f"{pre}.captions", f"must be 'lines' (one caption per line) or 'whole', got {src['captions']!r}")
