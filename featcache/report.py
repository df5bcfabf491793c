"""`featcache report`: one static HTML file a person opens in a browser: the leaderboard of every protocol the
records hold, the base-novel and shots plots embedded as images, and every run's config, fingerprint and
metrics one click away (a <details> row per run). No server, no JavaScript, no files beside it.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FeatcacheError
from .fsio import atomic_write
from .leaderboard import METRICS, format_cells, leaderboard
from .results import read_records

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
details { margin: 0.15rem 0; } summary { cursor: pointer; font-family: monospace; font-size: 0.85rem; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 0.85rem; }
"""


def _table(wide, protocol: str) -> str:
    """A leaderboard as an HTML table: the same cells as the terminal table (mean ± std over seeds)."""
    cells = format_cells(wide, protocol)
    head = "".join(f'<th class="{"l" if c in ("backbone", "method") else ""}">{html.escape(str(c))}</th>'
                   for c in cells.columns)  # fmt: skip
    rows = []
    for _, r in cells.iterrows():
        tds = "".join(f'<td class="{"l" if c in ("backbone", "method") else ""}">{html.escape(str(r[c]))}</td>'
                      for c in cells.columns)  # fmt: skip
        rows.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _has_top5(records: list[dict[str, Any]], protocol: str) -> bool:
    """Records written before top-5 was recorded have none: their table would be empty."""
    keys = ("acc5", "base_acc5")
    return any(r.get("protocol") == protocol and any(k in (r.get("metrics") or {}) for k in keys) for r in records)


def _plot_png(results: Path, kind: str, metric: str = "acc") -> str | None:
    """The plot as a base64 PNG, or None when matplotlib is missing or there is nothing to plot."""
    from .plots import plot

    with tempfile.TemporaryDirectory() as d:
        try:
            path = plot(results, kind, Path(d) / f"{kind}.png", metric=metric)
        except FeatcacheError:
            return None
        return base64.b64encode(path.read_bytes()).decode()


def _run_summary(r: dict[str, Any]) -> str:
    m = r.get("metrics") or {}
    if r.get("error"):
        score = f"failed: {r['error']}"
    elif r.get("protocol") == "base2novel":
        score = "  ".join(f"{k} {m.get(k)}" for k in ("base_acc", "novel_acc", "hm", "base_acc5", "novel_acc5"))
    else:
        score = "  ".join(f"{k} {v}" for k, v in m.items() if k in ("acc", "acc5", "t2i_r1", "t2v_r1"))
    where = r.get("dataset", "?") + (f" -> {r['eval_dataset']}" if r.get("eval_dataset") else "")
    return (f"{r.get('method')} {where} {r.get('protocol')} {r.get('shots')}-shot seed {r.get('seed')} "
            f"[{r.get('backbone')}]  {score}  (run {r.get('run_id')})")  # fmt: skip


def build_report(results: str | Path) -> str:
    """The whole report as one HTML string."""
    results = Path(results).expanduser()
    records = read_records(results)
    if not records:
        raise FeatcacheError(f"{results} holds no records; run `featcache fit --results {results}` or a sweep first")
    parts = [
        f"<h1>featcache report: {html.escape(results.name)}</h1>",
        f'<p class="note">{len(records)} records from {html.escape(str(results))}; written '
        f"{time.strftime('%Y-%m-%d %H:%M')} by featcache {__version__}. Cells are mean ± std over seeds; "
        "every run's config and store fingerprint are listed at the end.</p>",
    ]
    protocols = [p for p in METRICS if any(r.get("protocol") == p and not r.get("error") for r in records)]
    for protocol in protocols:
        wide, _ = leaderboard(records, protocol)
        if wide.empty:
            continue
        parts.append(f"<h2>Leaderboard: {protocol} (top-1)</h2>{_table(wide, protocol)}")
        kind = {"base2novel": "base-novel", "fewshot": "shots"}.get(protocol)
        png = _plot_png(results, kind) if kind else None
        if png:
            parts.append(f'<img alt="{kind} plot" src="data:image/png;base64,{png}">')
        if protocol != "retrieval" and _has_top5(records, protocol):
            wide5, _ = leaderboard(records, protocol, metric="acc5")
            parts.append(f"<h3>{protocol}: top-5</h3>{_table(wide5, protocol)}")
            png = _plot_png(results, kind, "acc5") if kind else None
            if png:
                parts.append(f'<img alt="{kind} plot, top-5" src="data:image/png;base64,{png}">')
    parts.append(f"<h2>Runs ({len(records)})</h2>")
    for r in records:
        body = html.escape(json.dumps(r, indent=2, sort_keys=True, default=str))
        parts.append(f"<details><summary>{html.escape(_run_summary(r))}</summary><pre>{body}</pre></details>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>featcache report</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")  # fmt: skip


def write_report(results: str | Path, out: str | Path) -> Path:
    """Write the report to `out` through a temporary name (a reader never sees half a page)."""
    data = build_report(results).encode("utf-8")
    return atomic_write(out, lambda f: f.write(data))
