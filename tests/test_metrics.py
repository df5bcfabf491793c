"""Top-1 and top-5 accuracy, hand-computed: the scorer, the records, the leaderboard's --metric and the plots."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from featcache.adapters import create_adapter
from featcache.evaluate import base_novel_metrics, evaluate
from featcache.leaderboard import format_table, leaderboard
from featcache.results import Record, append_record

runner = CliRunner()


def _logits_as_given(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, text) for zero-shot (logits = 100 · x · tᵀ) whose logits are exactly 100 · rows: text = identity."""
    x = torch.tensor(rows, dtype=torch.float32)
    return x, torch.eye(x.shape[1])


def test_top1_and_top5_by_hand():
    zs = create_adapter("zero-shot", dim=7)
    x, text = _logits_as_given([
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0],  # label 0 ranks 1st: top-1 and top-5 hit
        [0.1, 0.9, 0.8, 0.3, 0.0, 0.0, 0.0],  # label 3 ranks 3rd: top-5 only
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 6 ranks 7th: neither
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4 ranks 5th: top-5 only (the edge of the top 5)
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5 ranks 6th: neither (just outside)
    ])  # fmt: skip
    y = torch.tensor([0, 3, 6, 4, 5])
    got = evaluate(zs, x, y, text)
    assert got == {"acc": pytest.approx(100 * 1 / 5), "acc5": pytest.approx(100 * 3 / 5)}
    # mini-batches of one row give the same counts
    assert evaluate(zs, x, y, text, batch_size=1) == got


def test_top5_with_fewer_than_five_classes_is_top_c():
    zs = create_adapter("zero-shot", dim=3)
    x, text = _logits_as_given([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.0, 0.1, 0.9]])
    got = evaluate(zs, x, torch.tensor([0, 2, 1]), text)  # ranks 1, 3, 2 among 3 classes: all within top-3
    assert got == {"acc": pytest.approx(100 / 3), "acc5": 100.0}
    assert evaluate(zs, x[:0], torch.tensor([], dtype=torch.long), text) == {"acc": None, "acc5": None}


def test_tied_logits_never_give_top5_below_top1():
    zs = create_adapter("zero-shot", dim=8)
    x, text = torch.zeros(4, 8), torch.eye(8)  # every logit ties: argmax says class 0
    got = evaluate(zs, x, torch.tensor([0, 0, 7, 7]), text)
    assert got["acc"] == 50.0 and got["acc5"] >= got["acc"]


def test_base_novel_metrics_by_hand():
    m = base_novel_metrics({"acc": 80.0, "acc5": 95.0}, {"acc": 60.0, "acc5": 90.0})
    assert m["base_acc"] == 80.0 and m["novel_acc"] == 60.0 and m["hm"] == pytest.approx(2 * 80 * 60 / 140, abs=1e-4)
    assert m["base_acc5"] == 95.0 and m["novel_acc5"] == 90.0 and m["hm5"] == pytest.approx(2 * 95 * 90 / 185, abs=1e-4)
    none = base_novel_metrics({"acc": 80.0, "acc5": 95.0}, None)  # a method that cannot score novel classes
    assert none["novel_acc5"] is None and none["hm5"] is None and none["base_acc5"] == 95.0


def _rec(method, dataset, seed, metrics, protocol="base2novel", shots=16):
    r = Record(method=method, dataset=dataset, backbone="B", protocol=protocol, shots=shots, seed=seed,
               metrics=metrics, fit_seconds=1.0, trainable_params=1, config={}, store={}, sampled={})  # fmt: skip
    return json.loads(r.to_json())


def _b2n(b, n, b5, n5):
    return {"base_acc": b, "novel_acc": n, "hm": 2 * b * n / (b + n), "base_acc5": b5, "novel_acc5": n5,
            "hm5": 2 * b5 * n5 / (b5 + n5)}  # fmt: skip


def test_leaderboard_top5_by_hand():
    recs = [
        _rec("m", "dtd", 1, _b2n(80, 60, 96, 88)),
        _rec("m", "dtd", 2, _b2n(82, 64, 98, 90)),  # dtd top-5: base 97, novel 89
        _rec("m", "eurosat", 1, _b2n(90, 50, 100, 80)),
        _rec("m", "eurosat", 2, _b2n(94, 54, 100, 84)),  # eurosat top-5: base 100, novel 82
        _rec("old", "dtd", 1, {"base_acc": 70, "novel_acc": 70, "hm": 70}),  # made before top-5 was recorded
    ]
    top1 = leaderboard(recs, "base2novel")[0].set_index("method").loc["m"]
    assert top1["average/base"] == 86.5  # the default stays top-1
    wide, long = leaderboard(recs, "base2novel", metric="acc5")
    m = wide.set_index("method").loc["m"]
    assert m["dtd/base5"] == 97 and m["dtd/novel5"] == 89 and m["dtd/base5_std"] == 1.0
    assert m["dtd/hm5"] == pytest.approx(2 * 97 * 89 / 186, abs=1e-4)  # HM of the seed means
    assert m["average/base5"] == 98.5 and m["average/novel5"] == 85.5
    assert m["average/hm5"] == pytest.approx(2 * 98.5 * 85.5 / 184, abs=1e-4)  # HM of the averages
    # seed 1: base (96+100)/2 = 98, novel 84; seed 2: base 99, novel 87
    assert m["average/base5_std"] == 0.5 and m["average/novel5_std"] == 1.5
    assert wide.set_index("method").loc["old"].isna()["average/base5"]  # n/a, never top-1 in disguise
    text = format_table(wide, "base2novel")
    assert "avg base5" in text and "avg hm5" in text and "98.50±0.50" in text
    assert set(long.columns) >= {"base5", "novel5", "hm5"}


def test_fewshot_top5_leaderboard_and_errors():
    recs = [_rec("m", "dtd", s, {"acc": 50 + s, "acc5": 80 + 2 * s}, protocol="fewshot", shots=4) for s in (1, 2)]
    w = leaderboard(recs, "fewshot", metric="acc5")[0].set_index("method").loc["m"]
    assert w["average/acc5"] == 83 and w["average/acc5_std"] == 1.0 and w["shots"] == 4
    with pytest.raises(ValueError, match="unknown metric 'acc3'; use acc \\(top-1\\) or acc5 \\(top-5\\)"):
        leaderboard(recs, "fewshot", metric="acc3")
    with pytest.raises(ValueError, match="--metric applies to classification protocols"):
        leaderboard(recs, "retrieval", metric="acc5")
    with pytest.raises(ValueError, match="published reference rows are top-1"):
        leaderboard(recs, "fewshot", reference="published", metric="acc5")


def test_leaderboard_and_plot_commands_take_a_metric(tmp_path):
    out = tmp_path / "r.jsonl"
    for s in (1, 2):
        for method, acc, acc5 in (("zero-shot", 40, 70), ("tip", 50 + s, 80 + s)):
            shots = [0] if method == "zero-shot" else [1, 4]
            for k in shots:
                rec = Record(method=method, dataset="dtd", backbone="B", protocol="fewshot", shots=k, seed=s,
                             metrics={"acc": acc + k, "acc5": acc5 + k}, fit_seconds=1.0, trainable_params=1,
                             config={}, store={}, sampled={})  # fmt: skip
                append_record(out, rec)
    r = runner.invoke(app, ["leaderboard", str(out), "--protocol", "fewshot", "--metric", "acc5"])
    assert r.exit_code == 0 and "avg acc5" in r.output and "85.50±0.50" in r.output, r.output + r.stderr
    r = runner.invoke(app, ["leaderboard", str(out), "--protocol", "fewshot", "--metric", "top5"])
    assert r.exit_code == 1 and r.stderr.strip() == "error: unknown metric 'top5'; use acc (top-1) or acc5 (top-5)"
    pytest.importorskip("matplotlib")
    r = runner.invoke(app, ["plot", str(out), "--kind", "shots", "--metric", "acc5", "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG", r.output + r.stderr
    r = runner.invoke(app, ["plot", str(out), "--kind", "shots", "--metric", "x", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "unknown metric 'x'" in r.stderr and not (tmp_path / "x.png").exists()


def test_fit_records_and_prints_top5(digits_store, tmp_path):
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone",
                            "featcache-tiny/random", "--cache-dir", str(digits_store.parent.parent), "--protocol",
                            "fewshot", "--results", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads(out.read_text())["metrics"]
    assert set(m) == {"acc", "acc5"} and m["acc"] <= m["acc5"] <= 100
    assert f"acc {m['acc']:.2f}  top-5 {m['acc5']:.2f}" in r.output
