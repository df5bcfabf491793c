"""Leaderboard numbers against hand-computed values."""

import math
import random

import pandas as pd
import pytest

from featcache.leaderboard import PUBLISHED_BASE2NOVEL, leaderboard, write_leaderboard
from featcache.results import Record, append_record


def rec(method, dataset, seed, base=None, novel=None, acc=None, protocol="base2novel", backbone="B", shots=16,
        variant=None, error=None, eval_dataset=None, fit=1.0, params=10):  # fmt: skip
    metrics = {"base_acc": base, "novel_acc": novel, "hm": None if base is None or novel is None else
               2 * base * novel / (base + novel)} if protocol == "base2novel" else {"acc": acc}  # fmt: skip
    r = Record(method=method, dataset=dataset, backbone=backbone, protocol=protocol, shots=shots, seed=seed,
               metrics=metrics, fit_seconds=fit, trainable_params=params, config={}, store={}, sampled={},
               variant=variant, error=error, eval_dataset=eval_dataset)  # fmt: skip
    return __import__("json").loads(r.to_json())


def b2n_records():
    return [
        rec("m", "dtd", 1, 80, 60),
        rec("m", "dtd", 2, 82, 64),  # dtd: base 81, novel 62
        rec("m", "eurosat", 1, 90, 50),
        rec("m", "eurosat", 2, 94, 54),  # eurosat: base 92, novel 52
        rec("lp", "dtd", 1, 70, None),
        rec("lp", "eurosat", 1, 75, None),
        rec("m", "dtd", 3, 1, 1, error="boom"),  # failed runs never count
        rec("m", "dtd", 1, 99, 99, protocol="fewshot", acc=1.0),  # other protocols never count
    ]


def test_base2novel_numbers_by_hand():
    wide, long = leaderboard(b2n_records(), "base2novel")
    m = wide.set_index("method").loc["m"]
    assert m["dtd/base"] == 81 and m["dtd/novel"] == 62 and m["dtd/base_std"] == 1.0  # population std over seeds
    assert m["dtd/hm"] == pytest.approx(2 * 81 * 62 / 143, abs=1e-4)  # HM of the seed means
    per_seed_hm = [2 * 80 * 60 / 140, 2 * 82 * 64 / 146]
    assert m["dtd/hm_std"] == pytest.approx(abs(per_seed_hm[0] - per_seed_hm[1]) / 2, abs=1e-4)
    assert m["average/base"] == 86.5 and m["average/novel"] == 57.0  # means over datasets
    assert m["average/hm"] == pytest.approx(2 * 86.5 * 57 / 143.5, abs=1e-4)  # HM of the averages
    # seed 1: base (80+90)/2=85, novel 55; seed 2: base 88, novel 59 -> std 1.5 and 2.0
    assert m["average/base_std"] == 1.5 and m["average/novel_std"] == 2.0
    hm1, hm2 = 2 * 85 * 55 / 140, 2 * 88 * 59 / 147
    assert m["average/hm_std"] == pytest.approx(abs(hm1 - hm2) / 2, abs=1e-4)
    assert m["seeds"] == 2 and m["datasets"] == 2 and m["params"] == 10
    lp = wide.set_index("method").loc["lp"]
    assert lp["average/base"] == 72.5 and math.isnan(lp["average/novel"]) and math.isnan(lp["average/hm"])
    assert len(long) == 6 and set(long["method"]) == {"m", "lp"}


def test_example_from_methods_md():
    """Average Base 83.20 and Novel 76.80 give HM 79.87."""
    wide, _ = leaderboard([rec("x", "a", 1, 83.2, 76.8)], "base2novel")
    assert round(wide.loc[0, "average/hm"], 2) == 79.87


def test_backbones_and_variants_are_separate_rows():
    recs = [rec("m", "dtd", 1, 80, 60, backbone="B1"), rec("m", "dtd", 1, 10, 10, backbone="B2"),
            rec("m", "dtd", 1, 70, 70, variant="m (hard)", backbone="B1")]  # fmt: skip
    wide, _ = leaderboard(recs, "base2novel")
    assert list(zip(wide["backbone"], wide["method"], wide["dtd/base"], strict=True)) == [
        ("B1", "m", 80.0), ("B1", "m (hard)", 70.0), ("B2", "m", 10.0)]  # fmt: skip


def test_missing_dataset_leaves_the_average_empty():
    wide, _ = leaderboard([rec("m", "dtd", 1, 80, 60), rec("m", "eurosat", 1, 90, 50), rec("n", "dtd", 1, 1, 1)],
                          "base2novel")  # fmt: skip
    n = wide.set_index("method").loc["n"]
    assert math.isnan(n["average/base"]) and n["datasets"] == 1


def test_columns_are_deterministic():
    recs = b2n_records()
    a, _ = leaderboard(recs, "base2novel")
    random.Random(0).shuffle(recs)
    b, _ = leaderboard(recs, "base2novel")
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns[:5]) == ["backbone", "method", "dtd/base", "dtd/base_std", "dtd/novel"]
    assert list(a.columns[-12:]) == [
        "average/base",
        "average/base_std",
        "average/novel",
        "average/novel_std",
        "average/hm",
        "average/hm_std",
        "datasets",
        "seeds",
        "fit_s",
        "params",
        "selection",
        "source",
    ]
    # the papers' dataset order, not alphabetical: caltech101 before dtd before eurosat
    c, _ = leaderboard(recs + [rec("m", "caltech101", 1, 1, 1)], "base2novel")
    assert [x.split("/")[0] for x in c.columns[2::6]][:3] == ["caltech101", "dtd", "eurosat"]


def test_fewshot_rows_per_shots_and_xd_average_excludes_source():
    recs = [rec("m", "dtd", 1, acc=50, protocol="fewshot", shots=1), rec("m", "dtd", 1, acc=70, protocol="fewshot")]
    wide, _ = leaderboard(recs, "fewshot")
    assert list(wide["shots"]) == [1, 16] and list(wide["average/acc"]) == [50, 70]
    xd = [rec("m", "imagenet", s, acc=a, protocol="xd", eval_dataset=t)
          for s, t, a in [(1, "imagenet", 70), (1, "dtd", 40), (1, "eurosat", 50), (2, "dtd", 44), (2, "eurosat", 46),
                          (2, "imagenet", 72)]]  # fmt: skip
    wide, _ = leaderboard(xd, "xd")
    r = wide.iloc[0]
    assert r["imagenet/acc"] == 71 and r["dtd/acc"] == 42 and r["eurosat/acc"] == 48
    assert r["average/acc"] == 45  # over the targets, not the source
    assert r["average/acc_std"] == 0.0  # seed 1: 45, seed 2: 45


def test_published_reference_rows(tmp_path):
    wide, _ = leaderboard(b2n_records(), "base2novel", reference="published")
    pub = wide[wide["source"] == "published"].set_index("method")
    assert len(pub) == len(PUBLISHED_BASE2NOVEL) + 1  # and GDA's per-dataset row
    assert pub.loc["MMA (layer-wise) (published)", "average/hm"] == 79.87
    assert pub.loc["GDA (published)", "average/base"] == pytest.approx(83.96, abs=0.005)  # from its 11 datasets
    assert pub.loc["GDA (published)", "average/hm"] == pytest.approx(78.97, abs=0.005)
    recs = [rec("m", "dtd", 1, acc=50, protocol="fewshot")]
    fs = leaderboard(recs, "fewshot", reference="published")[0].set_index(["backbone", "method", "shots"])
    gda = fs.loc[("RN50-quickgelu/openai", "GDA (published)", 16)]
    assert gda["average/acc"] == pytest.approx(76.05, abs=0.005) and gda["dtd/acc"] == 66.51 and gda["seeds"] == 3
    assert fs.loc[("RN50-quickgelu/openai", "APE (published)", 16), "average/acc"] == pytest.approx(73.36, abs=0.005)
    assert fs.loc[("RN50-quickgelu/openai", "Tip-X (published)", 16), "average/acc"] == pytest.approx(71.36, abs=0.005)
    with pytest.raises(ValueError, match="base2novel and fewshot only"):
        leaderboard(b2n_records(), "xd", reference="published")


def test_csv_files(tmp_path):
    results = tmp_path / "r.jsonl"
    for r in b2n_records():
        r.pop("versions")
        append_record(results, Record(**r | {"versions": {}}))
    wide, long, written = write_leaderboard(results, "base2novel", tmp_path / "t.csv")
    assert written == [tmp_path / "t.csv", tmp_path / "t_runs.csv"]
    back = pd.read_csv(tmp_path / "t.csv")
    assert list(back.columns) == list(wide.columns) and len(pd.read_csv(tmp_path / "t_runs.csv")) == 6


def _retrieval_rec(method, dataset, seed, r1, medr, video=False):
    x = "v" if video else "i"
    metrics = {f"t2{x}_r1": r1, f"t2{x}_r5": r1 + 10, f"t2{x}_r10": r1 + 20, f"t2{x}_medr": medr,
               f"t2{x}_meanr": medr * 3, f"{x}2t_r1": r1 - 1, f"{x}2t_r5": r1, f"{x}2t_r10": r1 + 5,
               f"{x}2t_medr": medr + 1, f"{x}2t_meanr": medr * 4}  # fmt: skip
    r = Record(method=method, dataset=dataset, backbone="B32", protocol="retrieval", shots=0, seed=seed,
               metrics=metrics, fit_seconds=2.0, trainable_params=5, config={}, store={}, sampled={})  # fmt: skip
    return __import__("json").loads(r.to_json())


def test_retrieval_leaderboard_by_hand():
    recs = [
        _retrieval_rec("cma", "msrvtt", 1, 40.0, 2.0, video=True),
        _retrieval_rec("cma", "msrvtt", 2, 44.0, 3.0, video=True),  # msrvtt: t2v R@1 42, MdR 2.5
        _retrieval_rec("cma", "flickr30k", 1, 60.0, 1.0),  # image and video metrics share the t2x/x2t columns
        rec("cma", "dtd", 1, 80, 60),  # other protocols never count
    ]
    wide, long = leaderboard(recs, "retrieval")
    row = wide.set_index("method").loc["cma"]
    assert row["msrvtt/t2x_r1"] == 42.0 and row["msrvtt/t2x_r1_std"] == 2.0
    assert row["msrvtt/t2x_medr"] == 2.5 and row["msrvtt/x2t_r1"] == 41.0
    assert row["flickr30k/t2x_r1"] == 60.0 and row["flickr30k/x2t_medr"] == 2.0
    assert row["average/t2x_r1"] == 51.0  # mean over the two datasets of the seed means
    assert row["datasets"] == 2 and row["seeds"] == 2 and len(long) == 3
