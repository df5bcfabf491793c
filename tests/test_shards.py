"""Extraction under torchrun (2 CPU processes, gloo): the assembled store equals a one-process store of the same
settings; a rank that dies mid-share resumes on rerun; another process count is refused while shards remain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import folder_manifest, write_images

from featcache.extract import extract
from featcache.shards import _blocks, shard_path, share
from featcache.store import Store

TINY = "featcache-tiny/random"


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "cli.main", "extract", "--backbone", TINY, "--workers", "0", "--quiet", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def assert_same_store(a: Path, b: Path) -> None:
    """Same fingerprint, rows, ids, labels, skipped items and texts; features within float16 storage."""
    with Store.open(a) as sa, Store.open(b) as sb:
        assert sa.fingerprint == sb.fingerprint
        assert sa.splits == sb.splits
        for s in sa.splits:
            x, y = sa.split(s), sb.split(s)
            assert sa.ids(s) == sb.ids(s) and np.array_equal(x.labels, y.labels)
            np.testing.assert_allclose(x.features, y.features, atol=2e-3)
            assert (x.aug is None) == (y.aug is None)
            if x.aug is not None:
                np.testing.assert_allclose(x.aug, y.aug, atol=2e-3)
            assert sa.skipped(s) == sb.skipped(s)
        np.testing.assert_allclose(sa.text(), sb.text(), atol=1e-6)


def test_shares_cover_every_item_once():
    for n in (0, 1, 5, 1077):
        for size in (1, 2, 3, 8):
            bounds = [share(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_two_processes_equal_one(tmp_path, tiny):
    """digits with two augmented views per training image and pre-projection features: the views keep their
    one-process seeds, and the raw norms, pre-projection rows and the projection come through the assembly."""
    r = torchrun("--dataset", "digits", "--cache-dir", str(tmp_path / "two"), "--augment-views", "2",
                 "--pre-projection")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("store: ") == 1  # one summary, from rank 0
    two = next((tmp_path / "two").rglob("*.h5"))
    one = extract("digits", tiny, cache_dir=tmp_path / "one", workers=0, augment_views=2, progress=False,
                  pre_projection=True)  # fmt: skip
    assert_same_store(two, one)
    with Store.open(two) as a, Store.open(one) as b:
        for s in a.splits:
            pa, pb = a.pre_features(s), b.pre_features(s)
            np.testing.assert_allclose(pa.features, pb.features, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(a.norms(s), b.norms(s), rtol=1e-4)
        np.testing.assert_allclose(a.split("train").aug_norms, b.split("train").aug_norms, rtol=1e-4)
        np.testing.assert_array_equal(a.projection()[0], b.projection()[0])
    assert sorted(p.name for p in two.parent.iterdir()) == ["digits__fixed.h5", "digits__fixed.h5.lock"]


def test_a_dead_rank_resumes_and_another_process_count_is_refused(tmp_path, tiny):
    """Rank 1 meets an unreadable image (torchrun then stops rank 0 too); both shards keep their finished
    batches. One process is refused while they remain; the same torchrun with --skip-bad resumes them."""
    classes = ["cat", "dog"]
    data = tmp_path / "data"
    write_images(data / "toy" / "train", 12, classes, seed=1)
    write_images(data / "toy" / "test", 3, classes, seed=2)
    (data / "toy" / "train" / "dog" / "010.png").write_bytes(b"\x89PNG broken")  # in rank 1's half
    manifest = tmp_path / "toy.json"
    manifest.write_text(json.dumps(folder_manifest("toy", classes)))
    cache = tmp_path / "cache"
    args = ["--manifest", str(manifest), "--data-root", str(data), "--cache-dir", str(cache), "--batch-size", "4"]
    r = torchrun(*args)
    assert r.returncode != 0 and "unreadable image" in r.stderr
    store = cache / "featcache-tiny__random" / "toyfolder__folder.h5"
    assert not store.exists()
    shard1 = Path(str(shard_path(store, 1, 2)) + ".partial")
    with _h5(shard1) as f:
        assert int(f["splits/train"].attrs["rows_done"]) >= 4  # rank 1's batches before the bad image were kept

    with pytest.raises(Exception, match=r"unfinished shards of a 2-process torchrun extraction .* to start over"):
        extract(manifest, tiny, data_root=data, cache_dir=cache, workers=0, progress=False, skip_bad=True)

    r = torchrun(*args, "--skip-bad")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in store.parent.iterdir()) == ["toyfolder__folder.h5", "toyfolder__folder.h5.lock"]
    one = extract(manifest, tiny, data_root=data, cache_dir=tmp_path / "one", workers=0, progress=False,
                  skip_bad=True, batch_size=4)  # fmt: skip
    assert_same_store(store, one)
    with Store.open(store) as st:
        assert [i for i, _ in st.skipped("train")] == ["train/dog/010.png"] and st.num_rows("train") == 23


def _h5(path: Path):
    import h5py

    return h5py.File(path, "r")


def test_copy_plan_counts_skipped_items_in_the_last_block_of_each_shard(tmp_path, monkeypatch):
    """The assembly copies blocks whose item counts add up to the split's items (skipped ones included), so an
    interrupted assembly always stopped at a block boundary."""
    import h5py

    import featcache.shards as shards

    monkeypatch.setattr(shards, "COPY_ROWS", 3)
    store = tmp_path / "s.h5"
    for r, (rows, items) in enumerate([(7, 8), (0, 1)]):
        with h5py.File(Path(str(shard_path(store, r, 2)) + ".partial"), "w") as f:
            g = f.create_group("splits/train")
            g.attrs.update({"rows_done": rows, "items_done": items, "complete": True})
    plan = _blocks(store, 2, "train")
    assert [(lo, hi, n, last) for _, lo, hi, n, last in plan] == [(0, 3, 3, False), (3, 6, 3, False),
                                                                  (6, 7, 2, True), (0, 0, 1, True)]  # fmt: skip
    assert sum(n for *_, n, _ in plan) == 9
