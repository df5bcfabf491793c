"""`featcache demo`: the whole offline path on data that ships with scikit-learn."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .extract import extract
from .store import Store

DEMO_BACKBONE = "featcache-tiny/random"
DEMO_DATASET = "digits"


def run_demo(cache_dir: str | Path | None = None, workers: int = 0, echo: Callable[[str], None] = print) -> Path:
    """Extract `digits` through the tiny random-init architecture, print the store summary, then fit every
    embedding-level method (base-to-novel, 16 shots, seed 1) and print a small leaderboard."""
    echo(
        f"featcache demo: {DEMO_DATASET} (scikit-learn's bundled 8x8 digits, upscaled) through {DEMO_BACKBONE}.\n"
        "NOTE: this backbone has RANDOM weights (fixed seed) so the demo runs with no network; its features, and "
        "any accuracy computed from them, mean nothing. Use a real backbone (e.g. ViT-B-16-quickgelu/openai) for "
        "real numbers."
    )
    t0 = time.perf_counter()
    path = extract(DEMO_DATASET, DEMO_BACKBONE, cache_dir=cache_dir, workers=workers, progress=True)
    secs = time.perf_counter() - t0
    with Store.open(path) as st:
        s = st.summary()
    echo(f"\nstore ready in {secs:.1f} s: {s['path']} ({s['size_mb']} MB)")
    echo(
        f"  fingerprint: backbone={s['backbone']} weights_sha256={s['weights_sha256'][:12]} "
        f"dataset={s['dataset']}/{s['split_scheme']} dtype={s['dtype']} featcache={s['featcache_version']}"
    )
    echo(f"  {s['classes']} classes, D={s['dim']}, {s['templates']} prompt templates")
    for k, v in s["splits"].items():
        echo(f"  {k:<5} {v:>6} rows")
    echo("\nfitting every method on the cache (base-to-novel, 16 shots, seed 1) ...")
    echo(leaderboard(cache_dir))
    echo("(random backbone: these accuracies show the pipeline runs, not how good any method is)")
    return path


def leaderboard(cache_dir: str | Path | None = None) -> str:
    """Fit each method on the demo store and return a small text table."""
    import pandas as pd

    from .adapters import list_adapters
    from .api import fit_method

    rows = []
    for method in list_adapters():
        rec = fit_method(method, dataset=DEMO_DATASET, backbone=DEMO_BACKBONE, cache_dir=cache_dir).record
        m = rec.metrics
        rows.append({"method": method, "base": m["base_acc"], "novel": m["novel_acc"], "HM": m["hm"],
                     "fit s": rec.fit_seconds, "params": rec.trainable_params})  # fmt: skip
    table = pd.DataFrame(rows).sort_values("HM", ascending=False, na_position="last")
    return table.to_string(index=False, float_format=lambda x: f"{x:.2f}", na_rep="n/a")
