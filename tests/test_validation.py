"""Issue 11, escapes and values: paths stay inside their roots, every numeric option is range- and finite-checked
where it is parsed, sweep files refuse unknown keys, and load failures blame the right thing. Every CLI case ends
as one `error:` line with exit code 1."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import _print_record, app
from featcache.adapters import MethodError, adapter_config, create_adapter, list_adapters
from featcache.adapters.base import build_config, check_config, config_help
from featcache.adapters.clip_adapter import ClipAdapterConfig
from featcache.adapters.tip_adapter import TipAdapterFConfig
from featcache.api import fit_method, open_store
from featcache.backbones import backbone_slug, load_backbone, pick_device
from featcache.data import outside, resolve_split
from featcache.errors import BackboneError, DataError, ManifestError, StoreError
from featcache.manifests import load_manifest, parse_manifest
from featcache.protocols import fewshot_draw
from featcache.retrieval_data import resolve_retrieval_split
from featcache.streaming import streamed_methods
from featcache.sweep import SweepError, load_sweep

runner = CliRunner()
TINY = "featcache-tiny/random"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def one_line_error(r, text: str) -> None:
    """The CLI contract: exit 1, a single `error: ...` line on stderr containing `text`."""
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr
    assert "Traceback" not in r.output


def classification(scheme: str = "coop", split_file: str = "mine/split.json") -> dict:
    return {
        "id": "mine", "name": "Mine", "classnames": ["cat", "dog"], "template": "a photo of a {}.",
        "templates": ["a photo of a {}."], "default_scheme": scheme,
        "schemes": {scheme: {"source": {"kind": "split_json", "split_file": split_file,
                                        "image_dirs": ["mine/images"]}}},
    }  # fmt: skip


def write_manifest(tmp_path, raw: dict):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(raw))
    return p


# --- paths stay inside their roots ---------------------------------------------------------------------------


def test_scheme_name_that_climbs_out_is_refused(tmp_path):
    with pytest.raises(ManifestError, match=r"scheme named '\.\./\.\./\.\./\.\./tmp/x'; scheme names must match"):
        parse_manifest(classification(scheme="../../../../tmp/x"))
    cache = tmp_path / "cache"
    mfile = write_manifest(tmp_path, classification(scheme="../../../../tmp/x"))
    r = runner.invoke(app, ["extract", "--manifest", str(mfile), "--backbone", TINY, "--cache-dir", str(cache),
                            "--data-root", str(tmp_path), "--quiet", "--workers", "0"])  # fmt: skip
    one_line_error(r, "scheme named '../../../../tmp/x'")
    assert not list(tmp_path.parent.glob("**/x.h5*"))


def test_split_file_items_outside_the_data_root_are_refused(tmp_path):
    (tmp_path / "mine" / "images").mkdir(parents=True)
    rows = {"train": [["../../../../etc/passwd", 0, "cat"]], "val": [], "test": []}
    (tmp_path / "mine" / "split.json").write_text(json.dumps(rows))
    m = parse_manifest(classification())
    with pytest.raises(DataError) as e:
        resolve_split(m, m.scheme(), "train", tmp_path)
    assert str(e.value) == (
        f"split file item '../../../../etc/passwd' resolves outside the data root {tmp_path}; "
        "items must be paths inside it"
    )
    rows["train"] = [["/etc/passwd", 0, "cat"]]
    (tmp_path / "mine" / "split.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="split file item '/etc/passwd' resolves outside the data root"):
        resolve_split(m, m.scheme(), "train", tmp_path)


def test_split_file_path_outside_the_data_root_is_refused(tmp_path):
    for bad in ("../outside.json", "/etc/split.json", "mine/../../outside.json"):
        with pytest.raises(ManifestError, match=r"split_file' must be a relative path that stays inside --data-root"):
            parse_manifest(classification(split_file=bad))
    # a scheme that skipped manifest validation is still refused when the split is read
    m = parse_manifest(classification())
    object.__setattr__(m.scheme(), "source", {**m.scheme().source, "split_file": "../outside.json"})
    (tmp_path.parent / "outside.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="split file '../outside.json' resolves outside the data root"):
        resolve_split(m, m.scheme(), "train", tmp_path)


def test_other_manifest_paths_are_checked_too():
    raw = classification()
    raw["schemes"]["coop"]["source"]["image_dirs"] = ["mine/images", "../../elsewhere"]
    with pytest.raises(ManifestError, match=r"image_dirs\[1\]' must be a relative path"):
        parse_manifest(raw)
    raw = classification()
    raw["schemes"]["coop"]["download"] = {"files": [{"path": "../../.bashrc", "url": "http://example.invalid/x"}]}
    with pytest.raises(ManifestError, match=r"download.files\[0\].path' must be a relative path"):
        parse_manifest(raw)


def test_symlinks_inside_the_data_root_are_followed(tmp_path):
    """A data root whose image folder is a symlink to another disk is the normal case, not an escape."""
    elsewhere = tmp_path / "big_disk"
    (elsewhere / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(elsewhere / "cat" / "1.jpg")
    root = tmp_path / "root"
    (root / "mine").mkdir(parents=True)
    os.symlink(elsewhere, root / "mine" / "images")
    (root / "mine" / "split.json").write_text(json.dumps({"train": [["cat/1.jpg", 0, "cat"]]}))
    m = parse_manifest(classification())
    items = resolve_split(m, m.scheme(), "train", root).items
    assert [it.id for it in items] == ["cat/1.jpg"]
    # but a '..' after the symlink would climb out of the real folder: refused
    assert outside(root, ["images/../../big_disk/cat/1.jpg"], [root / "mine"]) is not None
    assert outside(root, ["cat/1.jpg", "a..b.jpg", "x/../y.jpg"], [root / "mine" / "images"]) is None


def test_caption_file_items_outside_the_data_root_are_refused(tmp_path):
    raw = {"id": "caps", "name": "Caps", "task": "retrieval", "default_scheme": "own",
           "schemes": {"own": {"source": {"kind": "caption_file", "image_dirs": ["caps/images"],
                                          "splits": {"test": "caps/test.csv"}}}}}  # fmt: skip
    (tmp_path / "caps" / "images").mkdir(parents=True)
    (tmp_path / "caps" / "test.csv").write_text("image,caption\n../../../../etc/passwd,a file\n")
    m = parse_manifest(raw)
    with pytest.raises(DataError) as e:
        resolve_retrieval_split(m, m.scheme(), "test", tmp_path)
    assert str(e.value) == (
        f"caption file item '../../../../etc/passwd' resolves outside the data root {tmp_path}; "
        "items must be paths inside it"
    )
    raw["schemes"]["own"]["source"]["splits"]["test"] = "../../captions.csv"
    with pytest.raises(ManifestError, match=r"splits.test' must be a relative path"):
        parse_manifest(raw)


def test_store_path_parts_cannot_climb_out_of_the_cache():
    assert backbone_slug("..") == "__" and backbone_slug(".") == "_" and "/" not in backbone_slug("a/../../b")


# --- values: method options ----------------------------------------------------------------------------------


def test_every_registered_default_config_is_within_its_own_bounds():
    for m in list_adapters():
        check_config(adapter_config(m), m)
    for m, cls in streamed_methods().items():
        check_config(build_config(cls, m, {}), m)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": -3}, "option 'epochs' of 'clip-adapter' must be >= 1, got -3"),
        ({"epochs": "-3"}, "option 'epochs' of 'clip-adapter' must be >= 1, got -3"),
        ({"lr": float("nan")}, "option 'lr' of 'clip-adapter' must be finite, got nan"),
        ({"lr": "inf"}, "option 'lr' of 'clip-adapter' must be finite, got inf"),
        ({"lr": 0}, "option 'lr' of 'clip-adapter' must be > 0, got 0"),
        ({"optimizer": "adamx"}, "option 'optimizer' of 'clip-adapter' must be one of adam, adamw, sgd, got 'adamx'"),
        ({"momentum": 1.5}, "option 'momentum' of 'clip-adapter' must be <= 1, got 1.5"),
        ({"ratio": -0.1}, "option 'ratio' of 'clip-adapter' must be >= 0, got -0.1"),
        ({"epochs": 2.5}, "option 'epochs' of 'clip-adapter' must be an integer, got 2.5"),
        ({"schedule": 3}, "option 'schedule' of 'clip-adapter' must be a string, got 3"),
    ],
)
def test_config_bounds_from_the_api(options, message):
    with pytest.raises(MethodError) as e:
        adapter_config("clip-adapter", **options)
    assert str(e.value) == message


def test_bounds_apply_to_config_objects_list_elements_and_inherited_fields():
    with pytest.raises(MethodError, match="option 'lr' of 'clip-adapter' must be finite, got nan"):
        create_adapter("clip-adapter", ClipAdapterConfig(lr=float("nan")))
    with pytest.raises(MethodError, match="option 'epochs' of 'clip-adapter' must be >= 1, got 0"):
        create_adapter("clip-adapter", ClipAdapterConfig(), epochs=0)
    with pytest.raises(MethodError, match=r"'search_steps' of 'tip-adapter' \(every element\) must be >= 1, got 0"):
        adapter_config("tip-adapter", search_steps="200,0")
    # TipAdapterFConfig redeclares lr with a new default only: TrainConfig's bound still holds
    with pytest.raises(MethodError, match="option 'lr' of 'tip-adapter-f' must be > 0, got -1"):
        create_adapter("tip-adapter-f", TipAdapterFConfig(lr=-1.0))
    with pytest.raises(MethodError, match="option 'lam' of 'mm-attn' must be finite, got inf"):
        adapter_config("mm-attn", lam=float("inf"))
    with pytest.raises(MethodError, match="option 'optimizer' of 'layer-mma' must be one of sgd, got 'adam'"):
        build_config(streamed_methods()["layer-mma"], "layer-mma", {"optimizer": "adam"})
    assert build_config(streamed_methods()["cross-modal-adapter"], "cma", {"logit_scale": "50"}).logit_scale == 50.0
    assert adapter_config("clip-adapter", epochs=np.int64(3), lr=np.float32(0.5)).epochs == 3  # numpy scalars pass
    with pytest.raises(MethodError, match="must be finite, got nan$"):
        adapter_config("clip-adapter", lr=np.float64("nan"))
    assert ("lr", 0.005, "learning rate [> 0]") in config_help("clip-adapter")


def test_fit_refuses_bad_options_before_reading_any_store(tmp_path):
    with pytest.raises(MethodError, match="option 'epochs' of 'clip-adapter' must be >= 1, got -3"):
        fit_method("clip-adapter", dataset="digits", backbone=TINY, cache_dir=tmp_path, options={"epochs": -3})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "clip-adapter", "--set", "epochs=-3"], "option 'epochs' of 'clip-adapter' must be >= 1, got -3"),
        (["--adapter", "clip-adapter", "--set", "lr=nan"], "option 'lr' of 'clip-adapter' must be finite, got nan"),
        (["--adapter", "mm-attn", "--lambda", "inf"], "option 'lam' of 'mm-attn' must be finite, got inf"),
        (["--adapter", "mm-attn", "--lambda", "nan"], "option 'lam' of 'mm-attn' must be finite, got nan"),
        (["--adapter", "mm-attn", "--lambda", "1.5"], "option 'lam' of 'mm-attn' must be <= 1, got 1.5"),
        (["--adapter", "layer-mma", "--set", "lr=-1"], "option 'lr' of 'layer-mma' must be > 0, got -1.0"),
        (["--adapter", "clip-adapter", "--shots", "-1"], "--shots must be >= 0 (0: every training row), got -1"),
        (["--adapter", "clip-adapter", "--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--adapter", "clip-adapter", "--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    ],
)
def test_fit_option_values_from_the_cli(tmp_path, args, message):
    r = runner.invoke(app, ["fit", *args, "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(tmp_path)])
    one_line_error(r, message)


def test_other_commands_check_their_numbers(tmp_path):
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--workers", "-1"])
    one_line_error(r, "--workers must be >= 0, got -1")
    base = ["extract", "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(tmp_path), "--quiet"]
    for opt, value, text in [("--workers", "-1", "--workers must be >= 0, got -1"),
                             ("--batch-size", "0", "--batch-size must be"),
                             ("--augment-views", "-2", "--augment-views must be >= 0, got -2")]:  # fmt: skip
        one_line_error(runner.invoke(app, [*base, opt, value]), text)
    assert not list(tmp_path.rglob("*.h5*"))
    sweep = tmp_path / "s.toml"
    sweep.write_text('protocol = "fewshot"\nbackbones = ["b"]\ndatasets = ["digits"]\nmethods = ["zero-shot"]\n')
    one_line_error(runner.invoke(app, ["sweep", str(sweep), "--jobs", "0"]), "--jobs must be >= 1, got 0")


def test_negative_shots_are_refused_and_zero_means_every_row(capsys):
    labels = [0, 0, 0, 1, 1]
    with pytest.raises(MethodError, match=r"shots must be a whole number >= 0 \(0: every training row\), got -1"):
        fewshot_draw(labels, None, -1, 1)
    assert sorted(fewshot_draw(labels, None, 0, 1)[0]) == [0, 1, 2, 3, 4]
    rec = SimpleNamespace(method="zero-shot", dataset="digits", eval_dataset=None, protocol="fewshot", shots=0, seed=1,
                          metrics={"acc": 50.0}, fit_seconds=0.0, trainable_params=0, run_id="r")  # fmt: skip
    _print_record(rec)
    assert "fewshot all-shot seed 1" in capsys.readouterr().out


# --- devices -------------------------------------------------------------------------------------------------


@NO_CUDA
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(BackboneError, match="--device cuda: .*; use --device cpu"):
        pick_device("cuda")
    with pytest.raises(BackboneError, match="--device cuda"):
        fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=tmp_path, device="cuda")
    r = runner.invoke(app, ["fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone", TINY,
                            "--cache-dir", str(tmp_path), "--device", "cuda"])  # fmt: skip
    one_line_error(r, "--device cuda: ")
    r = runner.invoke(app, ["extract", "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(tmp_path),
                            "--device", "cuda", "--quiet"])  # fmt: skip
    one_line_error(r, "--device cuda: ")
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--device", "cuda"])
    one_line_error(r, "--device cuda: ")


def test_unknown_device_name_is_one_line():
    with pytest.raises(BackboneError, match="unknown device 'gpu'"):
        pick_device("gpu")


# --- sweep files ---------------------------------------------------------------------------------------------

GRID = 'protocol = "base2novel"\nbackbones = ["featcache-tiny/random"]\ndatasets = ["digits"]\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (GRID + 'methods = ["zero-shot"]\nshotz = [4]\n', "unknown key 'shotz'; allowed: name, protocol, backbones"),
        (
            GRID + 'methods = ["clip-adapter"]\n[options]\nclip-adapter = { epochz = 3 }\n',
            "[options] clip-adapter: method 'clip-adapter' has no option 'epochz'",
        ),
        (
            GRID + '[[variants]]\nname = "v"\nmethod = "clip-adapter"\noptionz = { epochs = 3 }\n',
            "unknown key 'optionz' in variants[0] (v); allowed: name, method, options",
        ),
        (
            GRID + '[[variants]]\nname = "v"\nmethod = "clip-adapter"\noptions = { ratioo = 0.1 }\n',
            "variants (v): method 'clip-adapter' has no option 'ratioo'",
        ),
        (
            GRID + 'methods = ["clip-adapter"]\n[options]\nclip-adapter = { epochs = -3 }\n',
            "[options] clip-adapter: option 'epochs' of 'clip-adapter' must be >= 1, got -3",
        ),
        (
            GRID + '[[variants]]\nname = "v"\nmethod = "mm-attn"\noptions = { lam = nan }\n',
            "variants (v): option 'lam' of 'mm-attn' must be finite, got nan",
        ),
        (GRID + 'methods = ["zero-shot"]\nshots = [-1]\n', "'shots' must be a non-empty list of whole numbers >= 0"),
        (GRID + 'methods = ["zero-shot"]\nseeds = [1.5]\n', "'seeds' must be a non-empty list of whole numbers"),
        (GRID + 'methods = ["zero-shot"]\nseeds = []\n', "'seeds' must be a non-empty list"),
        (GRID + 'methods = ["zero-shot"]\nsource = "digits"\n', "'source' does not apply to protocol base2novel"),
        (GRID + 'methods = ["zero-shot"]\nval_from = "test"\n', "'val_from' must be one of val, train, none"),
        (
            GRID + 'methods = ["layer-mma"]\n[options]\nlayer-mma = { batch_size = 0 }\n',
            "option 'batch_size' of 'layer-mma' must be >= 1, got 0",
        ),
    ],
)
def test_sweep_files_refuse_unknown_keys_and_bad_values(tmp_path, text, message):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(SweepError) as e:
        load_sweep(p)
    assert message in str(e.value) and "\n" not in str(e.value)
    one_line_error(runner.invoke(app, ["sweep", str(p), "--results", str(tmp_path / "r.jsonl")]), message)
    assert not (tmp_path / "r.jsonl").exists()


# --- blame -----------------------------------------------------------------------------------------------------


def test_a_local_checkpoint_that_fails_to_load_is_not_blamed_on_the_network(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError) as e:
        load_backbone(f"{TINY.split('/')[0]}/{bad}", device="cpu")
    msg = str(e.value)
    assert f"{bad} is not an open_clip checkpoint for featcache-tiny (" in msg and "network" not in msg
    assert "\n" not in msg


def test_a_download_that_fails_suggests_the_network(monkeypatch):
    import open_clip

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(BackboneError, match=r"Failed to resolve 'huggingface.co' \(no network\? "):
        load_backbone("ViT-B-32-quickgelu/openai", device="cpu")


def test_missing_store_hint_names_the_manifest_file_and_unknown_backbones_fail_first(tmp_path):
    mfile = write_manifest(tmp_path, classification())
    with pytest.raises(StoreError, match=f"featcache extract --manifest {mfile} --backbone {TINY}"):
        open_store(str(mfile), TINY, cache_dir=tmp_path / "cache")
    with pytest.raises(StoreError, match=f"featcache extract --dataset digits --backbone {TINY}"):
        open_store("digits", TINY, cache_dir=tmp_path / "cache")
    with pytest.raises(BackboneError, match="unknown architecture 'nope-arch'"):
        open_store("digits", "nope-arch/random", cache_dir=tmp_path / "cache")
    assert load_manifest(mfile).id == "mine"
