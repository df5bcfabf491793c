"""`fit`, `eval` and `sweep` take `--manifest FILE` as `extract` does; every hint names a command that works."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
TINY = "featcache-tiny/random"


def one_line_error(r, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr


def test_fit_and_eval_take_a_manifest_and_the_missing_store_hint_works(toy_folder, tmp_path):
    data, mpath = toy_folder
    cache = str(tmp_path / "cache")
    fit = ["fit", "--adapter", "zero-shot", "--manifest", str(mpath), "--backbone", TINY, "--cache-dir", cache]
    r = runner.invoke(app, fit)
    one_line_error(r, f"create it with: featcache extract --manifest {mpath} --backbone {TINY} --cache-dir {cache}")
    hint = re.search(r"create it with: (featcache extract .*)$", r.stderr.strip()).group(1)
    argv = shlex.split(hint)[1:] + ["--data-root", str(data), "--workers", "0", "--quiet"]
    assert runner.invoke(app, argv).exit_code == 0  # the hinted command works as written
    r = runner.invoke(app, [*fit, "--protocol", "fewshot", "--save", str(tmp_path / "run")])
    assert r.exit_code == 0 and "toyfolder  fewshot no training:  acc " in r.output, r.output + r.stderr
    tip = ["--adapter", "tip-adapter", "--shots", "2", "--val-from", "train", "--protocol", "fewshot"]
    r = runner.invoke(app, ["fit", *tip, "--manifest", str(mpath), "--backbone", TINY, "--cache-dir", cache])
    assert r.exit_code == 0 and "toyfolder  fewshot 2-shot seed 1:  acc " in r.output, r.output + r.stderr
    r = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--manifest", str(mpath), "--cache-dir", cache])
    assert r.exit_code == 0 and "toyfolder -> toyfolder  xd" in r.output, r.output + r.stderr


@pytest.mark.parametrize("command", ["fit", "eval", "extract"])
def test_dataset_and_manifest_errors_are_one_line(toy_folder, tmp_path, command):
    _, mpath = toy_folder
    head = {"fit": ["fit", "--adapter", "zero-shot", "--backbone", TINY], "extract": ["extract", "--backbone", TINY],
            "eval": ["eval", "--run", str(tmp_path)]}[command]  # fmt: skip
    base = [*head, "--cache-dir", str(tmp_path / "c")]
    one_line_error(runner.invoke(app, [*base, "--dataset", "digits", "--manifest", str(mpath)]),
                   "give exactly one of --dataset NAME or --manifest FILE")  # fmt: skip
    one_line_error(runner.invoke(app, [*base, "--manifest", str(tmp_path / "nope.json")]),
                   f"no manifest file at {tmp_path / 'nope.json'}")  # fmt: skip
    want = {"fit": "give --dataset NAME or --manifest FILE (or --name NAME for an imported store)",
            "eval": "give the target --dataset NAME or --manifest FILE (or --name NAME for an imported store)",
            "extract": "give --dataset NAME or --manifest FILE"}[command]  # fmt: skip
    one_line_error(runner.invoke(app, base), want)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_sweep_takes_a_manifest_and_its_missing_cache_hint_works(toy_folder, tmp_path):
    data, mpath = toy_folder
    cache = str(tmp_path / "cache")
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'protocol = "fewshot"\nbackbones = ["{TINY}"]\ndatasets = ["digits"]\n'
                     'methods = ["zero-shot"]\nseeds = [1]\n')  # fmt: skip
    argv = ["sweep", str(sweep), "--manifest", str(mpath), "--results", str(tmp_path / "r.jsonl"), "--cache-dir",
            cache, "--quiet"]  # fmt: skip
    r = runner.invoke(app, argv)
    assert r.exit_code == 0 and "waiting for a cache 1" in r.output, r.output + r.stderr
    hint = next(line.strip() for line in r.output.splitlines() if "featcache extract" in line)
    assert hint == f"featcache extract --manifest {mpath} --backbone {TINY} --cache-dir {cache}"
    made = runner.invoke(app, shlex.split(hint)[1:] + ["--data-root", str(data), "--workers", "0", "--quiet"])
    assert made.exit_code == 0, made.stderr
    r = runner.invoke(app, argv)
    assert r.exit_code == 0 and "done 1, failed 0" in r.output, r.output + r.stderr
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert rec["dataset"] == "toyfolder" and rec["shots"] == 0 and set(rec["metrics"]) == {"acc", "acc5"}
    one_line_error(runner.invoke(app, [*argv[:2], "--manifest", str(tmp_path / "nope.json")]), "no manifest file at")
