"""fit/eval through the Python API: records, saving and loading, cross-dataset evaluation, test-split guard."""

import json

import pytest
import torch

import featcache.train
from featcache.adapters import MethodError
from featcache.api import evaluate_run, fit_method, load_run, open_store
from featcache.importers import import_npz
from featcache.results import read_records
from featcache.store import Store, StoreError

METHODS = ["zero-shot", "linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f", "mm-attn"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    """The synthetic store re-imported by name, as a user would bring features made elsewhere."""
    import numpy as np

    cache = tmp_path_factory.mktemp("cache")
    with Store.open(synth) as st:
        arrays = {f"{s}_{k}": v for s in st.splits for k, v in
                  (("features", st.split(s).features.numpy()), ("labels", st.split(s).labels.numpy()))}  # fmt: skip
        arrays |= {"text_features": st.text().numpy(), "classnames": np.array(st.classnames)}
    np.savez(cache / "synth.npz", **arrays)
    import_npz(cache / "synth.npz", "synth", cache_dir=cache, dtype="float32")
    return cache


@pytest.mark.parametrize("method", METHODS)
def test_test_split_is_never_read_while_fitting(imported, method, monkeypatch):
    """A spy on the store: reading 'test' while `fit` runs fails the test."""
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
    run = fit_method(method, name="synth", cache_dir=imported, shots=4, options={"epochs": 3})
    assert state["test_reads"] >= 1  # read for evaluation, after fitting
    # and the guard itself works: a read inside fitting is caught
    state["fitting"] = True
    with pytest.raises(AssertionError, match="read during fitting"):
        Store.split(run.task and Store.open(imported / "imported" / "synth.h5"), "test")


def test_record_fields_and_jsonl(imported, tmp_path):
    out = tmp_path / "r.jsonl"
    run = fit_method("tip-adapter", name="synth", cache_dir=imported, shots=4, seed=2, results=out)
    fit_method("linear-probe", name="synth", cache_dir=imported, shots=4, seed=2, results=out, options={"c": 1.0})
    recs = read_records(out)
    assert [r["method"] for r in recs] == ["tip-adapter", "linear-probe"]
    r = recs[0]
    assert r["protocol"] == "base2novel" and r["shots"] == 4 and r["seed"] == 2 and r["dataset"] == "synth"
    assert set(r["metrics"]) == {"base_acc", "novel_acc", "hm", "base_acc5", "novel_acc5", "hm5"}
    hm = (
        2
        * r["metrics"]["base_acc"]
        * r["metrics"]["novel_acc"]
        / (r["metrics"]["base_acc"] + r["metrics"]["novel_acc"])
    )
    assert r["metrics"]["hm"] == pytest.approx(hm, abs=1e-3)
    assert r["store"]["split_scheme"] == "imported" and r["featcache_version"] and r["versions"]["torch"]
    assert r["sampled"]["n_train"] == 20 and len(r["sampled"]["train_rows_sha256"]) == 64
    assert r["config"]["alpha"] == 1.17 and r["trainable_params"] == 0 and r["fit_seconds"] >= 0
    assert recs[1]["metrics"]["novel_acc"] is None and recs[1]["metrics"]["hm"] is None  # null, never a number
    assert run.record.run_id == r["run_id"]


def test_same_draw_for_every_method(imported):
    a = fit_method("tip-adapter", name="synth", cache_dir=imported, shots=4, seed=3).record.sampled
    b = fit_method("clip-adapter", name="synth", cache_dir=imported, shots=4, seed=3, options={"epochs": 1}).record
    assert a["train_rows_sha256"] == b.sampled["train_rows_sha256"]
    assert a["val_rows_sha256"] == b.sampled["val_rows_sha256"]


def test_save_load_and_cross_dataset_eval(imported, tmp_path):
    run = fit_method("mm-attn", name="synth", cache_dir=imported, protocol="fewshot", shots=4,
                     options={"epochs": 5}, save=tmp_path / "run")  # fmt: skip
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert set(state) == set(run.adapter.state_dict())
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["method"] == "mm-attn" and meta["config"]["lam"] == 0.2
    rows = json.loads((tmp_path / "run" / "rows.json").read_text())
    assert len(rows["train_rows"]) == 40
    adapter, _ = load_run(tmp_path / "run")
    x, t = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1), run.task.fit.text
    torch.testing.assert_close(adapter(x, t), run.adapter(x, t))
    # evaluating on the same store's test split with all classes reproduces the fewshot accuracy
    rec = evaluate_run(tmp_path / "run", name="synth", cache_dir=imported)
    assert rec.protocol == "xd" and rec.metrics["acc"] == pytest.approx(run.record.metrics["acc"])


def test_tip_and_probe_saved_runs_reload(imported, tmp_path):
    fit_method("tip-adapter-f", name="synth", cache_dir=imported, protocol="fewshot", shots=4,
               options={"epochs": 2}, save=tmp_path / "tip")  # fmt: skip
    a, _ = load_run(tmp_path / "tip")
    assert a.keys.shape == (40, 32) and a.key_labels.shape == (40,) and int(a.num_classes) == 10
    fit_method("linear-probe", name="synth", cache_dir=imported, protocol="fewshot", shots=4,
               options={"c": 1.0}, save=tmp_path / "lp")  # fmt: skip
    rec = evaluate_run(tmp_path / "lp", name="synth", cache_dir=imported)  # same classes: fine
    assert rec.metrics["acc"] > 50


def test_linear_probe_cannot_go_cross_dataset(imported, tmp_path, digits_store):
    fit_method("linear-probe", name="synth", cache_dir=imported, protocol="fewshot", shots=4,
               options={"c": 1.0}, save=tmp_path / "lp")  # fmt: skip
    import numpy as np

    other = np.load(imported / "synth.npz")
    arrays = dict(other) | {"classnames": np.array([f"other {i}" for i in range(10)])}
    np.savez(tmp_path / "o.npz", **arrays)
    import_npz(tmp_path / "o.npz", "other", cache_dir=imported, dtype="float32", backbone="unknown")
    with pytest.raises(StoreError, match="fitted on features of"):  # imported stores differ in weights hash
        evaluate_run(tmp_path / "lp", name="other", cache_dir=imported)


def test_store_lookup_errors(tmp_path):
    with pytest.raises(StoreError, match="no store for dtd \\(coop\\) with ViT-B-16-quickgelu/openai; create it with: "
                       "featcache extract --dataset dtd --backbone ViT-B-16-quickgelu/openai"):  # fmt: skip
        open_store("dtd", "ViT-B-16-quickgelu/openai", cache_dir=tmp_path)
    with pytest.raises(StoreError, match="no feature store at .*imported/nothing.h5"):
        open_store(name="nothing", cache_dir=tmp_path)
    with pytest.raises(StoreError, match=r"give --dataset NAME \(or --manifest FILE\) and --backbone ID"):
        open_store(dataset="dtd")


def test_shots_larger_than_a_class(imported):
    with pytest.raises(MethodError, match="50 shots asked, but class 0 \\('class 0'\\) has only 40 training rows"):
        fit_method("tip-adapter", name="synth", cache_dir=imported, shots=50)


def test_coop_refuses_an_imported_store(imported):
    with pytest.raises(MethodError, match="runs the backbone's text encoder; an imported store does not say which"):
        fit_method("coop", name="synth", cache_dir=imported, shots=4)


def test_method_names_are_checked_before_any_store_is_opened(tmp_path):
    # no store exists under tmp_path: the method name is what fails, naming every method (full-backbone too)
    with pytest.raises(MethodError, match=r"unknown method 'nope'; available: .*layer-mma.*maple"):
        fit_method("nope", name="missing", cache_dir=tmp_path)
    with pytest.raises(MethodError, match=r"'maple' streams images .*trainer\.fit_streaming"):
        fit_method("maple", name="missing", cache_dir=tmp_path)
