"""Sweep back ends: one GPU per local worker, and submitit jobs (its local executor here, as on SLURM) with the
local runner's resume, failure records and results-file semantics."""

from __future__ import annotations

import dataclasses
import os
import queue
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from featcache.errors import FeatcacheError
from featcache.results import read_records
from featcache.sweep import _take_gpu, gpu_plan, load_sweep, run_sweep, visible_gpus
from featcache.sweep_submitit import ClusterOptions, cluster_options, folder_for, resources, run_group

pytest.importorskip("submitit")

GRID = """
name = "t"
protocol = "base2novel"
backbones = ["featcache-tiny/random"]
datasets = ["digits"]
methods = ["zero-shot", "tip-adapter"]
shots = [4]
seeds = [1, 2]
{extra}
"""
BROKEN = '[[variants]]\nname = "broken"\nmethod = "mm-attn"\noptions = { heads = 3 }'  # fails inside the run
LOCAL = ClusterOptions(executor="local", poll_s=0.2, timeout_min=10, group_size=2)


@pytest.fixture
def cache(digits_store):
    return digits_store.parent.parent


def sweep_file(tmp_path, extra=""):
    p = tmp_path / "s.toml"
    p.write_text(GRID.format(extra=extra))
    return p


def by_key(path):
    return {r["sweep_key"]: r for r in read_records(path)}


def test_local_executor_records_what_the_local_runner_records(tmp_path, cache):
    """Same records (metrics, errors, keys) as the in-process runner; a failing run is recorded, not fatal; a
    rerun skips what is recorded and retries the failures; the job record files are consumed."""
    sweep = load_sweep(sweep_file(tmp_path, BROKEN))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "r.jsonl"
    assert run_sweep(sweep, ref, cache_dir=cache, progress=False)["failed"] == 2
    lines = []
    c = run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=LOCAL, echo=lines.append)
    assert c == {"skipped": 0, "missing": 0, "done": 4, "failed": 2}
    assert "submitted 6 run(s) as 3 local job(s) with 0 GPU(s) and 1 task(s) each" in lines[0]
    a, b = by_key(ref), by_key(out)
    assert set(a) == set(b) and len(b) == 6
    for k in a:
        assert (a[k]["metrics"], a[k]["error"], a[k]["variant"]) == (b[k]["metrics"], b[k]["error"], b[k]["variant"])
    assert all("must divide width" in r["error"] for r in b.values() if r["error"])
    assert list((folder_for(LOCAL, out) / "records").iterdir()) == []
    c = run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=LOCAL, echo=lines.append)
    assert c == {"skipped": 4, "missing": 0, "done": 0, "failed": 2}  # only the failed runs went again
    assert len(read_records(out)) == 8


class _DieOnArrival:
    """Unpickling this kills the process: a job that dies (OOM killer, node failure) before writing a record."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_job_that_dies_fails_its_runs(tmp_path, cache):
    sweep = load_sweep(sweep_file(tmp_path))
    doomed = dataclasses.replace(sweep.jobs[0], options=(("x", _DieOnArrival()),))
    sweep = dataclasses.replace(sweep, jobs=[*sweep.jobs[1:], doomed])
    out = tmp_path / "r.jsonl"
    opts = dataclasses.replace(LOCAL, group_size=3)  # [3 good runs], [the doomed one]
    c = run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=opts, echo=lambda _: None)
    assert c == {"skipped": 0, "missing": 0, "done": 3, "failed": 1}
    (bad,) = [r for r in read_records(out) if r["error"]]
    assert bad["sweep_key"] == doomed.key() and bad["metrics"] == {}
    assert "submitit job" in bad["error"] and "_log.err" in bad["error"] and "\n" not in bad["error"]


def test_resume_after_an_interrupted_submitter(tmp_path, cache):
    """A submitter stopped while its jobs ran: the records they left are appended first, once, and only the runs
    without one are submitted again."""
    sweep = load_sweep(sweep_file(tmp_path))
    out = tmp_path / "r.jsonl"
    outbox = folder_for(LOCAL, out) / "records"
    run_group(sweep.jobs[:1], sweep, str(cache), str(tmp_path / "runs"), str(outbox), 1)  # a job that finished
    lines = []
    c = run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=LOCAL, echo=lines.append)
    assert lines[0].startswith("appended 1 record(s)")
    assert c == {"skipped": 1, "missing": 0, "done": 3, "failed": 0}
    recs = read_records(out)
    assert len(recs) == 4 and recs[0]["sweep_key"] == sweep.jobs[0].key()
    # the same record left twice (a resubmitted job finishing late) is not appended again
    run_group(sweep.jobs[:1], sweep, str(cache), str(tmp_path / "runs"), str(outbox), 1)
    assert run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=LOCAL)["skipped"] == 4
    assert len(read_records(out)) == 4 and not list(outbox.iterdir())


def test_resources_per_method(tmp_path):
    text = GRID.format(extra="").replace('methods = ["zero-shot", "tip-adapter"]', 'methods = ["zero-shot", "maple"]')
    sweep = load_sweep(_write(tmp_path, text))
    cached, streamed = sweep.jobs[0], next(j for j in sweep.jobs if j.method == "maple")
    opts = ClusterOptions(gpus_per_job=4)
    assert resources(cached, sweep, opts) == (0, 1)  # cached fits run on cpu unless the sweep says otherwise
    assert resources(streamed, sweep, opts) == (4, 4)  # one task per GPU: a torch.distributed group
    on_gpu = dataclasses.replace(sweep, device="cuda")
    assert resources(cached, on_gpu, opts) == (1, 1)
    on_cpu = dataclasses.replace(sweep, device="cpu")
    assert resources(streamed, on_cpu, opts) == (0, 4)  # gloo processes


def _write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_one_gpu_per_worker(monkeypatch):
    assert gpu_plan(3, ["0", "1"]) == ["0", "1", "0"] and gpu_plan(2, []) == []
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_gpus() == ["4", "6"]  # a worker's GPU is named as the parent sees it
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_gpus() == []
    q = queue.Queue()
    q.put("6")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    _take_gpu(q)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    _take_gpu(q)  # the plan is used up: the variable stays
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


def test_parallel_workers_pinned_to_gpus(tmp_path, cache, monkeypatch):
    """With GPUs the pool pins each worker before CUDA starts; the runs still all complete (here on cpu)."""
    monkeypatch.setattr("featcache.sweep.visible_gpus", lambda: ["0", "1"])
    lines = []
    out = tmp_path / "r.jsonl"
    c = run_sweep(load_sweep(sweep_file(tmp_path)), out, cache_dir=cache, jobs=2, progress=False, echo=lines.append)
    assert c["done"] == 4 and "worker 0 -> GPU 0, worker 1 -> GPU 1" in lines[0]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--partition", "gpu"], "--partition applies to --executor slurm or local"),
        (["--slurm-array-parallelism", "4"], "--slurm-array-parallelism applies to --executor slurm"),
        (["--executor", "local", "--jobs", "2"], "--jobs applies to --executor process"),
        (["--executor", "pbs"], "--executor must be one of process, slurm, local"),
        (["--executor", "slurm", "--gpus-per-job", "0"], "--gpus-per-job must be >= 1"),
        (["--executor", "slurm", "--slurm-arg", "account"], "--slurm-arg takes key=value"),
    ],
)
def test_cli_refuses_bad_back_end_options(tmp_path, args, msg):
    res = CliRunner().invoke(app, ["sweep", str(sweep_file(tmp_path)), "--results", str(tmp_path / "r.jsonl"), *args])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and msg in res.output, res.output


def test_missing_submitit_is_one_line(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(FeatcacheError, match=r"^--executor slurm/local needs the submitit package: pip install"):
        run_sweep(load_sweep(sweep_file(tmp_path)), tmp_path / "r.jsonl", cache_dir=cache, progress=False,
                  cluster=LOCAL)  # fmt: skip


def test_cli_local_executor(tmp_path, cache):
    args = ["--cache-dir", str(cache), "--executor", "local", "--group-size", "4", "--quiet"]
    res = CliRunner().invoke(app, ["sweep", str(sweep_file(tmp_path)), "--results", str(tmp_path / "r.jsonl"), *args])
    assert res.exit_code == 0, res.output
    assert "as 1 local job(s)" in res.output and "done 4, failed 0" in res.output
    assert len(read_records(tmp_path / "r.jsonl")) == 4


def test_streaming_run_with_two_tasks_is_distributed(tmp_path, cache):
    """--gpus-per-job 2 (here on cpu: 2 gloo processes): the job's tasks form one torch.distributed group, and
    the run matches the single-process one (DDP over the shards of each global batch)."""
    text = GRID.format(extra="").replace('methods = ["zero-shot", "tip-adapter"]', "methods = []")
    text = text.replace("seeds = [1, 2]", 'seeds = [1]\ndevice = "cpu"')
    text += '[[variants]]\nname = "lmma"\nmethod = "layer-mma"\n'
    text += "options = { first_block = 1, epochs = 1, batch_size = 8 }\n"
    sweep = load_sweep(_write(tmp_path, text))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "r.jsonl"
    run_sweep(sweep, ref, cache_dir=cache, progress=False)
    opts = dataclasses.replace(LOCAL, gpus_per_job=2)
    assert run_sweep(sweep, out, cache_dir=cache, progress=False, cluster=opts, echo=lambda _: None)["done"] == 1
    (a,), (b,) = read_records(ref), read_records(out)
    assert a["metrics"] == b["metrics"]
    la, lb = a["fit"]["history"][0]["loss"], b["fit"]["history"][0]["loss"]
    assert abs(la - lb) < 1e-4 * max(1.0, abs(la))  # the mean over both ranks' rows, not rank 0's share
    logs = folder_for(opts, out) / "logs"
    assert len(list(logs.glob("*_1_log.err"))) == 1  # a second task ran


def test_slurm_jobs_ask_for_what_the_options_say(tmp_path, monkeypatch):
    """The sbatch script submitit would submit (a stand-in `srun` on PATH: no cluster here)."""
    from featcache.sweep_submitit import make_executor

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    opts = cluster_options("slurm", partition="gpu", timeout_min=60, mem_gb=32, slurm_args=["account=abc"])
    ex = make_executor(opts, tmp_path / "logs", "featcache-t", 4, 4)
    text = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=60", "--mem=32GB",
                 "--account=abc", "--nodes=1", "--cpus-per-task=4"):  # fmt: skip
        assert f"#SBATCH {line}\n" in text
    assert ex._executor.parameters["array_parallelism"] == 32


def test_no_slurm_here_is_one_line(tmp_path, cache):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    res = CliRunner().invoke(app, ["sweep", str(sweep_file(tmp_path)), "--results", str(tmp_path / "r.jsonl"),
                                   "--cache-dir", str(cache), "--executor", "slurm"])  # fmt: skip
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("error: --executor slurm: ")
    assert "srun" in res.output and "--executor local" in res.output
