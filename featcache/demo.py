"""`featcache demo`: the whole offline path on data that ships with scikit-learn.

A random-weight CLIP predicts one class for everything, so a demo on it shows nothing about the methods.
The demo therefore first trains the tiny CLIP contrastively for a few seconds on the digits' training split
(all ten classes, as CLIP's pretraining sees broad concepts; deterministic, CPU, no network), so that its
zero-shot accuracy is well above chance. Then it extracts the store, runs every cached method base-to-novel
(fitted on the five base digits, 16 shots, three seeds) and prints the leaderboard: what a method gains on
the base classes and what it keeps on the novel ones is then the real trade-off the papers measure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from .extract import extract
from .leaderboard import format_table, write_leaderboard
from .store import Store, default_cache_dir
from .sweep import load_sweep, pending, run_sweep

DEMO_ARCH = "featcache-tiny"
DEMO_DATASET = "digits"
# contrastive pretraining of the tiny CLIP: enough to reach ~70 % zero-shot on the digits' test split
PRETRAIN = {"steps": 120, "batch_size": 128, "lr": 1e-3, "seed": 0}


def pretrain_tiny(cache_dir: Path, echo: Callable[[str], None] = print) -> Path:
    """Train featcache-tiny contrastively on the digits' training images against their class prompts (every
    template of the manifest), and save its state dict. Reused when it exists (same settings, same file)."""
    from .backbones import load_backbone
    from .data import ImageDataset, default_data_root, resolve_split
    from .manifests import load_manifest
    from .text import encode_text_truncated

    tag = hashlib.sha256(repr(sorted(PRETRAIN.items())).encode()).hexdigest()[:8]
    path = cache_dir / "demo" / f"{DEMO_ARCH}-digits-{tag}.pt"
    if path.exists():
        echo(f"reusing the pretrained tiny CLIP {path}")
        return path
    t0 = time.perf_counter()
    bb = load_backbone(f"{DEMO_ARCH}/random", device="cpu", precision="fp32")
    manifest = load_manifest(DEMO_DATASET)
    split = resolve_split(manifest, manifest.scheme(None), "train", default_data_root())
    ds = ImageDataset(split.items, split.source, bb.preprocess)
    x = torch.stack([ds[i][1] for i in range(len(ds))])
    y = torch.tensor([it.label for it in split.items])
    tokens = bb.tokenizer([t.format(c) for t in manifest.templates for c in manifest.classnames])
    n_templates, n_classes = len(manifest.templates), len(manifest.classnames)
    model = bb.model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.1)
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAIN["seed"])
        for _ in range(PRETRAIN["steps"]):
            idx = torch.randint(len(x), (PRETRAIN["batch_size"],), generator=gen)
            img = F.normalize(model.encode_image(x[idx]), dim=-1)
            txt = F.normalize(encode_text_truncated(model, tokens), dim=-1).view(n_templates, n_classes, -1)
            # CLIP's image-to-text contrastive loss over the (deduplicated) class prompts of every template
            logits = model.logit_scale.exp() * torch.einsum("bd,tcd->tbc", img, txt)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(n_templates))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    echo(f"pretrained the tiny CLIP on {len(x)} digit images in {time.perf_counter() - t0:.1f} s "
         f"({PRETRAIN['steps']} steps, final loss {loss.item():.2f}) -> {path}")  # fmt: skip
    return path


def run_demo(
    cache_dir: str | Path | None = None,
    workers: int = 0,
    echo: Callable[[str], None] = print,
    random_weights: bool = False,
) -> Path:
    """Pretrain (or, with random_weights, skip that), extract `digits`, run the digits sweep (every cached
    method, base-to-novel, 3 seeds) and print its leaderboard and how to read it."""
    t_start = time.perf_counter()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    echo(f"featcache demo: {DEMO_DATASET} (scikit-learn's bundled 8x8 digits, upscaled) through {DEMO_ARCH}, "
         "a 64-dimensional CLIP small enough for a CPU.")  # fmt: skip
    if random_weights:
        backbone = f"{DEMO_ARCH}/random"
        echo("NOTE: RANDOM weights (fixed seed): the features, and any accuracy computed from them, mean nothing; "
             "this only shows that the pipeline runs.")  # fmt: skip
    else:
        backbone = f"{DEMO_ARCH}/{pretrain_tiny(cache, echo)}"
    t0 = time.perf_counter()
    path = extract(DEMO_DATASET, backbone, cache_dir=cache, workers=workers, progress=True, pre_projection=True)
    with Store.open(path) as st:
        s = st.summary()
    echo(f"\nstore ready in {time.perf_counter() - t0:.1f} s: {s['path']} ({s['size_mb']} MB)")
    echo(
        f"  fingerprint: backbone={s['backbone']} weights_sha256={s['weights_sha256'][:12]} "
        f"dataset={s['dataset']}/{s['split_scheme']} dtype={s['dtype']} featcache={s['featcache_version']}"
    )
    echo(f"  {s['classes']} classes, D={s['dim']}, {s['templates']} prompt templates")
    for k, v in s["splits"].items():
        echo(f"  {k:<5} {v:>6} rows")
    results = cache / ("demo_results_random.jsonl" if random_weights else "demo_results.jsonl")
    sweep = load_sweep(sweep_file("digits"))
    sweep.jobs = [dataclasses.replace(j, backbone=backbone) for j in sweep.jobs]
    todo = len(pending(sweep, results))
    echo(f"\nrunning the digits sweep (every cached-feature method but CoOp, base-to-novel: fit on digits 0-4, "
         "16 shots, seeds 1-3)"
         f" -> {results}")  # fmt: skip
    if todo < len(sweep.jobs):
        echo(f"  reusing {len(sweep.jobs) - todo} of {len(sweep.jobs)} runs already recorded there "
             f"(delete {results.name} to run them again); running {todo}")  # fmt: skip
    run_sweep(sweep, results, cache_dir=cache, progress=True, echo=echo)
    wide, _, _ = write_leaderboard(results, "base2novel")
    wide = wide[wide["backbone"] == backbone]
    echo(f"\nleaderboard (backbone {backbone}):")
    echo(format_table(wide.drop(columns="backbone"), "base2novel"))
    if random_weights:
        echo("(random backbone: these accuracies show the pipeline runs, not how good any method is)")
    else:
        echo(_reading(wide))
    echo(
        f"\nplot it: featcache plot {results} --kind base-novel --out demo.png   "
        f"(or a page: featcache report {results} --out demo.html)"
    )
    echo(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return path


def _reading(wide) -> str:
    """One line saying what the table shows, computed from it: who raised base accuracy over zero-shot and who
    kept the novel accuracy."""
    rows = {r["method"]: r for _, r in wide.iterrows()}
    zs = rows.get("zero-shot")
    if zs is None:
        return ""
    gain = [m for m, r in rows.items() if m != "zero-shot" and r["average/base"] > zs["average/base"] + 1]
    kept = [m for m in gain if rows[m]["average/novel"] == rows[m]["average/novel"]
            and rows[m]["average/novel"] >= zs["average/novel"] - 1]  # fmt: skip
    lost = [m for m in gain if m not in kept]
    return (
        f"\nreading it: zero-shot scores base {zs['average/base']:.1f} / novel {zs['average/novel']:.1f}. "
        f"Fitting on the base digits raised base accuracy for {', '.join(gain) or 'no method'}; "
        f"of those, {', '.join(kept) or 'none'} kept novel accuracy (within 1 point) and "
        f"{', '.join(lost) or 'none'} traded it away (a linear probe cannot score novel classes at all). "
        "The harmonic mean (HM) ranks that trade-off."
    )


def sweep_file(name: str) -> Path:
    """A bundled sweep: the checkout's benchmarks/sweeps/, or the copy installed in the package."""
    src = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps" / f"{name}.toml"
    if src.exists():
        return src
    return Path(str(resources.files("featcache") / "sweeps" / f"{name}.toml"))


__all__ = ["run_demo", "pretrain_tiny", "sweep_file"]
