"""Checks shared by the training-free method tests (gda, ape, tip-x): an imported store for the Python API, the
test-split spy, and `featcache fit` + `featcache eval` on the digits store under a protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

import featcache.train
from featcache.api import fit_method
from featcache.store import Store


def import_synthetic(cache: Path, synth: Path) -> Path:
    """The synthetic store re-imported by name (the API addresses imported stores by name)."""
    from featcache.importers import import_npz

    with Store.open(synth) as st:
        arrays = {f"{s}_{k}": v for s in st.splits for k, v in
                  (("features", st.split(s).features.numpy()), ("labels", st.split(s).labels.numpy()))}  # fmt: skip
        arrays |= {"text_features": st.text().numpy(), "classnames": np.array(st.classnames)}
    np.savez(cache / "synth.npz", **arrays)
    import_npz(cache / "synth.npz", "synth", cache_dir=cache, dtype="float32")
    return cache


def assert_test_split_unread(method: str, cache: Path, monkeypatch, options: dict | None = None) -> None:
    """A spy on the store: reading 'test' while `fit` runs fails; it is read afterwards, for evaluation."""
    state = {"fitting": False, "test_reads": 0}
    real_split, real_fit = Store.split, featcache.train.fit

    def spy_split(self, split, *a, **k):
        if split == "test":
            assert not state["fitting"], "the test split was read during fitting"
            state["test_reads"] += 1
        return real_split(self, split, *a, **k)

    def spy_fit(*a, **k):
        state["fitting"] = True
        try:
            return real_fit(*a, **k)
        finally:
            state["fitting"] = False

    monkeypatch.setattr(Store, "split", spy_split)
    monkeypatch.setattr("featcache.api.fit", spy_fit)
    fit_method(method, name="synth", cache_dir=cache, shots=4, options=options)
    assert state["test_reads"] >= 1


def cli_fit_and_eval(method: str, digits_store: Path, tmp_path: Path, protocol: str, sets: list[str] = ()) -> dict:
    """`featcache fit --adapter METHOD` on the tiny digits store, then `featcache eval` of the saved run."""
    from cli.main import app

    runner = CliRunner()
    cache = digits_store.parent.parent  # <cache>/<backbone slug>/digits__<scheme>.h5
    out = tmp_path / "r.jsonl"
    args = ["fit", "--adapter", method, "--dataset", "digits", "--backbone", "featcache-tiny/random", "--cache-dir",
            str(cache), "--shots", "4", "--protocol", protocol, "--results", str(out), "--save",
            str(tmp_path / "run")]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + r.stderr
    rec = json.loads(out.read_text())
    assert rec["method"] == method and rec["trainable_params"] == 0
    b2n = {f"{m}{k}" for m in ("base_acc", "novel_acc", "hm") for k in ("", "5")}  # top-1 and top-5
    keys = {"acc", "acc5"} if protocol == "fewshot" else b2n
    assert set(rec["metrics"]) == keys and all(v is not None for v in rec["metrics"].values())
    e = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(cache)])
    assert e.exit_code == 0 and "digits -> digits  xd" in e.output, e.output + e.stderr
    return rec


def round_trip(run, folder: Path, dim: int) -> None:
    """A saved run reloads to the same logits, on the training classes and on classes never trained on."""
    from featcache.api import load_run

    adapter, _ = load_run(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, dim, generator=g), dim=-1)
    t = run.task.fit.text
    torch.testing.assert_close(adapter(x, t), run.adapter(x, t), rtol=0, atol=0)
    other = torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=-1)
    ids = torch.full((3,), -1)
    torch.testing.assert_close(adapter(x, other, ids), run.adapter(x, other, ids), rtol=0, atol=0)
