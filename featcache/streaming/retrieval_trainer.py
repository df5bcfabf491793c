"""The streaming trainer for retrieval: the Cross-Modal Adapter with images (or video frames) flowing through both
adapted encoders, trained with the symmetric InfoNCE over in-batch caption-item pairs.

One epoch visits every training caption once (CLIP4Clip's MSR-VTT loader unfolds the 20 captions per video the
same way); a batch holds `batch_size` (caption, item) pairs, each item's frames preprocessed with the backbone's
eval transform, as the reference does (no random crops); AMP (float16 autocast) on CUDA, as the reference trains
in fp16. Frames are pooled into one item embedding by the same code that scores retrieval (featcache.retrieval),
evaluation goes through `evaluate_retrieval`, and the run is one ordinary Record. The run reports its last epoch
(CLIP4Clip's code keeps the epoch that scores best on the test split, which is model selection on test). A
checkpoint after every epoch lets a killed run resume; under torchrun every rank takes its share of each global
batch and DistributedDataParallel averages the adapter gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import MethodError
from ..adapters.base import build_config
from ..backbones import load_backbone
from ..data import ImageDataset, Item, collate, default_data_root
from ..errors import DataError
from ..fsio import atomic_write, safe_torch_load, write_json
from ..manifests import load_manifest
from ..results import Record, append_record, new_run_id
from ..retrieval import RetrievalSet, _Scorer, evaluate_retrieval, group_frames, make_set
from ..text import encode_text_truncated
from .cross_modal_adapter import CrossModalAdapter, CrossModalAdapterConfig, info_nce, lr_at
from .trainer import _distributed, saved_run, streamed_source

METHODS = {"cross-modal-adapter": CrossModalAdapterConfig}


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay (the BERT optimiser CLIP4Clip and the
    Cross-Modal Adapter train with); the learning rate is set per step from outside (lr_at)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["m"], st["v"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


def _frames_by_item(frames: list[Item], n_items: int, max_frames: int) -> list[list[int]]:
    """Row positions of each item's frames (at most max_frames, chosen uniformly as CLIP4Clip does)."""
    out: list[list[int]] = [[] for _ in range(n_items)]
    for pos, it in enumerate(frames):
        out[it.label].append(pos)
    for i, rows in enumerate(out):
        if len(rows) > max_frames:
            out[i] = [rows[j] for j in np.linspace(0, len(rows) - 1, num=max_frames, dtype=int)]
    return out


def _load_split(manifest, scheme, split: str, root: Path):
    from ..retrieval_data import resolve_retrieval_split

    return resolve_retrieval_split(manifest, scheme, split, root)


class _PairLoss(torch.nn.Module):
    """The training loss as a module whose only parameters are the adapter's (for DistributedDataParallel).

    Under torchrun the InfoNCE must see the whole global batch (its negatives are the other pairs), as a single
    process does: every rank gathers all ranks' frame and caption embeddings with autograd (CLIP4Clip's
    AllGather) and computes the same global loss; the gathered gradients come back summed over ranks, and DDP's
    averaging of the parameter gradients then gives exactly the single-process gradient."""

    def __init__(self, adapter: CrossModalAdapter, bb, scale: torch.Tensor, cfg: CrossModalAdapterConfig):
        super().__init__()
        self.adapter = adapter
        self._bb, self._scale, self._cfg = (bb,), scale, cfg

    def forward(self, images: torch.Tensor, row_item: torch.Tensor, tokens: torch.Tensor, pad_to: int = 0):
        model = self._bb[0].model
        v = F.normalize(model.encode_image(images), dim=-1)
        t = F.normalize(encode_text_truncated(model, tokens), dim=-1)
        frames, mask = group_frames(v, row_item, len(tokens))
        if pad_to:  # gather the global batch; ranks pad to the same shape and drop the padding after
            frames, mask, t = _gather(frames, mask, t, pad_to, self._cfg.max_frames)
        rset = RetrievalSet(frames, mask, t, torch.arange(len(t), device=t.device))
        sims = _Scorer(rset, self._cfg.frame_pooling, self._cfg.softmax_temperature)(slice(None), slice(None))
        return info_nce(self._scale * sims)


def _gather(frames, mask, t, rows: int, max_frames: int):
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    b, f, _ = frames.shape
    frames = F.pad(frames, (0, 0, 0, max_frames - f, 0, rows - b))
    mask = F.pad(mask, (0, max_frames - f, 0, rows - b))
    valid = torch.arange(rows, device=t.device) < b
    t = F.pad(t, (0, 0, 0, rows - b))
    frames, t = torch.cat(all_gather(frames)), torch.cat(all_gather(t))
    gathered = [torch.empty_like(x) for x in (mask, valid) for _ in range(dist.get_world_size())]
    n = dist.get_world_size()
    dist.all_gather(gathered[:n], mask)
    dist.all_gather(gathered[n:], valid)
    mask, valid = torch.cat(gathered[:n]), torch.cat(gathered[n:])
    return frames[valid], mask[valid], t[valid]


def fit_retrieval_streaming(
    method: str,
    *,
    dataset: str,
    backbone: str,
    data_root: str | Path | None = None,
    split_scheme: str | None = None,
    seed: int = 1,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    workers: int = 0,
    results: str | Path | None = None,
    save: str | Path | None = None,
    progress: bool = True,
) -> Record:
    """Train the Cross-Modal Adapter on a retrieval dataset's train split, evaluate retrieval on its test split,
    record (and save) the run."""
    if method not in METHODS:
        raise MethodError(f"unknown retrieval method '{method}'; available: {', '.join(METHODS)}")
    cfg = build_config(METHODS[method], method, options or {})
    manifest = load_manifest(dataset)
    if manifest.task != "retrieval":
        raise MethodError(f"{method} trains on caption datasets; '{manifest.id}' is a {manifest.task} dataset")
    scheme = manifest.scheme(split_scheme)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    train, test = _load_split(manifest, scheme, "train", root), _load_split(manifest, scheme, "test", root)
    video = scheme.source["kind"] == "video_frames"

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    bb = load_backbone(backbone, device=device, precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = CrossModalAdapter.for_model(bb.model, cfg).to(bb.device)
    adapter.attach(bb.model)
    try:
        record = _train_and_evaluate(method, cfg, manifest, scheme, train, test, video, bb, adapter, seed, workers,
                                     results, save, progress)  # fmt: skip
    finally:
        adapter.detach(bb.model)
    return record


def _train_and_evaluate(method, cfg, manifest, scheme, train, test, video, bb, adapter, seed, workers, results, save,
                        progress) -> Record:  # fmt: skip
    rank, world = _distributed(bb.device)
    item_rows = _frames_by_item(train.frames, len(train.items), cfg.max_frames)
    captions, cap_item = train.captions, train.caption_item
    if not captions:
        raise DataError(f"{manifest.id}: the train split has no captions")
    ds = ImageDataset(train.frames, train.source, bb.preprocess, split="train")
    scale = (
        torch.tensor(float(cfg.logit_scale), device=bb.device)
        if cfg.logit_scale is not None
        else bb.model.logit_scale.exp().detach()
    )
    step_fn = _PairLoss(adapter, bb, scale, cfg)
    stepper = step_fn
    if world > 1:
        ids = [bb.device.index] if bb.device.type == "cuda" else None
        stepper = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=ids)
    groups = adapter.param_groups()
    if cfg.optimizer not in ("bertadam", "adamw"):
        raise MethodError(f"{method}: unknown optimizer '{cfg.optimizer}'; use bertadam (the reference's) or adamw")
    kind = BertAdam if cfg.optimizer == "bertadam" else torch.optim.AdamW
    opt = kind(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    n = len(captions)
    steps_per_epoch = n // cfg.batch_size + (1 if n % cfg.batch_size >= world else 0)
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    ident = json.dumps([method, dataclasses.asdict(cfg), manifest.id, manifest.sha256, bb.id, seed], sort_keys=True)
    ident = hashlib.sha256(ident.encode()).hexdigest()
    ckpt_dir = Path(save).expanduser() if save else None
    ckpt = ckpt_dir / "checkpoint.pt" if ckpt_dir else None
    start, step, history, prior_seconds, run_id = 0, 0, [], 0.0, new_run_id()
    if ckpt is not None and ckpt.exists():
        state = safe_torch_load(ckpt, map_location=bb.device)
        if state["ident"] == ident:
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, step, history = state["epoch"], state["step"], json.loads(state["history"])
            # a resumed run is the same run: its id, and the fit time of the segments before this one
            prior_seconds, run_id = state.get("fit_seconds", 0.0), state.get("run_id", run_id)
    amp = bb.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start * steps_per_epoch, unit="step", desc=method, disable=not progress)
    for epoch in range(start, cfg.epochs):
        adapter.train()
        perm = torch.randperm(n, generator=gen)
        shards = [perm[i : i + cfg.batch_size][rank::world].tolist() for i in range(0, n, cfg.batch_size)]
        loss_sum, seen = 0.0, 0
        shards = shards[:steps_per_epoch]
        rows_of = [[r for c in caps for r in item_rows[cap_item[c]]] for caps in shards]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=rows_of, num_workers=workers, collate_fn=collate)
        for caps, batch in zip(shards, loader, strict=True):
            counts = [len(item_rows[cap_item[c]]) for c in caps]
            if batch["bad"]:
                raise DataError(f"unreadable image {batch['bad'][0][1]}; fix or remove it")
            row_item = torch.repeat_interleave(torch.arange(len(caps)), torch.tensor(counts)).to(bb.device)
            tokens = bb.tokenizer([captions[c] for c in caps]).to(bb.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, total)
            pad_to = -(-min(cfg.batch_size, n) // world) if world > 1 else 0
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):  # the reference trains in fp16
                loss = stepper(batch["x"].to(bb.device), row_item, tokens, pad_to)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum, seen = loss_sum + loss.item() * len(caps), seen + len(caps)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen)})
        if ckpt is not None and rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"ident": ident, "adapter": adapter.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                     "epoch": epoch + 1, "step": step, "history": json.dumps(history), "run_id": run_id,
                     "fit_seconds": prior_seconds + time.perf_counter() - t0}  # fmt: skip
            atomic_write(ckpt, lambda f, state=state: torch.save(state, f))
    bar.close()
    fit_seconds = prior_seconds + time.perf_counter() - t0

    rset = encode_retrieval_split(bb, test, cfg.max_frames, workers, video)
    metrics = {k: None if v is None else round(v, 4) for k, v in
               evaluate_retrieval(rset, cfg.frame_pooling, cfg.softmax_temperature).items()}  # fmt: skip
    record = Record(
        selection=adapter.selection,
        method=method, dataset=manifest.id, backbone=bb.id, protocol="retrieval", shots=0, seed=seed,
        metrics=metrics, fit_seconds=round(fit_seconds, 4), trainable_params=adapter.trainable_params(),
        config=dataclasses.asdict(cfg),
        store=streamed_source(bb, manifest, scheme.name),
        sampled={"split": "train", "n_pairs": len(captions), "n_items": len(train.items),
                 "test_items": rset.num_items, "test_captions": len(rset.caption_item)},
        fit={"epochs": len(history), "steps": step, "history": history}, run_id=run_id,
    )  # fmt: skip
    if ckpt_dir is not None and rank == 0:  # the saved run first, then the record that points to it
        final = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
        atomic_write(ckpt_dir / "state.pt", lambda f: torch.save(final, f))
        meta = {"streaming": True, "task": "retrieval", "method": method, "config": record.config,
                "metrics": metrics, "run_id": record.run_id, "backbone": bb.id, "store": record.store,
                "dataset": manifest.id, "protocol": "retrieval", "shots": 0, "seed": seed}  # fmt: skip
        write_json(ckpt_dir / "run.json", meta, indent=2)
    if results and rank == 0:
        append_record(results, record)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return record


@torch.no_grad()
def encode_retrieval_split(bb, rs, max_frames: int, workers: int, video: bool, batch_size: int = 256) -> RetrievalSet:
    """Frames and captions of a retrieval split through the (possibly adapted) encoders -> a RetrievalSet."""
    model = bb.model
    was = model.training
    model.eval()
    item_rows = _frames_by_item(rs.frames, len(rs.items), max_frames)
    keep = [r for rows in item_rows for r in rows]
    ds = ImageDataset([rs.frames[r] for r in keep], rs.source, bb.preprocess, split="test")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    feats = []
    for batch in loader:
        if batch["bad"]:
            raise DataError(f"unreadable image {batch['bad'][0][1]}; fix or remove it")
        feats.append(F.normalize(model.encode_image(batch["x"].to(bb.device)), dim=-1))
    caps = []
    for i in range(0, len(rs.captions), batch_size):
        tokens = bb.tokenizer(rs.captions[i : i + batch_size]).to(bb.device)
        caps.append(F.normalize(encode_text_truncated(model, tokens), dim=-1))
    model.train(was)
    row_item = torch.tensor([rs.frames[r].label for r in keep], device=bb.device)
    return make_set(
        torch.cat(feats), row_item, torch.cat(caps), torch.tensor(rs.caption_item, device=bb.device), len(rs.items),
        video,
    )  # fmt: skip


def evaluate_retrieval_run(
    run: str | Path,
    *,
    dataset: str,
    data_root: str | Path | None = None,
    split_scheme: str | None = None,
    device: str = "auto",
    workers: int = 0,
    results: str | Path | None = None,
) -> Record:
    """Evaluate a saved Cross-Modal Adapter run on another retrieval dataset's test split (cross-dataset
    retrieval, e.g. trained on MSR-VTT, tested on another video set)."""
    folder, meta = saved_run(run)
    method = meta["method"]
    cfg = build_config(METHODS[method], method, meta["config"])
    manifest = load_manifest(dataset)
    if manifest.task != "retrieval":
        raise MethodError(f"{method} is a retrieval run; '{manifest.id}' is a {manifest.task} dataset")
    scheme = manifest.scheme(split_scheme)
    root = Path(data_root).expanduser() if data_root else default_data_root()
    test = _load_split(manifest, scheme, "test", root)
    bb = load_backbone(meta["backbone"], device=device, precision="fp32")
    if bb.weights_sha256 != meta["store"]["weights_sha256"]:
        raise MethodError(f"the weights of {bb.id} differ from those the run was trained with")
    adapter = CrossModalAdapter.for_model(bb.model, cfg).to(bb.device)
    adapter.load_state_dict(safe_torch_load(folder / "state.pt", map_location=bb.device))
    adapter.attach(bb.model)
    try:
        rset = encode_retrieval_split(bb, test, cfg.max_frames, workers, scheme.source["kind"] == "video_frames")
    finally:
        adapter.detach(bb.model)
    metrics = {k: None if v is None else round(v, 4) for k, v in
               evaluate_retrieval(rset, cfg.frame_pooling, cfg.softmax_temperature).items()}  # fmt: skip
    record = Record(
        selection=adapter.selection,
        method=method, dataset=meta["dataset"], backbone=bb.id, protocol="retrieval", shots=0, seed=meta["seed"],
        metrics=metrics, fit_seconds=0.0, trainable_params=adapter.trainable_params(), config=meta["config"],
        store=streamed_source(bb, manifest, scheme.name),
        sampled={"from_run": meta["run_id"], "test_items": rset.num_items, "test_captions": len(rset.caption_item)},
        eval_dataset=manifest.id,
    )  # fmt: skip
    if results:
        append_record(results, record)
    return record
