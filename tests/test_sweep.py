"""Sweeps: resume, failures recorded, missing caches listed, transfer protocols, parallel jobs."""

import pytest

from featcache.results import read_records
from featcache.sweep import SweepError, load_sweep, missing_stores, pending, run_sweep

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


def write(tmp_path, extra="", text=None):
    p = tmp_path / "s.toml"
    p.write_text(text if text is not None else GRID.format(extra=extra))
    return p


@pytest.fixture
def cache(digits_store):
    return digits_store.parent.parent


def test_resume_skips_finished_runs(tmp_path, cache):
    sweep = load_sweep(write(tmp_path))
    assert len(sweep.jobs) == 4
    out = tmp_path / "r.jsonl"
    assert run_sweep(sweep, out, cache_dir=cache, progress=False) == {
        "skipped": 0,
        "missing": 0,
        "done": 4,
        "failed": 0,
    }
    assert len(read_records(out)) == 4
    assert run_sweep(sweep, out, cache_dir=cache, progress=False)["skipped"] == 4  # nothing re-run
    assert len(read_records(out)) == 4
    # an interrupted sweep: drop the last record, rerun, only that run is done again
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    lost = __import__("json").loads(lines[-1])
    c = run_sweep(sweep, out, cache_dir=cache, progress=False)
    assert c["done"] == 1 and c["skipped"] == 3
    again = read_records(out)[-1]
    assert (again["method"], again["seed"], again["sweep_key"]) == (lost["method"], lost["seed"], lost["sweep_key"])
    assert again["metrics"] == lost["metrics"]  # deterministic


def test_failing_run_is_recorded_and_the_rest_continue(tmp_path, cache):
    # options pass load_sweep's checks (each in bounds) but not the method: a failure only the run itself finds
    extra = '[[variants]]\nname = "broken"\nmethod = "mm-attn"\noptions = { heads = 3 }'
    sweep = load_sweep(write(tmp_path, extra))
    out = tmp_path / "r.jsonl"
    c = run_sweep(sweep, out, cache_dir=cache, progress=False)
    assert c == {"skipped": 0, "missing": 0, "done": 4, "failed": 2}
    recs = read_records(out)
    failed = [r for r in recs if r["error"]]
    assert len(failed) == 2 and all(r["variant"] == "broken" and "must divide width" in r["error"] for r in failed)
    assert all(r["metrics"] == {} for r in failed)
    assert len(pending(sweep, out)) == 2  # failed runs are retried next time


def test_missing_caches_are_listed_with_the_command(tmp_path, cache):
    text = GRID.format(extra="").replace('datasets = ["digits"]', 'datasets = ["digits", "dtd"]')
    sweep = load_sweep(write(tmp_path, text=text))
    miss = missing_stores(sweep, cache)
    cmd = f"featcache extract --dataset dtd --backbone featcache-tiny/random --cache-dir {cache}"
    assert miss == [("featcache-tiny/random", "dtd", cmd)]
    lines = []
    c = run_sweep(sweep, tmp_path / "r.jsonl", cache_dir=cache, progress=False, echo=lines.append)
    assert c["missing"] == 4 and c["done"] == 4
    assert "featcache extract --dataset dtd" in "\n".join(lines)


def test_transfer_sweep_records_each_target(tmp_path, cache):
    text = """
protocol = "xd"
backbones = ["featcache-tiny/random"]
source = "digits"
targets = ["digits"]
methods = ["clip-adapter"]
shots = [4]
seeds = [1]
[options]
clip-adapter = { epochs = 2 }
"""
    out = tmp_path / "r.jsonl"
    c = run_sweep(load_sweep(write(tmp_path, text=text)), out, cache_dir=cache, progress=False)
    assert c["done"] == 1
    (r,) = read_records(out)
    assert r["protocol"] == "xd" and r["eval_dataset"] == "digits" and "acc" in r["metrics"]
    assert (tmp_path / "r.runs").is_dir()


def test_parallel_jobs(tmp_path, cache):
    out = tmp_path / "r.jsonl"
    c = run_sweep(load_sweep(write(tmp_path)), out, cache_dir=cache, jobs=2, progress=False)
    assert c["done"] == 4 and len({r["sweep_key"] for r in read_records(out)}) == 4


@pytest.mark.parametrize(
    "text,msg",
    [
        ("protocol = 'b2n'\nbackbones=['x']\nmethods=['zero-shot']", "'protocol' must be one of"),
        ("backbones=['x']\nmethods=['zero-shot']", "'protocol' is missing"),
        ("protocol='fewshot'\nbackbones=['x']\ndatasets=['digits']\nmethods=['nope']", "unknown method 'nope'"),
        ("protocol='fewshot'\nbackbones=['x']\ndatasets=['nope']\nmethods=['zero-shot']", "unknown dataset 'nope'"),
        ("protocol='xd'\nbackbones=['x']\nmethods=['zero-shot']\ntargets=['digits']", "'source' is missing"),
        ("protocol='fewshot'\nbackbones=['x']\ndatasets=['digits']", "nothing to run"),
        ("protocol = [", "not valid TOML"),
    ],
)
def test_bad_sweep_files(tmp_path, text, msg):
    from featcache.errors import FeatcacheError

    with pytest.raises(FeatcacheError, match=msg):
        load_sweep(write(tmp_path, text=text))
    assert issubclass(SweepError, FeatcacheError)


def test_shipped_sweeps_parse():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps"
    sweeps = {p.stem: load_sweep(p) for p in folder.glob("*.toml")}
    assert set(sweeps) == {"base2novel", "fewshot", "xd", "dg", "digits", "retrieval"}
    assert len(sweeps["retrieval"].jobs) == 3 * 3 and {j.shots for j in sweeps["retrieval"].jobs} == {0}
    assert len(sweeps["base2novel"].jobs) == 11 * 15 * 3  # 14 methods + the hard-mask variant, 3 seeds
    assert {j.shots for j in sweeps["fewshot"].jobs if j.method != "zero-shot"} == {1, 2, 4, 8, 16}
    assert {j.shots for j in sweeps["fewshot"].jobs if j.method == "zero-shot"} == {0}  # trains nothing: once
    assert sweeps["dg"].jobs[0].targets == ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def test_streaming_methods_in_a_sweep(tmp_path, cache):
    text = GRID.format(extra="").replace('methods = ["zero-shot", "tip-adapter"]', 'methods = ["zero-shot"]')
    text += '\n[[variants]]\nname = "layer-mma (tiny)"\nmethod = "layer-mma"\n'
    text += "options = { first_block = 1, epochs = 1, batch_size = 8 }\n"
    out = tmp_path / "r.jsonl"
    c = run_sweep(load_sweep(write(tmp_path, text=text)), out, cache_dir=cache, progress=False)
    assert c["done"] == 4 and c["failed"] == 0
    recs = [r for r in read_records(out) if r["method"] == "layer-mma"]
    assert len(recs) == 2 and recs[0]["variant"] == "layer-mma (tiny)" and recs[0]["store"]["streaming"]
