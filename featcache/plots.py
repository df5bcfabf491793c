"""Plots from result records: base vs novel accuracy per method, and accuracy vs shots. Needs matplotlib
(`pip install "featcache[plot]"`)."""

from __future__ import annotations

from pathlib import Path

from .errors import FeatcacheError
from .leaderboard import ACCURACY_METRICS, leaderboard
from .results import read_records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FeatcacheError('plotting needs matplotlib: pip install "featcache[plot]"') from None
    return plt


def plot(results: str | Path, kind: str, out: str | Path, metric: str = "acc") -> Path:
    """kind: base-novel (average base vs novel per method, one panel per backbone) or shots (average accuracy
    vs shots per method; a method that trains nothing, recorded at 0 shots, is a dashed horizontal line). metric:
    acc (top-1) or acc5 (top-5). Written to a temporary name, then renamed."""
    if kind not in ("base-novel", "shots"):
        raise FeatcacheError(f"unknown plot kind '{kind}'; use base-novel or shots")
    if metric not in ACCURACY_METRICS:
        raise FeatcacheError(f"unknown metric '{metric}'; use acc (top-1) or acc5 (top-5)")
    plt = _pyplot()
    records = read_records(results)
    protocol = "base2novel" if kind == "base-novel" else "fewshot"
    wide, _ = leaderboard(records, protocol, metric=metric)
    k = "5" if metric == "acc5" else ""
    what = ACCURACY_METRICS[metric]
    if wide.empty:
        raise FeatcacheError(f"{results} holds no successful {protocol} records to plot")
    backbones = sorted(wide["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 5), squeeze=False)
    for ax, bb in zip(axes[0], backbones, strict=True):
        w = wide[wide["backbone"] == bb]
        if kind == "base-novel":
            w = w.dropna(subset=[f"average/base{k}", f"average/novel{k}"])
            markers = "osD^vP*Xh<>"
            for i, (_, r) in enumerate(w.iterrows()):
                ax.scatter(r[f"average/base{k}"], r[f"average/novel{k}"], marker=markers[i % len(markers)], s=60,
                           alpha=0.8, label=f"{r['method']} (HM {r[f'average/hm{k}']:.2f})")  # fmt: skip
            ax.legend(fontsize=8)
            ax.set_xlabel(f"base {what} (%), mean over datasets")
            ax.set_ylabel(f"novel {what} (%), mean over datasets")
        else:
            for method, g in w.groupby("method"):
                g = g.sort_values("shots")
                flat = g[g["shots"] == 0]  # trains nothing (zero-shot): no place on a log axis of shots
                if len(flat) and len(flat) == len(g):
                    ax.axhline(flat[f"average/acc{k}"].iloc[0], linestyle="--", linewidth=1, label=method)
                    continue
                g = g[g["shots"] > 0]
                ax.errorbar(g["shots"], g[f"average/acc{k}"], yerr=g[f"average/acc{k}_std"], marker="o", capsize=3,
                            label=method)  # fmt: skip
            ticks = sorted(s for s in w["shots"].unique() if s > 0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(s) for s in ticks])
            ax.set_xlabel("shots per class")
            ax.set_ylabel(f"{what} (%), mean over datasets")
            ax.legend(fontsize=8)
        ax.set_title(bb, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
