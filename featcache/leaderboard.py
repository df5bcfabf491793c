"""Leaderboards from result records (pandas over the JSONL): the papers' tables, mean ± std over seeds.

Base-to-novel averages follow the papers: average Base and Novel over datasets (each first averaged over
seeds), then HM of those averages. Records of different backbones or protocols are never averaged together:
the backbone is part of every row's key and one table holds one protocol.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .results import read_records

# the order of the papers' tables; other datasets follow alphabetically
DATASET_ORDER = [
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
]  # fmt: skip

# methods.md §1: 11 datasets, ViT-B/16, 16 shots, 3 seeds (Base / Novel / HM)
PUBLISHED_BASE2NOVEL = {
    "zero-shot CLIP": (69.34, 74.22, 71.70),
    "CoOp": (82.69, 63.22, 71.66),
    "CoCoOp": (80.47, 71.69, 75.83),
    "MaPLe": (82.28, 75.14, 78.55),
    "MMA (layer-wise)": (83.20, 76.80, 79.87),
}
METRICS = {
    "base2novel": ["base", "novel", "hm"], "fewshot": ["acc"], "xd": ["acc"], "dg": ["acc"],
    # retrieval: x is the item (image or video): t2x = text -> image/video, x2t = image/video -> text
    "retrieval": [f"{d}_{k}" for d in ("t2x", "x2t") for k in ("r1", "r5", "r10", "medr", "meanr")],
}  # fmt: skip
HEADLINE = {"base2novel": "hm", "retrieval": "t2x_r1"}


def hm(b: float, n: float) -> float:
    if b is None or n is None or math.isnan(b) or math.isnan(n) or b + n == 0:
        return float("nan")
    return 2 * b * n / (b + n)


def runs_table(records: list[dict[str, Any]], protocol: str) -> pd.DataFrame:
    """The long (tidy) table: one row per successful run of `protocol`."""
    rows = []
    for r in records:
        if r.get("error") or r.get("protocol") != protocol:
            continue
        m = r.get("metrics") or {}
        row = {
            "backbone": r["backbone"], "method": r.get("variant") or r["method"], "base_method": r["method"],
            "dataset": r.get("eval_dataset") or r["dataset"], "trained_on": r["dataset"], "shots": r["shots"],
            "seed": r["seed"], "fit_s": r.get("fit_seconds"), "params": r.get("trainable_params"),
            "run_id": r.get("run_id"),
        }  # fmt: skip
        if protocol == "base2novel":
            row |= {"base": m.get("base_acc"), "novel": m.get("novel_acc"), "hm": m.get("hm")}
        elif protocol == "retrieval":  # t2i/t2v and i2t/v2t share columns: one table covers images and videos
            row |= {k.replace("t2i", "t2x").replace("t2v", "t2x").replace("i2t", "x2t").replace("v2t", "x2t"): v
                    for k, v in m.items()}  # fmt: skip
        else:
            row |= {"acc": m.get("acc")}
        rows.append(row)
    cols = ["backbone", "method", "base_method", "dataset", "trained_on", "shots", "seed", *METRICS[protocol],
            "fit_s", "params", "run_id"]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    for c in METRICS[protocol]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    # a rerun of the same (row, dataset, seed) replaces the earlier record: keep the last one
    key = ["backbone", "method", "dataset", "trained_on", "shots", "seed"]
    return df.drop_duplicates(key, keep="last").reset_index(drop=True)


def _dataset_order(names) -> list[str]:
    known = [d for d in DATASET_ORDER if d in set(names)]
    return known + sorted(set(names) - set(known))


def leaderboard(
    records: list[dict[str, Any]], protocol: str, reference: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(wide table, long table). Wide: one row per (backbone, method[, shots]); per dataset the mean and std
    over seeds of each metric; an `average` group; seeds, mean fit seconds, trainable parameters."""
    if protocol not in METRICS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(METRICS)}")
    long = runs_table(records, protocol)
    metrics = METRICS[protocol]
    row_key = ["backbone", "method"] + (["shots"] if protocol == "fewshot" else [])
    # retrieval's rank metrics are averaged over datasets like the recalls (the papers report them per dataset)
    datasets = _dataset_order(long["dataset"].unique())
    sources = set(long["trained_on"]) if protocol in ("xd", "dg") else set()
    avg_sets = [d for d in datasets if d not in sources]  # xd/dg: the average is over targets only
    out = []
    for key, g in long.groupby(row_key, sort=True):
        row: dict[str, Any] = dict(zip(row_key, key if isinstance(key, tuple) else (key,), strict=True))
        per_ds = {}
        for d in datasets:
            gd = g[g["dataset"] == d]
            for m in metrics:
                vals = gd[m].dropna()
                mean = vals.mean() if len(vals) else float("nan")
                std = vals.std(ddof=0) if len(vals) else float("nan")
                if m == "hm":  # HM of the seed-averaged base and novel; std over the per-seed HMs
                    mean = hm(per_ds[(d, "base")], per_ds[(d, "novel")])
                per_ds[(d, m)] = mean
                row[f"{d}/{m}"], row[f"{d}/{m}_std"] = _round(mean), _round(std)
        complete = all(not g[g["dataset"] == d].empty for d in avg_sets) and avg_sets
        for m in metrics:
            if m == "hm":
                mean = hm(row.get("average/base", float("nan")), row.get("average/novel", float("nan")))
            else:
                means = [per_ds[(d, m)] for d in avg_sets]
                mean = float(pd.Series(means).mean(skipna=False)) if complete else float("nan")
            row[f"average/{m}"] = _round(mean)
            row[f"average/{m}_std"] = _round(_seed_std(g, avg_sets, m) if complete else float("nan"))
        row["datasets"] = int(g["dataset"].nunique())
        row["seeds"] = int(g["seed"].nunique())
        row["fit_s"] = _round(g["fit_s"].mean())
        row["params"] = int(g["params"].max()) if g["params"].notna().any() else None
        row["source"] = "featcache"
        out.append(row)
    cols = row_key + [f"{d}/{m}{s}" for d in [*datasets, "average"] for m in metrics for s in ("", "_std")]
    cols += ["datasets", "seeds", "fit_s", "params", "source"]
    wide = pd.DataFrame(out, columns=cols)
    if reference == "published":
        if protocol != "base2novel":
            raise ValueError("published reference rows exist for base2novel only (methods.md §1)")
        pub = [{"backbone": "ViT-B-16-quickgelu/openai", "method": f"{name} (published)", "average/base": b,
                "average/novel": n, "average/hm": h, "datasets": 11, "seeds": 3, "source": "published"}
               for name, (b, n, h) in PUBLISHED_BASE2NOVEL.items()]  # fmt: skip
        wide = pd.concat([wide, pd.DataFrame(pub, columns=cols)], ignore_index=True)
    elif reference is not None:
        raise ValueError(f"unknown reference {reference!r}; use 'published'")
    return wide, long


def _seed_std(g: pd.DataFrame, datasets: list[str], m: str) -> float:
    """Std over seeds of the per-seed average over datasets (HM: of the per-seed HM of averages)."""
    per_seed = []
    for _, gs in g.groupby("seed"):
        if m == "hm":
            b = gs[gs["dataset"].isin(datasets)].groupby("dataset")["base"].mean()
            n = gs[gs["dataset"].isin(datasets)].groupby("dataset")["novel"].mean()
            if len(b) < len(datasets) or n.isna().any():
                return float("nan")
            per_seed.append(hm(b.mean(), n.mean()))
        else:
            v = gs[gs["dataset"].isin(datasets)].groupby("dataset")[m].mean()
            if len(v) < len(datasets) or v.isna().any():
                return float("nan")
            per_seed.append(v.mean())
    return float(pd.Series(per_seed).std(ddof=0)) if per_seed else float("nan")


def _round(x: Any) -> float:
    try:
        return round(float(x), 4)
    except (TypeError, ValueError):
        return float("nan")


def format_cells(wide: pd.DataFrame, protocol: str, max_datasets: int = 11) -> pd.DataFrame:
    """The displayed table as strings: the average block first, then one headline metric per dataset (none when
    there is one dataset: it would repeat the average). A cell averaging several seeds is always `mean±std`."""
    metrics = METRICS[protocol]
    head = HEADLINE.get(protocol, "acc")
    datasets = [c[: -len(f"/{head}")] for c in wide.columns if c.endswith(f"/{head}") and not c.startswith("average")]
    if len(datasets) == 1:
        datasets = []
    table = pd.DataFrame({k: wide[k] for k in wide.columns if k in ("backbone", "method", "shots")})
    seeds = [int(s) if s == s and s is not None else 1 for s in wide["seeds"]]

    def pm(mean, std, n: int) -> str:
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "n/a"
        if n <= 1 or std is None or (isinstance(std, float) and math.isnan(std)):
            return f"{mean:.2f}"
        return f"{mean:.2f}±{std:.2f}"

    for m in metrics:
        table[f"avg {m}"] = [pm(a, b, n) for a, b, n in zip(wide[f"average/{m}"], wide[f"average/{m}_std"], seeds,
                                                            strict=True)]  # fmt: skip
    for d in datasets[:max_datasets]:
        table[f"{d} {head}"] = [pm(a, b, n) for a, b, n in zip(wide[f"{d}/{head}"], wide[f"{d}/{head}_std"], seeds,
                                                               strict=True)]  # fmt: skip
    table["seeds"] = wide["seeds"]
    table["fit s"] = [f"{x:.2f}" if x == x else "" for x in wide["fit_s"]]
    table["source"] = wide["source"]
    table.attrs["more"] = max(0, len(datasets) - max_datasets)
    return table


def format_table(wide: pd.DataFrame, protocol: str, max_datasets: int = 11) -> str:
    """A readable terminal table (format_cells as text)."""
    table = format_cells(wide, protocol, max_datasets)
    more = table.attrs["more"]
    return table.to_string(index=False) + (f"\n({more} more datasets in the CSV)" if more else "")


def write_leaderboard(
    results: str | Path, protocol: str, out: str | Path | None = None, reference: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Read records, build both tables, write `out` (wide) and `<out stem>_runs.csv` (long) if asked."""
    wide, long = leaderboard(read_records(results), protocol, reference)
    written = []
    if out is not None:
        out = Path(out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        long_path = out.with_name(out.stem + "_runs.csv")
        for df, p in ((wide, out), (long, long_path)):
            tmp = p.with_name(p.name + ".tmp")
            df.to_csv(tmp, index=False, float_format="%.4f")
            tmp.replace(p)
            written.append(p)
    return wide, long, written
