"""`featcache report`: one static HTML page with the leaderboards, the plots and every run's record."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from cli.main import app
from featcache.results import Record, append_record

runner = CliRunner()


def _records(path):
    for seed, (b, n) in zip((1, 2), ((80.0, 70.0), (82.0, 72.0)), strict=True):
        for method, bump in (("zero-shot", 0.0), ("mm-attn", 5.0)):
            append_record(path, Record(
                method=method, dataset="dtd", backbone="ViT-B-16/openai", protocol="base2novel", shots=16,
                seed=seed, metrics={"base_acc": b + bump, "novel_acc": n, "hm": 2 * (b + bump) * n / (b + bump + n)},
                fit_seconds=1.0, trainable_params=0, config={"lam": 0.2}, store={"weights_sha256": "abc123"},
                sampled={}, versions={},
            ))  # fmt: skip
    for shots in (1, 4):
        append_record(path, Record(
            method="tip-adapter", dataset="dtd", backbone="ViT-B-16/openai", protocol="fewshot", shots=shots,
            seed=1, metrics={"acc": 50.0 + shots}, fit_seconds=0.5, trainable_params=0, config={}, store={},
            sampled={}, versions={},
        ))  # fmt: skip


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)
            self._in_td = False


def test_report_holds_tables_plots_and_every_run(tmp_path):
    res = tmp_path / "r.jsonl"
    _records(res)
    out = tmp_path / "out" / "report.html"
    r = runner.invoke(app, ["report", str(res), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = _Page()
    page.feed(out.read_text())
    assert page.tags["table"] == 2  # base2novel and fewshot
    assert page.tags["details"] == 6  # one per record, with its JSON
    assert len(page.images) == 2 and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert "86.00±1.00" in page.cells  # mm-attn base over 2 seeds: (85 + 87) / 2 ± 1
    text = out.read_text()
    assert '"weights_sha256": "abc123"' in text.replace("&quot;", '"')
    assert not list(out.parent.glob(".*tmp"))


def test_report_adds_top5_tables_where_records_hold_top5(tmp_path):
    res = tmp_path / "r.jsonl"
    for seed, b5 in ((1, 95.0), (2, 97.0)):
        append_record(res, Record(
            method="zero-shot", dataset="dtd", backbone="ViT-B-16/openai", protocol="base2novel", shots=0, seed=seed,
            metrics={"base_acc": 80.0, "novel_acc": 70.0, "hm": 74.67, "base_acc5": b5, "novel_acc5": 90.0,
                     "hm5": 2 * b5 * 90.0 / (b5 + 90.0)},
            fit_seconds=0.0, trainable_params=0, config={}, store={}, sampled={}, versions={},
        ))  # fmt: skip
    out = tmp_path / "report.html"
    assert runner.invoke(app, ["report", str(res), "--out", str(out)]).exit_code == 0
    page = _Page()
    page.feed(out.read_text())
    assert page.tags["table"] == 2 and "base2novel: top-5" in out.read_text()  # top-1 and top-5
    assert "96.00±1.00" in page.cells  # top-5 base over the 2 seeds


def test_report_refuses_missing_or_empty_results(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 1 and r.stderr.startswith("error: no results file at")
    (tmp_path / "empty.jsonl").write_text("")
    r = runner.invoke(app, ["report", str(tmp_path / "empty.jsonl")])
    assert r.exit_code == 1 and "holds no records" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    res = tmp_path / "r.jsonl"
    _records(res)
    out = tmp_path / "report.html"
    assert runner.invoke(app, ["report", str(res), "--out", str(out)]).exit_code == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
         out.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # text and plots on a white page, not a blank screen
    assert sum(1 for p in img.getdata() if p < 128) > 1000
