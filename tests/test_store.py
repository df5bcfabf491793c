import h5py
import numpy as np
import pytest
import torch

from featcache.errors import FingerprintMismatch, StoreError
from featcache.store import FINGERPRINT_FIELDS, Store, StoreWriter, partial_path

FP = {k: f"value-of-{k}" for k in FINGERPRINT_FIELDS} | {"dtype": "float16"}


def _write(path, n=100, d=16, dtype="float16", seed=0, finalize=True):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = torch.arange(n) % 3
    w = StoreWriter(path, FP | {"dtype": dtype})
    text = torch.nn.functional.normalize(torch.randn(2, 3, d, generator=g), dim=-1)
    w.write_text(["a", "b", "c"], ["a {}.", "b {}."], text)
    w.begin_split("train", n, d)
    for i in range(0, n, 32):
        j = min(n, i + 32)
        w.write_batch("train", j - i, feats[i:j], labels[i:j], [f"img{k}" for k in range(i, j)])
    w.finish_split("train")
    if finalize:
        w.finalize()
    else:
        w.close()
    return feats, labels, text


def test_round_trip_fp16_tolerance_and_order(tmp_path):
    p = tmp_path / "s.h5"
    feats, labels, text = _write(p)
    with Store.open(p) as st:
        d = st.split("train")
        assert d.features.dtype == torch.float32 and d.features.shape == (100, 16)
        # float16 keeps ~11 bits: unit-norm components round to within 2^-11 relative, < 5e-4 absolute
        assert (d.features - feats).abs().max() < 5e-4
        assert not torch.equal(d.features, feats)
        assert torch.equal(d.labels, labels)
        assert st.ids("train") == [f"img{k}" for k in range(100)]
        assert st.classnames == ["a", "b", "c"]
        torch.testing.assert_close(st.text(), text[0])
        torch.testing.assert_close(st.text("b {}."), text[1])
        ens = torch.nn.functional.normalize(text.mean(0), dim=-1)
        torch.testing.assert_close(st.text("ensemble"), ens)
        assert st.fingerprint == FP
        with h5py.File(p) as f:
            ds = f["splits/train/features"]
            assert ds.chunks is not None and ds.compression is None


def test_float32_is_exact(tmp_path):
    p = tmp_path / "s32.h5"
    feats, _, _ = _write(p, dtype="float32")
    with Store.open(p) as st:
        assert torch.equal(st.split("train").features, feats)


def test_fingerprint_mismatch_names_the_field(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    with pytest.raises(FingerprintMismatch, match="fingerprint field 'preprocessing' differs: store has"):
        Store.open(p, expect={"backbone": FP["backbone"], "preprocessing": "other"})
    with pytest.raises(FingerprintMismatch, match="'featcache_version' differs.*re-extract with this featcache"):
        Store.open(p, expect={"featcache_version": "9.9"})
    Store.open(p, expect={"backbone": FP["backbone"]}).close()


def test_partial_file_never_looks_complete(tmp_path):
    p = tmp_path / "s.h5"
    _write(p, finalize=False)
    assert not p.exists() and partial_path(p).exists()
    with pytest.raises(StoreError, match="did not finish; rerun the same extract command"):
        Store.open(p)
    # reopening the writer resumes: the split reports its finished items
    w = StoreWriter(p, FP)
    assert w.resumed and w.split_state("train") == (100, 100, True)
    w.finalize()
    assert Store.open(p).num_rows("train") == 100


def test_resume_counts_and_skipped_rows(tmp_path):
    p = tmp_path / "s.h5"
    w = StoreWriter(p, FP)
    w.write_text(["a"], ["{}"], torch.ones(1, 1, 4) / 2)
    w.begin_split("test", 5, 4)
    w.write_batch("test", 3, torch.ones(2, 4) / 2, [0, 0], ["x0", "x2"], skipped=[("x1", "bad.jpg: broken")])
    w.close()
    w = StoreWriter(p, FP)
    assert w.begin_split("test", 5, 4) == 3
    w.write_batch("test", 2, torch.ones(2, 4) / 2, [0, 0], ["x3", "x4"])
    w.finish_split("test")
    w.finalize()
    with Store.open(p) as st:
        assert st.ids("test") == ["x0", "x2", "x3", "x4"]
        assert st.skipped("test") == [("x1", "bad.jpg: broken")]


def test_writer_refuses_other_settings_without_overwrite(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    with pytest.raises(FingerprintMismatch, match="'augmentation' differs.*pass --overwrite"):
        StoreWriter(p, FP | {"augmentation": "x10"})
    before = p.read_bytes()
    w = StoreWriter(p, FP | {"augmentation": "x10"}, overwrite=True)
    assert not w.resumed and "splits" not in w.h5  # overwrite starts from scratch, not from a copy
    w.close()
    assert p.read_bytes() == before  # and the old store stays whole until the new one is finalized


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(StoreError, match="no feature store at .*featcache extract"):
        Store.open(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5 store"):
        Store.open(bad)


def test_large_split_reads_whole(tmp_path):
    p = tmp_path / "big.h5"
    n, d = 50_000, 512
    w = StoreWriter(p, FP)
    w.write_text(["a"], ["{}"], torch.ones(1, 1, d) / d**0.5)
    w.begin_split("train", n, d)
    block = torch.from_numpy(np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))
    w.write_batch("train", n, block, np.zeros(n, dtype=np.int64), [str(i) for i in range(n)])
    w.finish_split("train")
    w.finalize()
    with Store.open(p) as st:
        x = st.split("train").features
    assert x.shape == (n, d) and torch.allclose(x[-1], block[-1], atol=1e-2, rtol=1e-3)


def test_rows_reads_only_what_is_asked_in_that_order(tmp_path):
    p = tmp_path / "s.h5"
    feats, labels, _ = _write(p, dtype="float32")
    with Store.open(p) as st:
        d = st.rows("train", [7, 2, 7, 50])
        assert torch.equal(d.features, feats[[7, 2, 7, 50]]) and d.labels.tolist() == labels[[7, 2, 7, 50]].tolist()
        assert torch.equal(st.labels("train"), labels)
        assert st.rows("train", []).features.shape == (0, 16)


def test_rows_across_many_chunks_equal_fancy_indexing(tmp_path):
    """Rows picked from runs of touched chunks equal plain indexing, for any pattern: single rows, whole chunks,
    neighbouring chunks merged into one read, the last partial chunk, repeats and any order."""
    p = tmp_path / "s.h5"
    n, d = 1000, 64
    w = StoreWriter(p, {"backbone": "b", "dataset": "d", "dtype": "float32"})
    w.write_text(["a", "b"], ["a {}."], torch.nn.functional.normalize(torch.randn(1, 2, d), dim=-1))
    w.begin_split("train", n, d)
    feats = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    w.write_batch("train", n, feats, torch.arange(n) % 2, [f"i{i}" for i in range(n)])
    w.finish_split("train")
    w.finalize()
    rng = np.random.default_rng(0)
    with Store.open(p) as st:
        per = st._group("train")["features"].chunks[0]
        assert per < 100  # many chunks: the test exercises the runs
        for rows in ([0], [n - 1], list(range(per, 3 * per)), rng.integers(0, n, 300).tolist(), [999, 0, 5, 5]):
            got = st.rows("train", rows)
            assert torch.equal(got.features, feats[rows]) and got.labels.tolist() == [r % 2 for r in rows]
