"""`featcache fit` / `featcache eval` end to end on the tiny architecture and digits."""

import json
import re

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
TINY = ["--dataset", "digits", "--backbone", "featcache-tiny/random"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    r = runner.invoke(app, ["extract", *TINY, "--cache-dir", str(d), "--quiet", "--workers", "0"])
    assert r.exit_code == 0, r.output
    return d


@pytest.mark.parametrize("method", ["zero-shot", "linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f",
                                    "mm-attn", "coop"])  # fmt: skip
def test_fit_every_method(cache, tmp_path, method):
    out = tmp_path / "r.jsonl"
    args = ["fit", "--adapter", method, *TINY, "--cache-dir", str(cache), "--shots", "4", "--results", str(out),
            "--save", str(tmp_path / "run"), "--set", "epochs=2"]  # fmt: skip
    if method == "linear-probe":
        args += ["--set", "c=1.0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + r.stderr
    drawn = "no training" if method == "zero-shot" else "4-shot seed 1"  # zero-shot draws no shots
    assert f"digits  base2novel {drawn}:  base" in r.output and "trainable parameters" in r.output
    assert "(top-5: base " in r.output
    rec = json.loads(out.read_text())
    assert rec["method"] == method and rec["backbone"] == "featcache-tiny/random" and rec["config"]["epochs"] in (2,)
    assert ("novel n/a" in r.output) == (method == "linear-probe")
    assert (tmp_path / "run" / "state.pt").exists()
    e = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(cache)])
    if method == "linear-probe":
        assert e.exit_code == 1 and "cannot score digits's classes" in e.stderr
    else:
        assert e.exit_code == 0 and "digits -> digits  xd" in e.output


def test_lambda_reaches_mm_attn(cache, tmp_path):
    out = tmp_path / "r.jsonl"
    r = runner.invoke(
        app,
        [
            "fit",
            "--adapter",
            "mm-attn",
            *TINY,
            "--cache-dir",
            str(cache),
            "--lambda",
            "0.5",
            "--set",
            "mask=hard",
            "--set",
            "epochs=1",
            "--protocol",
            "fewshot",
            "--results",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["lam"] == 0.5 and rec["config"]["mask"] == "hard" and set(rec["metrics"]) == {"acc", "acc5"}


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--adapter", "nope"], "unknown method 'nope'; available: ape, "),
        (["--adapter", "clip-adapter", "--set", "depth=3"], "method 'clip-adapter' has no option 'depth'"),
        (["--adapter", "clip-adapter", "--set", "ratio"], "--set takes key=value"),
        (["--adapter", "clip-adapter", "--lambda", "0.3"], "method 'clip-adapter' has no option 'lam'"),
        (["--adapter", "tip-adapter", "--shots", "500"], "500 shots asked, but class"),
        (["--adapter", "zero-shot", "--protocol", "xd"], "unknown protocol 'xd'"),
    ],
)
def test_fit_errors(cache, extra, msg):
    r = runner.invoke(app, ["fit", *TINY, "--cache-dir", str(cache), *extra])
    assert r.exit_code == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_store_says_how_to_make_it(tmp_path):
    r = runner.invoke(app, ["fit", "--adapter", "zero-shot", "--dataset", "dtd", "--backbone", "featcache-tiny/random",
                            "--cache-dir", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 1 and "featcache extract --dataset dtd --backbone featcache-tiny/random" in r.stderr


def test_methods_command():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "mm-attn" in r.output and "closed form" in r.output
    assert re.search(r"^linear-probe +closed form +Linear probe, .*\.$", r.output, re.M), r.output  # a sentence
    r = runner.invoke(app, ["methods", "nope"])
    assert r.exit_code == 1 and "available: ape, " in r.stderr
    r = runner.invoke(app, ["methods", "mm-attn"])
    assert "lam=0.2" in r.output and "mask=bias" in r.output


def test_sweep_leaderboard_plot_commands(cache, tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('protocol = "base2novel"\nbackbones = ["featcache-tiny/random"]\ndatasets = ["digits"]\n'
                     'methods = ["zero-shot", "tip-adapter"]\nshots = [4]\nseeds = [1, 2]\n')  # fmt: skip
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["sweep", str(sweep), "--results", str(out), "--cache-dir", str(cache), "--quiet"])
    assert r.exit_code == 0 and "done 4, failed 0" in r.output, r.output + r.stderr
    r = runner.invoke(app, ["sweep", str(sweep), "--results", str(out), "--cache-dir", str(cache), "--quiet"])
    assert "done 0, failed 0 (recorded with their error; rerun to retry), already recorded 4" in r.output
    r = runner.invoke(app, ["leaderboard", str(out), "--out", str(tmp_path / "t.csv"), "--reference", "published"])
    assert r.exit_code == 0, r.stderr
    assert "tip-adapter" in r.output and "MaPLe (published)" in r.output
    assert "digits hm" not in r.output  # one dataset: its column would repeat the average
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t_runs.csv").exists()
    r = runner.invoke(app, ["leaderboard", str(out), "--protocol", "fewshot"])
    assert r.exit_code == 1 and "no successful fewshot records" in r.stderr
    r = runner.invoke(app, ["plot", str(out), "--kind", "base-novel", "--out", str(tmp_path / "p.png")])
    assert r.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_methods_lists_streaming_methods_too():
    r = runner.invoke(app, ["methods"])
    for name in ("layer-mma", "maple", "cross-modal-adapter"):
        assert re.search(rf"^{name} +full backbone ", r.output, re.M), r.output
    r = runner.invoke(app, ["methods", "maple"])
    assert "depth=9" in r.output and "n_ctx=2" in r.output
