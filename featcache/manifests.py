"""Datasets as data: load and validate the JSON manifests in `data_manifests/` (format: its README.md)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ManifestError

SPLITS = ("train", "val", "test")
SOURCE_KINDS = {
    "split_json": {"split_file": str, "image_dirs": list},
    "image_folder": {"image_dirs": list, "splits": dict},
    "list_file": {"dirs": list, "image_subdir": str, "image_ext": str, "splits": dict},
    "torchvision": {"class": str, "root": str, "splits": dict},
    "sklearn_digits": {"splits": dict},
}
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
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p}: not valid JSON ({e})") from e
    return parse_manifest(raw, where=str(p))


def parse_manifest(raw: Any, where: str = "<manifest>") -> Manifest:
    """Validate a manifest dict; raise ManifestError naming the first bad field."""

    def bad(fieldname: str, why: str) -> ManifestError:
        return ManifestError(f"{where}: field '{fieldname}' {why}")

    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: a manifest must be a JSON object")
    for key in ("id", "name", "classnames", "template", "templates", "default_scheme", "schemes"):
        if key not in raw:
            raise bad(key, "is missing")
    for key in ("id", "name", "template", "default_scheme"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise bad(key, "must be a non-empty string")
    for key in ("homepage", "license", "task"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, "must be a string")
    if raw.get("task", "classification") != "classification":
        raise bad("task", f"must be 'classification', got {raw['task']!r}")
    if not _ID_RE.match(raw["id"]):
        raise bad("id", f"must match [a-z0-9][a-z0-9_-]*, got {raw['id']!r}")
    names = raw["classnames"]
    if not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names):
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
    schemes = {n: _parse_scheme(n, s, len(names), bad) for n, s in raw["schemes"].items()}
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
        task=raw.get("task", "classification"),
        path=where,
        raw=raw,
    )


def _parse_scheme(name: str, s: Any, n_classes: int, bad) -> Scheme:
    pre = f"schemes.{name}"
    if not isinstance(s, dict):
        raise bad(pre, "must be an object")
    src = s.get("source")
    if not isinstance(src, dict):
        raise bad(f"{pre}.source", "must be an object")
    kind = src.get("kind")
    if kind not in SOURCE_KINDS:
        raise bad(f"{pre}.source.kind", f"must be one of {sorted(SOURCE_KINDS)}, got {kind!r}")
    for key, typ in SOURCE_KINDS[kind].items():
        if not isinstance(src.get(key), typ):
            raise bad(f"{pre}.source.{key}", f"must be a {typ.__name__} for kind '{kind}'")
    for key in ("image_dirs", "dirs"):
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
    counts = s.get("counts", {})
    if not isinstance(counts, dict):
        raise bad(f"{pre}.counts", "must be an object mapping split to item count")
    for sp, c in counts.items():
        if sp not in SPLITS:
            raise bad(f"{pre}.counts.{sp}", f"is not a split name; use one of {list(SPLITS)}")
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise bad(f"{pre}.counts.{sp}", f"must be a non-negative integer, got {c!r}")
        if "splits" in src and sp not in src["splits"]:
            raise bad(f"{pre}.counts.{sp}", "counts a split the source does not have")
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
    for key in ("description", "instructions"):
        if key in s and not isinstance(s[key], str):
            raise bad(f"{pre}.{key}", "must be a string")
    return Scheme(
        name=name,
        source=src,
        counts=dict(counts),
        description=s.get("description", ""),
        download=dl,
        instructions=s.get("instructions", ""),
    )
