"""One result record type for every run, written as JSON lines; tables come from pandas over the records."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FeatcacheError

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Library versions for a record, read from the installed distributions' metadata: importing open_clip (and
    with it torchvision) or scikit-learn just to ask their version would cost a cached fit seconds of start-up."""
    from importlib.metadata import PackageNotFoundError, version

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    import torch

    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "open_clip": dist("open_clip_torch"),
        "sklearn": dist("scikit-learn"),
        "python": platform.python_version(),
    }


def new_run_id() -> str:
    """A fresh run id (a resumed streaming run keeps the one its checkpoint holds)."""
    return uuid.uuid4().hex[:12]


@dataclass
class Record:
    """Everything needed to compare and reproduce one run. Metrics are percentages; a metric that does not
    apply (a linear probe's novel accuracy) is null, never a number."""

    method: str
    dataset: str
    backbone: str
    protocol: str
    shots: int
    seed: int
    metrics: dict[str, float | None]
    fit_seconds: float
    trainable_params: int
    config: dict[str, Any]
    store: dict[str, Any]  # the store's fingerprint (+ path)
    sampled: dict[str, Any]  # row counts and sha256 of the sampled train/val row positions
    template: str | None = None
    eval_dataset: str | None = None  # cross-dataset / DG: the store evaluated on
    variant: str | None = None  # a sweep's named override (its own leaderboard row)
    sweep_key: str | None = None  # identifies the run inside a sweep (resume skips keys already recorded)
    error: str | None = None  # a failed run: the one-line error, and no metrics
    selection: str | None = None  # what model selection looked at (featcache.adapters.base.SELECTIONS)
    fit: dict[str, Any] = field(default_factory=dict)  # epochs run, best epoch, best val acc
    versions: dict[str, str] = field(default_factory=versions)
    run_id: str = field(default_factory=new_run_id)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    featcache_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=_jsonable)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_record(path: str | Path, record: Record) -> None:
    """Append one record as one line, so that a results file only ever holds whole records.

    A torn last line left by an earlier crash or full disk is cut off first (with a warning), so the new record
    starts on a line of its own instead of being glued onto the fragment. The line goes out in one os.write (looped
    on short writes) under an exclusive lock and is fsynced; if any of that fails the file is truncated back to its
    size before the append and a one-line FeatcacheError says what happened."""
    path = Path(path).expanduser()
    line = (record.to_json() + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise FeatcacheError(f"could not open results file {path}: {e.strerror or e}; {_FIX}") from None
    try:
        _lock(fd)
        size = _repair_tail(fd, path)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except BaseException as e:
            os.ftruncate(fd, size)  # no partial record stays behind
            os.fsync(fd)
            if isinstance(e, OSError):
                raise FeatcacheError(
                    f"could not append a record to {path}: {e.strerror or e}; {_FIX} (the file is unchanged)"
                ) from None
            raise
    except OSError as e:  # the repair or the rollback itself failed
        raise FeatcacheError(f"could not update results file {path}: {e.strerror or e}; {_FIX}") from None
    finally:
        os.close(fd)


_FIX = "free disk space or fix the file's permissions and rerun"


def _lock(fd: int) -> None:
    """Exclusive for the repair, the write and a rollback: parallel sweep workers append to one file, and a
    rollback must not cut off a record another process appended meanwhile."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: single appends of whole lines are still atomic
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def _repair_tail(fd: int, path: Path) -> int:
    """Cut the file back to its last newline if it does not end in one; returns the (repaired) size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep, pos = 0, size
    while pos > 0:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            keep = start + i + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("%s ended in a torn line (%d bytes, from an interrupted write); removed it", path, size - keep)
    return keep


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file. A line that is not a JSON record is an error naming it (silently dropping it
    would drop a run from every table); only an unterminated last line that does not parse, the torn tail of an
    interrupted append, is skipped, with a warning."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FeatcacheError(f"could not read results file {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty when the file ends in one
    out = [_parse(raw, n, path) for n, raw in enumerate(lines, 1) if raw.strip()]
    if tail.strip():
        try:
            rec = json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if isinstance(rec, dict):  # a complete record that only lacks its newline (a hand-edited file)
            out.append(rec)
        else:
            log.warning("%s: skipped a torn last line (%d bytes, from an interrupted write)", path, len(tail))
    return out


def _parse(raw: bytes, n: int, path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise FeatcacheError(
            f"line {n} of {path} is not a JSON record ({reason}); fix or delete that line (one record per line)"
        ) from None
    if not isinstance(rec, dict):
        raise FeatcacheError(
            f"line {n} of {path} is not a JSON record (a {type(rec).__name__}); fix or delete that line"
        )
    return rec
