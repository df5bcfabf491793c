"""Plots from result records: base vs novel accuracy per method, and accuracy vs shots. Needs matplotlib
(`pip install "featcache[plot]"`)."""

from __future__ import annotations

from pathlib import Path

from .errors import FeatcacheError
from .leaderboard import leaderboard
from .results import read_records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FeatcacheError('plotting needs matplotlib: pip install "featcache[plot]"') from None
    return plt


def plot(results: str | Path, kind: str, out: str | Path) -> Path:
    """kind: base-novel (average base vs novel per method, one panel per backbone) or shots (average accuracy
    vs shots per method). Written to a temporary name, then renamed."""
    if kind not in ("base-novel", "shots"):
        raise FeatcacheError(f"unknown plot kind '{kind}'; use base-novel or shots")
    plt = _pyplot()
    records = read_records(results)
    protocol = "base2novel" if kind == "base-novel" else "fewshot"
    wide, _ = leaderboard(records, protocol)
    if wide.empty:
        raise FeatcacheError(f"{results} holds no successful {protocol} records to plot")
    backbones = sorted(wide["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 5), squeeze=False)
    for ax, bb in zip(axes[0], backbones, strict=True):
        w = wide[wide["backbone"] == bb]
        if kind == "base-novel":
            w = w.dropna(subset=["average/base", "average/novel"])
            markers = "osD^vP*Xh<>"
            for i, (_, r) in enumerate(w.iterrows()):
                ax.scatter(r["average/base"], r["average/novel"], marker=markers[i % len(markers)], s=60, alpha=0.8,
                           label=f"{r['method']} (HM {r['average/hm']:.2f})")  # fmt: skip
            ax.legend(fontsize=8)
            ax.set_xlabel("base accuracy (%), mean over datasets")
            ax.set_ylabel("novel accuracy (%), mean over datasets")
        else:
            for method, g in w.groupby("method"):
                g = g.sort_values("shots")
                ax.errorbar(g["shots"], g["average/acc"], yerr=g["average/acc_std"], marker="o", capsize=3,
                            label=method)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(w["shots"].unique()), [str(s) for s in sorted(w["shots"].unique())])
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%), mean over datasets")
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
