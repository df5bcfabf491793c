import builtins

import pytest

from featcache.errors import FeatcacheError
from featcache.plots import plot
from featcache.results import Record, append_record

pytest.importorskip("matplotlib")  # a dev install has it; the [plot] extra installs it for users


def _results(tmp_path):
    out = tmp_path / "r.jsonl"
    for m, b, n in (("a", 80, 60), ("b", 70, 75)):
        for seed in (1, 2):
            append_record(out, Record(method=m, dataset="dtd", backbone="B", protocol="base2novel", shots=16, seed=seed,
                                      metrics={"base_acc": b + seed, "novel_acc": n, "hm": 2 * b * n / (b + n)},
                                      fit_seconds=1, trainable_params=1, config={}, store={}, sampled={}))  # fmt: skip
        for k, acc in ((1, 40), (4, 55), (16, 70)):
            append_record(out, Record(method=m, dataset="dtd", backbone="B", protocol="fewshot", shots=k, seed=1,
                                      metrics={"acc": acc}, fit_seconds=1, trainable_params=1, config={}, store={},
                                      sampled={}))  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["base-novel", "shots"])
def test_plot_writes_a_png(tmp_path, kind):
    png = plot(_results(tmp_path), kind, tmp_path / f"{kind}.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(FeatcacheError, match="unknown plot kind 'pie'"):
        plot(_results(tmp_path), "pie", tmp_path / "x.png")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(FeatcacheError, match="no successful base2novel records"):
        plot(empty, "base-novel", tmp_path / "x.png")
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(FeatcacheError, match=r'plotting needs matplotlib: pip install "featcache\[plot\]"'):
        plot(_results(tmp_path), "base-novel", tmp_path / "x.png")
