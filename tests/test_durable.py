"""Nothing a user wrote is lost: whole-line appends to results files, atomic saves, one-line errors for damaged
files, saves before records, and resumed streaming runs that stay one run."""

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import NotATensor
from typer.testing import CliRunner

from cli.main import app
from featcache.errors import FeatcacheError
from featcache.fsio import atomic_write, read_json, safe_torch_load
from featcache.results import Record, append_record, read_records


def _record(method: str = "zero-shot") -> Record:
    return Record(method=method, dataset="dtd", backbone="B", protocol="fewshot", shots=1, seed=1,
                  metrics={"acc": 50.0}, fit_seconds=0.0, trainable_params=0, config={}, store={}, sampled={},
                  versions={})  # fmt: skip


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_torn_tail_is_cut_off_before_the_next_append(tmp_path, caplog):
    out = tmp_path / "r.jsonl"
    append_record(out, _record("a"))
    with open(out, "ab") as f:
        f.write(b'{"method": "half a rec')  # a crash in the middle of an earlier append
    assert [r["method"] for r in read_records(out)] == ["a"]  # the torn tail is skipped, not an error
    with caplog.at_level(logging.WARNING, logger="featcache.results"):
        append_record(out, _record("b"))
    assert "torn line (22 bytes" in caplog.text
    assert [r["method"] for r in read_records(out)] == ["a", "b"]
    assert out.read_bytes().count(b"\n") == 2


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    append_record(out, _record("a"))
    before = out.read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:10]))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(FeatcacheError) as e:
        append_record(out, _record("b"))
    msg = _one_line(e)
    assert str(out) in msg and "No space left on device" in msg and "free disk space" in msg
    assert out.read_bytes() == before


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    append_record(tmp_path / "r.jsonl", _record("a"))
    append_record(tmp_path / "r.jsonl", _record("b"))
    assert [r["method"] for r in read_records(tmp_path / "r.jsonl")] == ["a", "b"]


def test_a_garbage_line_is_reported_with_its_number(tmp_path):
    out = tmp_path / "r.jsonl"
    append_record(out, _record("a"))
    with open(out, "ab") as f:
        f.write(b"not json at all\n")
    append_record(out, _record("b"))
    with pytest.raises(FeatcacheError, match=rf"^line 2 of {out} is not a JSON record"):
        read_records(out)
    r = CliRunner().invoke(app, ["leaderboard", str(out), "--protocol", "fewshot"])
    assert r.exit_code == 1 and r.stderr.strip().count("\n") == 0 and "line 2 of" in r.stderr, r.stderr


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "state.pt"
    p.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise ValueError("serialiser broke")

    with pytest.raises(ValueError, match="serialiser broke"):
        atomic_write(p, half_then_fail)

    def full_disk(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FeatcacheError) as e:
        atomic_write(p, full_disk)
    assert str(p) in _one_line(e) and "No space left on device" in str(e.value)
    assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["state.pt"]
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["state.pt"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "custom-class"])
def test_damaged_state_file_is_one_line(tmp_path, damage):
    p = tmp_path / "state.pt"
    if damage == "custom-class":
        torch.save({"w": NotATensor()}, p)
    else:
        torch.save({"w": torch.ones(64, 64)}, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(FeatcacheError) as e:
        safe_torch_load(p, map_location="cpu")
    msg = _one_line(e)
    assert msg.startswith(f"{p} is not a readable featcache state file (") and msg.endswith("delete it and refit")
    assert "weights_only" not in msg


def test_atomic_write_refuses_a_folder(tmp_path):
    for target in (tmp_path, Path("/")):
        with pytest.raises(FeatcacheError, match="is a folder; give the path of a file to write"):
            atomic_write(target, lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == []


def test_broken_json_is_one_line(tmp_path):
    p = tmp_path / "run.json"
    p.write_text('{"method": ')
    with pytest.raises(FeatcacheError, match=rf"^{p} is not a readable run.json \(Expecting value at line 1\)"):
        read_json(p, "run.json")
    with pytest.raises(FeatcacheError, match="^no run.json at"):
        read_json(tmp_path / "missing.json", "run.json")


def test_a_failed_save_appends_no_record(tmp_path, monkeypatch, digits_store):
    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out, run = tmp_path / "r.jsonl", tmp_path / "run"
    args = ["fit", "--adapter", "zero-shot", "--dataset", "digits", "--backbone", "featcache-tiny/random",
            "--cache-dir", str(digits_store.parent.parent), "--protocol", "fewshot", "--shots", "2",
            "--results", str(out), "--save", str(run)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "No space left on device" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not out.exists()
    assert os.listdir(run) == []  # no state.pt, no temporary file


def test_resumed_streaming_run_keeps_its_id_and_sums_fit_seconds(tmp_path, monkeypatch):
    from featcache.streaming.trainer import fit_streaming

    tiny = {"dataset": "digits", "backbone": "featcache-tiny/random", "shots": 2, "progress": False,
            "options": {"first_block": 1, "epochs": 2, "batch_size": 8}, "save": tmp_path / "run"}  # fmt: skip
    real_step, calls = torch.optim.SGD.step, {"n": 0}

    def crash_in_epoch_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 10 images, batch 8: two steps per epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        fit_streaming("layer-mma", **tiny)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["fit_seconds"] > 0 and len(state["run_id"]) == 12
    torch.save(state | {"fit_seconds": 1000.0}, ckpt)  # a long first segment, so the sum is unmistakable
    rec = fit_streaming("layer-mma", **tiny, results=tmp_path / "r.jsonl")
    assert rec.run_id == state["run_id"] and 1000.0 < rec.fit_seconds < 1000.0 + 600
    (saved,) = read_records(tmp_path / "r.jsonl")
    assert saved["run_id"] == state["run_id"] and saved["fit_seconds"] == rec.fit_seconds
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == state["run_id"]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "run.json", "state.pt"]
    again = fit_streaming("layer-mma", **tiny, results=tmp_path / "r.jsonl")  # rerun of the finished run
    assert again.run_id == rec.run_id and len(read_records(tmp_path / "r.jsonl")) == 1  # counted once
