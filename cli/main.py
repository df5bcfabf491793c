"""The `featcache` command: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from featcache.errors import FeatcacheError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract CLIP features once; adapt and evaluate few-shot methods on the cache in seconds.",
)

CACHE_HELP = "Cache folder (default: $FEATCACHE_HOME or ~/.cache/featcache)."


_DEBUG = {"on": os.environ.get("FEATCACHE_DEBUG", "") not in ("", "0")}


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an unexpected error."),
) -> None:
    """Extract CLIP features once; adapt and evaluate few-shot methods on the cache in seconds."""
    if debug:
        _DEBUG["on"] = True


def _crash(e: BaseException) -> None:
    """An error nobody anticipated: one line, the traceback in a file (or on screen with --debug), exit 1."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if _DEBUG["on"]:
        typer.echo(text, err=True, nl=False)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, OSError) and e.strerror:  # the system said no (permissions, a missing path): say what and where
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror}{where}", err=True)
        raise typer.Exit(1) from None
    where = "above" if _DEBUG["on"] else None
    if where is None:
        try:
            fd, name = tempfile.mkstemp(prefix=f"featcache-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            where = name
        except OSError:
            where = "not written (rerun with --debug to see it)"
    typer.echo(
        f"error: unexpected {type(e).__name__}: {first} (a featcache bug, please report it; full traceback: {where})",
        err=True,
    )
    raise typer.Exit(1) from None


@contextmanager
def _user_errors():
    """Every failure ends as one line on stderr and a non-zero exit code: expected ones (FeatcacheError) with
    their message, anything else with its type and where the traceback was written."""
    try:
        yield
    except FeatcacheError as e:
        if _DEBUG["on"]:
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished batches are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        _crash(e)


@app.command()
def extract(
    dataset: str | None = typer.Option(None, help="Dataset id (see `featcache datasets`)."),
    backbone: str = typer.Option(..., help="ARCH/TAG, ARCH/random, ARCH/CHECKPOINT, hf-hub:ORG/REPO or local-dir:DIR."),
    manifest: Path | None = typer.Option(None, help="Your own dataset manifest (JSON) instead of --dataset."),
    data_root: Path | None = typer.Option(None, help="Datasets folder (default: $FEATCACHE_DATA or ~/data)."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    splits: list[str] | None = typer.Option(None, "--splits", help="Splits to extract (repeat); default: all."),
    split_scheme: str | None = typer.Option(None, help="coop (CoOp split files), official (torchvision) ..."),
    batch_size: int = typer.Option(128, help="Images per forward pass."),
    workers: int | None = typer.Option(
        None, help="DataLoader worker processes (default: CPU count, shared among torchrun processes, at most 8)."
    ),
    download: bool = typer.Option(False, "--download", help="Fetch what the manifest can download first."),
    augment_views: int = typer.Option(0, help="Extra random-resized-crop + flip views per training image."),
    augment_seed: int = typer.Option(0, help="Seed of the augmented views."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and record them in the store."),
    dtype: str = typer.Option(
        "float16", help="Storage dtype of image features: float16 or float32 (class text and captions: always float32)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    precision: str = typer.Option("auto", help="auto (fp16 on cuda, else fp32), fp32, bf16, fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild a store made with other settings."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    cache_layer: int | None = typer.Option(
        None, help="Also cache the vision tokens entering block N+1 (float16) for layer-mma's partial-backbone path."
    ),
    pre_projection: bool = typer.Option(
        False,
        "--pre-projection",
        help="Also store the raw pooled features before the last visual projection, and that projection (ProLIP).",
    ),
) -> None:
    """Run a frozen open_clip model once over a dataset and cache unit-norm image and class-text features."""
    from featcache.extract import extract as run
    from featcache.store import Store

    with _user_errors():
        source = _dataset_or_manifest(dataset, manifest)
        _at_least("--batch-size", batch_size, 1)
        _at_least("--workers", workers, 0)
        _at_least("--augment-views", augment_views, 0)
        _at_least("--augment-seed", augment_seed, 0, MAX_SEED)
        _at_least("--cache-layer", cache_layer, 0)
        _device(device)
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and cache_layer is not None:
            raise FeatcacheError("--cache-layer runs in one process: extract the store under torchrun, then rerun "
                                 "the same command with --cache-layer outside torchrun")  # fmt: skip
        path = run(
            source, backbone, data_root=data_root, cache_dir=cache_dir,
            splits=splits, split_scheme=split_scheme, batch_size=batch_size, workers=workers,
            download_data=download, augment_views=augment_views, augment_seed=augment_seed, skip_bad=skip_bad,
            dtype=dtype, device=device, precision=precision, overwrite=overwrite, progress=not quiet,
            pre_projection=pre_projection,
        )  # fmt: skip
        if rank != 0:  # under torchrun: one summary, from rank 0
            return
        with Store.open(path) as st:
            _print_summary(st.summary())
        if cache_layer is not None:
            from featcache.streaming.partial import extract_tokens

            if manifest is not None:
                raise FeatcacheError("--cache-layer works with a bundled --dataset")
            tok = extract_tokens(
                dataset, backbone, cache_layer, data_root=data_root, cache_dir=cache_dir, split_scheme=split_scheme,
                splits=splits, batch_size=batch_size, workers=workers or 0, augment_views=augment_views,
                augment_seed=augment_seed, device=device, progress=not quiet,
            )  # fmt: skip
            typer.echo(f"token cache: {tok} ({tok.stat().st_size / 2**20:.1f} MB)")


@app.command("import")
def import_(
    file: Path = typer.Argument(
        ...,
        help="An .npz with text_features, classnames and <split>_features/<split>_labels for train, val and/or "
        "test (test alone serves zero-shot; for prolip <split>_pre and projection_weight [+ projection_bias]).",
    ),
    name: str = typer.Option(..., help="Name to address the store by (fit --name NAME)."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    backbone: str = typer.Option("unknown", help="Label of the model that made the features (recorded)."),
    dtype: str = typer.Option("float16", help="Storage dtype of image features: float16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store with the same name."),
) -> None:
    """Import features made elsewhere from an .npz (they are normalised on import)."""
    from featcache.importers import import_npz
    from featcache.store import Store

    with _user_errors():
        path = import_npz(file, name, cache_dir=cache_dir, backbone=backbone, dtype=dtype, overwrite=overwrite)
        with Store.open(path) as st:
            _print_summary(st.summary())


@app.command("import-tip")
def import_tip(
    folder: Path = typer.Argument(..., help="Tip-Adapter cache folder (keys_{K}shots.pt, values_{K}shots.pt, ...)."),
    name: str = typer.Option(..., help="Name to address the store by."),
    classnames: Path = typer.Option(..., help="Class names: one per line, or a JSON list."),
    text_features: Path = typer.Option(..., help="Class text features .npy or .pt, [C, D] or Tip-Adapter's [D, C]."),
    shots: int | None = typer.Option(None, help="Which keys_{K}shots.pt to use when several exist."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    backbone: str = typer.Option("unknown", help="Label of the model that made the features (recorded)."),
    dtype: str = typer.Option("float16", help="Storage dtype of image features: float16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store with the same name."),
) -> None:
    """Import a Tip-Adapter cache folder (GPU-saved .pt files load on a CPU-only machine)."""
    from featcache.importers import import_tip as run
    from featcache.store import Store

    with _user_errors():
        _at_least("--shots", shots, 1)
        path = run(folder, name, classnames, text_features, shots=shots, cache_dir=cache_dir,
                   backbone=backbone, dtype=dtype, overwrite=overwrite)  # fmt: skip
        with Store.open(path) as st:
            _print_summary(st.summary())


@app.command("ls")
def ls(cache_dir: Path | None = typer.Option(None, help=CACHE_HELP)) -> None:
    """List the stores in the cache folder: backbone, dataset, splits and counts, size on disk."""
    from featcache.store import Store, default_cache_dir

    with _user_errors():
        root = (cache_dir or default_cache_dir()).expanduser()
        rows = []
        for p in sorted(root.rglob("*.h5")) + sorted(root.rglob("*.h5.partial")):
            size = round(p.stat().st_size / 2**20, 1)
            if p.suffix == ".partial":
                rows.append({"backbone": "?", "dataset": p.name, "scheme": "", "splits": "unfinished: rerun extract",
                             "MB": size})  # fmt: skip
                continue
            try:
                with Store.open(p) as st:
                    s = st.summary()
                rows.append({
                    "backbone": s["backbone"], "dataset": s["dataset"], "scheme": s["split_scheme"],
                    "splits": " ".join(f"{k}={v}" for k, v in s["splits"].items()), "MB": size,
                })  # fmt: skip
            except FeatcacheError as e:
                rows.append(
                    {"backbone": "?", "dataset": p.name, "scheme": "", "splits": f"unreadable: {e}", "MB": size}
                )
        if not rows:
            typer.echo(f"no stores in {root}")
            return
        typer.echo(f"stores in {root}:")
        typer.echo(_columns(rows))


@app.command()
def info(file: Path = typer.Argument(..., help="A store (.h5).")) -> None:
    """Print a store's full fingerprint, splits, templates and skipped items."""
    from featcache.store import Store

    with _user_errors():
        with Store.open(file) as st:
            s = st.summary()
            s["templates"] = st.templates
            s["classnames"] = st.classnames
            s["skipped"] = {sp: st.skipped(sp) for sp in st.splits if st.skipped(sp)}
        typer.echo(json.dumps(s, indent=2))


@app.command()
def datasets() -> None:
    """List the bundled dataset manifests with their split schemes and expected counts (retrieval: items/captions)."""
    import pandas as pd

    from featcache.manifests import list_datasets, load_manifest

    with _user_errors():
        rows = []
        for d in list_datasets():
            m = load_manifest(d)
            retrieval = m.task == "retrieval"
            for s in m.schemes.values():
                caps = s.caption_counts
                counts = {k: f"{v}/{caps[k]}" if k in caps else str(v) for k, v in s.counts.items()}
                dl = "bundled" if s.source["kind"] == "sklearn_digits" else "yes" if s.download else "no"
                rows.append({
                    "dataset": m.id, "task": m.task, "classes": "-" if retrieval else len(m.classnames),
                    "scheme": s.name + (" (default)" if s.name == m.default_scheme else ""),
                    "counts": " ".join(f"{k}={v}" for k, v in counts.items()),
                    "download": "annotations" if retrieval and s.download else dl,
                })  # fmt: skip
        typer.echo(pd.DataFrame(rows).to_string(index=False))
        if any(r["task"] == "retrieval" for r in rows):
            typer.echo("retrieval counts are items/captions (images or videos / captions)")


@app.command()
def backbones(
    arch: str | None = typer.Argument(None, help="Only ids whose architecture contains this text."),
) -> None:
    """List ARCH/TAG ids open_clip knows (plus ARCH/random for any architecture, and featcache-tiny/random)."""
    from featcache.backbones import _open_clip

    open_clip = _open_clip()
    ids = [f"{a}/{t}" for a, t in open_clip.list_pretrained()] + ["featcache-tiny/random"]
    for i in ids:
        if arch is None or arch.lower() in i.lower():
            typer.echo(i)


MAX_SEED = 2**32 - 1  # numpy's limit; torch and random take it too


def _at_least(option: str, value: int | None, low: int, high: int | None = None, why: str = "") -> None:
    """Range of an integer option, checked where it is parsed: one `error:` line and exit 1, like any bad input
    (typer's own min= would end in a usage error with exit 2)."""
    if value is not None and (value < low or (high is not None and value > high)):
        limit = f">= {low}" if high is None else f"in {low}..{high}"
        raise FeatcacheError(f"{option} must be {limit}{why}, got {value}")


def _device(device: str) -> str:
    """The device, checked once before anything is loaded: one line if this machine has no such device."""
    from featcache.backbones import pick_device

    return str(pick_device(device))


def _dataset_or_manifest(
    dataset: str | None, manifest: Path | None, needed: bool = True, what: str = "", name_ok: bool = False
) -> str | None:
    """The dataset a command works on, from --dataset NAME or --manifest FILE (exactly one where a dataset is
    needed, as `extract` takes them); a manifest is passed on as its path, which every library call accepts."""
    if dataset is not None and manifest is not None:
        raise FeatcacheError("give exactly one of --dataset NAME or --manifest FILE")
    if manifest is not None:
        if not manifest.expanduser().is_file():
            raise FeatcacheError(f"no manifest file at {manifest}; give the path of a dataset manifest (JSON)")
        return str(manifest.expanduser())
    if dataset is None and needed:
        alt = " (or --name NAME for an imported store)" if name_ok else ""
        raise FeatcacheError(f"give {what}--dataset NAME or --manifest FILE{alt}")
    return dataset


def _parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise FeatcacheError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _print_record(rec) -> None:
    m = rec.metrics
    if rec.protocol == "retrieval":
        x = "v" if "t2v_r1" in m else "i"
        scores = "  ".join(
            f"{d}: R@1 {m[f'{d}_r1']:.2f} R@5 {m[f'{d}_r5']:.2f} R@10 {m[f'{d}_r10']:.2f} MdR {m[f'{d}_medr']:g} "
            f"MnR {m[f'{d}_meanr']:.1f}"
            for d in (f"t2{x}", f"{x}2t")
            if m.get(f"{d}_r1") is not None
        )
        where = rec.dataset if rec.eval_dataset is None else f"{rec.dataset} -> {rec.eval_dataset}"
        typer.echo(f"{rec.method:<14} {where}  retrieval (test):  {scores}")
        if rec.trainable_params and rec.eval_dataset is None:
            typer.echo(f"{'':<14} fit {rec.fit_seconds:.2f} s, {rec.trainable_params:,} trainable parameters")
        return

    def pct(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.2f}"

    if rec.protocol == "base2novel":
        scores = f"base {pct('base_acc')}  novel {pct('novel_acc')}  HM {pct('hm')}"
        if "base_acc5" in m:
            scores += f"  (top-5: base {pct('base_acc5')}  novel {pct('novel_acc5')}  HM {pct('hm5')})"
    else:
        scores = f"acc {pct('acc')}" + (f"  top-5 {pct('acc5')}" if "acc5" in m else "")
    where = rec.dataset if rec.eval_dataset is None else f"{rec.dataset} -> {rec.eval_dataset}"
    if (getattr(rec, "sampled", None) or {}).get("n_train") == 0:  # a method that trains nothing drew no shots
        drawn = "no training"
    else:
        drawn = (f"{rec.shots}-shot" if rec.shots else "all-shot") + f" seed {rec.seed}"
    typer.echo(f"{rec.method:<14} {where}  {rec.protocol} {drawn}:  {scores}")
    if rec.eval_dataset is None:
        typer.echo(
            f"{'':<14} fit {rec.fit_seconds:.2f} s, {rec.trainable_params:,} trainable parameters, run {rec.run_id}"
        )


@app.command()
def fit(
    adapter: str = typer.Option(..., help="Method name (see `featcache methods`)."),
    dataset: str | None = typer.Option(None, help="Dataset id of an extracted store."),
    manifest: Path | None = typer.Option(None, help="Your own dataset manifest (JSON) instead of --dataset."),
    backbone: str | None = typer.Option(None, help="Backbone id of an extracted store."),
    name: str | None = typer.Option(None, help="An imported store, instead of --dataset/--backbone."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    split_scheme: str | None = typer.Option(None, help="Split scheme of the store (default: the manifest's)."),
    protocol: str = typer.Option(
        "base2novel", help="base2novel, fewshot (all classes), or retrieval (caption datasets: R@K both ways)."
    ),
    shots: int = typer.Option(
        16, help="Training images per class (Dassl's draw); 0: all. Ignored by methods that train nothing (zero-shot)."
    ),
    seed: int = typer.Option(1, help="Seed of the few-shot draw and of training."),
    lam: float | None = typer.Option(
        None, "--lambda", help="mm-attn: weight on the adapter output (0.2 reproduces the published setup)."
    ),
    sets: list[str] | None = typer.Option(None, "--set", help="Method option key=value (repeat)."),
    template: str | None = typer.Option(
        None, help="Class text: the dataset's template (default), 'ensemble', or a stored template string."
    ),  # fmt: skip
    val_from: str = typer.Option("val", help="Validation rows: val (Dassl), train (unused train rows), none."),
    allow_short_classes: bool = typer.Option(
        False, "--allow-short-classes", help="Take whole classes that hold fewer than --shots rows."
    ),  # fmt: skip
    device: str = typer.Option("cpu", help="Device for the cached tensors and the method."),
    results: Path | None = typer.Option(None, help="Append the result record to this JSONL file."),
    save: Path | None = typer.Option(None, help="Save the fitted method (state.pt, run.json) in this folder."),
    data_root: Path | None = typer.Option(None, help="layer-mma, maple: datasets folder (images are streamed)."),
    workers: int = typer.Option(0, help="layer-mma, maple: DataLoader workers."),
    cache_layer: int | None = typer.Option(
        None, help="layer-mma: train from the partial-backbone cache at this layer."
    ),
) -> None:
    """Fit a method under a protocol, print its metrics, record and save it. Embedding-level methods train on
    a store; layer-mma and maple stream the dataset's images through the backbone."""
    from featcache.adapters import list_adapters
    from featcache.api import fit_method

    with _user_errors():
        _at_least("--shots", shots, 0, why=" (0: every training row)")
        _at_least("--seed", seed, 0, MAX_SEED)
        _at_least("--workers", workers, 0)
        _at_least("--cache-layer", cache_layer, 0)
        dataset = _dataset_or_manifest(dataset, manifest, needed=name is None, name_ok=True)
        device = _device(device)
        options = _parse_sets(sets)
        if lam is not None:
            options["lam"] = lam  # a method option: its declared bounds (and finiteness) apply
        if adapter not in list_adapters():  # a full-backbone method: its modules (backbone code) load only here
            from featcache.streaming.retrieval_trainer import METHODS as RETRIEVAL
            from featcache.streaming.retrieval_trainer import fit_retrieval_streaming
            from featcache.streaming.trainer import METHODS, fit_streaming

            if adapter in RETRIEVAL:
                if dataset is None or backbone is None:
                    raise FeatcacheError(
                        f"{adapter} streams images: give --dataset NAME or --manifest FILE, and --backbone"
                    )
                if protocol != "retrieval":
                    raise FeatcacheError(f"{adapter} is a retrieval method: pass --protocol retrieval")
                rec = fit_retrieval_streaming(
                    adapter, dataset=dataset, backbone=backbone, data_root=data_root, split_scheme=split_scheme,
                    seed=seed, options=options, device=device, workers=workers, results=results, save=save,
                )  # fmt: skip
                if os.environ.get("RANK", "0") == "0":
                    _print_record(rec)
                return
            if adapter in METHODS:
                if dataset is None or backbone is None:
                    raise FeatcacheError(
                        f"{adapter} streams images: give --dataset NAME or --manifest FILE, and --backbone"
                    )
                rec = fit_streaming(
                    adapter, dataset=dataset, backbone=backbone, data_root=data_root, split_scheme=split_scheme,
                    protocol=protocol, shots=shots, seed=seed, options=options, device=device, workers=workers,
                    results=results, save=save, allow_short_classes=allow_short_classes, cache_layer=cache_layer,
                    cache_dir=cache_dir,
                )  # fmt: skip
                if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
                    _print_record(rec)
                return
        run = fit_method(
            adapter, dataset=dataset, backbone=backbone, name=name, cache_dir=cache_dir, split_scheme=split_scheme,
            protocol=protocol, shots=shots, seed=seed, template=template, options=options, val_from=val_from,
            allow_short_classes=allow_short_classes, device=device, results=results, save=save,
        )  # fmt: skip
        _print_record(run.record)


@app.command("eval")
def eval_(
    run: Path = typer.Option(..., help="A folder saved by `featcache fit --save`."),
    dataset: str | None = typer.Option(None, help="Target dataset (same backbone as the run)."),
    manifest: Path | None = typer.Option(None, help="Your own target dataset manifest (JSON) instead of --dataset."),
    backbone: str | None = typer.Option(None, help="Backbone id (default: the run's)."),
    name: str | None = typer.Option(None, help="An imported target store."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    split_scheme: str | None = typer.Option(None, help="Split scheme of the target store."),
    template: str | None = typer.Option(None, help="Class text template (default: the run's)."),
    device: str = typer.Option("cpu", help="Device."),
    results: Path | None = typer.Option(None, help="Append the result record to this JSONL file."),
    data_root: Path | None = typer.Option(None, help="Streaming runs: datasets folder (images are streamed)."),
    workers: int = typer.Option(0, help="Streaming runs: DataLoader workers."),
) -> None:
    """Evaluate a saved method on another dataset's test split (cross-dataset, domain generalization; for a
    cross-modal-adapter run, retrieval on another caption dataset)."""
    from featcache.api import evaluate_run
    from featcache.fsio import read_json

    with _user_errors():
        _at_least("--workers", workers, 0)
        dataset = _dataset_or_manifest(dataset, manifest, needed=name is None, what="the target ", name_ok=True)
        device = _device(device)
        meta_file = run / "run.json"
        fix = "delete the run folder and refit with --save"
        meta = read_json(meta_file, "saved run's run.json", fix) if meta_file.exists() else {}
        if meta.get("streaming") and dataset is None:
            raise FeatcacheError(
                "a streaming run evaluates on images: give the target --dataset NAME or --manifest FILE"
            )
        if meta.get("task") == "retrieval":
            from featcache.streaming.retrieval_trainer import evaluate_retrieval_run

            rec = evaluate_retrieval_run(run, dataset=dataset, data_root=data_root, split_scheme=split_scheme,
                                         device=device, workers=workers, results=results)  # fmt: skip
            _print_record(rec)
            return
        if meta.get("streaming"):
            from featcache.streaming.trainer import evaluate_streaming_run

            rec = evaluate_streaming_run(run, dataset=dataset, data_root=data_root, split_scheme=split_scheme,
                                         device=device, workers=workers, results=results)  # fmt: skip
            _print_record(rec)
            return
        rec = evaluate_run(run, dataset=dataset, backbone=backbone, name=name, cache_dir=cache_dir,
                           split_scheme=split_scheme, template=template, device=device, results=results)  # fmt: skip
        _print_record(rec)


@app.command()
def methods(method: str | None = typer.Argument(None, help="Show one method's options.")) -> None:
    """List the methods, or one method's options with defaults and help."""
    import dataclasses

    from featcache.adapters import config_help, create_adapter, list_adapters
    from featcache.streaming import streamed_methods

    STREAMING = streamed_methods()  # noqa: N806  (full-backbone methods, classification and retrieval)
    with _user_errors():
        if method is None:
            width = max(map(len, [*list_adapters(), *STREAMING])) + 1

            def summary(module: str) -> str:  # the module docstring's first sentence, on one line
                para = " ".join((sys.modules[module].__doc__ or "").strip().split("\n\n")[0].split())
                return re.split(r"(?<=\.)\s", para, maxsplit=1)[0]

            for m in list_adapters():
                a = create_adapter(m, dim=512)
                kind = "gradient-trained" if a.trainable else "closed form"
                typer.echo(f"{m:<{width}} {kind:<17} {summary(type(a).__module__)}")
            for m, cfg in STREAMING.items():
                typer.echo(f"{m:<{width}} {'full backbone':<17} {summary(cfg.__module__)}")
            return
        if method in STREAMING:
            for f in dataclasses.fields(STREAMING[method]):
                typer.echo(f"  {f.name + '=' + str(f.default):<32} {f.metadata.get('help', '')}")
            return
        from featcache.api import check_method

        check_method(method)
        for key, default, text in config_help(method):
            value = ",".join(map(str, default)) if isinstance(default, list) else default
            typer.echo(f"  {key + '=' + str(value):<32} {text}")


SWEEP_DEVICE_HELP = ("Where runs compute (cpu, cuda, auto); default: the file's `device`, else cached fits on cpu and "
                     "streaming methods on cuda when there is one.")  # fmt: skip
EXECUTOR_HELP = ("process (local worker processes, one GPU each), slurm (submitit) or local (submitit's local "
                 "executor: each run a job in its own process on this machine).")  # fmt: skip


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="A sweep TOML (see benchmarks/sweeps/)."),
    results: Path = typer.Option(Path("results.jsonl"), help="JSONL file the records are appended to."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    jobs: int = typer.Option(1, help="Runs in parallel (processes; torch threads are split between them)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    dataset: list[str] | None = typer.Option(
        None, "--dataset", help="Run the grid on this dataset instead of the file's datasets (xd/dg: its source)."
    ),
    manifest: list[Path] | None = typer.Option(
        None, "--manifest", help="The same with your own dataset manifest (JSON); --dataset and --manifest repeat."
    ),
    device: str | None = typer.Option(None, help=SWEEP_DEVICE_HELP),
    executor: str = typer.Option("process", help=EXECUTOR_HELP),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    gpus_per_job: int | None = typer.Option(None, help="GPUs (one task each) per streaming run; default 1."),
    cpus_per_job: int | None = typer.Option(None, help="CPUs per task; default 4."),
    timeout_min: int | None = typer.Option(None, help="Time limit of each job in minutes; default 240."),
    slurm_array_parallelism: int | None = typer.Option(None, help="Jobs of the array running at once; default 32."),
    group_size: int | None = typer.Option(None, help="Runs per submitted job (run one after another); default 1."),
    mem_gb: int | None = typer.Option(None, help="Memory per job in GB (default: the partition's)."),
    slurm_folder: Path | None = typer.Option(None, help="submitit logs and job records; default <results>.submitit."),
    slurm_arg: list[str] | None = typer.Option(
        None, "--slurm-arg", help="Extra sbatch option key=value (repeat), e.g. account=abc, qos=high."
    ),
) -> None:
    """Run a grid of backbones x datasets x methods x shots x seeds x variants; resumable."""
    import dataclasses

    from featcache.sweep import load_sweep, run_sweep
    from featcache.sweep_submitit import cluster_options

    with _user_errors():
        _at_least("--jobs", jobs, 1)
        cluster = cluster_options(
            executor, jobs, partition=partition, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
            timeout_min=timeout_min, array_parallelism=slurm_array_parallelism, group_size=group_size, mem_gb=mem_gb,
            folder=str(slurm_folder) if slurm_folder else None,
            slurm_args=slurm_arg or None,
        )  # fmt: skip
        if device is not None and executor != "slurm":
            _device(device)  # this machine must have it (on a cluster, the nodes must)
        for m in manifest or []:
            _dataset_or_manifest(None, m)
        s = load_sweep(file, datasets=[*(dataset or []), *map(str, manifest or [])] or None)
        if device is not None:
            s = dataclasses.replace(s, device=device)
        typer.echo(f"sweep {s.name}: {len(s.jobs)} runs ({s.protocol}) -> {results}")
        c = run_sweep(s, results, cache_dir=cache_dir, jobs=jobs, progress=not quiet, echo=typer.echo,
                      cluster=cluster)  # fmt: skip
        typer.echo(f"done {c['done']}, failed {c['failed']} (recorded with their error; rerun to retry), "
                   f"already recorded {c['skipped']}, waiting for a cache {c['missing']}")  # fmt: skip
        if c["failed"]:
            raise typer.Exit(1)


@app.command()
def leaderboard(
    results: Path = typer.Argument(..., help="A JSONL file of result records."),
    protocol: str = typer.Option("base2novel", help="base2novel, fewshot, xd, dg or retrieval."),
    out: Path | None = typer.Option(None, help="Wide CSV; the long one goes to <out>_runs.csv."),
    reference: str | None = typer.Option(None, help="'published': add the published rows (base2novel, fewshot)."),
    metric: str = typer.Option("acc", help="acc (top-1 accuracy) or acc5 (top-5); classification protocols."),
) -> None:
    """Leaderboard tables (mean ± std over seeds, papers' averages) printed and written as CSV."""
    from featcache.leaderboard import format_table, write_leaderboard

    with _user_errors():
        if not results.exists():
            raise FeatcacheError(f"no results file at {results}")
        try:
            wide, _, written = write_leaderboard(results, protocol, out, reference, metric)
        except ValueError as e:
            raise FeatcacheError(str(e)) from None
        if wide.empty:
            raise FeatcacheError(f"{results} holds no successful {protocol} records")
        typer.echo(format_table(wide, protocol))
        for p in written:
            typer.echo(f"wrote {p}")


@app.command()
def plot(
    results: Path = typer.Argument(..., help="A JSONL file of result records."),
    kind: str = typer.Option("base-novel", help="base-novel or shots."),
    out: Path = typer.Option(..., help="PNG file to write."),
    metric: str = typer.Option("acc", help="acc (top-1 accuracy) or acc5 (top-5)."),
) -> None:
    """Base vs novel accuracy per method, or accuracy vs shots (needs matplotlib: the 'plot' extra)."""
    from featcache.plots import plot as run

    with _user_errors():
        typer.echo(f"wrote {run(results, kind, out, metric)}")


@app.command()
def report(
    results: Path = typer.Argument(..., help="A JSONL file of result records."),
    out: Path = typer.Option(Path("report.html"), help="HTML file to write."),
) -> None:
    """One static HTML page: leaderboards, the base-novel and shots plots, every run's config and fingerprint."""
    from featcache.report import write_report

    with _user_errors():
        if not results.exists():
            raise FeatcacheError(f"no results file at {results}")
        typer.echo(f"wrote {write_report(results, out)}")


@app.command()
def demo(
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    workers: int = typer.Option(0, help="DataLoader workers (0: decode in the main process)."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Skip the pretraining: a random-weight CLIP (its numbers mean nothing)."
    ),
) -> None:
    """Offline end-to-end run: pretrain a tiny CLIP on scikit-learn's digits for a few seconds, extract, fit
    every cached method base-to-novel and print the leaderboard."""
    from featcache.demo import run_demo

    with _user_errors():
        _at_least("--workers", workers, 0)
        run_demo(cache_dir=cache_dir, workers=workers, echo=typer.echo, random_weights=random_weights)


def _columns(rows: list[dict]) -> str:
    """Rows of equal keys as a right-aligned text table (what pandas' to_string prints, without importing pandas:
    `featcache ls` then starts in about the time of `import torch`)."""
    keys = list(rows[0])
    cells = [[str(k) for k in keys]] + [[str(r[k]) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _print_summary(s: dict) -> None:
    typer.echo(f"store: {s['path']}")
    typer.echo(f"  backbone {s['backbone']} ({s['weights']}), dataset {s['dataset']} ({s['split_scheme']}), "
               f"{s['classes']} classes, D={s['dim']}, {s['dtype']}, {s['size_mb']} MB")  # fmt: skip
    for k, v in s["splits"].items():
        extra = ""
        if k in s.get("augment_views", {}):
            extra += f" + {s['augment_views'][k]} augmented views each"
        if k in s.get("skipped", {}):
            extra += f" ({s['skipped'][k]} skipped, see `featcache info`)"
        typer.echo(f"  {k:<5} {v:>8} rows{extra}")


def main() -> None:
    """The console entry point: click's usage errors and anything raised outside a command's own error
    handling also end as one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        code = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors (typer vendors click): one line, exit 2
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if not message.strip():  # `featcache` alone: the help was printed, nothing went wrong
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {' '.join(message.split())}{hint}", err=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except Exception as e:
        try:
            _crash(e)
        except typer.Exit as x:
            sys.exit(x.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
