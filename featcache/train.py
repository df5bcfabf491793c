"""One training loop for every trainable cached method: whole split on one device, mini-batches by index,
the method's optimiser and schedule, early stopping on val accuracy, best-on-val restore, seeded.

Optional config fields a method may declare: `drop_last` (skip a last partial batch, as Dassl's loader does),
`views` ("clean": train on the clean features even when the store has augmented views), and `warmup_epochs` /
`warmup_lr` for the `dassl-cosine` schedule."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters.base import Adapter, FitData, MethodError
from .evaluate import accuracy


@dataclass
class FitResult:
    epochs: int = 0  # epochs run
    best_epoch: int | None = None
    best_val_acc: float | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # per epoch: loss, val_acc


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    # Adam(W) as one fused kernel per step where PyTorch has it: the same update, to float rounding, as the
    # per-parameter loop, without its ~10 passes and temporaries per tensor (Tip-Adapter-F's keys are 4M values)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise MethodError(f"unknown optimizer '{cfg.optimizer}'; use adam, adamw or sgd")


def _schedule(cfg, opt, total_steps: int, steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if cfg.schedule == "dassl-cosine":
        # Dassl's cosine: CosineAnnealingLR(T_max=epochs) stepped once per epoch, behind `warmup_epochs` epochs at
        # the constant `warmup_lr` (WARMUP_TYPE constant, WARMUP_RECOUNT: the cosine starts from the top after it)
        warm, warm_lr = getattr(cfg, "warmup_epochs", 0), getattr(cfg, "warmup_lr", 0.0)

        def factor(step: int) -> float:
            e = step // steps_per_epoch
            return warm_lr / cfg.lr if e < warm else 0.5 * (1 + math.cos(math.pi * (e - warm) / cfg.epochs))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    raise MethodError(f"unknown schedule '{cfg.schedule}'; use constant, cosine or dassl-cosine")


def fit(method: Adapter, data: FitData, seed: int = 1) -> FitResult:
    """Fit `method` on `data` (never the test split). Deterministic for a given seed and device."""
    cfg = method.config
    if method.trainable and getattr(cfg, "epochs", 0) > 0:
        # optimisers import torch._dynamo on their first step (about a second): pay that before the clock starts,
        # and only when something trains, so zero-shot and the closed-form methods start fast
        import torch._dynamo  # noqa: F401
    t0 = time.perf_counter()
    if method.needs_val and (data.val_x is None or len(data.val_y) == 0):
        raise MethodError(
            f"'{method.name}' selects on a validation split and this store has none; "
            "draw one from the training rows with --val-from train"
        )
    device = data.train_x.device
    method.to(device)
    method.setup(data)
    result = FitResult()
    params = [p for p in method.parameters() if p.requires_grad]
    if method.trainable and params and cfg.epochs > 0:
        _train(method, data, seed, cfg, params, result)
    method.finish(data)
    method.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _train(method: Adapter, data: FitData, seed: int, cfg, params, result: FitResult) -> None:
    if cfg.select not in ("best-val", "last"):
        raise MethodError(f"unknown select '{cfg.select}'; use best-val or last")
    n = len(data.train_y)
    bs = min(cfg.batch_size, n)
    end = n - n % bs if getattr(cfg, "drop_last", False) else n  # Dassl drops a last partial batch
    steps = math.ceil(end / bs)
    opt = _optimizer(cfg, params)
    sched = _schedule(cfg, opt, cfg.epochs * steps, steps)
    gen = torch.Generator().manual_seed(seed)
    use_val = data.val_x is not None and len(data.val_y) > 0 and (cfg.patience > 0 or cfg.select == "best-val")
    best_acc, best_state, since = -1.0, None, 0
    rows = torch.arange(n, device=data.train_x.device)
    for epoch in range(cfg.epochs):
        method.train()
        x = data.train_x
        if data.train_aug is not None and getattr(cfg, "views", "auto") != "clean":  # one view per image per epoch
            pick = torch.randint(data.train_aug.shape[1], (n,), generator=gen).to(x.device)
            x = data.train_aug[rows, pick]
        perm = torch.randperm(n, generator=gen).to(x.device)
        total = 0.0
        for i in range(0, end, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(method.score(x[idx], data.text, None, data.classnames), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        entry = {"epoch": epoch + 1, "loss": total / end}
        result.epochs = epoch + 1
        if use_val:
            acc = accuracy(method, data.val_x, data.val_y, data.text, None, data.classnames)
            entry["val_acc"] = acc
            if acc > best_acc:
                best_acc, since = acc, 0
                result.best_epoch, result.best_val_acc = epoch + 1, acc
                if cfg.select == "best-val":
                    best_state = copy.deepcopy(method.state_dict())
            else:
                since += 1
        result.history.append(entry)
        if use_val and cfg.patience > 0 and since >= cfg.patience:
            break
    if best_state is not None:
        method.load_state_dict(best_state)
