import io
import zipfile

import numpy as np
import pytest
import torch

from featcache.errors import StoreError
from featcache.importers import import_npz, import_tip, imported_path
from featcache.store import Store


def _npz(path, n=(12, 4, 6), c=3, d=8, text_shape=None, **drop):
    rng = np.random.default_rng(0)
    arrays = {"classnames": np.array(["ant", "bee", "cow"][:c])}
    for s, k in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{s}_features"] = rng.standard_normal((k, d)).astype(np.float32) * 7.0  # not normalised
        arrays[f"{s}_labels"] = np.arange(k) % c
    arrays["text_features"] = rng.standard_normal(text_shape or (c, d)).astype(np.float32)
    for k in drop:
        arrays.pop(k)
    np.savez(path, **arrays)
    return arrays


def test_npz_import_normalises(tmp_path):
    src = tmp_path / "f.npz"
    a = _npz(src)
    p = import_npz(src, "mine", cache_dir=tmp_path, dtype="float32")
    assert p == imported_path("mine", tmp_path)
    with Store.open(p) as st:
        assert st.splits == ["train", "val", "test"] and st.classnames == ["ant", "bee", "cow"]
        tr = st.split("train")
        want = torch.nn.functional.normalize(torch.from_numpy(a["train_features"]), dim=-1)
        torch.testing.assert_close(tr.features, want)
        assert tr.labels.tolist() == (np.arange(12) % 3).tolist()
        torch.testing.assert_close(
            st.text(), torch.nn.functional.normalize(torch.from_numpy(a["text_features"]), dim=-1)
        )
        assert st.fingerprint["split_scheme"] == "imported" and st.extra["source"] == "npz"


def test_npz_with_template_stack_and_only_train(tmp_path):
    src = tmp_path / "f.npz"
    _npz(src, text_shape=(4, 3, 8), val_features=1, val_labels=1, test_features=1, test_labels=1)
    with Store.open(import_npz(src, "t", cache_dir=tmp_path)) as st:
        assert st.splits == ["train"] and st.text_all().shape == (4, 3, 8) and len(st.templates) == 4


def test_npz_with_only_a_test_split_serves_zero_shot(tmp_path):
    from featcache.api import fit_method

    src = tmp_path / "f.npz"
    _npz(src, train_features=1, train_labels=1, val_features=1, val_labels=1)
    with Store.open(import_npz(src, "t", cache_dir=tmp_path)) as st:
        assert st.splits == ["test"]
    rec = fit_method("zero-shot", name="t", cache_dir=tmp_path, protocol="fewshot").record
    assert rec.metrics["acc"] is not None and rec.sampled["n_train"] == 0


@pytest.mark.parametrize(
    "drop,msg",
    [
        ({"text_features": 1}, "missing array 'text_features'"),
        ({k: 1 for s in ("train", "val", "test") for k in (f"{s}_features", f"{s}_labels")}, "no split to import"),
        ({"test_labels": 1}, "has test_features but no test_labels"),
    ],
)
def test_npz_missing_arrays(tmp_path, drop, msg):
    src = tmp_path / "f.npz"
    _npz(src, **drop)
    with pytest.raises(StoreError, match=msg):
        import_npz(src, "x", cache_dir=tmp_path)
    assert not imported_path("x", tmp_path).exists()


def test_npz_bad_shapes_and_labels(tmp_path):
    src = tmp_path / "f.npz"
    _npz(src, text_shape=(3, 5))
    with pytest.raises(StoreError, match=r"train features must be \[N, 5\]"):
        import_npz(src, "x", cache_dir=tmp_path)
    a = _npz(src)
    a["train_labels"] = a["train_labels"] + 5
    np.savez(src, **a)
    with pytest.raises(StoreError, match=r"labels must lie in 0..2"):
        import_npz(src, "x", cache_dir=tmp_path)


def test_existing_name_needs_overwrite(tmp_path):
    src = tmp_path / "f.npz"
    _npz(src)
    import_npz(src, "dup", cache_dir=tmp_path)
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        import_npz(src, "dup", cache_dir=tmp_path)
    import_npz(src, "dup", cache_dir=tmp_path, overwrite=True)
    with pytest.raises(StoreError, match="invalid store name"):
        import_npz(src, "../evil", cache_dir=tmp_path)


def _save_as_if_on_gpu(obj, path):
    """torch.save, then rewrite the storage location tag to cuda:0, as a file saved on a GPU machine has."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without CUDA")
def test_gpu_saved_file_really_needs_map_location(tmp_path):
    _save_as_if_on_gpu(torch.ones(3), tmp_path / "t.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "t.pt", weights_only=True)
    assert torch.load(tmp_path / "t.pt", weights_only=True, map_location="cpu").sum() == 3


def _tip_folder(tmp_path, shots=(4,), c=3, d=8, gpu=True):
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "tip"
    folder.mkdir()
    save = _save_as_if_on_gpu if gpu else torch.save
    n = None
    for k in shots:
        n = k * c
        keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).t().contiguous()  # [D, N]
        values = torch.nn.functional.one_hot(torch.arange(n) % c, c).half()  # [N, C], as Tip-Adapter saves
        save(keys.half(), folder / f"keys_{k}shots.pt")
        save(values, folder / f"values_{k}shots.pt")
    save(torch.randn(5, d, generator=g).half(), folder / "val_f.pt")
    save(torch.arange(5) % c, folder / "val_l.pt")
    save(torch.randn(7, d, generator=g), folder / "test_f.pt")
    save(torch.arange(7) % c, folder / "test_l.pt")
    (tmp_path / "classes.txt").write_text("ant\nbee\ncow\n")
    np.save(tmp_path / "text.npy", torch.randn(d, c, generator=g).numpy())  # clip_weights are [D, C]
    return folder, n


def test_tip_adapter_folder_saved_on_gpu_imports_on_cpu(tmp_path):
    folder, n = _tip_folder(tmp_path)
    p = import_tip(folder, "tip", tmp_path / "classes.txt", tmp_path / "text.npy", cache_dir=tmp_path)
    keys = torch.load(folder / "keys_4shots.pt", map_location="cpu", weights_only=True).float()
    with Store.open(p) as st:
        assert {s: st.num_rows(s) for s in st.splits} == {"train": n, "val": 5, "test": 7}
        tr = st.split("train")
        assert (tr.features - torch.nn.functional.normalize(keys.t(), dim=-1)).abs().max() < 1e-3
        assert tr.labels.tolist() == (torch.arange(n) % 3).tolist()
        assert st.text().shape == (3, 8) and st.extra == {"source": "tip-adapter", "tip_shots": 4}


def test_tip_adapter_needs_shots_when_ambiguous(tmp_path):
    folder, _ = _tip_folder(tmp_path, shots=(1, 4), gpu=False)
    args = (folder, "tip", tmp_path / "classes.txt", tmp_path / "text.npy")
    with pytest.raises(StoreError, match=r"caches for \[1, 4\] shots; choose one with --shots"):
        import_tip(*args, cache_dir=tmp_path)
    with pytest.raises(StoreError, match=r"no keys_2shots.pt \(found shots: \[1, 4\]\)"):
        import_tip(*args, shots=2, cache_dir=tmp_path)
    with Store.open(import_tip(*args, shots=1, cache_dir=tmp_path)) as st:
        assert st.num_rows("train") == 3
    with pytest.raises(StoreError, match="no keys_<K>shots.pt file"):
        import_tip(tmp_path, "x", tmp_path / "classes.txt", tmp_path / "text.npy", cache_dir=tmp_path)
