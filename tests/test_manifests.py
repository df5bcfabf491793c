import copy
import json

import pytest

from featcache.errors import ManifestError
from featcache.manifests import list_datasets, load_manifest, manifest_dir, parse_manifest

EXPECTED = {
    "imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
    "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101,
    "imagenet_v2": 1000, "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200,
    "cifar10": 10, "cifar100": 100, "digits": 10,
}  # fmt: skip
RETRIEVAL = {"flickr30k", "mscoco", "msrvtt"}  # tested in test_retrieval_data.py


def test_every_expected_dataset_is_bundled():
    assert sorted([*EXPECTED, *RETRIEVAL]) == list_datasets()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_manifest_is_valid(name):
    m = load_manifest(name)
    assert m.id == name
    assert len(m.classnames) == EXPECTED[name]
    assert m.default_scheme in m.schemes
    for s in m.schemes.values():
        assert set(s.counts) <= set(s.splits)
        assert "train" in s.splits or "test" in s.splits
    assert all("_" not in c for c in m.classnames), "CoOp cleaning turns underscores into spaces"


def test_coop_templates_match_methods_md():
    assert load_manifest("dtd").template == "{} texture."
    assert load_manifest("eurosat").template == "a centered satellite photo of {}."
    assert load_manifest("ucf101").template == "a photo of a person doing {}."
    assert load_manifest("food101").template == "a photo of {}, a type of food."
    assert len(load_manifest("imagenet").templates) == 7


def test_coop_class_name_cleaning():
    cal = load_manifest("caltech101").classnames
    assert "face" in cal and "leopard" in cal and "airplane" in cal and "motorbike" in cal
    assert "BACKGROUND_Google" not in cal and "Faces_easy" not in cal
    assert "Annual Crop Land" in load_manifest("eurosat").classnames


def _digits_raw():
    return json.loads((manifest_dir() / "digits.json").read_text())


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("id", KeyError, "'id' is missing"),
        ("id", "Bad Id", "'id' must match"),
        ("template", "no placeholder", "'template' must contain exactly one '{}'"),
        ("templates", ["{} and {}"], "'templates[0]'"),
        ("classnames", ["a", "a"] + [str(i) for i in range(8)], "'classnames' has a duplicate class name 'a'"),
        ("classnames", [], "'classnames' must be a non-empty list"),
        ("default_scheme", "nope", "'default_scheme' must be one of ['fixed']"),
        ("schemes.fixed.counts.train", -1, "'schemes.fixed.counts.train' must be a non-negative integer"),
        ("schemes.fixed.counts.train", "10", "'schemes.fixed.counts.train' must be a non-negative integer"),
        ("schemes.fixed.source.kind", "ftp", "'schemes.fixed.source.kind' must be one of"),
        ("schemes.fixed.source.splits", {"training": {}}, "'schemes.fixed.source.splits.training' is not a split"),
        ("schemes.fixed.download", {"kind": "torchvision"}, "'schemes.fixed.download'"),
    ],
)
def test_invalid_manifest_names_the_bad_field(path, value, field):
    raw = copy.deepcopy(_digits_raw())
    _set(raw, path, value)
    with pytest.raises(ManifestError) as e:
        parse_manifest(raw, where="x.json")
    assert field in str(e.value) and "field '" in str(e.value)
    assert str(e.value).startswith("x.json: ")
    assert "\n" not in str(e.value)


def test_class_dirs_must_match_class_count():
    raw = {
        **_digits_raw(),
        "schemes": {
            "f": {"source": {"kind": "image_folder", "image_dirs": ["x"], "splits": {"test": "t"}, "class_dirs": ["a"]}}
        },
        "default_scheme": "f",
    }
    with pytest.raises(ManifestError, match=r"'schemes.f.source.class_dirs' must be a list of 10 strings"):
        parse_manifest(raw)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ManifestError, match="unknown dataset 'dtdd'; known: .*dtd.*--manifest FILE"):
        load_manifest("dtdd")


def test_user_manifest_by_path_and_bad_json(tmp_path):
    p = tmp_path / "mine.json"
    raw = _digits_raw() | {"id": "mine"}
    p.write_text(json.dumps(raw))
    assert load_manifest(p).id == "mine"
    p.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(p)
    p.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ManifestError, match="could not read manifest"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="is not a file; give the path of a dataset manifest"):
        load_manifest(tmp_path)


def test_hash_changes_with_content():
    a = parse_manifest(_digits_raw())
    raw = _digits_raw()
    raw["classnames"][0] = "nought"
    assert a.sha256 != parse_manifest(raw).sha256
    assert a.sha256 == parse_manifest(_digits_raw()).sha256


def test_unknown_scheme_message():
    with pytest.raises(ManifestError, match="no split scheme 'coop'; choose one of: fixed"):
        load_manifest("digits").scheme("coop")


def test_duplicates_only_when_declared():
    raw = _digits_raw()
    raw["classnames"] = ["a", "a"] + [str(i) for i in range(8)]
    raw["allow_duplicate_classnames"] = True
    assert parse_manifest(raw).classnames[:2] == ["a", "a"]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert load_manifest("imagenet").classnames == list(IMAGENET_CLASSNAMES)  # CoOp's names, repeats included
