"""Model selection on every record: what each method declares, what a run records (val rows, a train holdout, no
val), the val draws by hand, and the leaderboard marking rows that selected differently."""

import json
import random

import numpy as np
import pytest

from featcache.adapters import MethodError, create_adapter, list_adapters
from featcache.adapters.base import SELECTIONS, _entry
from featcache.api import evaluate_run, fit_method
from featcache.leaderboard import format_table, leaderboard, selection_note
from featcache.protocols import build_task, fewshot_draw
from featcache.results import Record
from featcache.store import Store
from featcache.streaming.cross_modal_adapter import CrossModalAdapter
from featcache.streaming.layer_mma import LayerMMA
from featcache.streaming.maple import MaPLe

DECLARED = {"validation-free", "few-shot-val", "val"}


def test_every_method_declares_its_selection():
    assert set(SELECTIONS) == DECLARED | {"train-holdout"}
    for name in list_adapters():
        assert _entry(name).cls.selection in DECLARED, name
    want = {"zero-shot": "validation-free", "linear-probe": "few-shot-val", "clip-adapter": "few-shot-val",
            "tip-adapter": "few-shot-val", "tip-adapter-f": "few-shot-val", "mm-attn": "few-shot-val",
            "coop": "validation-free", "taskres": "validation-free", "gda": "val", "ape": "val", "tip-x": "val",
            "lp++": "few-shot-val", "zs-lp": "validation-free", "clap": "validation-free",
            "prolip": "validation-free"}  # fmt: skip
    assert set(want) == set(list_adapters())  # a new method declares (and this test states) how it selects
    assert {k: _entry(k).cls.selection for k in want} == want
    assert LayerMMA.selection == MaPLe.selection == CrossModalAdapter.selection == "validation-free"


def test_whether_a_method_selects_follows_its_config():
    def uses(name, **kw):
        return create_adapter(name, dim=8, **kw).uses_val()

    assert not uses("zero-shot") and not uses("coop") and not uses("taskres")
    assert uses("coop", select="best-val") and uses("taskres", patience=3)  # the loop then selects on val
    assert uses("clip-adapter") and not uses("clip-adapter", patience=0, select="last")
    assert uses("tip-adapter") and not uses("tip-adapter", search=False)
    assert uses("tip-adapter-f", search=False)  # still keeps its best-val epoch
    assert uses("linear-probe") and not uses("linear-probe", c=1.0)
    assert uses("mm-attn") and uses("gda") and not uses("gda", search=False)
    assert not uses("prolip") and uses("prolip", search=True) and not uses("zs-lp") and not uses("clap")
    assert uses("ape") and uses("tip-x") and not uses("tip-x", search=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    """The synthetic store re-imported by name (the API addresses imported stores by name)."""
    from featcache.importers import import_npz

    cache = tmp_path_factory.mktemp("cache")
    with Store.open(synth) as st:
        arrays = {f"{s}_{k}": v for s in st.splits for k, v in
                  (("features", st.split(s).features.numpy()), ("labels", st.split(s).labels.numpy()))}  # fmt: skip
        arrays |= {"text_features": st.text().numpy(), "classnames": np.array(st.classnames)}
    np.savez(cache / "synth.npz", **arrays)
    import_npz(cache / "synth.npz", "synth", cache_dir=cache, dtype="float32")
    return cache


def test_records_say_what_selection_looked_at(imported, tmp_path):
    """synth: 10 classes, 40 train / 10 val rows per class; base2novel trains on 5."""

    def run(method, val_from="val", **options):
        return fit_method(method, name="synth", cache_dir=imported, shots=4, val_from=val_from, options=options).record

    r = run("clip-adapter", epochs=2)
    assert r.selection == "few-shot-val" and r.sampled["val_draw"] == "dassl" and r.sampled["n_val"] == 10 * 4
    r = run("clip-adapter", "train", epochs=2)
    assert r.selection == "train-holdout" and r.sampled["val_from"] == "train" and r.sampled["n_val"] == 40
    assert run("zero-shot").selection == "validation-free"
    assert run("linear-probe", c=1.0).selection == "validation-free"  # a fixed C selects nothing
    assert run("taskres", epochs=2).selection == "validation-free"
    assert run("taskres", epochs=2, select="best-val").selection == "few-shot-val"
    assert run("taskres", "none", epochs=2, select="best-val").selection == "validation-free"  # no val rows to use
    r = run("gda")  # val_draw full: the whole val split
    assert r.selection == "val" and r.sampled["val_draw"] == "full" and r.sampled["n_val"] == 100
    r = run("gda", "train")  # full from train: every train row the draw left
    assert r.selection == "train-holdout" and r.sampled["n_val"] == 400 - 40
    assert run("gda", val_draw="k-shot").sampled["n_val"] == 40
    # a saved run carries its selection to the records it is evaluated into (cross-dataset)
    fit_method("clip-adapter", name="synth", cache_dir=imported, shots=4, options={"epochs": 2}, save=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "run.json").read_text())["selection"] == "few-shot-val"
    assert evaluate_run(tmp_path / "r", name="synth", cache_dir=imported).selection == "few-shot-val"


TRAIN = [0, 1, 2] * 8  # 8 rows per class, classes interleaved
VAL = [2, 0, 1] * 6  # 6 per class, first appearance 2, 0, 1


def _by_hand(labels, k, rng):
    """Dassl's per-class sample: groups in order of first appearance, rows in list order, rng.sample(group, k)."""
    groups = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return [r for g in groups.values() for r in (rng.sample(g, k) if len(g) >= k else g)]


def test_val_draws_by_hand():
    shots = 5
    rng = random.Random(7)
    train = _by_hand(TRAIN, shots, rng)
    state = rng.getstate()
    dassl = _by_hand(VAL, 4, rng)  # min(K, 4), continuing the random state
    rng.setstate(state)
    kshot = _by_hand(VAL, shots, rng)
    assert fewshot_draw(TRAIN, VAL, shots, 7) == (train, dassl)
    assert fewshot_draw(TRAIN, VAL, shots, 7, val_draw="dassl") == (train, dassl)
    assert fewshot_draw(TRAIN, VAL, shots, 7, val_draw="k-shot") == (train, kshot)
    assert fewshot_draw(TRAIN, VAL, shots, 7, val_draw="full") == (train, list(range(len(VAL))))
    assert len(dassl) == 12 and len(kshot) == 15
    # from the train rows the draw left out (--val-from train)
    rest = [i for i in range(len(TRAIN)) if i not in set(train)]
    for draw, k in (("dassl", 4), ("k-shot", shots)):
        rng.setstate(state)
        want = [rest[i] for i in _by_hand([TRAIN[i] for i in rest], k, rng)]
        assert fewshot_draw(TRAIN, None, shots, 7, val_from_train=True, val_draw=draw) == (train, want)
    assert fewshot_draw(TRAIN, None, shots, 7, val_from_train=True, val_draw="full") == (train, rest)
    with pytest.raises(MethodError, match="unknown val_draw 'most'"):
        fewshot_draw(TRAIN, VAL, shots, 7, val_draw="most")


def test_build_task_hands_the_drawn_val_rows_to_the_method(synth):
    with Store.open(synth) as st:
        n = {d: len(build_task(st, "fewshot", 8, 1, val_draw=d).fit.val_y) for d in ("dassl", "k-shot", "full")}
        assert n == {"dassl": 40, "k-shot": 80, "full": 100}
        same = {tuple(build_task(st, "fewshot", 8, 1, val_draw=d).train_rows) for d in ("dassl", "k-shot", "full")}
        assert len(same) == 1  # the train rows never depend on the val draw
        b2n = build_task(st, "base2novel", 8, 1, val_draw="full")
        assert len(b2n.fit.val_y) == 50 and len(b2n.val_rows) == 100  # base classes only reach the method


def _rec(method, selection, dataset="dtd", seed=1, base=80.0, novel=60.0):
    r = Record(method=method, dataset=dataset, backbone="B", protocol="base2novel", shots=16, seed=seed,
               metrics={"base_acc": base, "novel_acc": novel, "hm": 2 * base * novel / (base + novel)},
               fit_seconds=1.0, trainable_params=1, config={}, store={}, sampled={}, selection=selection)  # fmt: skip
    return json.loads(r.to_json())


def test_leaderboard_marks_rows_that_selected_differently():
    same = [_rec("a", "few-shot-val"), _rec("b", "few-shot-val", base=70)]
    wide, long = leaderboard(same, "base2novel")
    assert list(wide["selection"]) == ["few-shot-val"] * 2 and list(long["selection"]) == ["few-shot-val"] * 2
    assert selection_note(wide) is None and "rows differ" not in format_table(wide, "base2novel")
    mixed = [*same, _rec("z", "validation-free", base=60), _rec("a", "train-holdout", base=90)]
    old = _rec("old", None)
    del old["selection"]  # a record from before the field
    wide, _ = leaderboard([*mixed, old], "base2novel")
    rows = list(zip(wide["method"], wide["selection"], wide["dtd/base"], strict=True))
    assert rows == [("a", "few-shot-val", 80), ("a", "train-holdout", 90), ("b", "few-shot-val", 70),
                    ("old", "unrecorded", 80), ("z", "validation-free", 60)]  # fmt: skip
    text = format_table(wide, "base2novel")
    assert "selection" in text.splitlines()[0]
    assert text.splitlines()[-1] == ("rows differ in selection: few-shot-val (a, b); train-holdout (a); "
                                     "unrecorded (old); validation-free (z)")  # fmt: skip
    # published reference rows have no selection of featcache's and do not count as differing
    pub, _ = leaderboard(same, "base2novel", reference="published")
    assert selection_note(pub) is None


def test_streaming_records_carry_their_selection(tmp_path):
    from featcache.streaming.trainer import evaluate_streaming_run, fit_streaming

    opts = {"first_block": 1, "epochs": 1, "batch_size": 8}
    rec = fit_streaming("layer-mma", dataset="digits", backbone="featcache-tiny/random", shots=1, progress=False,
                        protocol="fewshot", options=opts, save=tmp_path / "run",
                        results=tmp_path / "r.jsonl")  # fmt: skip
    assert rec.selection == "validation-free"
    assert json.loads((tmp_path / "r.jsonl").read_text())["selection"] == "validation-free"
    assert evaluate_streaming_run(tmp_path / "run", dataset="digits").selection == "validation-free"
