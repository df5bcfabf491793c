"""Benchmark sweeps: a TOML grid of backbones x datasets x methods x shots x seeds x named variants, run
resumably into a JSONL results file (one Record per run). Format: benchmarks/sweeps/README.md."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import queue
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_config, list_adapters
from .adapters.base import _entry, build_config
from .errors import FeatcacheError
from .manifests import load_manifest
from .results import Record, append_record, read_records

if TYPE_CHECKING:
    from .sweep_submitit import ClusterOptions

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PROTOCOLS = ("base2novel", "fewshot", "xd", "dg", "retrieval")


def _streamed() -> set[str]:
    """Full-backbone methods: they read the dataset's images (data_root), not a store."""
    from .streaming import streamed_methods

    return set(streamed_methods())


class SweepError(FeatcacheError):
    """A sweep file is malformed."""


@dataclass(frozen=True)
class Job:
    """One fit (and, for xd/dg, its evaluations on the targets)."""

    backbone: str
    dataset: str
    method: str
    variant: str | None
    options: tuple[tuple[str, Any], ...]
    protocol: str
    shots: int
    seed: int
    targets: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.variant or self.method

    def key(self, target: str | None = None) -> str:
        """Stable id of one record of this job (the fit, or its evaluation on one target)."""
        ident = [self.backbone, self.dataset, self.method, self.variant, list(self.options), self.protocol,
                 self.shots, self.seed, target]  # fmt: skip
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def keys(self) -> list[str]:
        return [self.key(t) for t in self.targets] if self.targets else [self.key()]


@dataclass
class Sweep:
    name: str
    protocol: str
    jobs: list[Job]
    template: str | None = None
    val_from: str = "val"
    cache_dir: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    device: str | None = None  # None: cached fits on cpu, streaming methods on cuda when there is one (`auto`)


TOP_KEYS = ("name", "protocol", "backbones", "datasets", "source", "targets", "methods", "shots", "seeds",
            "template", "val_from", "cache_dir", "data_root", "device", "options", "variants")  # fmt: skip
VARIANT_KEYS = ("name", "method", "options")
VAL_FROM = ("val", "train", "none")
MAX_SEED = 2**32 - 1  # numpy's limit; torch and random take it too


def load_sweep(path: str | Path, datasets: list[str] | None = None) -> Sweep:
    """Parse and check a sweep file before anything runs; every mistake names the key. Unknown keys are refused
    at every level (a typo such as `shotz` would otherwise run the defaults), and every method's options are
    built into its config, so a value outside the option's bounds fails here rather than in run 37.

    `datasets` (ids or manifest paths: `featcache sweep --dataset/--manifest`) replace the file's `datasets`, or
    for xd/dg its `source` (then exactly one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SweepError(f"no sweep file at {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML ({e})") from e

    def refuse_unknown(table: dict, allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                raise SweepError(f"{path}: unknown key {key!r}{where}; allowed: {', '.join(allowed)}")

    def need(key: str, kind: type, default: Any = None) -> Any:
        v = raw.get(key, default)
        if v is None:
            raise SweepError(f"{path}: '{key}' is missing")
        if not isinstance(v, kind):
            raise SweepError(f"{path}: '{key}' must be a {'table' if kind is dict else kind.__name__}")
        return v

    def strings(key: str, default: Any = None) -> list[str]:
        v = need(key, list, default)
        if not v or not all(isinstance(x, str) and x for x in v):
            raise SweepError(f"{path}: '{key}' must be a non-empty list of names, got {v!r}")
        return v

    def counts(key: str, default: list[int], what: str) -> list[int]:
        v = need(key, list, default)
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_SEED]
        if not v or bad:
            got = repr(bad[0]) if bad else "[]"
            raise SweepError(f"{path}: '{key}' must be a non-empty list of {what}, got {got}")
        return v

    refuse_unknown(raw, TOP_KEYS, "")
    protocol = need("protocol", str)
    if protocol not in PROTOCOLS:
        raise SweepError(f"{path}: 'protocol' must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    cross = protocol in ("xd", "dg")
    for key in ("source", "targets") if not cross else ("datasets",):
        if key in raw:
            uses = "'source' and 'targets'" if cross else "'datasets'"
            raise SweepError(f"{path}: '{key}' does not apply to protocol {protocol}, which uses {uses}")
    for key in ("name", "template", "cache_dir", "data_root", "device"):
        if key in raw:
            need(key, str)
    if "device" in raw and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", raw["device"]):
        raise SweepError(f"{path}: 'device' must be auto, cpu, cuda, cuda:N or mps, got {raw['device']!r}")
    val_from = need("val_from", str, "train" if cross else "val")
    if val_from not in VAL_FROM:
        raise SweepError(f"{path}: 'val_from' must be one of {', '.join(VAL_FROM)}, got {val_from!r}")
    backbones = strings("backbones")
    methods = need("methods", list, [])
    shots = counts("shots", [0] if protocol == "retrieval" else [16], "whole numbers >= 0 (0: every training row)")
    seeds = counts("seeds", [1, 2, 3], f"whole numbers in 0..{MAX_SEED}")
    known = set(list_adapters()) | _streamed()
    for m in methods:
        if m not in known:
            raise SweepError(f"{path}: unknown method {m!r} in 'methods'; available: {', '.join(sorted(known))}")
    per_method = need("options", dict, {})
    for m, opts in per_method.items():
        if m not in known:
            raise SweepError(f"{path}: unknown method {m!r} in [options]; available: {', '.join(sorted(known))}")
        if not isinstance(opts, dict):
            raise SweepError(f"{path}: [options] {m} must be a table of options, e.g. {m} = {{ epochs = 10 }}")
    variants = need("variants", list, [])
    rows: list[tuple[str, str | None, dict]] = [(m, None, dict(per_method.get(m, {}))) for m in methods]
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or v.get("method") not in known:
            raise SweepError(f"{path}: variants[{i}] needs a 'name' and a known 'method'")
        refuse_unknown(v, VARIANT_KEYS, f" in variants[{i}] ({v['name']})")
        if not isinstance(v.get("options", {}), dict):
            raise SweepError(f"{path}: variants[{i}] ({v['name']}): 'options' must be a table")
        rows.append((v["method"], v["name"], {**per_method.get(v["method"], {}), **v.get("options", {})}))
    if not rows:
        raise SweepError(f"{path}: no 'methods' and no [[variants]]: nothing to run")
    names = [var for _, var, _ in rows if var is not None]
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: two [[variants]] are named {next(n for n in names if names.count(n) > 1)!r}")
    for m, var, opts in rows:  # option names and bounds, before any run starts
        try:
            _method_config(m, opts)
        except FeatcacheError as e:
            where = f"variants ({var})" if var else f"[options] {m}"
            raise SweepError(f"{path}: {where}: {e}") from None

    if cross:
        if datasets and len(datasets) != 1:
            raise SweepError(f"protocol {protocol} fits on one source: give one --dataset or --manifest")
        sources = list(datasets) if datasets else [need("source", str)]
        targets = tuple(strings("targets"))
        fit_protocol = "fewshot"
    else:
        sources = list(datasets) if datasets else strings("datasets")
        targets = ()
        fit_protocol = protocol
    for d in [*sources, *targets]:
        load_manifest(d)  # unknown datasets fail here, with the list of known ones
    jobs = [
        Job(b, d, m, var, tuple(sorted(opts.items())), fit_protocol, int(k), int(s), targets)
        for b in backbones for d in sources for (m, var, opts) in rows for k in _shots(m, shots) for s in seeds
    ]  # fmt: skip
    return Sweep(
        name=raw.get("name", path.stem), protocol=protocol, jobs=jobs, template=raw.get("template"),
        val_from=val_from, cache_dir=raw.get("cache_dir"), raw=raw, device=raw.get("device"),
    )  # fmt: skip


def _shots(method: str, shots: list[int]) -> list[int]:
    """The shot counts a method runs at: one run (recorded as 0 shots) for a method that trains nothing, since
    every shot count would give the same numbers."""
    if method in list_adapters() and not _entry(method).cls.needs_train:
        return [0]
    return shots


def _method_config(method: str, options: dict[str, Any]) -> Any:
    """The config a run of `method` with these options would get (raises on an unknown option or a bad value)."""
    from .streaming import streamed_methods

    streamed = streamed_methods()
    if method in streamed:
        return build_config(streamed[method], method, options)
    return adapter_config(method, **options)


def _bundled(manifest: Any) -> bool:
    from .manifests import manifest_dir

    return Path(manifest.path).resolve().parent == manifest_dir().resolve()


def _pre_projection(method: str) -> bool:
    """Whether a method trains on pre-projection features (prolip): its store needs `extract --pre-projection`."""
    return method in list_adapters() and _entry(method).cls.inputs == "pre-projection"


def missing_stores(sweep: Sweep, cache_dir: str | Path | None) -> list[tuple[str, str, str]]:
    """(backbone, dataset, extract command) for every store the sweep needs that does not exist."""
    from .extract import store_path

    # full-backbone methods read images, not stores (a coop run reads a store: it stays in)
    streamed = _streamed()
    need = {(j.backbone, d) for j in sweep.jobs if j.method not in streamed for d in (j.dataset, *j.targets)}
    pre = {(j.backbone, d) for j in sweep.jobs if _pre_projection(j.method) for d in (j.dataset, *j.targets)}
    out = []
    for b, d in sorted(need):
        m = load_manifest(d)
        if not store_path(cache_dir, b, m.id, m.default_scheme).exists():
            source = f"--dataset {d}" if _bundled(m) else f"--manifest {d}"  # a manifest path is extracted as one
            cmd = f"featcache extract {source} --backbone {b}" + (f" --cache-dir {cache_dir}" if cache_dir else "")
            out.append((b, d, cmd + (" --pre-projection" if (b, d) in pre else "")))
    return out


def pending(sweep: Sweep, results: str | Path) -> list[Job]:
    """Jobs with at least one record still missing (failed runs are retried)."""
    done = set()
    if Path(results).expanduser().exists():
        done = {r["sweep_key"] for r in read_records(results) if r.get("sweep_key") and not r.get("error")}
    return [j for j in sweep.jobs if not all(k in done for k in j.keys())]


def run_job(job: Job, sweep: Sweep, cache_dir: str | None, runs_dir: str, threads: int | None) -> list[Record]:
    """Fit one job (evaluate on its targets for xd/dg); a failure becomes a record with its error."""
    import torch

    from .api import evaluate_run, fit_method

    if threads:
        torch.set_num_threads(threads)
    stream_device = sweep.device or "auto"  # in a worker given one GPU (CUDA_VISIBLE_DEVICES), cuda means it
    common = {"method": job.method, "dataset": job.dataset, "backbone": job.backbone, "shots": job.shots,
              "seed": job.seed, "variant": job.variant}  # fmt: skip
    try:
        from .streaming.retrieval_trainer import METHODS as RETRIEVAL
        from .streaming.retrieval_trainer import fit_retrieval_streaming
        from .streaming.trainer import METHODS as STREAMING
        from .streaming.trainer import evaluate_streaming_run, fit_streaming

        if job.method in RETRIEVAL:  # the Cross-Modal Adapter streams the images and captions
            rec = fit_retrieval_streaming(
                job.method, dataset=job.dataset, backbone=job.backbone, data_root=sweep.raw.get("data_root"),
                seed=job.seed, options=dict(job.options), progress=False, device=stream_device,
            )  # fmt: skip
            rec.variant, rec.sweep_key = job.variant, job.key()
            return [rec]
        if job.method in STREAMING:  # full-backbone methods stream the dataset's images
            data_root = sweep.raw.get("data_root")
            save = Path(runs_dir) / job.key() if job.targets else None
            rec = fit_streaming(
                job.method, dataset=job.dataset, backbone=job.backbone, data_root=data_root, protocol=job.protocol,
                shots=job.shots, seed=job.seed, options=dict(job.options), progress=False, save=save,
                device=stream_device,
            )  # fmt: skip
            if not job.targets:
                rec.variant, rec.sweep_key = job.variant, job.key()
                return [rec]
            out = []
            for t in job.targets:
                r = evaluate_streaming_run(save, dataset=t, data_root=data_root, device=stream_device)
                r.protocol, r.fit_seconds, r.variant, r.sweep_key = (
                    sweep.protocol,
                    rec.fit_seconds,
                    job.variant,
                    job.key(t),
                )
                out.append(r)
            return out
        save = Path(runs_dir) / job.key() if job.targets else None
        run = fit_method(
            job.method, dataset=job.dataset, backbone=job.backbone, cache_dir=cache_dir, protocol=job.protocol,
            shots=job.shots, seed=job.seed, template=sweep.template, options=dict(job.options),
            val_from=sweep.val_from, save=save, device=sweep.device or "cpu",
        )  # fmt: skip
        if not job.targets:
            run.record.variant, run.record.sweep_key = job.variant, job.key()
            return [run.record]
        out = []
        for t in job.targets:
            try:
                rec = evaluate_run(save, dataset=t, cache_dir=cache_dir, template=sweep.template,
                                   device=sweep.device or "cpu")  # fmt: skip
                rec.protocol, rec.fit_seconds = sweep.protocol, run.record.fit_seconds
            except FeatcacheError as e:
                rec = _failed(common | {"protocol": sweep.protocol}, str(e), eval_dataset=t)
            rec.variant, rec.sweep_key = job.variant, job.key(t)
            out.append(rec)
        return out
    except Exception as e:  # any failure is recorded; the sweep goes on
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return failed_records(job, sweep, f"{type(e).__name__}: {msg}")


def failed_records(job: Job, sweep: Sweep, error: str) -> list[Record]:
    """The records of a job that failed with `error`: one per record it would have made, no metrics."""
    common = {"method": job.method, "dataset": job.dataset, "backbone": job.backbone, "shots": job.shots,
              "seed": job.seed, "variant": job.variant}  # fmt: skip
    common["protocol"] = sweep.protocol if job.targets else job.protocol
    recs = [_failed(common, error, eval_dataset=t) for t in (job.targets or (None,))]
    for r, k in zip(recs, job.keys(), strict=True):
        r.sweep_key = k
    return recs


def _failed(common: dict, error: str, eval_dataset: str | None = None) -> Record:
    return Record(**common, metrics={}, fit_seconds=0.0, trainable_params=0, config={}, store={}, sampled={},
                  error=error, eval_dataset=eval_dataset)  # fmt: skip


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs); [] without CUDA."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n)]
    return [d.strip() for d in env.split(",") if d.strip()][:n]


def gpu_plan(workers: int, gpus: list[str]) -> list[str]:
    """The GPU of each worker process: one each, round-robin when workers outnumber GPUs."""
    return [gpus[i % len(gpus)] for i in range(workers)] if gpus else []


def _take_gpu(plan: Any) -> None:
    """Worker initializer: pin this process to the next GPU of the plan before CUDA starts in it (the variable is
    read when CUDA initialises, so every later `cuda` or `auto` device in this worker is that GPU)."""
    if plan is None:
        return
    try:
        os.environ["CUDA_VISIBLE_DEVICES"] = plan.get_nowait()
    except queue.Empty:  # a replacement worker after the plan ran out keeps the parent's devices
        pass


def run_sweep(
    sweep: Sweep,
    results: str | Path,
    cache_dir: str | Path | None = None,
    jobs: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    cluster: ClusterOptions | None = None,
) -> dict[str, int]:
    """Run every pending job, appending records as they finish. Returns counts: done, failed, skipped, missing.

    Locally (`cluster` None) runs go one at a time or, with `jobs` > 1, in that many spawned worker processes,
    each pinned to one visible GPU (round-robin when there are more workers than GPUs). With `cluster` (a
    featcache.sweep_submitit.ClusterOptions) each run, or each group of runs, is a submitit job (SLURM, or
    submitit's local executor); either way only this process appends to the results file."""
    from tqdm.auto import tqdm

    cache = str(cache_dir) if cache_dir else sweep.cache_dir
    missing = missing_stores(sweep, cache)
    if missing:
        echo(f"{len(missing)} cache(s) missing; their runs are skipped until you create them:")
        for _, _, cmd in missing:
            echo(f"  {cmd}")
    lacking = {(b, d) for b, d, _ in missing}
    runs_dir = str(Path(results).expanduser().with_suffix("")) + ".runs"
    if cluster is not None:
        from .sweep_submitit import harvest

        harvest(cluster, results, echo)  # records of jobs an earlier, interrupted submitter left behind
    todo_all = pending(sweep, results)
    streamed = _streamed()

    def waits(j: Job) -> bool:
        return j.method not in streamed and any((j.backbone, d) in lacking for d in (j.dataset, *j.targets))

    todo = [j for j in todo_all if not waits(j)]
    counts = {"skipped": len(sweep.jobs) - len(todo_all), "missing": len(todo_all) - len(todo), "done": 0, "failed": 0}
    bar = tqdm(total=len(todo), unit="run", desc=sweep.name, disable=not progress)

    def record(recs: list[Record]) -> None:
        for r in recs:
            append_record(results, r)
        counts["failed" if any(r.error for r in recs) else "done"] += 1
        bar.update(1)

    try:
        if cluster is not None:
            from .sweep_submitit import submit_and_wait

            submit_and_wait(todo, sweep, cache, runs_dir, cluster, results, record, echo)
        elif jobs <= 1:
            for j in todo:
                record(run_job(j, sweep, cache, runs_dir, None))
        elif todo:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            pinned = (sweep.device or "").startswith("cuda:")  # the file names a GPU itself: every worker uses it
            plan = [] if pinned else gpu_plan(jobs, visible_gpus())
            if plan:
                echo(f"{jobs} workers on {len(set(plan))} GPU(s): " + ", ".join(f"worker {i} -> GPU {g}"
                     for i, g in enumerate(plan)))  # fmt: skip
            ctx = mp.get_context("spawn")  # not fork: a forked child of a process that ran OpenMP threads can hang
            gpus = ctx.Queue() if plan else None
            for g in plan:
                gpus.put(g)
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_take_gpu,
                                        initargs=(gpus,)) as pool:  # fmt: skip
                futures = [pool.submit(run_job, j, sweep, cache, runs_dir, threads) for j in todo]
                for f in cf.as_completed(futures):
                    record(f.result())
    finally:
        bar.close()
    return counts
