"""The CLI end to end through typer's CliRunner, on the tiny architecture and digits."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_demo_pretrains_then_teaches(tmp_path):
    """The default demo pretrains the tiny CLIP, so zero-shot is far above chance (10 %), and says what the
    table shows; a rerun reuses the checkpoint and the records and says so."""
    r = run("demo", "--cache-dir", tmp_path)
    assert r.exit_code == 0, r.output
    assert "pretrained the tiny CLIP on 1077 digit images" in r.output and "RANDOM" not in r.output
    zs = re.search(r"zero-shot scores base (\d+\.\d) / novel (\d+\.\d)", r.output)
    assert zs and float(zs[1]) > 50 and float(zs[2]) > 50
    assert "raised base accuracy for" in r.output and "featcache plot" in r.output
    r = run("demo", "--cache-dir", tmp_path)
    assert "reusing the pretrained tiny CLIP" in r.output and "reusing 45 of 45 runs already recorded" in r.output


def test_demo_extract_ls_info(tmp_path):
    r = run("demo", "--cache-dir", tmp_path, "--random-weights")
    assert r.exit_code == 0, r.output
    assert "RANDOM weights" in r.output and "mean nothing" in r.output
    assert "train   1077 rows" in r.output
    r = run("extract", "--dataset", "digits", "--backbone", "featcache-tiny/random", "--cache-dir", tmp_path,
            "--quiet", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0 and "digits (fixed), 10 classes, D=64, float16" in r.output
    r = run("ls", "--cache-dir", tmp_path)
    assert r.exit_code == 0
    assert "featcache-tiny/random" in r.output and "train=1077 val=360 test=360" in r.output
    store = tmp_path / "featcache-tiny__random" / "digits__fixed.h5"
    r = run("info", store)
    info = json.loads(r.output)
    assert info["backbone"] == "featcache-tiny/random" and info["splits"]["test"] == 360
    assert len(info["classnames"]) == 10 and info["templates"][0] == "a photo of the digit {}."


@pytest.mark.parametrize(
    "args,msg",
    [
        (["extract", "--dataset", "nope", "--backbone", "featcache-tiny/random"], "error: unknown dataset 'nope'"),
        (["extract", "--dataset", "digits", "--backbone", "ViT-B-16/openai"], "use ViT-B-16-quickgelu/openai"),
        (["extract", "--backbone", "featcache-tiny/random"], "error: give --dataset NAME or --manifest FILE"),
        (
            ["extract", "--dataset", "digits", "--backbone", "featcache-tiny/random", "--split-scheme", "coop"],
            "no split scheme 'coop'",
        ),
        (["info", "/no/such/store.h5"], "no feature store at /no/such/store.h5"),
        (["import", "/no/such.npz", "--name", "x"], "no such file"),
    ],
)
def test_errors_are_one_line_and_nonzero(tmp_path, args, msg):
    r = runner.invoke(app, args + ["--cache-dir", str(tmp_path)] if args[0] in ("extract", "import") else args)
    assert r.exit_code == 1
    err = r.stderr if r.stderr else r.output
    assert msg in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_data_folder_message(tmp_path):
    manifest = tmp_path / "m.json"
    from conftest import folder_manifest

    manifest.write_text(json.dumps(folder_manifest("toy", ["a", "b"])))
    r = runner.invoke(app, ["extract", "--manifest", str(manifest), "--backbone", "featcache-tiny/random",
                            "--data-root", str(tmp_path / "none"), "--cache-dir", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 1 and "image folder not found" in r.stderr and "Put the images under" in r.stderr


def test_import_and_import_tip(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", train_features=rng.standard_normal((6, 4)), train_labels=np.arange(6) % 2,
             text_features=rng.standard_normal((2, 4)), classnames=np.array(["x", "y"]))  # fmt: skip
    r = run("import", tmp_path / "f.npz", "--name", "feat", "--cache-dir", tmp_path)
    assert r.exit_code == 0 and "train        6 rows" in r.output
    import torch

    tip = tmp_path / "tip"
    tip.mkdir()
    torch.save(torch.randn(4, 6), tip / "keys_3shots.pt")
    torch.save(torch.nn.functional.one_hot(torch.arange(6) % 2, 2), tip / "values_3shots.pt")
    (tmp_path / "c.txt").write_text("x\ny\n")
    torch.save(torch.randn(2, 4), tmp_path / "t.pt")
    r = run("import-tip", tip, "--name", "tip", "--classnames", tmp_path / "c.txt", "--text-features",
            tmp_path / "t.pt", "--cache-dir", tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("ls", "--cache-dir", tmp_path)
    assert "feat" in r.output and "tip" in r.output


def test_datasets_and_backbones_lists():
    r = run("datasets")
    assert r.exit_code == 0 and "digits" in r.output and "bundled" in r.output
    r = run("backbones", "ViT-B-16-quickgelu")
    assert "ViT-B-16-quickgelu/openai" in r.output.splitlines()


def test_console_entry_point_runs_as_module(tmp_path):
    """The installed `featcache` script calls cli.main:main; run the same function in a fresh process."""
    p = subprocess.run([sys.executable, "-m", "cli.main", "extract", "--dataset", "nope", "--backbone", "x/y"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: unknown dataset 'nope'; known: "
        + ", ".join(__import__("featcache.manifests").manifests.list_datasets())
        + " (or pass your own manifest with --manifest FILE)"
    )
