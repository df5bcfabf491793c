"""Zero-shot anywhere: a method that trains nothing draws no shots, needs no train (or val) split, runs under
every protocol and is recorded with shots 0; a store holding only a test split serves zero-shot and the
evaluation of a saved run."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app
from featcache.adapters import create_adapter, list_adapters
from featcache.api import evaluate_run, fit_method
from featcache.extract import extract
from featcache.store import Store, StoreError

TINY = "featcache-tiny/random"
runner = CliRunner()


@pytest.fixture(scope="module")
def test_only(tmp_path_factory, tiny):
    """digits extracted through the tiny backbone with its test split only, in a cache of its own."""
    cache = tmp_path_factory.mktemp("test-only")
    path = extract("digits", tiny, cache_dir=cache, splits=["test"], workers=0, batch_size=256, progress=False)
    with Store.open(path) as st:
        assert st.splits == ["test"]
    return cache


def test_only_zero_shot_trains_nothing():
    trainless = [m for m in list_adapters() if not create_adapter(m, dim=8).needs_train]
    assert trainless == ["zero-shot"]


@pytest.mark.parametrize("protocol", ["base2novel", "fewshot"])
def test_zero_shot_on_a_test_only_store_equals_zero_shot_on_the_full_store(test_only, digits_store, protocol):
    full = fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=digits_store.parent.parent,
                      protocol=protocol, shots=16)  # fmt: skip
    only = fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=test_only, protocol=protocol, shots=4)
    assert only.record.metrics == full.record.metrics  # same test split, same classes: the same numbers
    keys = {"acc", "acc5"} if protocol == "fewshot" else {"base_acc", "novel_acc", "hm", "base_acc5", "novel_acc5"}
    assert keys <= set(only.record.metrics) and all(only.record.metrics[k] is not None for k in keys)
    for rec in (only.record, full.record):  # --shots is ignored and the record says no shots were drawn
        assert rec.shots == 0 and rec.sampled["n_train"] == 0 and rec.sampled["n_val"] is None
        assert rec.selection == "validation-free"
    with Store.open(next(test_only.rglob("*.h5"))) as st:  # base2novel: the first 5 of digits' 10 classes are base
        assert only.task.fit.classnames == (st.classnames[:5] if protocol == "base2novel" else st.classnames)


def test_a_trained_method_on_a_test_only_store_says_what_to_do(test_only, tiny, tmp_path):
    with pytest.raises(StoreError, match=r"digits__fixed.h5 has no train split \(it has: test\); add it with: "
                       rf"featcache extract --dataset digits --backbone {TINY} --cache-dir {test_only} --splits train "
                       r"\(a method that trains nothing needs none: --adapter zero-shot\)"):  # fmt: skip
        fit_method("tip-adapter", dataset="digits", backbone=TINY, cache_dir=test_only, shots=4)
    # the hinted command works: on a test-only store of its own, it adds the train split and the fit then runs
    cache = tmp_path / "c"
    extract("digits", tiny, cache_dir=cache, splits=["test"], workers=0, batch_size=256, progress=False)
    with pytest.raises(StoreError, match="has no train split") as e:
        fit_method("tip-adapter", dataset="digits", backbone=TINY, cache_dir=cache, shots=4, val_from="train")
    hint = str(e.value).split("add it with: ")[1].split(" (a method")[0]
    r = runner.invoke(app, [*hint.split()[1:], "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.stderr
    fit_method("tip-adapter", dataset="digits", backbone=TINY, cache_dir=cache, shots=4, val_from="train")


def test_a_saved_run_evaluates_on_a_test_only_store(test_only, digits_store, tmp_path):
    cache = digits_store.parent.parent
    fit_method("tip-adapter", dataset="digits", backbone=TINY, cache_dir=cache, protocol="fewshot", shots=4,
               save=tmp_path / "run")  # fmt: skip
    on_full = evaluate_run(tmp_path / "run", dataset="digits", cache_dir=cache)
    on_test_only = evaluate_run(tmp_path / "run", dataset="digits", cache_dir=test_only)
    assert on_test_only.metrics == on_full.metrics and on_test_only.metrics["acc5"] >= on_test_only.metrics["acc"]
    r = runner.invoke(
        app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(test_only)]
    )
    assert r.exit_code == 0 and "digits -> digits  xd" in r.output and "top-5" in r.output, r.output + r.stderr


def test_zero_shot_cli_needs_no_shots_and_prints_no_training(test_only, tmp_path):
    for extra in ([], ["--shots", "500", "--protocol", "fewshot"]):  # 500 shots would be refused for a draw
        r = runner.invoke(app, ["fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone", TINY,
                                "--cache-dir", str(test_only), *extra])  # fmt: skip
        assert r.exit_code == 0, r.output + r.stderr
        assert "digits  " + ("fewshot" if extra else "base2novel") + " no training:  " in r.output
        assert "500-shot" not in r.output and "16-shot" not in r.output and "seed" not in r.output


def test_zero_shot_saved_run_evaluates_elsewhere(test_only, tmp_path):
    run = fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=test_only, protocol="fewshot",
                     save=tmp_path / "zs")  # fmt: skip
    rec = evaluate_run(tmp_path / "zs", dataset="digits", cache_dir=test_only)
    assert rec.metrics == run.record.metrics and rec.shots == 0
    r = runner.invoke(
        app, ["eval", "--run", str(tmp_path / "zs"), "--dataset", "digits", "--cache-dir", str(test_only)]
    )
    assert r.exit_code == 0 and "digits -> digits  xd no training:  acc " in r.output, r.output + r.stderr


def test_a_store_without_a_test_split_is_refused_in_one_line(tiny, tmp_path, digits_store):
    cache = tmp_path / "c"
    extract("digits", tiny, cache_dir=cache, splits=["train"], workers=0, batch_size=256, progress=False)
    with pytest.raises(StoreError, match=rf"has no test split \(it has: train\); add it with: .* --cache-dir {cache} "
                       "--splits test$"):  # fmt: skip
        fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=cache)
    fit_method("tip-adapter", dataset="digits", backbone=TINY, cache_dir=digits_store.parent.parent, shots=2,
               save=tmp_path / "r")  # fmt: skip
    with pytest.raises(StoreError, match="has no test split"):
        evaluate_run(tmp_path / "r", dataset="digits", cache_dir=cache)
