"""The streaming trainer end to end on digits and the tiny architecture."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from featcache.adapters import MethodError
from featcache.streaming.trainer import fit_streaming, streaming_config

TINY = {"dataset": "digits", "backbone": "featcache-tiny/random", "shots": 2, "progress": False}
MMA = {"first_block": 1, "epochs": 2, "batch_size": 8}


def test_deterministic_and_recorded(tmp_path):
    a = fit_streaming("layer-mma", **TINY, options=MMA, save=tmp_path / "a", results=tmp_path / "r.jsonl")
    b = fit_streaming("layer-mma", **TINY, options=MMA, save=tmp_path / "b")
    assert a.metrics == b.metrics
    assert set(a.metrics) == {f"{m}{k}" for m in ("base_acc", "novel_acc", "hm") for k in ("", "5")}
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert rec["method"] == "layer-mma" and rec["store"]["streaming"] is True and rec["sampled"]["n_train"] == 10
    assert rec["trainable_params"] == 2 * (64 * 32 + 32 + 32 * 64 + 64) * 2 + 2 * (32 * 32 + 32)
    assert rec["fit"]["epochs"] == 2


def test_killed_run_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    clean = fit_streaming("layer-mma", **TINY, options=MMA, save=tmp_path / "clean")
    real_step, calls = torch.optim.SGD.step, {"n": 0}

    def crash_in_epoch_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 10 images, batch 8: two steps per epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        fit_streaming("layer-mma", **TINY, options=MMA, save=tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    resumed = fit_streaming("layer-mma", **TINY, options=MMA, save=tmp_path / "run")
    assert resumed.metrics == clean.metrics
    a, b = (torch.load(p / "state.pt", weights_only=True) for p in (tmp_path / "clean", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_options_are_checked():
    with pytest.raises(MethodError, match="method 'maple' has no option 'first_block'"):
        streaming_config("maple", {"first_block": 1})
    assert streaming_config("maple", {"depth": "3"}).depth == 3
    with pytest.raises(
        MethodError,
        match=r"first_block 5 is past the last block of .* \(2 blocks\); pass --set first_block=K with K <= 2",
    ):
        fit_streaming("layer-mma", **TINY, options={"epochs": 1})  # the tiny model has 2 blocks


@pytest.mark.parametrize("method,sets", [("layer-mma", ["first_block=1"]), ("maple", ["depth=2", "batch_size=8"])])
def test_cli(tmp_path, method, sets):
    args = ["fit", "--adapter", method, "--dataset", "digits", "--backbone", "featcache-tiny/random", "--shots", "2",
            "--protocol", "fewshot", "--set", "epochs=1", "--results", str(tmp_path / "r.jsonl")]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + r.stderr
    assert f"{method}" in r.output and "fewshot 2-shot seed 1:  acc" in r.output


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank trains on its half of every global batch of 8."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["fit", "--adapter", "layer-mma", "--dataset", "digits", "--backbone", "featcache-tiny/random",
            "--shots", "2", "--protocol", "fewshot", "--set", "first_block=1", "--set", "epochs=2",
            "--set", "batch_size=8"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "cli.main", *args, "--save", str(tmp_path / "ddp")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("fewshot 2-shot seed 1:  acc") == 1  # one process reports
    single = fit_streaming("layer-mma", dataset="digits", backbone="featcache-tiny/random", shots=2, protocol="fewshot",
                           options={"first_block": 1, "epochs": 2, "batch_size": 8}, save=tmp_path / "one",
                           progress=False)  # fmt: skip
    a = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    # the same updates up to float summation order (measured: 6e-8 on weights of size ~1)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert single.metrics["acc"] is not None


def test_saved_run_evaluates_on_a_target_dataset(tmp_path):
    from featcache.streaming.trainer import evaluate_streaming_run

    opts = {"first_block": 1, "epochs": 1, "batch_size": 8}
    fit = fit_streaming("layer-mma", **TINY, protocol="fewshot", options=opts, save=tmp_path / "run")
    rec = evaluate_streaming_run(tmp_path / "run", dataset="digits", results=tmp_path / "r.jsonl")
    assert rec.protocol == "xd" and rec.eval_dataset == "digits"
    assert rec.metrics["acc"] == fit.metrics["acc"]  # same test images and classes: the same accuracy
    r = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits"])
    assert r.exit_code == 0 and "digits -> digits  xd" in r.output, r.output + r.stderr


def test_transfer_sweep_with_a_streaming_method(tmp_path):
    from featcache.results import read_records
    from featcache.sweep import load_sweep, run_sweep

    sweep = tmp_path / "s.toml"
    sweep.write_text('protocol = "dg"\nbackbones = ["featcache-tiny/random"]\nsource = "digits"\ntargets = ["digits"]\n'
                     'shots = [2]\nseeds = [1]\n[[variants]]\nname = "mma"\nmethod = "layer-mma"\n'
                     'options = { first_block = 1, epochs = 1, batch_size = 8 }\n')  # fmt: skip
    c = run_sweep(load_sweep(sweep), tmp_path / "r.jsonl", cache_dir=tmp_path / "empty", progress=False)
    assert c["done"] == 1 and c["failed"] == 0
    (rec,) = read_records(tmp_path / "r.jsonl")
    assert rec["protocol"] == "dg" and rec["eval_dataset"] == "digits" and rec["variant"] == "mma"
