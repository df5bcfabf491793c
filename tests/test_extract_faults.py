"""Extraction under faults: full disk, I/O errors, damaged partials, concurrent writers, refused options,
flipped bits, unpicklable imports. Every failure must be one line and leave the user's data recoverable."""

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import flip_chunk_bytes
from typer.testing import CliRunner

from cli.main import app
from featcache.errors import BackboneError, DataError, StoreError
from featcache.extract import extract, store_path
from featcache.store import Store, StoreLock, partial_path

ROOT = Path(__file__).resolve().parents[1]
TINY = "featcache-tiny/random"


def _run(tiny, cache, **kw):
    opts = {"splits": ["val"], "batch_size": 50, "workers": 0, "progress": False} | kw
    return extract("digits", tiny, cache_dir=cache, **opts)


def _final(cache) -> Path:
    return store_path(cache, TINY, "digits", "fixed")


def _arrays(path):
    with Store.open(path) as st:
        out = {}
        for s in st.splits:
            d = st.split(s)
            out[s] = (d.features, d.labels, d.aug, st.ids(s), st.skipped(s))
        return out, st.text_all(), st.classnames


def _same(a, b) -> None:
    (sa, ta, ca), (sb, tb, cb) = _arrays(a), _arrays(b)
    assert sa.keys() == sb.keys() and torch.equal(ta, tb) and ca == cb
    for s in sa:
        for x, y in zip(sa[s], sb[s], strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, s


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail_h5_write(monkeypatch, nth: int, code: int, dataset: str = "features") -> dict:
    """Make the nth write into a `dataset` raise as h5py does after a failed write(2): a RuntimeError whose only
    trace of the cause is 'errno = N' in the HDF5 message text."""
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def write(self, key, value):
        if self.name.rsplit("/", 1)[-1] == dataset:
            calls["n"] += 1
            if calls["n"] == nth:
                raise RuntimeError(
                    f"Can't synchronously write data (file write failed: time = now, filename = 'x', file "
                    f"descriptor = 7, errno = {code}, error message = '{os.strerror(code)}', buf = 0x0)"
                )
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)
    return calls


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny) -> Path:
    """An uninterrupted extraction of digits' val split: what every recovered run must equal."""
    return _run(tiny, tmp_path_factory.mktemp("clean"))


def test_enospc_in_a_write_is_disk_full_and_the_rerun_resumes(tmp_path, tiny, clean, monkeypatch, caplog):
    _fail_h5_write(monkeypatch, 4, errno.ENOSPC)
    with pytest.raises(StoreError, match=r"^disk full while writing digits__fixed\.h5 \(.* MiB free in .*rerun the"):
        _run(tiny, tmp_path)
    monkeypatch.undo()
    part = partial_path(_final(tmp_path))
    assert not _final(tmp_path).exists() and part.exists()
    with h5py.File(part) as f:
        assert int(f["splits/val"].attrs["items_done"]) == 150  # three batches of 50 were committed
    with caplog.at_level(logging.WARNING):
        p = _run(tiny, tmp_path)
    assert "discarding" not in caplog.text  # the partial was sound: resumed, not started over
    _same(p, clean)


def test_eio_is_reported_as_eio_not_disk_full(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    _fail_h5_write(monkeypatch, 2, errno.EIO)
    with pytest.raises(StoreError) as e:
        _run(tiny, tmp_path)
    msg = str(e.value)
    assert "Input/output error (EIO)" in msg and "disk full" not in msg and "\n" not in msg, msg


@pytest.mark.parametrize("damage", ["truncate", "flip", "counts"])
def test_damaged_partial_is_discarded_and_the_rerun_completes(tmp_path, tiny, clean, monkeypatch, caplog, damage):
    _fail_h5_write(monkeypatch, 5, errno.ENOSPC)
    with pytest.raises(StoreError, match="disk full"):
        _run(tiny, tmp_path)
    monkeypatch.undo()
    part = partial_path(_final(tmp_path))
    if damage == "truncate":
        os.truncate(part, part.stat().st_size // 2)
    elif damage == "flip":  # inside the chunk that holds the last committed rows
        with h5py.File(part, "r") as f:
            d = f["splits/val/features"]
            last = int(f["splits/val"].attrs["rows_done"]) - 1
            info = d.id.get_chunk_info_by_coord((last // d.chunks[0] * d.chunks[0], 0))
        with open(part, "r+b") as fh:
            fh.seek(info.byte_offset + 16)
            b = fh.read(8)
            fh.seek(info.byte_offset + 16)
            fh.write(bytes(x ^ 0xFF for x in b))
    else:  # counts ahead of the data
        with h5py.File(part, "a") as f:
            f["splits/val"].attrs["rows_done"] = 10_000
    with caplog.at_level(logging.WARNING):
        p = _run(tiny, tmp_path)
    assert "discarding damaged digits__fixed.h5.partial (" in caplog.text and "starting over" in caplog.text
    _same(p, clean)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if ok.returncode != 0:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_real_full_disk_is_one_line_and_resumes_after_space_is_freed(tmp_path, tiny):
    """A real ENOSPC from a small tmpfs, through the CLI with data loader workers: exit 1, one error line, no
    traceback, no segfault; after the tmpfs grows, the same command finishes a store equal to a clean one."""
    mnt = tmp_path / "small"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and mount -t tmpfs")
    args = ["extract", "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(mnt), "--batch-size", "64",
            "--workers", "2", "--augment-views", "2", "--quiet"]  # fmt: skip
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], check=True)
    try:
        full = _cli(*args)
        assert full.returncode == 1, (full.returncode, full.stderr[-3000:])
        errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "disk full while writing digits__fixed.h5" in errors[0], full.stderr[-3000:]
        assert "Traceback" not in full.stderr and "Slist" not in full.stderr, full.stderr[-3000:]
        assert partial_path(_final(mnt)).exists()
        again = _cli(*args)  # still full: the same one line, never a crash
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)  # space freed
        done = _cli(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        clean = extract("digits", tiny, cache_dir=tmp_path / "ref", batch_size=64, workers=0, augment_views=2,
                        progress=False)  # fmt: skip
        _same(_final(mnt), clean)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import featcache.store as store
    from featcache.extract import extract
    real = store.StoreWriter.write_batch
    def write_then_wait(self, *a, **k):
        real(self, *a, **k)
        ready, go = Path(sys.argv[2]), Path(sys.argv[3])
        if not ready.exists():
            ready.touch()
            while not go.exists():
                time.sleep(0.05)
    store.StoreWriter.write_batch = write_then_wait
    extract("digits", "featcache-tiny/random", cache_dir=sys.argv[1], splits=["val"], batch_size=50, workers=0,
            progress=False)
    """
)


def test_second_extraction_is_refused_and_the_first_continues(tmp_path, tiny, clean):
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path), str(ready), str(go)],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)
        part = partial_path(_final(tmp_path))
        before = (_sha(part), part.stat().st_mtime_ns)
        with pytest.raises(StoreError) as e:
            _run(tiny, tmp_path)
        want = f"another featcache extract (pid {first.pid}) is writing {_final(tmp_path)}; wait for it to finish"
        assert str(e.value).startswith(want), str(e.value)
        with pytest.raises(StoreError, match="another featcache extract"):
            _run(tiny, tmp_path, overwrite=True)  # not even --overwrite touches a live run's files
        assert (_sha(part), part.stat().st_mtime_ns) == before
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    _same(_final(tmp_path), clean)


def test_lock_held_in_this_process_and_the_token_cache_lock(tmp_path, tiny):
    from featcache.streaming.partial import extract_tokens, tokens_path

    with StoreLock(_final(tmp_path), "featcache import"):
        with pytest.raises(StoreError, match=rf"another featcache import \(pid {os.getpid()}\) is writing"):
            _run(tiny, tmp_path)
    assert not partial_path(_final(tmp_path)).exists()
    tok = tokens_path(tmp_path, TINY, "digits", "fixed", 1)
    with StoreLock(tok):
        with pytest.raises(StoreError, match="another featcache extract .* is writing .*__tokens1.h5"):
            extract_tokens("digits", tiny, 1, cache_dir=tmp_path, splits=["val"], progress=False)
    assert extract_tokens("digits", tiny, 1, cache_dir=tmp_path, splits=["val"], progress=False) == tok


def test_refused_overwrite_leaves_the_old_store_byte_identical(tmp_path, tiny, monkeypatch):
    p = _run(tiny, tmp_path)
    before = _sha(p)
    refused = [
        (dict(workers=-2), DataError, r"--workers must be 0 or more, got -2"),
        (dict(augment_views=-2), DataError, r"--augment-views must be 0 or more, got -2"),
        (dict(batch_size=0), DataError, r"--batch-size must be at least 1"),
        (dict(dtype="int8"), StoreError, r"unknown dtype 'int8'"),
        (dict(precision="fp8"), BackboneError, r"unknown precision 'fp8'"),
        (dict(splits=["dev"]), DataError, r"no 'dev' split"),
    ]
    for kw, err, msg in refused:
        with pytest.raises(err, match=msg):
            _run(TINY, tmp_path, overwrite=True, dtype=kw.pop("dtype", "float32"), **kw)
        assert _sha(p) == before and not partial_path(p).exists(), kw
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="--device cuda: .*use --device cpu"):
            _run(TINY, tmp_path, overwrite=True, dtype="float32", device="cuda")
        assert _sha(p) == before
    # an --overwrite that fails half-way also leaves the old store whole; the finished one replaces it
    _fail_h5_write(monkeypatch, 3, errno.EIO)
    with pytest.raises(StoreError, match=r"Input/output error \(EIO\)"):
        _run(tiny, tmp_path, overwrite=True, dtype="float32")
    monkeypatch.undo()
    assert _sha(p) == before and Store.open(p).fingerprint["dtype"] == "float16"
    _run(tiny, tmp_path, overwrite=True, dtype="float32")
    with Store.open(p) as st:
        assert st.fingerprint["dtype"] == "float32" and st.num_rows("val") == 360


def test_cli_negative_augment_views_is_a_bad_value_not_a_bad_image(tmp_path):
    r = CliRunner().invoke(app, ["extract", "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(tmp_path),
                                 "--augment-views", "-2", "--workers", "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 1 and r.stderr.strip() == "error: --augment-views must be >= 0, got -2", r.stderr
    assert not any(tmp_path.rglob("*.h5*"))


def test_flipped_bytes_in_a_chunk_are_an_error_naming_the_store(tmp_path, clean):
    p = tmp_path / "copy.h5"
    shutil.copyfile(clean, p)
    flip_chunk_bytes(p, "/splits/val/features")
    flip_chunk_bytes(p, "/splits/val/ids")
    with Store.open(p) as st:
        with pytest.raises(StoreError, match=rf"^{p} is corrupt \(checksum failed reading /splits/val/features\); "
                                             "delete it and extract again$"):  # fmt: skip
            st.split("val")
        with pytest.raises(StoreError, match="corrupt .*reading /splits/val/features"):
            st.rows("val", [3, 1])
        with pytest.raises(StoreError, match="corrupt .*reading /splits/val/ids"):
            st.ids("val")
        assert st.labels("val").shape == (360,)  # untouched datasets still read
    with h5py.File(clean) as f:  # every dataset carries the checksum
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert names and all(f[n].fletcher32 for n in names), [n for n in names if not f[n].fletcher32]


def test_store_of_the_old_format_says_to_rebuild(tmp_path, tiny):
    p = _run(tiny, tmp_path)
    with h5py.File(p, "a") as f:
        f.attrs["format"] = "1"
    with pytest.raises(StoreError, match=r"store format 1 by an older featcache.*--overwrite"):
        Store.open(p)
    with pytest.raises(StoreError, match=r"store format 1 .*pass --overwrite to rebuild it"):
        _run(tiny, tmp_path)
    _run(tiny, tmp_path, overwrite=True)
    assert Store.open(p).num_rows("val") == 360


def test_npz_with_an_object_array_is_one_line(tmp_path):
    src = tmp_path / "f.npz"
    rng = np.random.default_rng(0)
    np.savez(src, train_features=rng.standard_normal((4, 8)), train_labels=np.arange(4) % 2,
             text_features=rng.standard_normal((2, 8)), classnames=np.array(["ant", None], dtype=object))  # fmt: skip
    r = CliRunner().invoke(app, ["import", str(src), "--name", "obj", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {src}: array 'classnames' holds Python objects (dtype=object)"), r.stderr
    assert not any((tmp_path / "imported").glob("obj.h5*"))
