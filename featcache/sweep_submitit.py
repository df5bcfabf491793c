"""The cluster back end of `featcache sweep`: each run, or each group of runs, becomes one submitit job (SLURM,
or submitit's local executor) with the resources its method needs, and the submitting process waits for them.

Semantics are the local runner's: runs already recorded are skipped, a failing run is recorded with its error
(so is a job that dies, times out or is cancelled: one failure record per run it did not finish), failed runs
are retried by the next invocation. Only the submitting process appends to the results file (jobs may run on
nodes whose view of a shared file system makes concurrent appends unsafe): a job writes the records of each
finished run to a file of its own, `<folder>/records/<run key>.jsonl`, written whole and then renamed into
place, and the submitter appends and deletes it when the job ends. A submitter that was stopped leaves such
files behind; the next invocation appends them first (`harvest`), skipping runs already recorded, so finished
cluster work is neither lost nor counted twice.

Streaming methods (full-backbone training) may ask for several GPUs per run: the job then has one task per GPU
and the tasks form a torch.distributed group (submitit's TorchDistributedEnvironment sets what torchrun would),
which the streaming trainers use as they do under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FeatcacheError
from .results import Record, append_record, read_records
from .sweep import Job, Sweep, _streamed, failed_records, run_job

EXECUTORS = ("slurm", "local")
INSTALL = "pip install 'featcache[slurm]'"


@dataclass(frozen=True)
class ClusterOptions:
    """Where and with what each submitted job runs. `gpus_per_job` is what a streaming run gets (one task per
    GPU; on `device = "cpu"` that many gloo processes and no GPU); a cached fit gets one GPU when the sweep's
    device is not cpu, else none."""

    executor: str = "slurm"
    folder: str | None = None  # submitit's logs and the jobs' record files; default <results>.submitit
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    timeout_min: int = 240
    array_parallelism: int = 32
    group_size: int = 1
    mem_gb: int | None = None
    slurm_args: dict[str, str] = field(default_factory=dict)  # extra #SBATCH options: account, qos, constraint
    poll_s: float | None = None  # how often job states are checked; default 10 s on slurm, 1 s locally

    def check(self) -> None:
        """Refuse bad values before anything is submitted, naming the option."""
        if self.executor not in EXECUTORS:
            raise FeatcacheError(f"--executor must be one of process, {', '.join(EXECUTORS)}; got {self.executor!r}")
        for name, v, low in (("--gpus-per-job", self.gpus_per_job, 1), ("--cpus-per-job", self.cpus_per_job, 1),
                             ("--timeout-min", self.timeout_min, 1), ("--group-size", self.group_size, 1),
                             ("--slurm-array-parallelism", self.array_parallelism, 1),
                             ("--mem-gb", self.mem_gb, 1)):  # fmt: skip
            if v is not None and v < low:
                raise FeatcacheError(f"{name} must be >= {low}, got {v}")


_FLAGS = {"folder": "--slurm-folder", "array_parallelism": "--slurm-array-parallelism", "slurm_args": "--slurm-arg"}


def cluster_options(executor: str, jobs: int = 1, **given: Any) -> ClusterOptions | None:
    """The back end `featcache sweep` asked for: None for the local process pool (`--executor process`), else
    ClusterOptions. Options given (not None) that the chosen back end ignores are refused, naming them."""
    given = {k: v for k, v in given.items() if v is not None}
    if executor == "process":
        if given:
            key = next(iter(given))
            flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
            raise FeatcacheError(f"{flag} applies to --executor slurm or local (submitit); add --executor slurm")
        return None
    if jobs != 1:
        raise FeatcacheError(
            "--jobs applies to --executor process; submitted jobs run in parallel as the cluster allows "
            "(--slurm-array-parallelism)"
        )
    if "slurm_args" in given:  # ["account=abc", ...] from --slurm-arg
        args = {}
        for a in given["slurm_args"]:
            k, eq, v = a.partition("=")
            if not (eq and k.strip()):
                raise FeatcacheError(f"--slurm-arg takes key=value (an sbatch option such as account=abc), got {a!r}")
            args[k.strip()] = v.strip()
        given["slurm_args"] = args
    opts = ClusterOptions(executor=executor, **given)
    opts.check()
    return opts


def _needs_submitit():
    try:
        import submitit
    except ImportError:
        raise FeatcacheError(f"--executor slurm/local needs the submitit package: {INSTALL}") from None
    return submitit


def folder_for(opts: ClusterOptions, results: str | Path) -> Path:
    return Path(opts.folder).expanduser() if opts.folder else Path(str(Path(results).expanduser()) + ".submitit")


def resources(job: Job, sweep: Sweep, opts: ClusterOptions) -> tuple[int, int]:
    """(GPUs, tasks) of the submitit job that runs `job`."""
    streaming = job.method in _streamed()
    on_gpu = (sweep.device or ("auto" if streaming else "cpu")) != "cpu"
    if streaming:
        return (opts.gpus_per_job if on_gpu else 0), opts.gpus_per_job
    return (1 if on_gpu else 0), 1


def run_group(jobs: list[Job], sweep: Sweep, cache: str | None, runs_dir: str, outbox: str, tasks: int) -> int:
    """What one submitit job runs: its runs one after another (each failure becomes a record, as locally); with
    several tasks, under torch.distributed, where rank 0 writes the records."""
    rank = 0
    if tasks > 1:
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank = env.rank
    for j in jobs:
        recs = run_job(j, sweep, cache, runs_dir, None)
        if rank == 0:
            _write_outbox(Path(outbox), j, recs)
    return len(jobs)


def _write_outbox(outbox: Path, job: Job, recs: list[Record]) -> None:
    outbox.mkdir(parents=True, exist_ok=True)
    tmp = outbox / f".{job.key()}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write("".join(r.to_json() + "\n" for r in recs))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, outbox / f"{job.key()}.jsonl")  # whole or absent, never half a file


def _take(outbox: Path, job: Job) -> list[Record] | None:
    """The records a job left for `job` (the file is removed), or None if it left none."""
    path = outbox / f"{job.key()}.jsonl"
    if not path.exists():
        return None
    recs = [Record(**d) for d in read_records(path)]
    path.unlink()
    return recs


def harvest(opts: ClusterOptions, results: str | Path, echo: Callable[[str], None]) -> int:
    """Append the record files an interrupted submitter left in the folder (skipping runs already recorded)."""
    outbox = folder_for(opts, results) / "records"
    files = sorted(outbox.glob("*.jsonl")) if outbox.is_dir() else []
    if not files:
        return 0
    done = set()
    if Path(results).expanduser().exists():
        done = {r["sweep_key"] for r in read_records(results) if r.get("sweep_key") and not r.get("error")}
    n = 0
    for f in files:
        for d in read_records(f):
            if d.get("sweep_key") not in done:
                append_record(results, Record(**d))
                n += 1
        f.unlink()
    if n:
        echo(f"appended {n} record(s) that finished jobs had left in {outbox}")
    return n


def job_error(sj: Any, e: BaseException) -> str:
    """One line for a job that ended without a record: the exception its log ends with, its id and log path."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
    msg = raised[-1] if raised else (lines[0] if lines else type(e).__name__)
    return f"{type(e).__name__}: {msg} (submitit job {sj.job_id}; log {sj.paths.stderr})"


def make_executor(opts: ClusterOptions, logs: Path, name: str, gpus: int, tasks: int) -> Any:
    """A submitit executor for jobs of `gpus` GPUs and `tasks` tasks on one node."""
    submitit = _needs_submitit()
    try:
        ex = submitit.AutoExecutor(folder=logs, cluster=opts.executor)
    except RuntimeError as e:  # submitit's 'Could not detect "srun"': not a SLURM machine
        raise FeatcacheError(
            f"--executor {opts.executor}: {str(e).splitlines()[0]}; submit from a SLURM login node, or use "
            "--executor local or --jobs N here"
        ) from None
    ex.update_parameters(
        name=name, timeout_min=opts.timeout_min, nodes=1, tasks_per_node=tasks, gpus_per_node=gpus,
        cpus_per_task=opts.cpus_per_job, mem_gb=opts.mem_gb, slurm_partition=opts.partition,
        slurm_array_parallelism=opts.array_parallelism, slurm_additional_parameters=dict(opts.slurm_args) or None,
    )  # fmt: skip
    return ex


def submit_and_wait(
    todo: list[Job],
    sweep: Sweep,
    cache: str | None,
    runs_dir: str,
    opts: ClusterOptions,
    results: str | Path,
    record: Callable[[list[Record]], None],
    echo: Callable[[str], None],
) -> None:
    """Submit `todo` (one job per `group_size` runs needing the same resources; a SLURM array per resource
    class, at most `array_parallelism` running at once), then record each run as its job ends."""
    if not todo:
        return
    opts.check()
    folder = folder_for(opts, results)
    outbox = folder / "records"
    outbox.mkdir(parents=True, exist_ok=True)
    classes: dict[tuple[int, int], list[Job]] = {}
    for j in todo:
        classes.setdefault(resources(j, sweep, opts), []).append(j)
    shipped = dataclasses.replace(sweep, jobs=[])  # each job carries its own runs, not the whole grid
    submitted: list[tuple[Any, list[Job]]] = []
    for (gpus, tasks), runs in classes.items():
        groups = [runs[i : i + opts.group_size] for i in range(0, len(runs), opts.group_size)]
        ex = make_executor(opts, folder / "logs", f"featcache-{sweep.name}", gpus, tasks)
        n = len(groups)
        sjobs = ex.map_array(run_group, groups, [shipped] * n, [cache] * n, [runs_dir] * n, [str(outbox)] * n,
                             [tasks] * n)  # fmt: skip
        submitted += list(zip(sjobs, groups, strict=True))
        echo(f"submitted {len(runs)} run(s) as {n} {opts.executor} job(s) with {gpus} GPU(s) and {tasks} task(s) "
             f"each: {', '.join(str(sj.job_id) for sj in sjobs[:3])}{' ...' if n > 3 else ''}")  # fmt: skip
    echo(f"logs in {folder / 'logs'}; records are appended to {results} as jobs end")
    while submitted:
        left = []
        for sj, runs in submitted:
            try:  # a job that died, timed out or was cancelled raises here: its unfinished runs fail
                if not sj.done():
                    left.append((sj, runs))
                    continue
                sj.results()
                err = "the job ended without a record"
            except Exception as e:
                err = job_error(sj, e)
            for j in runs:
                recs = _take(outbox, j)
                record(recs if recs is not None else failed_records(j, sweep, err))
        submitted = left
        if submitted:
            time.sleep(opts.poll_s or (10.0 if opts.executor == "slurm" else 1.0))


__all__ = ["ClusterOptions", "make_executor", "submit_and_wait", "harvest", "run_group", "resources", "job_error"]
