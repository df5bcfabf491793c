"""The Python API behind `featcache fit` and `featcache eval`: find a store, run a protocol, fit, evaluate,
record, save. The CLI only parses options and calls these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .adapters import Adapter, MethodError, adapter_config, create_adapter, list_adapters
from .adapters.base import _entry, run_selection
from .backbones import parse_backbone, pick_device
from .evaluate import base_novel_metrics, evaluate
from .fsio import atomic_write, read_json, safe_torch_load, write_json
from .importers import imported_path
from .manifests import load_manifest, manifest_dir
from .protocols import Task, build_task, rows_sha256, target_eval_set, trainless_task
from .results import Record, append_record
from .retrieval import evaluate_retrieval
from .store import Store, StoreError
from .train import FitResult, fit

DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def open_store(
    dataset: str | None = None,
    backbone: str | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    split_scheme: str | None = None,
) -> Store:
    """The store for (dataset, backbone[, scheme]) or an imported store by name, checked by fingerprint."""
    from .extract import store_path  # here: the extraction code (data loading, shards) is not needed to read a store

    if name is not None:
        if dataset is not None or backbone is not None:
            raise StoreError(
                "give either --name NAME (an imported store) or --dataset NAME / --manifest FILE with --backbone, "
                "not both"
            )
        return Store.open(imported_path(name, cache_dir), expect={"split_scheme": "imported"})
    if dataset is None or backbone is None:
        raise StoreError(
            "give --dataset NAME (or --manifest FILE) and --backbone ID, or --name NAME for an imported store"
        )
    manifest = load_manifest(dataset)
    scheme = manifest.scheme(split_scheme).name
    path = store_path(cache_dir, backbone, manifest.id, scheme)
    if not path.exists():
        parse_backbone(backbone)  # an unknown backbone is the problem to report, not a store to extract with it
        how = extract_command(dataset, backbone, cache_dir, split_scheme)
        raise StoreError(f"no store for {manifest.id} ({scheme}) with {backbone}; create it with: {how}")
    expect = {"featcache_version": __version__, "backbone": backbone, "dataset": manifest.id,
              "manifest_sha256": manifest.sha256, "split_scheme": scheme}  # fmt: skip
    return Store.open(path, expect=expect)


def extract_command(
    dataset: str, backbone: str, cache_dir: str | Path | None = None, split_scheme: str | None = None
) -> str:
    """The `featcache extract` command that makes (or, with `--splits S` appended, extends) the store for a
    dataset as the user named it: `--dataset ID` for a bundled manifest, `--manifest FILE` for their own."""
    manifest = load_manifest(dataset)
    bundled = Path(manifest.path).resolve().parent == manifest_dir().resolve()
    source = f"--dataset {manifest.id}" if bundled else f"--manifest {dataset}"
    return (f"featcache extract {source} --backbone {backbone}" + (f" --split-scheme {split_scheme}" if split_scheme
            else "") + (f" --cache-dir {cache_dir}" if cache_dir else ""))  # fmt: skip


def _check_splits(store: Store, splits: tuple[str, ...], dataset: str | None, cache_dir, split_scheme) -> None:
    """The splits a fit or an evaluation reads exist, else one line saying how to add the missing one: the extract
    command that extends this store, or what an imported .npz must hold."""
    for split in splits:
        if split in store.splits:
            continue
        if store.fingerprint.get("split_scheme") == "imported" or dataset is None:
            how = f"import the features again with {split}_features and {split}_labels in the .npz"
        else:
            how = "add it with: " + extract_command(dataset, store.fingerprint["backbone"], cache_dir, split_scheme)
            how += f" --splits {split}"
        use = " (a method that trains nothing needs none: --adapter zero-shot)" if split == "train" else ""
        has = ", ".join(store.splits) or "none"
        raise StoreError(f"{store.path.name} has no {split} split (it has: {has}); {how}{use}")


def check_method(method: str) -> None:
    """Refuse a name that is no cached method, naming every method there is (full-backbone ones too)."""
    from .streaming import streamed_methods

    if method in list_adapters():
        return
    if method in streamed_methods():
        raise MethodError(
            f"'{method}' streams images through the backbone, so it does not train on a store: call "
            "featcache.streaming.trainer.fit_streaming (retrieval: retrieval_trainer.fit_retrieval_streaming); "
            "`featcache fit` does this for you"
        )
    names = ", ".join(sorted([*list_adapters(), *streamed_methods()]))
    raise MethodError(f"unknown method '{method}'; available: {names}")


def resolve_config(method: str, dataset: str, options: dict[str, Any] | None = None, shots: int | None = None) -> Any:
    """Method defaults, then the method's per-dataset defaults (Tip-Adapter's alpha/scales), its per-shots
    defaults (TaskRes's epochs), then the user's."""
    cls = _entry(method).config_cls
    per_dataset = cls.dataset_defaults(dataset) if hasattr(cls, "dataset_defaults") else {}
    per_shots = cls.shots_defaults(shots) if shots is not None and hasattr(cls, "shots_defaults") else {}
    return adapter_config(method, **{**per_dataset, **per_shots, **(options or {})})


@dataclass
class Run:
    record: Record
    adapter: Adapter
    task: Task | None  # None under the retrieval protocol (no few-shot draw)
    fit: FitResult


def fit_method(
    method: str,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    split_scheme: str | None = None,
    protocol: str = "base2novel",
    shots: int = 16,
    seed: int = 1,
    template: str | None = None,
    options: dict[str, Any] | None = None,
    val_from: str = "val",
    allow_short_classes: bool = False,
    device: str = "cpu",
    results: str | Path | None = None,
    save: str | Path | None = None,
) -> Run:
    """Fit one method under one protocol on one store, evaluate it, and return (and optionally append and
    save) its record. Model selection only ever sees the val rows drawn (the method's `val_draw`, default Dassl's
    min(K, 4) per class), never the test split; the record's `selection` says what it looked at.

    A method that trains nothing (`needs_train` false: zero-shot) draws nothing: `shots`, `val_from` and
    `allow_short_classes` do not apply, the record says shots 0, and the store needs only a test split."""
    check_method(method)
    adapter_config(method, **(options or {}))  # unknown options and values out of bounds, before any store is read
    device = str(pick_device(device))  # a device this machine lacks fails here, in one line
    store = open_store(dataset, backbone, name, cache_dir, split_scheme)
    with store:
        ds = store.fingerprint["dataset"]
        cfg = resolve_config(method, ds, options, shots)
        if (protocol == "retrieval") != (store.task == "retrieval"):
            hint = "use --protocol retrieval" if store.task == "retrieval" else "retrieval needs a retrieval dataset"
            raise MethodError(f"{store.path.name} is a {store.task} store; {hint}")
        if protocol == "retrieval":
            return _retrieval_run(method, cfg, store, seed, device, results)
        adapter = create_adapter(method, cfg, dim=store.dim, seed=seed)
        _check_splits(store, ("train", "test") if adapter.needs_train else ("test",), dataset, cache_dir, split_scheme)
        _bind_backbone(adapter, store.fingerprint, device)
        val_draw = getattr(cfg, "val_draw", "dassl")  # the method's own val policy, where it declares one
        if adapter.needs_train:
            task = build_task(method_inputs(adapter, store), protocol, shots, seed, template, val_from,
                              allow_short_classes, device, val_draw)  # fmt: skip
        else:  # nothing to draw: any store with a test split, under any protocol
            task = trainless_task(store, protocol, template, device)
            shots, val_from, val_draw = 0, "none", None
        result = fit(adapter, task.fit, seed)
        metrics = _evaluate_task(adapter, task)
        record = Record(
            method=method, dataset=ds, backbone=store.fingerprint["backbone"], protocol=protocol, shots=shots,
            seed=seed, metrics=metrics, fit_seconds=round(result.seconds, 4),
            trainable_params=adapter.trainable_params(), config=dataclasses.asdict(cfg) | {"dim": store.dim},
            store=store.fingerprint | {"path": str(store.path)},
            sampled={"n_train": len(task.train_rows), "train_rows_sha256": rows_sha256(task.train_rows),
                     "n_val": None if task.val_rows is None else len(task.val_rows),
                     "val_rows_sha256": rows_sha256(task.val_rows), "val_from": val_from, "val_draw": val_draw},
            selection=run_selection(adapter, task.fit, val_from, val_draw), template=template,
            fit={"epochs": result.epochs, "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc},
        )  # fmt: skip
        if save:  # first what the record points to, then the record: a failed save appends nothing
            save_run(save, adapter, record, task)
        if results:
            append_record(results, record)
    return Run(record, adapter, task, result)


def _retrieval_run(method: str, cfg: Any, store: Store, seed: int, device: str, results) -> Run:
    """Cached retrieval: CLIP's zero-shot captions-vs-items ranking on the store's test split."""
    import time

    if method != "zero-shot":
        raise MethodError(
            f"'{method}' is a classification method; from the cache, the retrieval protocol runs zero-shot "
            "(trained retrieval: --adapter cross-modal-adapter, which streams the images)"
        )
    t0 = time.perf_counter()
    rset = store.retrieval_set("test", device)
    metrics = {k: _r(v) for k, v in evaluate_retrieval(rset, cfg.pool, cfg.temperature).items()}
    record = Record(
        method=method, dataset=store.fingerprint["dataset"], backbone=store.fingerprint["backbone"],
        protocol="retrieval", shots=0, seed=seed, metrics=metrics, fit_seconds=0.0, trainable_params=0,
        config=dataclasses.asdict(cfg) | {"dim": store.dim}, store=store.fingerprint | {"path": str(store.path)},
        sampled={"split": "test", "n_items": rset.num_items, "n_captions": len(rset.caption_item)},
        selection="validation-free", fit={"eval_seconds": round(time.perf_counter() - t0, 4)},
    )  # fmt: skip
    if results:
        append_record(results, record)
    adapter = create_adapter(method, cfg, dim=store.dim)
    return Run(record, adapter, None, FitResult())


def method_inputs(adapter: Adapter, store: Store) -> Store:
    """The store as the method reads it: unit-norm features, or (ProLIP) the pre-projection features, refused in
    one line naming the fix when the store has none."""
    if adapter.inputs == "features":
        return store
    if not store.has_pre_projection:
        raise StoreError(
            f"'{adapter.name}' trains on pre-projection features and {store.path.name} has none; "
            "re-extract with --pre-projection (featcache extract ... --pre-projection --overwrite)"
        )
    return store.pre_projection_view()


def _bind_backbone(adapter: Adapter, fingerprint: dict[str, Any], device: str) -> None:
    """Methods that run part of the backbone (CoOp's text encoder) get the model that made the store, checked
    by its weights hash."""
    if not getattr(adapter, "needs_backbone", False):
        return
    from .backbones import load_backbone

    bid = fingerprint.get("backbone", "")
    if fingerprint.get("split_scheme") == "imported" or not bid or bid == "unknown":
        raise MethodError(f"'{adapter.name}' runs the backbone's text encoder; an imported store does not say which")
    bb = load_backbone(bid, device=device, precision="fp32")
    if bb.weights_sha256 != fingerprint.get("weights_sha256"):
        raise StoreError(f"the weights of {bid} differ from those that made the store; re-extract it")
    adapter.bind(bb)


def _evaluate_task(adapter: Adapter, task: Task) -> dict[str, float | None]:
    """The record's metrics: top-1 and top-5 accuracy (base2novel: of base and novel, each among its own classes,
    and the HM of each pair; a method that cannot score novel classes gets null novel metrics)."""
    sets = task.eval_sets()  # the test split is read here, after fitting
    if task.protocol == "base2novel":
        b, n = sets["base"], sets["novel"]
        base = evaluate(adapter, b.x, b.y, b.text, b.class_ids, b.classnames)
        novel = evaluate(adapter, n.x, n.y, n.text, n.class_ids, n.classnames) if adapter.class_agnostic else None
        return base_novel_metrics(base, novel)
    a = sets["all"]
    return {k: _r(v) for k, v in evaluate(adapter, a.x, a.y, a.text, a.class_ids, a.classnames).items()}


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def save_run(folder: str | Path, adapter: Adapter, record: Record, task: Task) -> Path:
    """state.pt (a plain state dict: torch.load(weights_only=True) reads it), rows.json, then run.json. Each is
    written atomically (featcache.fsio), run.json last, so a folder with a run.json never holds a half-written
    state.pt."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    meta = {
        "method": record.method, "config": record.config, "dim": record.config["dim"],
        "train_classnames": task.fit.classnames, "dataset": record.dataset, "backbone": record.backbone,
        "store": record.store, "template": record.template, "protocol": record.protocol, "shots": record.shots,
        "seed": record.seed, "run_id": record.run_id, "metrics": record.metrics, "featcache_version": __version__,
        "selection": record.selection,
    }  # fmt: skip
    rows = {"train_rows": task.train_rows, "val_rows": task.val_rows}
    atomic_write(folder / "state.pt", lambda f: torch.save(state, f))
    write_json(folder / "rows.json", rows)
    write_json(folder / "run.json", meta, indent=2)
    return folder


def load_run(folder: str | Path, device: str = "cpu") -> tuple[Adapter, dict[str, Any]]:
    """Rebuild a saved method from run.json and state.pt."""
    folder = Path(folder).expanduser()
    if not (folder / "run.json").exists() or not (folder / "state.pt").exists():
        raise MethodError(f"{folder} is not a saved run (expected run.json and state.pt from `featcache fit --save`)")
    meta = read_json(folder / "run.json", "saved run's run.json", "delete the run folder and refit with --save")
    options = {k: v for k, v in meta["config"].items() if k != "dim"}
    adapter = create_adapter(meta["method"], adapter_config(meta["method"], **options), dim=meta["dim"])
    _bind_backbone(adapter, meta["store"], device)
    state = safe_torch_load(folder / "state.pt", map_location=device)
    _load_state(adapter, state)
    return adapter.to(device).eval(), meta


def _load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict, after resizing tensors whose shape is set by fitting (cache keys, probe weights)."""
    for key, t in state.items():
        owner, _, attr = key.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        cur = getattr(sub, attr)
        if cur.shape != t.shape:
            if isinstance(cur, nn.Parameter):
                setattr(sub, attr, nn.Parameter(torch.empty_like(t), requires_grad=cur.requires_grad))
            else:
                sub.register_buffer(attr, torch.empty_like(t))
    module.load_state_dict(state)


def evaluate_run(
    run: str | Path,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    split_scheme: str | None = None,
    template: str | None = None,
    device: str = "cpu",
    results: str | Path | None = None,
) -> Record:
    """Evaluate a saved method on another store's test split (cross-dataset, domain generalization)."""
    device = str(pick_device(device))
    adapter, meta = load_run(run, device)
    backbone = backbone or (meta["backbone"] if name is None else None)
    store = open_store(dataset, backbone, name, cache_dir, split_scheme)
    with store:
        _check_splits(store, ("test",), dataset, cache_dir, split_scheme)
        trained = meta["store"]
        for key in ("backbone", "weights_sha256"):
            if store.fingerprint[key] != trained[key]:
                raise StoreError(
                    f"run {run} was fitted on features of {trained['backbone']}, but {store.path.name} holds "
                    f"features of {store.fingerprint['backbone']} ({key} differs); evaluate on a store of the same "
                    "backbone"
                )
        ev = target_eval_set(method_inputs(adapter, store), meta["train_classnames"],
                             template if template is not None else meta["template"], device)  # fmt: skip
        if not adapter.class_agnostic and (ev.class_ids < 0).any():
            raise MethodError(
                f"'{meta['method']}' has weights for its {len(meta['train_classnames'])} training classes only and "
                f"cannot score {store.fingerprint['dataset']}'s classes"
            )
        scores = evaluate(adapter, ev.x, ev.y, ev.text, ev.class_ids, ev.classnames)
        target = store.fingerprint["dataset"]
        sampled = {"from_run": meta["run_id"]} | ({} if adapter.needs_train else {"n_train": 0})  # zero-shot: none
        record = Record(
            method=meta["method"], dataset=meta["dataset"], backbone=meta["backbone"],
            protocol="dg" if target in DG_TARGETS else "xd", shots=meta["shots"], seed=meta["seed"],
            metrics={k: _r(v) for k, v in scores.items()}, fit_seconds=0.0, trainable_params=adapter.trainable_params(),
            config=meta["config"], store=store.fingerprint | {"path": str(store.path)}, sampled=sampled,
            template=template if template is not None else meta["template"],
            eval_dataset=target, selection=meta.get("selection"),
        )  # fmt: skip
        if results:
            append_record(results, record)
    return record
