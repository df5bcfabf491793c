"""webdataset tar shards as a source: the same rows and features as a folder of the same images, whatever the
number of shards and DataLoader workers; captions for retrieval; resume; one-line errors for bad shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import folder_manifest, write_images

from featcache.data import resolve_split
from featcache.errors import DataError, ManifestError
from featcache.extract import extract
from featcache.manifests import load_manifest, parse_manifest
from featcache.retrieval_data import resolve_retrieval_split
from featcache.store import Store
from featcache.webdataset_source import TarImages

CLASSES = ["cat", "dog", "red fox"]


def write_shards(out: Path, samples: list[dict[str, bytes]], n_shards: int, extra_meta: bool = True) -> str:
    """Write `samples` (each {"__key__": ..., ext: bytes}) in order into n_shards tar files under `out`, the way
    webdataset's TarWriter lays them out (consecutive members per key); returns the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            if extra_meta and s == 0:
                _add(tf, "__meta__/info.json", b"{}")  # webdataset skips __meta__ folders
            for smp in samples[s * per : (s + 1) * per]:
                for ext, data in smp.items():
                    if ext != "__key__":
                        _add(tf, f"{smp['__key__']}.{ext}", data)
    return f"{out.name}/{{00000..{n_shards - 1:05d}}}.tar"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def wds_manifest(splits: dict[str, str], counts: dict[str, int], **src) -> dict:
    m = folder_manifest("unused", CLASSES, counts)
    m["id"] = "toywds"
    m["schemes"] = {"shards": {"source": {"kind": "webdataset", "splits": splits, **src}, "counts": counts}}
    m["default_scheme"] = "shards"
    return m


@pytest.fixture
def twin(tmp_path) -> tuple[Path, Path, Path, dict[str, list[str]]]:
    """The same PNGs as an image folder and as shards (train: 12 samples in 5 shards, more shards than workers;
    test: 6 samples in 1 shard, fewer). Returns (data root, folder manifest, shard manifest, expected ids)."""
    data = tmp_path / "data"
    ids = {}
    splits = {}
    for split, n, shards, seed in (("train", 4, 5, 1), ("test", 2, 1, 2)):
        rel = write_images(data / "toy" / split, n, CLASSES, seed=seed)
        samples = [
            {"__key__": f"s{i:04d}", "png": (data / "toy" / split / r).read_bytes(), "cls": str(CLASSES.index(
                r.split("/")[0])).encode(), "json": b"{}"}
            for i, r in enumerate(rel)
        ]  # fmt: skip
        splits[split] = write_shards(data / f"wds-{split}", samples, shards)
        per = -(-len(samples) // shards)
        ids[split] = [f"wds-{split}/{i // per:05d}.tar/s{i:04d}" for i in range(len(samples))]
    folder = tmp_path / "folder.json"
    folder.write_text(json.dumps(folder_manifest("toy", CLASSES, {"train": 12, "test": 6})))
    shards = tmp_path / "shards.json"
    shards.write_text(json.dumps(wds_manifest(splits, {"train": 12, "test": 6})))
    return data, folder, shards, ids


def test_listing_matches_webdataset_reader(twin):
    """The header-only listing sees what webdataset's own reader yields: keys, labels and image bytes."""
    wds = pytest.importorskip("webdataset")
    data, _, shards, ids = twin
    m = load_manifest(shards)
    got = resolve_split(m, m.scheme(), "train", data)
    assert [it.id for it in got.items] == ids["train"]
    pattern = m.scheme().source["splits"]["train"]
    ref = list(wds.WebDataset(str(data / pattern), shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in ref] == [i.rsplit("/", 1)[1] for i in ids["train"]]
    assert [int(r["cls"]) for r in ref] == [it.label for it in got.items]
    src = got.source
    assert isinstance(src, TarImages)
    for k, r in enumerate(ref):
        s, off, size = src.where[k]
        with open(src.paths[s], "rb") as fh:
            fh.seek(off)
            assert fh.read(size) == r["png"]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_store_equals_folder_store(twin, tmp_path, tiny, workers):
    """Every sample exactly once, in shard order, with its label and id, and the folder's features, whether
    workers outnumber shards (test) or not (train)."""
    data, folder, shards, ids = twin
    kw = {"data_root": data, "progress": False, "batch_size": 4, "dtype": "float32"}
    ref = extract(folder, tiny, cache_dir=tmp_path / "cf", workers=0, **kw)
    got = extract(shards, tiny, cache_dir=tmp_path / f"cw{workers}", workers=workers, **kw)
    with Store.open(ref) as a, Store.open(got) as b:
        for split in ("train", "test"):
            assert b.ids(split) == ids[split] and len(set(b.ids(split))) == len(ids[split])
            sa, sb = a.split(split), b.split(split)
            assert torch.equal(sa.labels, sb.labels)
            assert torch.allclose(sa.features, sb.features, atol=1e-6)
        assert torch.equal(a.text(), b.text())


def test_interrupted_extraction_resumes_to_the_same_store(twin, tmp_path, tiny, monkeypatch):
    data, _, shards, _ = twin
    kw = {"data_root": data, "progress": False, "batch_size": 4, "workers": 0, "dtype": "float32"}
    whole = extract(shards, tiny, cache_dir=tmp_path / "a", **kw)
    real = TarImages.__getitem__

    def flaky(self, ref):
        if ref >= 6:
            raise OSError("disk went away")
        return real(self, ref)

    monkeypatch.setattr(TarImages, "__getitem__", flaky)
    with pytest.raises(DataError, match="unreadable image .*s0006.*disk went away"):
        extract(shards, tiny, cache_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(TarImages, "__getitem__", real)
    resumed = extract(shards, tiny, cache_dir=tmp_path / "b", **kw)
    with Store.open(whole) as a, Store.open(resumed) as b:
        assert a.ids("train") == b.ids("train")
        assert torch.equal(a.split("train").features, b.split("train").features)


def test_captions_from_txt_members(tmp_path, tiny):
    """Retrieval: each sample is an item, each line of its txt a caption (CLIP_benchmark's layout)."""
    from PIL import Image

    data = tmp_path / "data"
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "webp")
        caps = "\n".join(f"caption {j} of image {i}" for j in range(1 + i % 2))
        samples.append({"__key__": f"{i:03d}", "webp": buf.getvalue(), "txt": caps.encode()})
    pattern = write_shards(data / "caps", samples, 2)
    m = {"id": "wdscaps", "name": "x", "task": "retrieval", "default_scheme": "s",
         "schemes": {"s": {"source": {"kind": "webdataset", "splits": {"test": pattern}},
                           "counts": {"test": 5}, "caption_counts": {"test": 7}}}}  # fmt: skip
    mp = tmp_path / "m.json"
    mp.write_text(json.dumps(m))
    man = load_manifest(mp)
    rs = resolve_retrieval_split(man, man.scheme(), "test", data)
    assert rs.items == ["caps/00000.tar/000", "caps/00000.tar/001", "caps/00000.tar/002", "caps/00001.tar/003",
                        "caps/00001.tar/004"]  # fmt: skip
    assert rs.captions[:3] == ["caption 0 of image 0", "caption 0 of image 1", "caption 1 of image 1"]
    assert rs.caption_item == [0, 1, 1, 2, 3, 3, 4]
    path = extract(mp, tiny, data_root=data, cache_dir=tmp_path / "c", workers=2, progress=False)
    with Store.open(path) as st:
        assert st.task == "retrieval" and st.num_rows("test") == 5 and st.num_captions("test") == 7
        assert st.retrieval_set("test").caption_item.tolist() == [0, 1, 1, 2, 3, 3, 4]
        assert st.ids("test") == rs.items


def test_bad_shards_are_one_line_errors(twin, tmp_path):
    data, _, _, _ = twin

    def resolve(splits, counts=None, **src):
        m = parse_manifest(wds_manifest(splits, counts or {}, **src))
        return resolve_split(m, m.scheme(), next(iter(splits)), data)

    with pytest.raises(DataError, match=r"shard .*wds-train/00005.tar not found \(and 2 more of 8\)"):
        resolve({"train": "wds-train/{00000..00007}.tar"})
    with pytest.raises(DataError, match="expected 13"):
        resolve({"train": "wds-train/{00000..00004}.tar"}, {"train": 13})
    with pytest.raises(DataError, match="has no image \\(jpg\\).*set the source's image_keys"):
        resolve({"train": "wds-train/00000.tar"}, image_keys=["jpg"])
    with pytest.raises(DataError, match="has no '.label' file"):
        resolve({"train": "wds-train/00000.tar"}, label_key="label")
    with pytest.raises(DataError, match="resolves outside the data root"):
        resolve({"train": "wds-train/{00000,../../x}.tar"})
    gz = data / "gz"
    gz.mkdir()
    with tarfile.open(gz / "0.tar", "w:gz") as tf:
        _add(tf, "a.png", b"x")
    with pytest.raises(DataError, match="not an uncompressed tar file.*gunzip"):
        resolve({"train": "gz/0.tar"})
    bad = data / "bad"
    bad.mkdir()
    with tarfile.open(bad / "0.tar", "w") as tf:
        _add(tf, "a.png", b"x")
        _add(tf, "a.cls", b"dog")
    with pytest.raises(DataError, match="sample bad/0.tar/a has label 'dog', not a class index"):
        resolve({"train": "bad/0.tar"})
    with tarfile.open(bad / "1.tar", "w") as tf:
        for name in ("a.png", "b.png", "a.cls"):
            _add(tf, name, b"0")
    with pytest.raises(DataError, match="files of sample 'a' are not consecutive"):
        resolve({"train": "bad/1.tar"})


@pytest.mark.parametrize(
    "src,msg",
    [
        ({"splits": {"train": "shards/{0..9}.tgz"}}, "shard pattern ending in .tar"),
        ({"splits": {"train": "/abs/{0..9}.tar"}}, "stays inside --data-root"),
        ({"splits": {"train": "../up/0.tar"}}, "stays inside --data-root"),
        ({"splits": {"train": "a.tar"}, "image_keys": []}, "image_keys"),
        ({"splits": {"train": "a.tar"}, "caption_key": "txt"}, "caption_key' does not apply to a classification"),
        ({"splits": {"train": "a.tar"}, "label_key": 3}, "label_key' must be a member extension"),
    ],
)
def test_bad_webdataset_manifests(src, msg):
    raw = wds_manifest({}, {})
    raw["schemes"]["shards"]["source"] = {"kind": "webdataset", **src}
    with pytest.raises(ManifestError, match=msg):
        parse_manifest(raw)


def test_missing_package_is_one_line(monkeypatch, twin):
    import sys

    data, _, shards, _ = twin
    for mod in ("webdataset", "webdataset.tariterators", "braceexpand"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` of a None entry raises ImportError
    m = load_manifest(shards)
    with pytest.raises(DataError, match=r"^webdataset shards need .*pip install 'featcache\[webdataset\]'$"):
        resolve_split(m, m.scheme(), "train", data)


def test_cli_extract_from_shards(twin, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    data, _, shards, _ = twin
    args = ["extract", "--manifest", str(shards), "--backbone", "featcache-tiny/random", "--cache-dir",
            str(tmp_path / "c"), "--workers", "0", "--quiet"]  # fmt: skip
    ok = CliRunner().invoke(app, [*args, "--data-root", str(data)])
    assert ok.exit_code == 0, ok.output
    again = CliRunner().invoke(app, [*args, "--data-root", str(tmp_path / "nowhere")])
    assert again.exit_code == 0, again.output  # up to date: answered before any shard is listed
    args[args.index("--cache-dir") + 1] = str(tmp_path / "other")
    bad = CliRunner().invoke(app, [*args, "--data-root", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert bad.output.startswith("error: toywds (shards): shard ") and "not found" in bad.output


def test_header_parser_agrees_with_tarfile(tmp_path):
    """The direct ustar parse and tarfile list the same members at the same offsets; a shard it does not parse
    (a pax header for a long name, GNU format) goes through tarfile."""
    from featcache.webdataset_source import _members, _members_tarfile

    deep = f"{'d' * 60}/{'e' * 60}.bin"  # over 100 characters: ustar's prefix field, or a long-name header
    for fmt, long in ((tarfile.USTAR_FORMAT, deep), (tarfile.PAX_FORMAT, "x" * 120), (tarfile.GNU_FORMAT, deep)):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            for i, size in enumerate((0, 1, 511, 512, 513, 5000)):
                _add(tf, f"sub/{long if i == 3 else i}.bin", bytes([i]) * size)
        with open(path, "rb") as fh:
            got = _members(fh, path, "t")
        assert got == _members_tarfile(path, "t") and len(got) == 6
        assert got[0][0] == "sub/0.bin" and [m[2] for m in got] == [0, 1, 511, 512, 513, 5000]


def test_two_torchrun_ranks_equal_one_process(twin, tmp_path, tiny):
    """Under torchrun each rank takes a contiguous share of the rows (featcache.shards): shards split across
    ranks as they come, every sample once, and the assembled store equals the one-process store."""
    import os
    import subprocess
    import sys

    data, _, shards, ids = twin
    one = extract(shards, tiny, data_root=data, cache_dir=tmp_path / "one", workers=0, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cli.main",
           "extract", "--manifest", str(shards), "--backbone", "featcache-tiny/random", "--data-root", str(data),
           "--cache-dir", str(tmp_path / "two"), "--workers", "2", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = next((tmp_path / "two").rglob("*.h5"))
    with Store.open(one) as a, Store.open(two) as b:
        for split in ("train", "test"):
            assert b.ids(split) == ids[split] == a.ids(split)
            assert torch.equal(a.split(split).labels, b.split(split).labels)
            assert torch.allclose(a.split(split).features, b.split(split).features, atol=2e-3)
