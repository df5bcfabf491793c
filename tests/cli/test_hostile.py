"""Issue 11's whole list, run through the CLI as a hostile user would: every case ends as one `error:` line with
exit code 1 (never a traceback), and nothing outside the roots is touched — no file is created, changed or deleted
anywhere in the sandbox except under the cache dir, and the existing store survives a refused `--overwrite`.

The deeper checks of each case (torn results tails, ENOSPC in the writer, concurrent extraction, kill -9) live in
test_durable.py, test_extract_faults.py and test_validation.py; this file is the user's-eye view of all of them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NotATensor, flip_chunk_bytes
from typer.testing import CliRunner

from cli.main import app

TINY = "featcache-tiny/random"
runner = CliRunner()


def _tree(root: Path, skip: Path) -> dict[str, str]:
    """Every file under root (but not under skip) with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and skip not in p.parents:
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _manifest(scheme: str = "coop", split_file: str = "mine/split.json") -> dict:
    return {
        "id": "mine", "name": "Mine", "classnames": ["cat", "dog"], "template": "a photo of a {}.",
        "templates": ["a photo of a {}."], "default_scheme": scheme,
        "schemes": {scheme: {"source": {"kind": "split_json", "split_file": split_file,
                                        "image_dirs": ["mine/images"]}}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A user's folder: a cache with the digits store, a saved run, a data root, and planted bad inputs."""
    top = tmp_path_factory.mktemp("hostile")
    cache, data, bad = top / "cache", top / "data", top / "inputs"
    for d in (cache, data, bad):
        d.mkdir()
    r = runner.invoke(app, ["extract", "--dataset", "digits", "--backbone", TINY, "--cache-dir", str(cache),
                            "--workers", "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit", "--adapter", "clip-adapter", "--dataset", "digits", "--backbone", TINY,
                            "--cache-dir", str(cache), "--shots", "2", "--set", "epochs=1",
                            "--save", str(top / "run")])  # fmt: skip
    assert r.exit_code == 0, r.output

    # saved runs damaged three ways
    for name in ("run-pickle", "run-truncated", "run-json"):
        shutil.copytree(top / "run", bad / name)
    torch.save({"w": NotATensor()}, bad / "run-pickle" / "state.pt")
    st = bad / "run-truncated" / "state.pt"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (bad / "run-json" / "run.json").write_text('{"method": "clip-adapter", ')
    # an .npz whose arrays are objects (unpickling one could run code)
    np.savez(bad / "objects.npz", train_features=np.array([{"x": 1}], dtype=object), train_labels=np.array([0]))
    # manifests that try to leave their roots
    (data / "mine" / "images").mkdir(parents=True)
    (data / "mine" / "split.json").write_text(json.dumps({"train": [["../../../../etc/passwd", 0, "cat"]]}))
    (bad / "climb.json").write_text(json.dumps(_manifest(scheme="../../../../escaped")))
    (bad / "items.json").write_text(json.dumps(_manifest()))
    (bad / "splitfile.json").write_text(json.dumps(_manifest(split_file="../inputs/split.json")))
    (bad / "split.json").write_text(json.dumps({"train": [["a.png", 0, "cat"]]}))
    (bad / "sweep.toml").write_text('protocol = "fewshot"\nbackbones = ["featcache-tiny/random"]\n'
                                    'datasets = ["digits"]\nmethods = ["zero-shot"]\nshotz = [4]\n')  # fmt: skip
    (bad / "garbage.pt").write_bytes(b"not a checkpoint at all")
    # a copy of the store with a few flipped bytes inside a feature chunk
    corrupt = top / "corrupt-cache"
    shutil.copytree(cache, corrupt)
    flip_chunk_bytes(next(corrupt.rglob("digits__fixed.h5")), "/splits/test/features")
    (top / "results.jsonl").write_text('{"method": "zero-shot"}\n{"method": "zero\n{"method": "x"}\n')
    return top


FIT = ["fit", "--dataset", "digits", "--backbone", TINY]
CUDA = torch.cuda.is_available()


def cases(top: Path) -> list[tuple[str, list[str], str]]:
    """(what the issue listed, argv, text the one error line must hold)."""
    cache, data, bad = str(top / "cache"), str(top / "data"), top / "inputs"
    ex = ["extract", "--backbone", TINY, "--cache-dir", cache, "--data-root", data, "--workers", "0", "--quiet"]
    out = [
        ("--lambda nan", [*FIT, "--adapter", "mm-attn", "--lambda", "nan"], "option 'lam' of 'mm-attn' must be finite"),
        ("--lambda inf", [*FIT, "--adapter", "mm-attn", "--lambda", "inf"], "option 'lam' of 'mm-attn' must be finite"),
        ("epochs=-3", [*FIT, "--adapter", "clip-adapter", "--set", "epochs=-3"], "option 'epochs' of 'clip-adapter'"),
        ("epochs=0", [*FIT, "--adapter", "clip-adapter", "--set", "epochs=0"], "must be >= 1, got 0"),
        ("lr=nan", [*FIT, "--adapter", "clip-adapter", "--set", "lr=nan"], "option 'lr' of 'clip-adapter' must be"),
        ("--shots -1", [*FIT, "--adapter", "clip-adapter", "--shots", "-1"], "--shots must be >= 0"),
        ("fit --workers -1", [*FIT, "--adapter", "clip-adapter", "--workers", "-1"], "--workers must be >= 0"),
        ("extract --workers -1", [*ex, "--dataset", "digits", "--workers", "-1"], "--workers must be >= 0, got -1"),
        ("refused --overwrite", [*ex, "--dataset", "digits", "--overwrite", "--workers", "-2"], "--workers must be"),
        ("--augment-views -2", [*ex, "--dataset", "digits", "--augment-views", "-2"], "--augment-views must be >= 0"),
        ("scheme name climbs", [*ex, "--manifest", str(bad / "climb.json")], "scheme names must match"),
        ("split item climbs", [*ex, "--manifest", str(bad / "items.json")],
         "'../../../../etc/passwd' resolves outside"),
        ("split file outside", [*ex, "--manifest", str(bad / "splitfile.json")],
         "must be a relative path that stays inside --data-root, got '../inputs/split.json'"),
        ("sweep typo", ["sweep", str(bad / "sweep.toml"), "--results", str(top / "sweep.jsonl")],
         "unknown key 'shotz'"),
        ("planted pickle", ["eval", "--run", str(bad / "run-pickle"), "--dataset", "digits", "--cache-dir", cache],
         "not a readable featcache state file"),
        ("truncated state.pt", ["eval", "--run", str(bad / "run-truncated"), "--dataset", "digits", "--cache-dir",
                                cache], "not a readable featcache state file"),
        ("broken run.json", ["eval", "--run", str(bad / "run-json"), "--dataset", "digits", "--cache-dir", cache],
         "is not a readable saved run's run.json"),
        ("npz object arrays", ["import", str(bad / "objects.npz"), "--name", "objs", "--cache-dir", cache],
         "object"),
        ("local checkpoint that is not one",
         [*ex, "--dataset", "digits", "--backbone", f"featcache-tiny/{bad / 'garbage.pt'}"],
         "is not an open_clip checkpoint"),
        ("unknown backbone", ["fit", "--adapter", "zero-shot", "--dataset", str(bad / "items.json"), "--backbone",
                              "NoSuchArch/x", "--cache-dir", cache], "unknown architecture 'NoSuchArch'"),
        ("custom manifest hint", ["fit", "--adapter", "zero-shot", "--dataset", str(bad / "items.json"),
                                  "--backbone", TINY, "--cache-dir", cache], f"--manifest {bad / 'items.json'}"),
        ("flipped bytes", [*FIT, "--adapter", "zero-shot", "--cache-dir", str(top / "corrupt-cache")],
         "is corrupt (checksum failed reading /splits/test/features); delete it and extract again"),
        ("torn middle line", ["leaderboard", str(top / "results.jsonl")], "line 2 of"),
    ]  # fmt: skip
    if not CUDA:
        out.append(("--device cuda", [*FIT, "--adapter", "zero-shot", "--cache-dir", cache, "--device", "cuda"],
                    "--device cuda: "))  # fmt: skip
    return [(w, a if "--cache-dir" in a or a[0] not in ("fit",) else [*a, "--cache-dir", cache], t) for w, a, t in out]


def test_every_listed_bad_input_is_one_line_and_touches_nothing(sandbox):
    cache = sandbox / "cache"
    store = next(cache.rglob("digits__fixed.h5"))
    before, store_sha = _tree(sandbox, cache), hashlib.sha1(store.read_bytes()).hexdigest()
    cache_before = sorted(str(p) for p in cache.rglob("*"))
    failures = []
    for what, argv, text in cases(sandbox):
        r = runner.invoke(app, argv)
        lines = (r.stderr or r.output).strip().splitlines()
        ok = r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]
        if not ok or "Traceback" in r.output:
            failures.append(f"{what}: exit {r.exit_code}: {r.output.strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert _tree(sandbox, cache) == before  # nothing outside the cache changed, appeared or went away
    assert hashlib.sha1(store.read_bytes()).hexdigest() == store_sha  # the refused --overwrite kept the store
    assert sorted(str(p) for p in cache.rglob("*")) == cache_before  # no stray store, partial or temporary
    assert not (sandbox.parent / "escaped").exists() and not Path("/tmp/escaped").exists()


def test_full_disk_during_fit_save_leaves_no_record_and_no_temporary(sandbox, monkeypatch, tmp_path):
    """A save that fails on a full disk is one line, and the results file gets no record for a run that is not
    there (nor a torn line), and no temporary is left in the run folder."""
    import errno

    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"method": "zero-shot", "dataset": "digits"}) + "\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    argv = [*FIT, "--adapter", "clip-adapter", "--cache-dir", str(sandbox / "cache"), "--shots", "2", "--set",
            "epochs=1", "--save", str(tmp_path / "run"), "--results", str(results)]  # fmt: skip
    r = runner.invoke(app, argv)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "No space left on device" in lines[0], r.output
    assert results.read_text().count("\n") == 1  # the old record only
    assert not (tmp_path / "run").exists() or not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())
