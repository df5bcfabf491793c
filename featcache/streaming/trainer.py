"""The streaming trainer: full-backbone methods (layer-wise MMA, MaPLe) with images flowing through the encoders.

Same protocol (Dassl's few-shot draw, base-to-novel halves), the same scorer (featcache.evaluate.accuracy, on
image features produced by the adapted encoder), the same Record. Training images get a fresh random resized
crop + flip every step, as the references do; text features for evaluation are computed once per evaluation.
A checkpoint after every epoch lets a killed run resume where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..adapters import MethodError, create_adapter
from ..adapters.base import build_config
from ..api import DG_TARGETS
from ..backbones import load_backbone
from ..data import ImageDataset, augment_transform, collate, default_data_root, resolve_split
from ..errors import DataError
from ..evaluate import base_novel_metrics, evaluate
from ..fsio import atomic_write, read_json, safe_torch_load, write_json
from ..manifests import load_manifest
from ..protocols import base_novel_split, fewshot_draw, rows_sha256, select_classes
from ..results import Record, append_record, new_run_id, read_records
from ..text import encode_text_truncated
from .inject import text_tower, vision_tower
from .layer_mma import LayerMMA, LayerMMAConfig
from .maple import MaPLe, MaPLeConfig
from .partial import encode_from_tokens, encode_text_from_prefix, open_tokens, text_prefix

METHODS = {"layer-mma": LayerMMAConfig, "maple": MaPLeConfig}


def streaming_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """The method's config with --set style overrides (strings are coerced to the field's type)."""
    if method not in METHODS:
        raise MethodError(f"unknown streaming method '{method}'; available: {', '.join(METHODS)}")
    return build_config(METHODS[method], method, options or {})


def _build(method: str, cfg: Any, backbone) -> torch.nn.Module:
    if method == "layer-mma":
        mod = LayerMMA.for_model(backbone.model, cfg)
        if not mod.blocks:
            depth = min(len(text_tower(backbone.model)[1]), len(vision_tower(backbone.model)[1]))
            raise MethodError(
                f"layer-mma: first_block {cfg.first_block} is past the last block of {backbone.id} ({depth} blocks); "
                f"pass --set first_block=K with K <= {depth}"
            )
        return mod
    return MaPLe.for_model(backbone.model, backbone.tokenizer, cfg)


def _prompts(method: str, cfg: Any, classnames: list[str]) -> list[str]:
    if method == "layer-mma":
        return [cfg.template.format(c) for c in classnames]
    return [f"{cfg.ctx_init} {c}." for c in classnames]  # MaPLe: the first n_ctx words become the context


def streamed_source(bb, manifest, scheme: str) -> dict[str, Any]:
    """What a streaming run's record keeps in place of a store fingerprint: the backbone's fingerprint and the
    dataset manifest it read the images through."""
    return {**bb.fingerprint(), "dataset": manifest.id, "manifest_sha256": manifest.sha256, "split_scheme": scheme,
            "featcache_version": __version__, "path": None, "streaming": True}  # fmt: skip


def saved_run(run: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, run.json) of a run saved by `featcache fit --save`, or a one-line error."""
    folder = Path(run).expanduser()
    if not (folder / "run.json").exists() or not (folder / "state.pt").exists():
        raise MethodError(f"{folder} is not a saved run (expected run.json and state.pt from `featcache fit --save`)")
    return folder, read_json(folder / "run.json", "saved run's run.json", "delete the run folder and refit with --save")


def _recorded(results: str | Path, run_id: str) -> bool:
    """Whether the results file already holds this run (a finished run resumed from its checkpoint is the same
    run, with the same id: appending again would count it twice in every leaderboard)."""
    path = Path(results).expanduser()
    return path.exists() and any(r.get("run_id") == run_id for r in read_records(path))


def _lr_at(cfg: Any, epoch: int) -> float:
    """Dassl's schedule, stepped per epoch: cosine over `epochs`; with MaPLe's constant warm-up, the first
    epochs run at 1e-5 and the cosine starts after them."""
    warm = getattr(cfg, "warmup_epochs", 0)
    if epoch < warm:
        return 1e-5
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - warm) / max(1, cfg.epochs)))


def fit_streaming(
    method: str,
    *,
    dataset: str,
    backbone: str,
    data_root: str | Path | None = None,
    split_scheme: str | None = None,
    protocol: str = "base2novel",
    shots: int = 16,
    seed: int = 1,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    workers: int = 0,
    results: str | Path | None = None,
    save: str | Path | None = None,
    allow_short_classes: bool = False,
    progress: bool = True,
    cache_layer: int | None = None,
    cache_dir: str | Path | None = None,
) -> Record:
    """Train a full-backbone method on a dataset's images under a protocol; evaluate, record, save.
    With `cache_layer`, layer-mma reads the vision tokens entering that block from the partial-backbone cache
    (`featcache extract --cache-layer`) and runs only the blocks after it."""
    if protocol not in ("base2novel", "fewshot"):
        raise MethodError(f"unknown protocol '{protocol}'; use base2novel or fewshot")
    cfg = streaming_config(method, options)
    manifest = load_manifest(dataset)
    scheme = manifest.scheme(split_scheme)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    splits = {s: resolve_split(manifest, scheme, s, root) for s in ("train", "test")}
    val_split = resolve_split(manifest, scheme, "val", root) if "val" in scheme.splits else None
    y_train = [it.label for it in splits["train"].items]
    y_val = [it.label for it in val_split.items] if val_split else None
    rows, _ = fewshot_draw(y_train, y_val, shots, seed, manifest.classnames, allow_short_classes)
    drawn = [y_train[r] for r in rows]
    base, novel = base_novel_split(drawn) if protocol == "base2novel" else (sorted(set(drawn)), [])
    remap = {c: i for i, c in enumerate(base)}
    train_rows = [r for r in rows if y_train[r] in remap]
    train_items = [dataclasses.replace(splits["train"].items[r], label=remap[y_train[r]]) for r in train_rows]

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    bb = load_backbone(backbone, device=device, precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = _build(method, cfg, bb).to(bb.device)
    adapter.attach(bb.model)
    tokens_cache = None
    if cache_layer is not None:
        if method != "layer-mma" or adapter.vision_blocks[0] < cache_layer:
            raise MethodError("the partial cache serves layer-mma when its first adapted block comes after the layer")
        tokens_cache = open_tokens(bb, manifest, scheme.name, cache_layer, cache_dir)
        tr_tokens, tr_views = tokens_cache.rows("train", train_rows, aug=True)
    classnames = [manifest.classnames[c] for c in base]
    tokens = bb.tokenizer(_prompts(method, cfg, classnames)).to(bb.device)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=getattr(cfg, "momentum", 0.9),
                          weight_decay=getattr(cfg, "weight_decay", 5e-4))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    ds = ImageDataset(train_items, splits["train"].source, augment_transform(bb.preprocess_cfg), split="train")
    rank, world = _distributed(bb.device)
    step_fn = _StepLoss(adapter, bb, tokens, cache_layer)
    stepper = step_fn
    if world > 1:  # every rank computes its shard of each global batch; DDP averages the gradients
        ids = [bb.device.index] if bb.device.type == "cuda" else None
        stepper = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=ids)
    n_train = len(train_items)
    full_batches = n_train // cfg.batch_size
    last = n_train - full_batches * cfg.batch_size
    steps_per_epoch = full_batches + (1 if last >= world else 0)  # a last batch smaller than the ranks is dropped
    epochs = cfg.epochs
    ident = json.dumps([method, dataclasses.asdict(cfg), dataset, backbone, protocol, shots, seed], sort_keys=True)
    ckpt_dir = Path(save).expanduser() if save else None
    ckpt = ckpt_dir / "checkpoint.pt" if ckpt_dir else None
    start, step, history, prior_seconds, run_id = 0, 0, [], 0.0, new_run_id()
    if ckpt is not None and ckpt.exists():
        state = safe_torch_load(ckpt, map_location=bb.device)
        if state["ident"] == hashlib.sha256(ident.encode()).hexdigest():
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, step, history = state["epoch"], state["step"], json.loads(state["history"])
            # a resumed run is the same run: its id, and the fit time of the segments before this one
            prior_seconds, run_id = state.get("fit_seconds", 0.0), state.get("run_id", run_id)
    t0 = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, unit="step", desc=method,
               disable=not progress)  # fmt: skip
    scale = bb.model.logit_scale.exp().detach()
    amp = bb.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    for epoch in range(start, epochs):
        adapter.train()
        ds.preprocess_seed = seed * 1000 + epoch  # this epoch's crops and flips, the same after a resume
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, epoch)
        total, n = 0.0, 0
        perm = torch.randperm(n_train, generator=gen)
        pick = (
            torch.randint(tr_views.shape[1], (n_train,), generator=gen)
            if tokens_cache and tr_views is not None
            else None
        )
        shards = [perm[i : i + cfg.batch_size][rank::world].tolist() for i in range(0, n_train, cfg.batch_size)]
        shards = shards[:steps_per_epoch]
        if tokens_cache is None:
            loader = torch.utils.data.DataLoader(ds, batch_sampler=shards, num_workers=workers, collate_fn=collate)
            batches = ((b["pos"], b["x"], b["bad"]) for b in loader)
        else:
            batches = ((s, tr_views[s, pick[s]] if pick is not None else tr_tokens[s], []) for s in shards)
        for pos, images, bad in batches:
            if bad:
                raise DataError(f"unreadable image {bad[0][1]}")
            labels = torch.tensor([train_items[i].label for i in pos], device=bb.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):  # AMP where available, as the references
                loss = stepper(images.to(bb.device), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            total, n = total + loss.item() * len(labels), n + len(labels)
            bar.update(1)
        if world > 1:  # the epoch's mean loss over every rank's rows, not rank 0's share alone
            import torch.distributed as dist

            sums = torch.tensor([total, float(n)], dtype=torch.float64, device=bb.device)
            dist.all_reduce(sums)
            total, n = float(sums[0]), int(sums[1])
        history.append({"epoch": epoch + 1, "loss": total / max(1, n)})
        if ckpt is not None and rank == 0:  # resumable: a killed run restarts from the last finished epoch
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"ident": hashlib.sha256(ident.encode()).hexdigest(), "adapter": adapter.state_dict(),
                     "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": epoch + 1, "step": step,
                     "history": json.dumps(history), "run_id": run_id,
                     "fit_seconds": prior_seconds + time.perf_counter() - t0}  # fmt: skip
            atomic_write(ckpt, lambda f, state=state: torch.save(state, f))
    bar.close()
    fit_seconds = prior_seconds + time.perf_counter() - t0

    zs = create_adapter("zero-shot", dim=bb.embed_dim)  # the one scorer, on features from the adapted encoder
    zs.config.logit_scale = float(scale)
    test_tokens = None
    if tokens_cache is not None and "test" in tokens_cache.h5["splits"]:
        test_tokens = tokens_cache.rows("test", list(range(len(splits["test"].items))), aug=False)[0]
    metrics = _evaluate(adapter, bb, method, cfg, manifest, splits["test"], base, novel, zs, workers,
                        test_tokens, cache_layer)  # fmt: skip
    if tokens_cache is not None:
        tokens_cache.close()
    record = Record(
        selection=adapter.selection,
        method=method, dataset=manifest.id, backbone=bb.id, protocol=protocol, shots=shots, seed=seed,
        metrics=metrics, fit_seconds=round(fit_seconds, 4), trainable_params=adapter.trainable_params(),
        config=dataclasses.asdict(cfg),
        store=streamed_source(bb, manifest, scheme.name),
        sampled={"n_train": len(train_rows), "train_rows_sha256": rows_sha256(train_rows)},
        fit={"epochs": len(history), "history": history}, run_id=run_id,
    )  # fmt: skip
    if ckpt_dir is not None and rank == 0:  # the saved run first, then the record that points to it
        final = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
        atomic_write(ckpt_dir / "state.pt", lambda f: torch.save(final, f))
        meta = {"streaming": True, "method": method, "config": record.config, "metrics": metrics,
                "run_id": record.run_id, "backbone": bb.id, "store": record.store, "dataset": manifest.id,
                "protocol": protocol, "shots": shots, "seed": seed}  # fmt: skip
        write_json(ckpt_dir / "run.json", meta, indent=2)
    if results and rank == 0 and not _recorded(results, run_id):  # a rerun of a finished run adds no duplicate
        append_record(results, record)
    adapter.detach(bb.model)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written its files
        dist.destroy_process_group()
    return record


class _StepLoss(torch.nn.Module):
    """One training loss as a module whose only parameters are the method's, so DistributedDataParallel can
    synchronise exactly those (the frozen backbone is referenced, not owned).

    The text encoder runs on the EOT-truncated tokens (exact: see featcache.text). With `cache_layer`
    (layer-mma from the partial-backbone cache), `images` are the cached vision tokens entering block
    cache_layer+1, and the text half is cached as well: the text tokens entering the first adapted text block are
    computed at the first step (no gradient, under that step's autocast) and every step runs only the adapted
    text blocks."""

    def __init__(self, adapter: torch.nn.Module, bb, tokens: torch.Tensor, cache_layer: int | None):
        super().__init__()
        self.adapter = adapter
        self._bb, self._tokens, self._layer = (bb,), tokens, cache_layer
        # layer-mma's text prompts are fixed and its text blocks before blocks[0] carry no adapter
        self._text_layer = adapter.blocks[0] if cache_layer is not None else None
        self._text_prefix: tuple = ()  # (TextInput,) once computed; a plain attribute, never a DDP buffer

    def text_features(self) -> torch.Tensor:
        model = self._bb[0].model
        if self._text_layer is None:
            return encode_text_truncated(model, self._tokens)
        if not self._text_prefix:
            with torch.no_grad():
                self._text_prefix = (text_prefix(model, self._tokens, self._text_layer),)
        return encode_text_from_prefix(model, self._text_prefix[0], self._text_layer)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = self._bb[0].model
        if self._layer is None:
            v = model.encode_image(images)
        else:
            v = encode_from_tokens(model, images.float(), self._layer)
        t = F.normalize(self.text_features(), dim=-1)
        logits = model.logit_scale.exp().detach() * F.normalize(v, dim=-1) @ t.t()
        return F.cross_entropy(logits, labels)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): 1 process unless started by torchrun (gloo on cpu, nccl on cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def _evaluate(
    adapter, bb, method, cfg, manifest, test, base, novel, zs, workers, test_tokens=None, cache_layer=None
) -> dict[str, float | None]:
    adapter.eval()
    feats, labels = [], []
    if test_tokens is not None:  # from the partial cache: only the blocks after the cached layer run
        for i in range(0, len(test_tokens), 256):
            chunk = test_tokens[i : i + 256].to(bb.device).float()
            feats.append(F.normalize(encode_from_tokens(bb.model, chunk, cache_layer), dim=-1))
        labels = [it.label for it in test.items]
    else:
        ds = ImageDataset(test.items, test.source, bb.preprocess, split="test")
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers, collate_fn=collate)
        for batch in loader:
            if batch["bad"]:
                raise DataError(f"unreadable image {batch['bad'][0][1]}")
            feats.append(F.normalize(bb.model.encode_image(batch["x"].to(bb.device)), dim=-1))
            labels += [test.items[i].label for i in batch["pos"]]
    x, y = torch.cat(feats), torch.tensor(labels, device=bb.device)

    def score(classes: list[int]) -> dict[str, float | None]:  # top-1 and top-5 (featcache.evaluate)
        if not classes:
            return {"acc": None, "acc5": None}
        xs, ys = select_classes(x, y, classes)
        names = [manifest.classnames[c] for c in classes]
        tokens = bb.tokenizer(_prompts(method, cfg, names)).to(bb.device)
        t = F.normalize(encode_text_truncated(bb.model, tokens), dim=-1)
        return evaluate(zs, xs, ys, t)

    b = score(base)
    if not novel:
        return {k: None if v is None else round(v, 4) for k, v in b.items()}
    return base_novel_metrics(b, score(novel))


def evaluate_streaming_run(
    run: str | Path,
    *,
    dataset: str,
    data_root: str | Path | None = None,
    split_scheme: str | None = None,
    device: str = "auto",
    workers: int = 0,
    results: str | Path | None = None,
) -> Record:
    """Evaluate a saved layer-mma / maple run on another dataset's test images with its own class names
    (cross-dataset; domain generalization for the ImageNet shifts)."""
    folder, meta = saved_run(run)
    method = meta["method"]
    cfg = streaming_config(method, meta["config"])
    bb = load_backbone(meta["backbone"], device=device, precision="fp32")
    if bb.weights_sha256 != meta["store"]["weights_sha256"]:
        raise MethodError(f"the weights of {bb.id} differ from those the run was trained with")
    adapter = _build(method, cfg, bb).to(bb.device)
    adapter.load_state_dict(safe_torch_load(folder / "state.pt", map_location=bb.device))
    adapter.attach(bb.model)
    manifest = load_manifest(dataset)
    scheme = manifest.scheme(split_scheme)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    test = resolve_split(manifest, scheme, "test", root)
    zs = create_adapter("zero-shot", dim=bb.embed_dim)
    zs.config.logit_scale = float(bb.model.logit_scale.exp())
    classes = list(range(len(manifest.classnames)))
    metrics = _evaluate(adapter, bb, method, cfg, manifest, test, classes, [], zs, workers)
    adapter.detach(bb.model)
    record = Record(
        selection=adapter.selection,
        method=method, dataset=meta["dataset"], backbone=bb.id,
        protocol="dg" if manifest.id in DG_TARGETS else "xd", shots=meta["shots"], seed=meta["seed"],
        metrics=metrics, fit_seconds=0.0, trainable_params=adapter.trainable_params(), config=meta["config"],
        store=streamed_source(bb, manifest, scheme.name),
        sampled={"from_run": meta["run_id"]}, eval_dataset=manifest.id,
    )  # fmt: skip
    if results:
        append_record(results, record)
    return record
