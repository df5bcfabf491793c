"""`featcache demo`: the whole offline path on data that ships with scikit-learn."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .extract import extract
from .leaderboard import format_table, write_leaderboard
from .store import Store
from .sweep import load_sweep, run_sweep

DEMO_BACKBONE = "featcache-tiny/random"
DEMO_DATASET = "digits"


def run_demo(cache_dir: str | Path | None = None, workers: int = 0, echo: Callable[[str], None] = print) -> Path:
    """Extract `digits` through the tiny random-init architecture, print the store summary, then run the
    digits sweep (every method, 3 seeds) and print its leaderboard."""
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
    results = Path(path).parent.parent / "demo_results.jsonl"
    echo(f"\nrunning the digits sweep (every method, base-to-novel, 16 shots, seeds 1-3) -> {results}")
    sweep = load_sweep(sweep_file("digits"))
    run_sweep(sweep, results, cache_dir=cache_dir, progress=True, echo=echo)
    wide, _, _ = write_leaderboard(results, "base2novel")
    echo(format_table(wide, "base2novel"))
    echo("(random backbone: these accuracies show the pipeline runs, not how good any method is)")
    return path


def sweep_file(name: str) -> Path:
    """A bundled sweep: the checkout's benchmarks/sweeps/, or the copy installed in the package."""
    src = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps" / f"{name}.toml"
    if src.exists():
        return src
    return Path(str(resources.files("featcache") / "sweeps" / f"{name}.toml"))
