"""One result record type for every run, written as JSON lines; tables come from pandas over the records."""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__


def versions() -> dict[str, str]:
    import open_clip
    import sklearn
    import torch

    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


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
    fit: dict[str, Any] = field(default_factory=dict)  # epochs run, best epoch, best val acc
    versions: dict[str, str] = field(default_factory=versions)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
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
    """Append one line. A single write of a complete line, flushed and fsynced, so a crash cannot leave half a
    record in the middle of the file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.to_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line from a crash is ignored)."""
    out = []
    for line in Path(path).expanduser().read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
