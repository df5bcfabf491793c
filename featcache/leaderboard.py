"""Leaderboards from result records (pandas over the JSONL): the papers' tables, mean ± std over seeds.

Base-to-novel averages follow the papers: average Base and Novel over datasets (each first averaged over
seeds), then HM of those averages. Records of different backbones or protocols are never averaged together:
the backbone is part of every row's key and one table holds one protocol. Runs whose model selection differed
(the record's `selection`: validation-free, few-shot-val, val, train-holdout) are separate rows with a
`selection` column, and the printed table ends with a line naming the rows when they differ.
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
    "ProLIP": (84.01, 73.86, 78.61),  # astra-vision/ProLIP README.md:249, validation-free (methods_2026.md §5.6)
}
# Published per-dataset figures of the training-free methods, from the references' logs (methods_2026.md §1.6, §6.8,
# §7.5): (protocol, backbone, method) -> (seeds, {dataset: values}); base2novel values are (base, novel) at 16
# shots, fewshot values the accuracies at 1, 2, 4, 8, 16 shots (None: not published). Their averages are computed
# as for featcache rows. GDA: mrflogs/ICLR24 logs/base2new.log, fewshots.log, architecture.log ("Average" lines);
# APE and Tip-X: yangyangyang127/APE APE_results.ipynb cell 0 (one draw; Tip-X's seeds are not stated).
PUBLISHED_SHOTS = (1, 2, 4, 8, 16)
_RN50, _B16 = "RN50-quickgelu/openai", "ViT-B-16-quickgelu/openai"
_ONLY16 = {d: [None] * 4 + [a] for d, a in [
    ("caltech101", 95.79), ("oxford_pets", 93.73), ("stanford_cars", 82.63), ("oxford_flowers", 97.92),
    ("food101", 87.27), ("fgvc_aircraft", 50.33), ("sun397", 75.87), ("dtd", 71.26), ("eurosat", 89.19),
    ("ucf101", 84.09), ("imagenet", 72.24)]}  # fmt: skip
PUBLISHED_PER_DATASET = {
    ("base2novel", _B16, "GDA"): (3, {
        "caltech101": (98.04, 94.51), "oxford_pets": (94.10, 97.15), "stanford_cars": (78.71, 66.92),
        "oxford_flowers": (97.78, 72.46), "food101": (90.63, 91.21), "fgvc_aircraft": (45.88, 34.09),
        "sun397": (81.95, 75.62), "dtd": (80.63, 59.82), "eurosat": (93.28, 79.21), "ucf101": (86.63, 79.09),
        "imagenet": (75.95, 69.79)}),
    ("fewshot", _B16, "GDA"): (3, _ONLY16),
    ("fewshot", _RN50, "GDA"): (3, {
        "caltech101": [87.28, 88.63, 90.62, 91.35, 92.55], "oxford_pets": [85.49, 86.69, 87.19, 89.12, 88.81],
        "stanford_cars": [56.77, 59.30, 62.75, 68.93, 75.12], "oxford_flowers": [72.11, 82.91, 89.73, 93.23, 95.72],
        "food101": [77.42, 77.87, 77.83, 78.43, 79.05], "fgvc_aircraft": [17.29, 22.45, 28.24, 34.07, 40.61],
        "sun397": [59.95, 63.64, 65.27, 68.58, 70.70], "dtd": [46.26, 51.26, 57.47, 62.77, 66.51],
        "eurosat": [58.30, 67.88, 75.40, 81.70, 86.12], "ucf101": [62.61, 66.28, 71.31, 75.74, 77.53],
        "imagenet": [60.64, 61.23, 61.71, 62.46, 63.82]}),
    ("fewshot", _RN50, "APE"): (1, {
        "caltech101": [90.47, 90.99, 91.81, 91.93, 92.49], "oxford_pets": [86.26, 87.06, 87.31, 87.55, 88.88],
        "stanford_cars": [59.57, 61.39, 65.09, 66.71, 70.31], "oxford_flowers": [79.62, 83.68, 87.90, 91.11, 91.96],
        "food101": [77.59, 77.64, 77.59, 78.27, 78.50], "fgvc_aircraft": [20.85, 22.89, 24.39, 28.32, 31.26],
        "sun397": [64.37, 65.93, 66.64, 68.37, 69.72], "dtd": [52.66, 58.63, 60.70, 66.08, 67.73],
        "eurosat": [59.79, 62.86, 70.33, 74.51, 78.16], "ucf101": [63.26, 65.72, 69.92, 71.74, 74.49],
        "imagenet": [62.04, 62.34, 62.54, 62.79, 63.42]}),
    ("fewshot", _B16, "APE"): (1, {"imagenet": [70.43, 70.91, 71.29, 71.59, 72.17]}),
    ("fewshot", _RN50, "Tip-X"): (None, {
        "caltech101": [88.39, 88.60, 89.29, 89.81, 90.70], "oxford_pets": [85.41, 87.95, 88.28, 89.12, 89.86],
        "stanford_cars": [58.79, 60.27, 63.84, 65.81, 67.30], "oxford_flowers": [73.44, 79.41, 85.92, 88.59, 90.29],
        "food101": [77.38, 77.53, 77.50, 77.87, 77.93], "fgvc_aircraft": [20.10, 21.93, 22.92, 26.91, 30.12],
        "sun397": [61.69, 63.38, 64.94, 66.28, 68.00], "dtd": [46.98, 50.11, 55.20, 59.33, 63.53],
        "eurosat": [55.88, 61.54, 68.14, 68.85, 73.16], "ucf101": [62.78, 66.45, 66.87, 68.88, 71.95],
        "imagenet": [60.73, 61.03, 61.10, 61.57, 62.16]}),
}  # fmt: skip
METRICS = {
    "base2novel": ["base", "novel", "hm"], "fewshot": ["acc"], "xd": ["acc"], "dg": ["acc"],
    # retrieval: x is the item (image or video): t2x = text -> image/video, x2t = image/video -> text
    "retrieval": [f"{d}_{k}" for d in ("t2x", "x2t") for k in ("r1", "r5", "r10", "medr", "meanr")],
}  # fmt: skip
HEADLINE = {"base2novel": "hm", "retrieval": "t2x_r1"}
# the accuracy a classification table shows: top-1 (the records' acc, base_acc, ...) or top-5 (acc5, base_acc5, ...)
ACCURACY_METRICS = {"acc": "top-1 accuracy", "acc5": "top-5 accuracy"}


def metric_columns(protocol: str, metric: str = "acc") -> list[str]:
    """The table's metric columns: METRICS[protocol] for top-1; for top-5 the same names with a 5 (base5, novel5,
    hm5; acc5). Retrieval tables always show their recalls and ranks."""
    if protocol not in METRICS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(METRICS)}")
    if metric not in ACCURACY_METRICS:
        raise ValueError(f"unknown metric {metric!r}; use acc (top-1) or acc5 (top-5)")
    if protocol == "retrieval":
        if metric != "acc":
            raise ValueError("retrieval tables show R@1/5/10 and ranks; --metric applies to classification protocols")
        return METRICS[protocol]
    return [m + ("5" if metric == "acc5" else "") for m in METRICS[protocol]]


def hm(b: float, n: float) -> float:
    if b is None or n is None or math.isnan(b) or math.isnan(n) or b + n == 0:
        return float("nan")
    return 2 * b * n / (b + n)


def runs_table(records: list[dict[str, Any]], protocol: str, metric: str = "acc") -> pd.DataFrame:
    """The long (tidy) table: one row per successful run of `protocol`, with top-1 or top-5 accuracy (`metric`; a
    record made before top-5 was recorded has none: n/a)."""
    cols_m = metric_columns(protocol, metric)
    k = "5" if metric == "acc5" else ""
    rows = []
    for r in records:
        if r.get("error") or r.get("protocol") != protocol:
            continue
        m = r.get("metrics") or {}
        row = {
            "backbone": r["backbone"], "method": r.get("variant") or r["method"], "base_method": r["method"],
            "dataset": r.get("eval_dataset") or r["dataset"], "trained_on": r["dataset"], "shots": r["shots"],
            "seed": r["seed"], "fit_s": r.get("fit_seconds"), "params": r.get("trainable_params"),
            "selection": r.get("selection") or "unrecorded", "run_id": r.get("run_id"),
        }  # fmt: skip
        if protocol == "base2novel":
            row |= {f"base{k}": m.get(f"base_acc{k}"), f"novel{k}": m.get(f"novel_acc{k}"), f"hm{k}": m.get(f"hm{k}")}
        elif protocol == "retrieval":  # t2i/t2v and i2t/v2t share columns: one table covers images and videos
            row |= {k.replace("t2i", "t2x").replace("t2v", "t2x").replace("i2t", "x2t").replace("v2t", "x2t"): v
                    for k, v in m.items()}  # fmt: skip
        else:
            row |= {f"acc{k}": m.get(f"acc{k}")}
        rows.append(row)
    cols = ["backbone", "method", "base_method", "dataset", "trained_on", "shots", "seed", *cols_m,
            "fit_s", "params", "selection", "run_id"]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    for c in cols_m:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    # a rerun of the same (row, dataset, seed) replaces the earlier record: keep the last one (a run that selected
    # differently is another row)
    key = ["backbone", "method", "dataset", "trained_on", "shots", "seed", "selection"]
    return df.drop_duplicates(key, keep="last").reset_index(drop=True)


def _dataset_order(names) -> list[str]:
    known = [d for d in DATASET_ORDER if d in set(names)]
    return known + sorted(set(names) - set(known))


def leaderboard(
    records: list[dict[str, Any]], protocol: str, reference: str | None = None, metric: str = "acc"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(wide table, long table). Wide: one row per (backbone, method[, shots]); per dataset the mean and std
    over seeds of each metric; an `average` group; seeds, mean fit seconds, trainable parameters. `metric`: acc
    (top-1, the default) or acc5 (top-5: columns base5/novel5/hm5 or acc5); the wide table's attrs say which."""
    metrics = metric_columns(protocol, metric)
    long = runs_table(records, protocol, metric)
    b_col, n_col = (metrics[0], metrics[1]) if protocol == "base2novel" else ("", "")
    row_key = ["backbone", "method"] + (["shots"] if protocol == "fewshot" else [])
    # retrieval's rank metrics are averaged over datasets like the recalls (the papers report them per dataset)
    datasets = _dataset_order(long["dataset"].unique())
    sources = set(long["trained_on"]) if protocol in ("xd", "dg") else set()
    avg_sets = [d for d in datasets if d not in sources]  # xd/dg: the average is over targets only
    out = []
    for key, g in long.groupby([*row_key, "selection"], sort=True):  # runs that selected differently: own rows
        row: dict[str, Any] = dict(zip([*row_key, "selection"], key, strict=True))
        per_ds = {}
        for d in datasets:
            gd = g[g["dataset"] == d]
            for m in metrics:
                vals = gd[m].dropna()
                mean = vals.mean() if len(vals) else float("nan")
                std = vals.std(ddof=0) if len(vals) else float("nan")
                if m.startswith("hm"):  # HM of the seed-averaged base and novel; std over the per-seed HMs
                    mean = hm(per_ds[(d, b_col)], per_ds[(d, n_col)])
                per_ds[(d, m)] = mean
                row[f"{d}/{m}"], row[f"{d}/{m}_std"] = _round(mean), _round(std)
        complete = all(not g[g["dataset"] == d].empty for d in avg_sets) and avg_sets
        for m in metrics:
            if m.startswith("hm"):
                mean = hm(row.get(f"average/{b_col}", float("nan")), row.get(f"average/{n_col}", float("nan")))
            else:
                means = [per_ds[(d, m)] for d in avg_sets]
                mean = float(pd.Series(means).mean(skipna=False)) if complete else float("nan")
            row[f"average/{m}"] = _round(mean)
            row[f"average/{m}_std"] = _round(_seed_std(g, avg_sets, m, b_col, n_col) if complete else float("nan"))
        row["datasets"] = int(g["dataset"].nunique())
        row["seeds"] = int(g["seed"].nunique())
        row["fit_s"] = _round(g["fit_s"].mean())
        row["params"] = int(g["params"].max()) if g["params"].notna().any() else None
        row["source"] = "featcache"
        out.append(row)
    cols = row_key + [f"{d}/{m}{s}" for d in [*datasets, "average"] for m in metrics for s in ("", "_std")]
    cols += ["datasets", "seeds", "fit_s", "params", "selection", "source"]
    wide = pd.DataFrame(out, columns=cols)
    if reference == "published":
        if protocol not in ("base2novel", "fewshot"):
            raise ValueError("published reference rows exist for base2novel and fewshot only (methods.md §1)")
        if metric != "acc":
            raise ValueError("the published reference rows are top-1 accuracy; use --metric acc with --reference")
        wide = pd.concat([wide, pd.DataFrame(published_rows(protocol), columns=cols)], ignore_index=True)
    elif reference is not None:
        raise ValueError(f"unknown reference {reference!r}; use 'published'")
    wide.attrs["metric"] = metric
    return wide, long


def published_rows(protocol: str) -> list[dict[str, Any]]:
    """The `--reference published` rows of a protocol (source `published`): the published base-to-novel averages,
    and the per-dataset figures of PUBLISHED_PER_DATASET with their averages computed as for featcache rows."""
    rows = []
    if protocol == "base2novel":
        rows += [{"backbone": "ViT-B-16-quickgelu/openai", "method": f"{name} (published)", "average/base": b,
                  "average/novel": n, "average/hm": h, "datasets": 11, "seeds": 3, "source": "published"}
                 for name, (b, n, h) in PUBLISHED_BASE2NOVEL.items()]  # fmt: skip
    for (proto, backbone, method), (seeds, values) in PUBLISHED_PER_DATASET.items():
        if proto != protocol:
            continue
        head = {"backbone": backbone, "method": f"{method} (published)", "seeds": seeds, "source": "published"}
        if protocol == "base2novel":
            row = head | {"datasets": len(values)}
            for d, (b, n) in values.items():
                row |= {f"{d}/base": b, f"{d}/novel": n, f"{d}/hm": _round(hm(b, n))}
            base = sum(b for b, _ in values.values()) / len(values)
            novel = sum(n for _, n in values.values()) / len(values)
            row |= {"average/base": _round(base), "average/novel": _round(novel), "average/hm": _round(hm(base, novel))}
            rows.append(row)
            continue
        for i, shots in enumerate(PUBLISHED_SHOTS):
            accs = {d: v[i] for d, v in values.items() if v[i] is not None}
            if accs:
                avg = sum(accs.values()) / len(accs) if len(accs) == 11 else float("nan")
                rows.append(head | {"shots": shots, "datasets": len(accs), "average/acc": _round(avg)}
                            | {f"{d}/acc": a for d, a in accs.items()})  # fmt: skip
    return rows


def _seed_std(g: pd.DataFrame, datasets: list[str], m: str, b_col: str = "base", n_col: str = "novel") -> float:
    """Std over seeds of the per-seed average over datasets (HM: of the per-seed HM of averages)."""
    per_seed = []
    for _, gs in g.groupby("seed"):
        if m.startswith("hm"):
            b = gs[gs["dataset"].isin(datasets)].groupby("dataset")[b_col].mean()
            n = gs[gs["dataset"].isin(datasets)].groupby("dataset")[n_col].mean()
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


def format_cells(wide: pd.DataFrame, protocol: str, max_datasets: int = 11, metric: str | None = None) -> pd.DataFrame:
    """The displayed table as strings: the average block first, then one headline metric per dataset (none when
    there is one dataset: it would repeat the average). A cell averaging several seeds is always `mean±std`.
    `metric` (default: the one the table was built with) picks the top-1 or top-5 columns."""
    metric = metric or wide.attrs.get("metric", "acc")
    metrics = metric_columns(protocol, metric)
    head = HEADLINE.get(protocol, "acc") + ("5" if metric == "acc5" else "")
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
    if "selection" in wide:
        table["selection"] = [s if isinstance(s, str) else "" for s in wide["selection"]]
    table["source"] = wide["source"]
    table.attrs["more"] = max(0, len(datasets) - max_datasets)
    return table


def format_table(wide: pd.DataFrame, protocol: str, max_datasets: int = 11, metric: str | None = None) -> str:
    """A readable terminal table (format_cells as text)."""
    table = format_cells(wide, protocol, max_datasets, metric)
    more = table.attrs["more"]
    note = selection_note(wide)
    return (table.to_string(index=False) + (f"\n({more} more datasets in the CSV)" if more else "")
            + (f"\n{note}" if note else ""))  # fmt: skip


def selection_note(wide: pd.DataFrame) -> str | None:
    """A footnote when the table's featcache rows did not all select the same way (their numbers are then not
    like for like): which rows selected how. None when they all agree."""
    if "selection" not in wide:
        return None
    rows = wide[wide["source"] == "featcache"]
    by: dict[str, list[str]] = {}
    for method, sel in zip(rows["method"], rows["selection"], strict=True):
        by.setdefault(sel, [])
        if method not in by[sel]:
            by[sel].append(method)
    if len(by) < 2:
        return None
    return "rows differ in selection: " + "; ".join(f"{s} ({', '.join(m)})" for s, m in sorted(by.items()))


def write_leaderboard(
    results: str | Path,
    protocol: str,
    out: str | Path | None = None,
    reference: str | None = None,
    metric: str = "acc",
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Read records, build both tables, write `out` (wide) and `<out stem>_runs.csv` (long) if asked."""
    wide, long = leaderboard(read_records(results), protocol, reference, metric)
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
