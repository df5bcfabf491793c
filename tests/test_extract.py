import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import folder_manifest, write_images
from PIL import Image

from featcache.data import load_image
from featcache.errors import DataError, FingerprintMismatch, StoreError
from featcache.extract import extract, store_path
from featcache.manifests import load_manifest, parse_manifest
from featcache.store import Store, StoreWriter, partial_path


def _arrays(path):
    with Store.open(path) as st:
        out = {s: st.split(s) for s in st.splits}
        return {s: (d.features, d.labels, d.aug, st.ids(s)) for s, d in out.items()}


def test_digits_store_contents(digits_store, tiny):
    from sklearn.datasets import load_digits

    digits = load_digits()
    m = load_manifest("digits")
    with Store.open(digits_store, expect={"backbone": "featcache-tiny/random", "dataset": "digits"}) as st:
        assert st.splits == ["train", "val", "test"]
        assert {s: st.num_rows(s) for s in st.splits} == {"train": 1077, "val": 360, "test": 360}
        ids = st.ids("test")
        rows = [int(i.split("/")[1]) for i in ids]
        assert rows == list(range(0, 1797, 5))  # the documented split, in the source's order
        test = st.split("test")
        assert torch.equal(test.labels, torch.from_numpy(digits.target[rows]).long())
        torch.testing.assert_close(test.features.norm(dim=-1), torch.ones(360), atol=2e-3, rtol=0)
        # stored rows equal a direct forward of the same images (within float16 storage)
        x = torch.stack([tiny.preprocess(load_image(r, _digits_source())) for r in rows[:8]])
        direct = tiny.encode_images(x)
        assert (test.features[:8] - direct).abs().max() < 1e-3
        # text: the dataset's own template first, then the ensemble's others; ensemble = mean, renormalised
        assert st.templates[0] == m.template and set(st.templates) == set(m.templates) | {m.template}
        direct_text = tiny.encode_texts([m.template.format(c) for c in m.classnames])
        torch.testing.assert_close(st.text(), direct_text, atol=1e-5, rtol=0)
        per = torch.stack([tiny.encode_texts([t.format(c) for c in m.classnames]) for t in m.templates])
        torch.testing.assert_close(st.text("ensemble"), torch.nn.functional.normalize(per.mean(0), dim=-1))
        fp = st.fingerprint
        assert fp["manifest_sha256"] == m.sha256 and fp["weights_sha256"] == tiny.weights_sha256
        assert fp["augmentation"] == "none" and fp["dtype"] == "float16" and fp["split_scheme"] == "fixed"


def _digits_source():
    from sklearn.datasets import load_digits

    from featcache.data import _Digits

    return _Digits(load_digits().images)


def test_rerun_is_a_no_op(digits_store, tiny):
    before = digits_store.stat().st_mtime_ns
    again = extract("digits", "featcache-tiny/random", cache_dir=digits_store.parent.parent, progress=False)
    assert again == digits_store and digits_store.stat().st_mtime_ns == before


def test_augmented_views_are_seeded_and_independent_of_batching(tmp_path, tiny):
    a = extract("digits", tiny, cache_dir=tmp_path / "a", splits=["train"], augment_views=2, batch_size=100,
                workers=0, progress=False)  # fmt: skip
    b = extract("digits", tiny, cache_dir=tmp_path / "b", splits=["train"], augment_views=2, batch_size=37,
                workers=2, progress=False)  # fmt: skip
    fa, _, va, _ = _arrays(a)["train"]
    fb, _, vb, _ = _arrays(b)["train"]
    assert va.shape == (1077, 2, 64)
    assert torch.equal(fa, fb) and torch.equal(va, vb)
    assert not torch.allclose(va[:, 0], va[:, 1])  # two different views
    assert not torch.allclose(va[:, 0], fa)  # and not the clean view
    with Store.open(a) as st:
        assert "x2 seed=0" in st.fingerprint["augmentation"]
    with pytest.raises(FingerprintMismatch, match="'augmentation' differs.*--overwrite"):
        extract("digits", tiny, cache_dir=tmp_path / "a", splits=["train"], progress=False)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import featcache.store as store
    from featcache.extract import extract
    real = store.StoreWriter.write_batch
    calls = {"n": 0}
    def write_then_die(self, *a, **k):
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, no finally blocks
    store.StoreWriter.write_batch = write_then_die
    extract("digits", "featcache-tiny/random", cache_dir=sys.argv[1], batch_size=100, workers=0,
            augment_views=1, progress=False)
    """
)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny):
    cache = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cache), "7"], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    final = store_path(cache, "featcache-tiny/random", "digits", "fixed")
    part = partial_path(final)
    assert not final.exists() and part.exists()
    with h5py.File(part) as f:
        assert int(f["splits/train"].attrs["items_done"]) == 700  # 7 batches of 100 survived the kill

    resumed = extract("digits", tiny, cache_dir=cache, batch_size=100, workers=0, augment_views=1, progress=False)
    clean = extract("digits", tiny, cache_dir=tmp_path / "clean", batch_size=100, workers=0, augment_views=1,
                    progress=False)  # fmt: skip
    ra, ca = _arrays(resumed), _arrays(clean)
    assert ra.keys() == ca.keys() == {"train", "val", "test"}
    for s in ra:
        for x, y in zip(ra[s], ca[s], strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), s
            else:
                assert x == y


def _toy_extract(data, manifest, tmp_path, tiny, **kw):
    return extract(manifest, tiny, data_root=data, cache_dir=tmp_path / "cache", workers=0, batch_size=4,
                   progress=False, **kw)  # fmt: skip


def test_image_folder_with_user_manifest(toy_folder, tmp_path, tiny):
    data, mpath = toy_folder
    p = _toy_extract(data, mpath, tmp_path, tiny)
    with Store.open(p) as st:
        assert st.num_rows("train") == 12 and st.num_rows("test") == 6
        assert st.ids("test")[:2] == ["test/cat/000.png", "test/cat/001.png"]
        assert st.split("test").labels.tolist() == [0, 0, 1, 1, 2, 2]
        assert st.classnames == ["cat", "dog", "red fox"]


def test_corrupt_image_stops_with_its_name_or_is_skipped(toy_folder, tmp_path, tiny):
    data, mpath = toy_folder
    bad = data / "toy" / "train" / "dog" / "001.png"
    bad.write_bytes(b"\x89PNG truncated garbage")
    with pytest.raises(DataError, match=r"unreadable image .*dog/001\.png.*--skip-bad"):
        _toy_extract(data, mpath, tmp_path, tiny)
    p = _toy_extract(data, mpath, tmp_path, tiny, skip_bad=True)
    with Store.open(p) as st:
        ids = st.ids("train")
        assert len(ids) == 11 and "train/dog/001.png" not in ids
        (sid, err), = st.skipped("train")  # fmt: skip
        assert sid == "train/dog/001.png" and "dog/001.png" in err
        labels = st.split("train").labels.tolist()
        assert labels == [0] * 4 + [1] * 3 + [2] * 4


def test_count_mismatch_and_missing_folder(toy_folder, tmp_path, tiny):
    data, mpath = toy_folder
    raw = json.loads(mpath.read_text())
    raw["schemes"]["folder"]["counts"]["train"] = 13
    with pytest.raises(DataError, match=r"train: found 12 items, expected 13; the download is partial"):
        extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path, progress=False)
    with pytest.raises(DataError, match=r"image folder not found .*Put the images under"):
        extract(mpath, tiny, data_root=tmp_path / "nowhere", cache_dir=tmp_path, progress=False)


def test_split_json_keeps_file_order(tmp_path, tiny):
    """CoOp split files are not sorted; rows must follow the file (the few-shot draw depends on it)."""
    data = tmp_path / "data"
    rel = write_images(data / "toy" / "images", 3, ["a", "b"])
    order = [rel[4], rel[0], rel[5], rel[2], rel[1], rel[3]]
    split = {"train": [[r, int(r.startswith("b")), r[0]] for r in order[:4]],
             "val": [], "test": [[r, int(r.startswith("b")), r[0]] for r in order[4:]]}  # fmt: skip
    (data / "toy" / "split_zhou_Toy.json").write_text(json.dumps(split))
    raw = folder_manifest("toy", ["a", "b"])
    raw["schemes"] = {"coop": {"source": {"kind": "split_json", "split_file": "toy/split_zhou_Toy.json",
                                          "image_dirs": ["elsewhere/images", "toy/images"]},
                               "counts": {"train": 4, "val": 0, "test": 2}}}  # fmt: skip
    raw["default_scheme"] = "coop"
    p = extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path / "c", splits=["train", "test"],
                workers=0, progress=False)  # fmt: skip
    with Store.open(p) as st:
        assert st.ids("train") == order[:4]
        assert st.split("train").labels.tolist() == [1, 0, 1, 0]


def test_list_file_source(tmp_path, tiny):
    data = tmp_path / "data" / "air"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(data / "images" / f"{i:07d}.jpg")
    (data / "test.txt").write_text("0000002 Boeing 707-320\n0000000 A300B4\n0000001 Boeing 707-320\n")
    raw = folder_manifest("x", ["707-320", "A300B4"])
    raw["schemes"] = {"v": {"source": {"kind": "list_file", "dirs": ["air"], "image_subdir": "images",
                                       "image_ext": ".jpg", "splits": {"test": "test.txt"},
                                       "class_keys": ["Boeing 707-320", "A300B4"]}}}  # fmt: skip
    raw["default_scheme"] = "v"
    p = extract(parse_manifest(raw), tiny, data_root=tmp_path / "data", cache_dir=tmp_path / "c", workers=0,
                progress=False)  # fmt: skip
    with Store.open(p) as st:
        assert st.ids("test") == ["images/0000002.jpg", "images/0000000.jpg", "images/0000001.jpg"]
        assert st.split("test").labels.tolist() == [0, 1, 0]


def test_torchvision_source(toy_folder, tmp_path, tiny):
    """A torchvision dataset class as the source (ImageFolder: same files as the folder source)."""
    data, mpath = toy_folder
    raw = json.loads(mpath.read_text())
    raw["schemes"]["tv"] = {"source": {"kind": "torchvision", "class": "ImageFolder", "root": "toy",
                                       "splits": {"test": {"root": "toy/test"}}}, "counts": {"test": 6}}  # fmt: skip
    p = extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path / "c", split_scheme="tv",
                workers=0, progress=False)  # fmt: skip
    q = _toy_extract(data, mpath, tmp_path, tiny, splits=["test"])
    with Store.open(p) as a, Store.open(q) as b:
        assert a.split("test").labels.tolist() == b.split("test").labels.tolist()
        assert torch.equal(a.split("test").features, b.split("test").features)


def test_add_a_split_later_keeps_the_others(tmp_path, tiny):
    p = extract("digits", tiny, cache_dir=tmp_path, splits=["test"], workers=0, progress=False)
    first = _arrays(p)["test"][0]
    extract("digits", tiny, cache_dir=tmp_path, splits=["val"], workers=0, progress=False)
    with Store.open(p) as st:
        assert st.splits == ["val", "test"]
        assert torch.equal(st.split("test").features, first)


def test_full_disk_keeps_finished_batches(tmp_path, tiny, monkeypatch):
    real = StoreWriter.write_batch
    calls = {"n": 0}

    def fail_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_batch", fail_third)
    with pytest.raises(StoreError, match="disk full while writing digits__fixed.h5.*rerun the same command"):
        extract("digits", tiny, cache_dir=tmp_path, splits=["train"], batch_size=100, workers=0, progress=False)
    final = store_path(tmp_path, "featcache-tiny/random", "digits", "fixed")
    assert not final.exists() and partial_path(final).exists()
    monkeypatch.setattr(StoreWriter, "write_batch", real)
    p = extract("digits", tiny, cache_dir=tmp_path, splits=["train"], batch_size=100, workers=0, progress=False)
    assert Store.open(p).num_rows("train") == 1077


def test_unknown_split_and_dtype(tmp_path, tiny):
    with pytest.raises(DataError, match="has no 'dev' split; it has: train, val, test"):
        extract("digits", tiny, cache_dir=tmp_path, splits=["dev"], progress=False)
    with pytest.raises(StoreError, match="unknown dtype 'int8'"):
        extract("digits", tiny, cache_dir=tmp_path, dtype="int8", progress=False)


def test_download_refused_where_manifest_has_none(tmp_path, tiny):
    with pytest.raises(DataError, match="cannot be downloaded automatically"):
        extract("digits", tiny, cache_dir=tmp_path, download_data=True, progress=False)


def test_float32_storage(tmp_path, tiny):
    p = extract("digits", tiny, cache_dir=tmp_path, splits=["val"], dtype="float32", workers=0, progress=False)
    with Store.open(p) as st:
        assert st.fingerprint["dtype"] == "float32"
        torch.testing.assert_close(st.split("val").features.norm(dim=-1), torch.ones(360))


def test_download_runs_torchvision_and_fetches_files(tmp_path, monkeypatch, tiny):
    """--download constructs the manifest's torchvision class with download=True and fetches listed files."""
    import torchvision.datasets as tvd

    calls = []

    class FakeTV:
        def __init__(self, root, download=False, **kw):
            calls.append((root, download, kw))
            write_images(Path(root) / "imgs", 2, ["a", "b"])

    monkeypatch.setattr(tvd, "FakeTV", FakeTV, raising=False)
    split_src = tmp_path / "published_split.json"
    rel = ["a/000.png", "b/001.png", "a/001.png"]
    split_src.write_text(json.dumps({"train": [[r, int(r[0] == "b"), r[0]] for r in rel], "val": [], "test": []}))
    raw = folder_manifest("x", ["a", "b"])
    raw["schemes"] = {"coop": {
        "source": {"kind": "split_json", "split_file": "fake/split.json", "image_dirs": ["fake/imgs"]},
        "counts": {"train": 3},
        "download": {"kind": "torchvision", "class": "FakeTV", "root": "fake", "calls": [{"split": "train"}],
                     "files": [{"path": "fake/split.json", "url": split_src.as_uri()}]},
    }}  # fmt: skip
    raw["default_scheme"] = "coop"
    data = tmp_path / "data"
    p = extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path / "c", splits=["train"],
                download_data=True, workers=0, progress=False)  # fmt: skip
    assert calls == [(str(data / "fake"), True, {"split": "train"})]
    with Store.open(p) as st:
        assert st.ids("train") == rel
    raw["schemes"]["coop"]["download"]["files"][0] = {"path": "fake/other.json", "url": (tmp_path / "no").as_uri()}
    with pytest.raises(DataError, match="could not download other.json for toyfolder.*fetch it by hand"):
        extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path / "c", download_data=True)
    assert not (data / "fake" / "other.json").exists() and not (data / "fake" / "other.json.download").exists()


def test_split_file_class_names_must_match_manifest(tmp_path, tiny):
    data = tmp_path / "data"
    rel = write_images(data / "toy" / "images", 1, ["a", "b"])
    (data / "toy" / "s.json").write_text(json.dumps({"train": [[rel[0], 0, "b"], [rel[1], 1, "a"]]}))
    raw = folder_manifest("toy", ["a", "b"])
    raw["schemes"] = {"c": {"source": {"kind": "split_json", "split_file": "toy/s.json", "image_dirs": ["toy/images"]},
                            "counts": {"train": 2}}}  # fmt: skip
    raw["default_scheme"] = "c"
    with pytest.raises(DataError, match="has label 0 named 'b', but the manifest names label 0 'a'"):
        extract(parse_manifest(raw), tiny, data_root=data, cache_dir=tmp_path, progress=False)


def test_other_precision_is_not_taken_for_up_to_date(tmp_path, tiny):
    extract("digits", "featcache-tiny/random", cache_dir=tmp_path, splits=["val"], workers=0, progress=False)
    with pytest.raises(FingerprintMismatch, match="'precision' differs.*--overwrite"):
        extract("digits", "featcache-tiny/random", cache_dir=tmp_path, splits=["val"], precision="bf16",
                workers=0, progress=False)  # fmt: skip


def test_image_folders_named_like_classes_take_their_labels_in_any_order(tmp_path):
    """Class names listed in another order than the sorted folders: labels follow the names, not the sort;
    a folder count that differs from the class count is refused."""
    from featcache.data import resolve_split

    write_images(tmp_path / "toy" / "train", 1, ["cat", "dog", "ant"])
    raw = folder_manifest("toy", ["dog", "cat", "ant"])
    m = parse_manifest(raw)
    items = resolve_split(m, m.scheme(None), "train", tmp_path).items
    assert {it.id.split("/")[1]: it.label for it in items} == {"dog": 0, "cat": 1, "ant": 2}
    raw = folder_manifest("toy", ["zero", "one"])
    m = parse_manifest(raw)
    with pytest.raises(DataError, match="holds 3 class folders but the manifest lists 2 classes"):
        resolve_split(m, m.scheme(None), "train", tmp_path)
