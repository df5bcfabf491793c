"""Durable writes and checked reads of the files a user keeps (saved runs, checkpoints, JSON metadata).

A file is written under a temporary name beside its destination and renamed into place only once it is complete
and on disk, so a crash, a full disk or a failing serialiser leaves either the old file or the new one, never a
half-written one, and no temporary file behind. Reads turn a damaged or foreign file into one line saying which
file it is and what to do, instead of a traceback from deep inside pickle or zip.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import FeatcacheError


def atomic_write(path: str | Path, write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write_fn` on a binary file open at a unique temporary name in `path`'s folder, fsync it, rename it
    onto `path` and fsync the folder (so the rename itself survives a power cut). On any failure the temporary
    file is removed and the old `path`, if any, is left as it was; an OSError (full disk, permissions) becomes
    a one-line FeatcacheError."""
    path = Path(path).expanduser()
    if not path.name or path.is_dir():
        raise FeatcacheError(f"{path} is a folder; give the path of a file to write")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FeatcacheError(
                f"could not write {path}: {e.strerror or e}; free disk space or fix the folder's permissions and "
                "rerun (the previous file, if any, is unchanged)"
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


def durable_rename(tmp: str | Path, path: str | Path) -> Path:
    """Move a finished file (an HDF5 store or token cache closed by its writer) onto `path` so that a power cut
    after the call cannot leave a complete-looking but empty file: fsync its content, rename, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """`obj` as JSON at `path`, atomically (see atomic_write)."""
    data = json.dumps(obj, indent=indent, default=str).encode()
    return atomic_write(path, lambda f: f.write(data))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform or filesystem without directory handles: the rename is done, only its flush is skipped
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is already on disk
    finally:
        os.close(fd)


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load restricted to tensors and plain values, with every way a file can be unreadable (truncated,
    empty, not a torch file, holding arbitrary Python objects) reported as one line naming the file."""
    import torch

    path = Path(path).expanduser()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise FeatcacheError(f"could not read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - pickle, zip, torch and the OS (a cut-off file) raise many types
        raise FeatcacheError(
            f"{path} is not a readable featcache state file ({_load_failure(e)}); it is damaged or was not written "
            "by featcache: delete it and refit"
        ) from None


def _load_failure(e: Exception) -> str:
    """A short reason for a failed torch.load (torch's own messages span paragraphs and suggest unsafe loading)."""
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and msg.startswith("Weights only load failed"):
        return "it holds Python objects other than tensors and plain values"
    if isinstance(e, OSError):  # seeking past the end of a cut-off archive
        return f"it is truncated: {e.strerror or type(e).__name__}"
    if isinstance(e, EOFError):
        return "it is empty or cut short"
    if isinstance(e, RuntimeError) and ("zip" in msg or "archive" in msg):
        return "it is truncated or not a torch archive"
    return f"not a torch file: {type(e).__name__}"


def read_json(path: str | Path, what: str, fix: str = "delete it and write it again") -> Any:
    """The JSON value in `path`, or a one-line error naming the file, `what` it should be and how to `fix` it."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise FeatcacheError(f"no {what} at {path}") from None
    except OSError as e:
        raise FeatcacheError(f"could not read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FeatcacheError(f"{path} is not a readable {what} (not UTF-8 text); it is damaged: {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FeatcacheError(
            f"{path} is not a readable {what} ({e.msg} at line {e.lineno}); it is damaged: {fix}"
        ) from None
