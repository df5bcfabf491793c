"""Extraction under torchrun: every rank encodes a contiguous share of each split into its own shard, then rank 0
assembles the store in split-file order.

    torchrun --nproc_per_node 8 -m cli.main extract --dataset imagenet --backbone ViT-B-16-quickgelu/openai
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 $(which featcache) extract ...

Why contiguous shares: rank r of W takes items [r·N/W, (r+1)·N/W) of every split, so the assembled rows are the
shards concatenated in rank order — exactly the split file's order, which the few-shot draw depends on — and each
image keeps the augmentation seed it has in one process (the seed is derived from its index in the split).

A shard is an ordinary `StoreWriter` partial (`<store>.rank<r>of<W>.h5.partial`) with the same fingerprint, lock,
checksums and resume rules as a one-process store; it is never finalized on its own. Rank 0 writes the class
texts (and captions, for retrieval) itself, copies the shards' rows into the real store's partial, renames it into
place and only then deletes the shards. So a killed rank or job resumes each shard where it stopped; a rerun with
another number of processes is refused while unfinished shards of the old layout exist (their work cannot be
split differently), naming them and the two ways forward.

Progress: each rank writes its running count to `<shard>.progress` (at most once a second); rank 0's bar sums
them, so it shows images/s over all ranks and the ETA of the whole job. Collectives are used only for the two
barriers (shards done; store assembled), with a long timeout: ranks finish their shares at different times.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import StoreError
from .store import StoreWriter, _decode, partial_path, read_checked

COPY_ROWS = 65_536  # rows per copied block at assembly: bounded memory for any split size
BARRIER_TIMEOUT = datetime.timedelta(hours=48)  # a rank may wait for the slowest share of a huge split


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0"))


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's contiguous share [lo, hi) of n items; shares differ by at most one item and cover 0..n exactly."""
    return n * rank // size, n * (rank + 1) // size


def shard_path(path: Path, rank: int, size: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}of{size}.h5")


def _shard_files(path: Path) -> dict[int, list[Path]]:
    """Unfinished shard partials of a store, by the world size that wrote them."""
    pat = re.compile(re.escape(path.stem) + r"\.rank(\d+)of(\d+)\.h5\.partial$")
    out: dict[int, list[Path]] = {}
    for p in sorted(path.parent.glob(f"{path.stem}.rank*of*.h5.partial")) if path.parent.is_dir() else []:
        m = pat.match(p.name)
        if m:
            out.setdefault(int(m[2]), []).append(p)
    return out


def check_layout(path: Path, size: int) -> None:
    """Refuse to start when unfinished shards of another world size exist (one process counts as size 1): their
    rows cannot be re-split, and silently starting over would throw their work away."""
    for other, files in _shard_files(path).items():
        if other != size:
            how = "one process" if size == 1 else f"{size} processes"
            raise StoreError(
                f"{path.name} has unfinished shards of a {other}-process torchrun extraction ({files[0].name}, ...); "
                f"rerun with torchrun --nproc_per_node ... totalling {other} processes to resume them, or delete "
                f"{path.parent / (path.stem + '.rank*')} to start over with {how}"
            )


def init_group(device: torch.device) -> bool:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); True if this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    return True


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per local rank; CPU ranks share the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


class Progress:
    """Each rank's running item count in a small file beside its shard; rank 0 reads them all."""

    def __init__(self, path: Path, rank: int, size: int):
        self.files = [shard_path(path, r, size).with_suffix(".progress") for r in range(size)]
        self.mine = self.files[rank]
        self._last = 0.0

    def report(self, count: int, force: bool = False) -> bool:
        """Write this rank's count, at most once a second (or now, with `force`); True when it did."""
        now = time.monotonic()
        if not force and now - self._last < 1.0:
            return False
        self._last = now
        tmp = self.mine.with_suffix(".progress.tmp")
        try:
            tmp.write_text(str(count))
            os.replace(tmp, self.mine)
        except OSError:  # progress is a courtesy: a full disk must not stop the extraction here
            pass
        return True

    def total(self) -> int:
        n = 0
        for f in self.files:
            try:
                n += int(f.read_text() or 0)
            except (OSError, ValueError):
                pass
        return n

    def remove(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


def _blocks(path: Path, size: int, split: str) -> list[tuple[Path, int, int, int, bool]]:
    """The copy plan of a split: (shard, first row, end row, items consumed, last block of its shard), in rank
    order. Deterministic, so an interrupted assembly resumes at a block boundary: the store's `items_done` is
    always the sum of the items of the blocks already copied."""
    out = []
    for r in range(size):
        shard = partial_path(shard_path(path, r, size))
        with h5py.File(shard, "r") as f:
            g = f["splits"][split]
            if not g.attrs["complete"]:
                raise StoreError(f"{shard.name}: split '{split}' is unfinished; rerun the same torchrun command")
            rows, items = int(g.attrs["rows_done"]), int(g.attrs["items_done"])
        starts = list(range(0, rows, COPY_ROWS)) or [0]
        for lo in starts:
            hi, last = min(rows, lo + COPY_ROWS), lo == starts[-1]
            out.append((shard, lo, hi, (hi - lo) + (items - rows if last else 0), last))
    return out


def copy_shards(writer: StoreWriter, path: Path, size: int, split: str, n_items: int, begin: dict) -> None:
    """Append every shard's rows of `split` to the store's writer, in rank order (= split-file order): features,
    labels, ids and whatever else the shards keep (views, norms, pre-projection features, skipped items)."""
    done, _, complete = writer.split_state(split)
    if complete and done == n_items:
        return
    done = writer.begin_split(split, n_items, **begin)
    at = 0
    for shard, lo, hi, n, last in _blocks(path, size, split):
        at += n
        if at <= done:
            continue  # copied before an interruption
        with h5py.File(shard, "r") as f:
            g = f["splits"][split]

            def get(name: str, g=g, shard=shard, lo=lo, hi=hi) -> np.ndarray:
                return read_checked(shard, g[name], np.s_[lo:hi])

            rows = {k: torch.from_numpy(get(k)) for k in ("aug", "norms", "aug_norms", "pre", "pre_aug") if k in g}
            skipped = None
            if last and "skipped" in g:
                skipped = [tuple(x.split("\t", 1)) for x in _decode(read_checked(shard, g["skipped"]))]
            writer.write_batch(split, n, torch.from_numpy(get("features")), get("labels"), _decode(get("ids")),
                               rows.pop("aug", None), skipped, **rows)  # fmt: skip
    writer.finish_split(split)


def remove_shards(path: Path, size: int) -> None:
    """After the store is in place: the shards' partials and lock files, and the progress files."""
    for r in range(size):
        shard = shard_path(path, r, size)
        for f in (partial_path(shard), shard.with_name(shard.name + ".lock"), shard.with_name(shard.name + ".lock.pid"),
                  shard.with_suffix(".progress")):  # fmt: skip
            f.unlink(missing_ok=True)
