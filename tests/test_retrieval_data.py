"""Retrieval readers on small synthetic layouts: order of items/frames/captions, counts, errors, manifests."""

import copy
import json
import zipfile

import pytest
from typer.testing import CliRunner

from featcache.data import Item, download
from featcache.errors import DataError, ManifestError
from featcache.manifests import list_datasets, load_manifest, manifest_dir, parse_manifest
from featcache.retrieval_data import resolve_retrieval_split


def touch(path):
    """An empty 'image': the readers only check that files exist, they never decode them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def bundled_raw(name):
    return json.loads((manifest_dir() / f"{name}.json").read_text())


def manifest(source, counts=None, caption_counts=None, **scheme):
    raw = {
        "id": "toyret", "name": "toy retrieval", "task": "retrieval", "default_scheme": "s",
        "schemes": {"s": {"source": source, "counts": counts or {}, "caption_counts": caption_counts or {}, **scheme}},
    }  # fmt: skip
    m = parse_manifest(raw)
    return m, m.scheme()


def sents(prefix, n):
    return [{"raw": f"{prefix}{i} ", "tokens": []} for i in range(1, n + 1)]


KARPATHY = {
    "images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": sents("a", 5)},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": sents("b", 7)},
        {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "sentences": sents("c", 5)},
        {"filepath": "val2014", "filename": "d.jpg", "split": "val", "sentences": sents("d", 5)},
        {"filepath": "train2014", "filename": "e.jpg", "split": "train", "sentences": sents("e", 6)},
    ]
}


def karpathy_layout(root, images=True):
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "dataset_coco.json").write_text(json.dumps(KARPATHY))
    if images:
        for im in KARPATHY["images"]:
            touch(root / "coco" / "images" / im["filepath"] / im["filename"])


def karpathy_source(cpi=5):
    return {
        "kind": "karpathy_json", "annotation_file": "coco/dataset_coco.json",
        "image_dirs": ["nowhere", "coco/images"], "captions_per_image": cpi,
        "splits": {"train": ["train", "restval"], "val": ["val"], "test": ["test"]},
    }  # fmt: skip


def test_karpathy_order_restval_and_captions_per_image(tmp_path):
    karpathy_layout(tmp_path)
    m, s = manifest(karpathy_source(), counts={"train": 3, "test": 1}, caption_counts={"train": 15, "test": 5})
    r = resolve_retrieval_split(m, s, "train", tmp_path)
    assert r.split == "train" and r.source is None
    assert r.items == ["train2014/b.jpg", "val2014/c.jpg", "train2014/e.jpg"]  # file order, restval interleaved
    base = tmp_path / "coco" / "images"  # the first image dir that holds the first image
    assert r.frames == [Item(p, i, str(base / p)) for i, p in enumerate(r.items)]
    assert r.captions == [f"{x}{i}" for x in "bce" for i in range(1, 6)]
    assert r.caption_item == [0] * 5 + [1] * 5 + [2] * 5
    t = resolve_retrieval_split(m, s, "test", tmp_path)
    assert t.items == ["val2014/a.jpg"] and t.caption_item == [0] * 5

    m, s = manifest(karpathy_source(cpi=None))  # null keeps all sentences: 7 + 5 + 6
    r = resolve_retrieval_split(m, s, "train", tmp_path)
    assert len(r.captions) == 18 and r.captions[5:7] == ["b6", "b7"] and r.caption_item[-6:] == [2] * 6


def test_karpathy_without_filepath_uses_filename(tmp_path):
    (tmp_path / "f30k").mkdir()
    data = {"images": [{"filename": "9.jpg", "split": "test", "sentences": sents("x", 2)}]}
    (tmp_path / "f30k" / "ann.json").write_text(json.dumps(data))
    touch(tmp_path / "f30k" / "imgs" / "9.jpg")
    src = {"kind": "karpathy_json", "annotation_file": "f30k/ann.json", "image_dirs": ["f30k/imgs"],
           "splits": {"test": ["test"]}}  # fmt: skip
    r = resolve_retrieval_split(*manifest(src), "test", tmp_path)
    assert r.items == ["9.jpg"] and r.captions == ["x1", "x2"] and r.frames[0].ref == str(tmp_path / "f30k/imgs/9.jpg")


def test_count_mismatch_is_caught_before_images_are_looked_at(tmp_path):
    karpathy_layout(tmp_path, images=False)  # no images at all: the count check still comes first
    m, s = manifest(karpathy_source(), counts={"train": 4}, instructions="Get the zip.")
    with pytest.raises(DataError, match=r"train: found 3 items, expected 4; .* Get the zip\.$"):
        resolve_retrieval_split(m, s, "train", tmp_path)
    m, s = manifest(karpathy_source(), counts={"train": 3}, caption_counts={"train": 16})
    with pytest.raises(DataError, match=r"train: found 15 captions, expected 16"):
        resolve_retrieval_split(m, s, "train", tmp_path)
    m, s = manifest(karpathy_source(), counts={"train": 3}, caption_counts={"train": 15})
    with pytest.raises(DataError, match=r"images not found \(looked for train2014/b.jpg under .*nowhere, .*coco/im"):
        resolve_retrieval_split(m, s, "train", tmp_path)


def test_missing_annotation_file_and_missing_images(tmp_path):
    m, s = manifest(karpathy_source(), instructions="Fetch dataset_coco.json.", download={"files": []})
    with pytest.raises(DataError) as e:
        resolve_retrieval_split(m, s, "train", tmp_path)
    msg = str(e.value)
    assert "annotation file" in msg and "dataset_coco.json not found" in msg and "Fetch dataset_coco.json." in msg
    assert "--download" in msg and "\n" not in msg
    karpathy_layout(tmp_path)
    (tmp_path / "coco/images/train2014/e.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images missing under .*, e\.g\. train2014/e\.jpg\. Fetch") as e:
        resolve_retrieval_split(m, s, "train", tmp_path)
    assert "--download" not in str(e.value)  # the download never fetches images
    with pytest.raises(DataError, match="has no 'restval' split; it has: train, val, test"):
        resolve_retrieval_split(m, s, "restval", tmp_path)
    with pytest.raises(DataError, match="digits is a classification dataset"):
        resolve_retrieval_split(load_manifest("digits"), load_manifest("digits").scheme(), "test", tmp_path)


def test_caption_file_csv_and_json(tmp_path):
    d = tmp_path / "mine"
    for p in ("x.png", "y.png", "sub/z.png"):
        touch(d / "pics" / p)
    (d / "train.csv").write_text('image,caption\nx.png,"a cat, sitting"\ny.png,a dog\nx.png,second cat\n')
    rows = [{"image": "sub/z.png", "caption": "z1"}, ["y.png", "y1"], {"image": "sub/z.png", "caption": "z2"}]
    (d / "test.json").write_text(json.dumps(rows))
    splits = {"train": "mine/train.csv", "test": "mine/test.json"}
    src = {"kind": "caption_file", "image_dirs": ["mine/pics"], "splits": splits}
    m, s = manifest(src, counts={"train": 2, "test": 2}, caption_counts={"train": 3, "test": 3})
    r = resolve_retrieval_split(m, s, "train", tmp_path)
    assert r.items == ["x.png", "y.png"]  # first appearance
    assert r.captions == ["a cat, sitting", "second cat", "a dog"] and r.caption_item == [0, 0, 1]
    assert [(f.id, f.label) for f in r.frames] == [("x.png", 0), ("y.png", 1)]
    t = resolve_retrieval_split(m, s, "test", tmp_path)
    assert t.items == ["sub/z.png", "y.png"] and t.captions == ["z1", "z2", "y1"] and t.caption_item == [0, 0, 1]
    assert t.frames[0].ref == str(d / "pics" / "sub" / "z.png")

    (d / "train.csv").write_text("file,text\nx.png,a\n")
    with pytest.raises(DataError, match=r"train.csv: needs header columns \['image', 'caption'\]"):
        resolve_retrieval_split(m, s, "train", tmp_path)
    (d / "test.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(DataError, match=r"test.json: row 0 is not an object with \['image', 'caption'\]"):
        resolve_retrieval_split(m, s, "test", tmp_path)


LINSPACE_30_12 = [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29]  # floor(k * 29 / 11), k = 0..11, by hand


def msrvtt_layout(root):
    """MSR-VTT's annotation files as CLIP4Clip ships them, in miniature; frames at root/msrvtt/frames."""
    d = root / "msrvtt"
    d.mkdir()
    (d / "MSRVTT_train.9k.csv").write_text("video_id\nvideo2\nvideo0\n")
    sentences = [
        {"caption": "v0 a", "video_id": "video0", "sen_id": 0},
        {"caption": "v2 a", "video_id": "video2", "sen_id": 1},
        {"caption": "not in train", "video_id": "video9", "sen_id": 2},
        {"caption": "v0 b", "video_id": "video0", "sen_id": 3},
        {"caption": "v2 b", "video_id": "video2", "sen_id": 4},
    ]
    (d / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sentences}))
    (d / "MSRVTT_JSFUSION_test.csv").write_text(
        'key,vid_key,video_id,sentence\nret0,msr7,video7,"a man, talking"\nret1,msr5,video5,a dog runs\n'
    )
    for i in range(30, 0, -1):  # written in reverse: the order is the sorted file name, not the directory's
        touch(d / "frames" / "video2" / f"{i:04d}.jpg")
    for i in range(1, 4):
        touch(d / "frames" / "video0" / f"{i:04d}.png")
    touch(d / "frames" / "video0" / "notes.txt")  # not an image: ignored
    touch(d / "frames" / "video7" / "0001.jpg")
    return d


def test_msrvtt_bundled_manifest_on_a_miniature_layout(tmp_path):
    d = msrvtt_layout(tmp_path)
    raw = bundled_raw("msrvtt")
    raw["schemes"]["1k-a"]["counts"] = {"train": 2, "test": 2}
    raw["schemes"]["1k-a"]["caption_counts"] = {"train": 4, "test": 2}
    m = parse_manifest(raw)
    r = resolve_retrieval_split(m, m.scheme(), "train", tmp_path)
    assert r.items == ["video2", "video0"]  # the train csv's order
    assert r.captions == ["v2 a", "v2 b", "v0 a", "v0 b"] and r.caption_item == [0, 0, 1, 1]
    want = [(f"video2/{j + 1:04d}.jpg", 0) for j in LINSPACE_30_12] + [(f"video0/{i:04d}.png", 1) for i in (1, 2, 3)]
    assert [(f.id, f.label) for f in r.frames] == want
    assert r.frames[0].ref == str(d / "frames" / "video2" / "0001.jpg")

    with pytest.raises(DataError) as e:  # video5 was never extracted
        resolve_retrieval_split(m, m.scheme(), "test", tmp_path)
    msg = str(e.value)
    assert "video video5 has no frame folder" in msg and "ffmpeg -i video5.mp4 -vf fps=1" in msg and "\n" not in msg
    touch(d / "frames" / "video5" / "0001.jpg")
    t = resolve_retrieval_split(m, m.scheme(), "test", tmp_path)
    assert t.items == ["video7", "video5"] and t.captions == ["a man, talking", "a dog runs"]
    assert [(f.id, f.label) for f in t.frames] == [("video7/0001.jpg", 0), ("video5/0001.jpg", 1)]


def test_video_pairs_json_and_short_videos(tmp_path):
    (tmp_path / "vids").mkdir()
    pairs = {"annotations": [{"vid": "b", "text": "b1"}, {"vid": "a", "text": "a1"}, {"vid": "b", "text": "b2"}]}
    (tmp_path / "vids" / "caps.json").write_text(json.dumps(pairs))
    for v, n in (("a", 5), ("b", 12)):
        for i in range(n):
            touch(tmp_path / "vids" / "fr" / v / f"f{i:02d}.jpg")
    spec = {"pairs": "vids/caps.json", "captions_key": "annotations", "video_column": "vid", "caption_column": "text"}
    src = {"kind": "video_frames", "frame_dirs": ["vids/fr"], "max_frames": 12, "splits": {"test": spec}}
    r = resolve_retrieval_split(*manifest(src), "test", tmp_path)
    assert r.items == ["b", "a"] and r.captions == ["b1", "b2", "a1"] and r.caption_item == [0, 0, 1]
    assert [f.id for f in r.frames] == [f"b/f{i:02d}.jpg" for i in range(12)] + [f"a/f{i:02d}.jpg" for i in range(5)]


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("task", "detection", "'task' must be one of ['classification', 'retrieval']"),
        ("schemes.s.source.kind", "split_json", "'schemes.s.source.kind' 'split_json' is a classification source"),
        ("schemes.s.source.annotation_file", 3, "'schemes.s.source.annotation_file' must be a str"),
        ("schemes.s.source.image_dirs", [], "'schemes.s.source.image_dirs' must be a non-empty list of paths"),
        ("schemes.s.source.splits", {"train": ["training"]}, "'schemes.s.source.splits.train' must be a non-empty"),
        ("schemes.s.source.splits", {"dev": ["val"]}, "'schemes.s.source.splits.dev' is not a split name"),
        ("schemes.s.source.captions_per_image", 0, "'schemes.s.source.captions_per_image' must be a positive integer"),
        ("schemes.s.caption_counts", {"train": -5}, "'schemes.s.caption_counts.train' must be a non-negative integer"),
        ("schemes.s.source.splits", {"train": ["train"]}, "'schemes.s.caption_counts.test' counts a split the source"),
        ("schemes.s.caption_counts", [5], "'schemes.s.caption_counts' must be an object"),
        ("classnames", [], None),  # retrieval: may be empty
        ("template", "no placeholder", "'template' must contain exactly one '{}'"),  # validated when given
        ("schemes.s.download", {"files": [{"path": "a.json", "gdrive_id": "x", "member": "a.json"}]},
         "'schemes.s.download.files[0].member' must be a file name inside the zip at 'url'"),
    ],
)  # fmt: skip
def test_invalid_retrieval_manifest_names_the_bad_field(path, value, field):
    scheme = {"source": karpathy_source(), "counts": {"train": 1}, "caption_counts": {"test": 5}}
    raw = {"id": "r", "name": "r", "task": "retrieval", "default_scheme": "s", "schemes": {"s": scheme}}
    d, keys = raw, path.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    if field is None:
        parse_manifest(raw, where="x.json")
        return
    with pytest.raises(ManifestError) as e:
        parse_manifest(raw, where="x.json")
    assert str(e.value).startswith("x.json: field ") and field in str(e.value) and "\n" not in str(e.value)


def video_raw(spec=None, **src):
    source = {"kind": "video_frames", "frame_dirs": ["f"], "max_frames": 12, **src}
    source["splits"] = {"test": spec if spec is not None else {"pairs": "p.csv"}}
    return {"id": "v", "name": "v", "task": "retrieval", "default_scheme": "s", "schemes": {"s": {"source": source}}}


@pytest.mark.parametrize(
    "raw,field",
    [
        (video_raw({"pairs": "p.csv", "videos": "v.csv"}), "'schemes.s.source.splits.test' needs either 'pairs' or"),
        (video_raw({"videos": "v.csv"}), "'schemes.s.source.splits.test' needs either 'pairs' or both"),
        (video_raw({}), "'schemes.s.source.splits.test' needs either 'pairs' or both"),
        (video_raw({"pair": "p.csv"}), "'schemes.s.source.splits.test.pair' is not a known key"),
        (video_raw({"pairs": "p.txt"}), "'schemes.s.source.splits.test.pairs' must be the path of a .csv or .json"),
        (video_raw("p.csv"), "'schemes.s.source.splits.test' must be an object of non-empty strings"),
        (video_raw(max_frames=0), "'schemes.s.source.max_frames' must be a positive integer"),
        (video_raw(max_frames="12"), "'schemes.s.source.max_frames' must be a int"),
        (video_raw(max_frames=True), "'schemes.s.source.max_frames' must be a int"),
        (video_raw(frame_dirs=[]), "'schemes.s.source.frame_dirs' must be a non-empty list of paths"),
        ({**video_raw(), "schemes": {"s": {"source": {"kind": "caption_file", "image_dirs": ["i"],
          "splits": {"test": "caps.txt"}}}}}, "'schemes.s.source.splits.test' must be the path of a .csv or .json"),
    ],
)  # fmt: skip
def test_invalid_video_and_caption_file_sources(raw, field):
    with pytest.raises(ManifestError) as e:
        parse_manifest(raw, where="x.json")
    assert field in str(e.value)


def test_classification_stays_strict_and_kinds_match_the_task():
    digits = bundled_raw("digits")
    for key in ("classnames", "template", "templates"):
        raw = copy.deepcopy(digits)
        del raw[key]
        with pytest.raises(ManifestError, match=f"field '{key}' is missing"):
            parse_manifest(raw)
    raw = copy.deepcopy(digits)
    raw["schemes"]["fixed"]["source"] = karpathy_source()
    with pytest.raises(ManifestError, match="'karpathy_json' is a retrieval source, but the manifest's task is 'cl"):
        parse_manifest(raw)
    raw = copy.deepcopy(digits)
    raw["schemes"]["fixed"]["caption_counts"] = {"train": 1}
    with pytest.raises(ManifestError, match="'schemes.fixed.caption_counts' is only for retrieval manifests"):
        parse_manifest(raw)


def test_retrieval_defaults_do_not_change_the_hash():
    raw = video_raw()
    m = parse_manifest(copy.deepcopy(raw))
    assert (m.classnames, m.template, m.templates, m.task) == ([], "{}", ["{}"], "retrieval")
    assert m.raw == raw and "classnames" not in m.raw
    assert m.sha256 == parse_manifest(copy.deepcopy(raw)).sha256


def test_all_bundled_manifests_load_and_retrieval_counts_agree():
    retrieval = []
    for name in list_datasets():
        m = load_manifest(name)
        assert m.id == name and m.default_scheme in m.schemes
        if m.task == "classification":
            assert m.classnames and all(s.caption_counts == {} for s in m.schemes.values())
            continue
        retrieval.append(name)
        for s in m.schemes.values():
            assert set(s.counts) == set(s.caption_counts) == set(s.splits)
            assert s.instructions and s.download
            if s.source.get("captions_per_image") == 5:
                assert all(s.caption_counts[k] == 5 * n for k, n in s.counts.items())
    assert retrieval == ["flickr30k", "mscoco", "msrvtt"]
    assert load_manifest("mscoco").scheme().counts == {"train": 113287, "val": 5000, "test": 5000}
    assert load_manifest("flickr30k").scheme().counts == {"train": 29000, "val": 1014, "test": 1000}
    assert load_manifest("msrvtt").scheme().caption_counts == {"train": 180000, "test": 1000}
    assert load_manifest("mscoco").scheme().source["splits"]["train"] == ["train", "restval"]


def test_zip_member_download(tmp_path):
    z = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("caption_datasets/dataset_coco.json", json.dumps(KARPATHY))
        f.writestr("caption_datasets/dataset_flickr30k.json", "{}")
    url = z.as_uri()
    files = [{"path": "coco/dataset_coco.json", "url": url, "member": "dataset_coco.json"},
             {"path": "f30k/dataset_flickr30k.json", "url": url, "member": "dataset_flickr30k.json"}]  # fmt: skip
    m, s = manifest(karpathy_source(), download={"kind": "files", "files": files})
    root = tmp_path / "data"
    download(m, s, root)
    assert json.loads((root / "coco/dataset_coco.json").read_text()) == KARPATHY
    assert (root / "f30k/dataset_flickr30k.json").read_text() == "{}"
    assert not list(root.rglob("*.download"))  # archive and partial files removed
    m, s = manifest(karpathy_source(), download={"files": [{"path": "x/y.json", "url": url, "member": "y.json"}]})
    with pytest.raises(DataError, match="could not download y.json for toyret: .* has no member y.json"):
        download(m, s, root)
    assert not (root / "x" / "y.json").exists() and not list(root.rglob("*.download"))


def test_datasets_command_lists_retrieval_manifests():
    from cli.main import app

    r = CliRunner().invoke(app, ["datasets"], catch_exceptions=False)
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.split()[0] == "flickr30k")
    assert "retrieval" in line and "test=1000/5000" in line and "annotations" in line
    assert any(ln.split()[:2] == ["digits", "classification"] for ln in r.output.splitlines())
