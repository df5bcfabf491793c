"""Retrieval end to end on the tiny architecture: extraction of an image-caption and a video-caption dataset,
cached evaluation, the Cross-Modal Adapter on the streaming path, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from featcache.api import fit_method
from featcache.errors import FeatcacheError
from featcache.extract import extract
from featcache.manifests import load_manifest
from featcache.retrieval import evaluate_retrieval
from featcache.retrieval_data import resolve_retrieval_split
from featcache.store import Store
from featcache.streaming.retrieval_trainer import encode_retrieval_split, fit_retrieval_streaming

TINY = "featcache-tiny/random"
WORDS = ["red", "green", "blue", "black", "white", "yellow"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def captions_dataset(tmp_path) -> tuple[Path, Path]:
    """6 images with 2 captions each; the test split is the train split (so training can be seen to help)."""
    data = tmp_path / "data"
    rows = []
    for i, w in enumerate(WORDS):
        _image(data / "caps" / "images" / f"{i}.png", i)
        rows += [(f"{i}.png", f"a {w} square"), (f"{i}.png", f"the {w} picture")]
    for split in ("train", "test"):
        with open(data / "caps" / f"{split}.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["image", "caption"])
            wr.writerows(rows)
    manifest = {
        "id": "toycaps", "name": "toy captions", "task": "retrieval", "default_scheme": "files",
        "schemes": {"files": {
            "source": {"kind": "caption_file", "image_dirs": ["caps/images"],
                       "splits": {"train": "caps/train.csv", "test": "caps/test.csv"}},
            "counts": {"train": 6, "test": 6}, "caption_counts": {"train": 12, "test": 12},
        }},
    }  # fmt: skip
    mpath = tmp_path / "toycaps.json"
    mpath.write_text(json.dumps(manifest))
    return data, mpath


@pytest.fixture
def video_dataset(tmp_path) -> tuple[Path, Path]:
    """3 videos as frame folders (2, 3 and 5 frames, max_frames 4) with one caption each."""
    data = tmp_path / "vdata"
    for v, n in (("video0", 2), ("video1", 3), ("video2", 5)):
        for f in range(n):
            _image(data / "vid" / "frames" / v / f"{f:04d}.jpg", 10 * int(v[-1]) + f)
    pairs = [{"video_id": f"video{i}", "caption": f"a {WORDS[i]} clip"} for i in range(3)]
    (data / "vid" / "pairs.json").write_text(json.dumps(pairs))
    split = {"pairs": "vid/pairs.json"}
    manifest = {
        "id": "toyvid", "name": "toy videos", "task": "retrieval", "default_scheme": "frames",
        "schemes": {"frames": {
            "source": {"kind": "video_frames", "frame_dirs": ["vid/frames"], "max_frames": 4,
                       "splits": {"train": split, "test": split}},
            "counts": {"test": 3},
        }},
    }  # fmt: skip
    mpath = tmp_path / "toyvid.json"
    mpath.write_text(json.dumps(manifest))
    return data, mpath


def test_extract_stores_images_and_captions(captions_dataset, tmp_path, tiny):
    data, mpath = captions_dataset
    path = extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c", workers=0, progress=False, dtype="float32")
    with Store.open(path) as st:
        assert st.task == "retrieval" and st.classnames == [] and st.dim == tiny.embed_dim
        assert st.num_rows("test") == 6 and st.num_captions("test") == 12
        rs = st.retrieval_set("test")
    assert rs.frames.shape == (6, 1, tiny.embed_dim) and rs.caption_item.tolist() == [i // 2 for i in range(12)]
    # the cached embeddings are what the backbone computes for those images and captions
    m = load_manifest(mpath)
    split = resolve_retrieval_split(m, m.scheme(), "test", data)
    direct = encode_retrieval_split(tiny, split, 12, 0, video=False)
    assert torch.allclose(direct.frames, rs.frames, atol=1e-5)
    assert torch.allclose(direct.captions, rs.captions, atol=1e-5)
    assert evaluate_retrieval(direct) == evaluate_retrieval(rs)
    # a rerun is a no-op (same file, untouched)
    mtime = path.stat().st_mtime_ns
    assert extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c", workers=0, progress=False,
                   dtype="float32") == path  # fmt: skip
    assert path.stat().st_mtime_ns == mtime


def test_cached_retrieval_record(captions_dataset, tmp_path, tiny):
    data, mpath = captions_dataset
    extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c", workers=0, progress=False)
    run = fit_method("zero-shot", dataset=str(mpath), backbone=TINY, cache_dir=tmp_path / "c", protocol="retrieval",
                     results=tmp_path / "r.jsonl")  # fmt: skip
    m = run.record.metrics
    assert set(m) == {f"{d}_{k}" for d in ("t2i", "i2t") for k in ("r1", "r5", "r10", "medr", "meanr")}
    assert m["t2i_r10"] == 100.0 and 1 <= m["t2i_meanr"] <= 6  # 6 candidates: every rank is within 10
    assert run.record.protocol == "retrieval" and run.record.sampled["n_captions"] == 12
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert rec["metrics"] == m and rec["store"]["dataset"] == "toycaps"
    with pytest.raises(FeatcacheError, match="classification method"):
        fit_method("linear-probe", dataset=str(mpath), backbone=TINY, cache_dir=tmp_path / "c", protocol="retrieval")
    with pytest.raises(FeatcacheError, match="retrieval store; use --protocol retrieval"):
        fit_method("zero-shot", dataset=str(mpath), backbone=TINY, cache_dir=tmp_path / "c", protocol="fewshot")


def test_classification_store_refuses_retrieval(digits_store):
    with pytest.raises(FeatcacheError, match="classification store; retrieval needs a retrieval dataset"):
        fit_method("zero-shot", dataset="digits", backbone=TINY, cache_dir=digits_store.parent.parent,
                   protocol="retrieval")  # fmt: skip


def test_video_store_and_pooling(video_dataset, tmp_path, tiny):
    data, mpath = video_dataset
    path = extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c", workers=0, progress=False,
                   splits=["test"])  # fmt: skip
    with Store.open(path) as st:
        rs = st.retrieval_set("test")
    assert rs.video and rs.mask.sum(1).tolist() == [2, 3, 4]  # video2's 5 frames capped at 4
    for pool in ("mean", "softmax"):
        run = fit_method("zero-shot", dataset=str(mpath), backbone=TINY, cache_dir=tmp_path / "c",
                         protocol="retrieval", options={"pool": pool})  # fmt: skip
        assert run.record.metrics["t2v_r10"] == 100.0 and "v2t_medr" in run.record.metrics


def test_cross_modal_adapter_training_raises_r1(captions_dataset, tmp_path):
    data, mpath = captions_dataset
    opts = {"lr": 0.05, "epochs": 12, "batch_size": 6, "warmup": 0.0, "weight_decay": 0.0}
    before = fit_retrieval_streaming("cross-modal-adapter", dataset=str(mpath), backbone=TINY, data_root=data,
                                     options=opts | {"epochs": 0}, device="cpu", progress=False)  # fmt: skip
    after = fit_retrieval_streaming("cross-modal-adapter", dataset=str(mpath), backbone=TINY, data_root=data,
                                    options=opts, device="cpu", progress=False, save=tmp_path / "run")  # fmt: skip
    losses = [h["loss"] for h in after.fit["history"]]
    assert losses[-1] < losses[0]
    assert after.metrics["t2i_r1"] > before.metrics["t2i_r1"]
    assert after.trainable_params > 0 and (tmp_path / "run" / "state.pt").exists()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert any("share" in k for k in state)
    # the saved run evaluates on a dataset (here the same one: the same numbers) through `featcache eval`
    from featcache.streaming.retrieval_trainer import evaluate_retrieval_run

    rec = evaluate_retrieval_run(tmp_path / "run", dataset=str(mpath), data_root=data, device="cpu")
    assert rec.metrics == after.metrics and rec.eval_dataset == "toycaps"
    out = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", str(mpath), "--data-root",
                                   str(data), "--device", "cpu"])  # fmt: skip
    assert out.exit_code == 0 and "toycaps -> toycaps  retrieval (test)" in out.output, out.output


def test_cli_end_to_end(captions_dataset, tmp_path):
    data, mpath = captions_dataset
    r = CliRunner()
    cache = str(tmp_path / "c")
    out = r.invoke(app, ["extract", "--manifest", str(mpath), "--backbone", TINY, "--data-root", str(data),
                         "--cache-dir", cache, "--workers", "0", "--quiet"])  # fmt: skip
    assert out.exit_code == 0, out.output
    store = next(Path(cache).rglob("*.h5"))
    out = r.invoke(app, ["info", str(store)])
    assert out.exit_code == 0 and json.loads(out.output)["captions"] == {"train": 12, "test": 12}
    out = r.invoke(app, ["ls", "--cache-dir", cache])
    assert out.exit_code == 0 and "toycaps" in out.output and "train=6 test=6" in out.output
    out = r.invoke(app, ["fit", "--adapter", "zero-shot", "--protocol", "retrieval", "--dataset", str(mpath),
                         "--backbone", TINY, "--cache-dir", cache, "--results", str(tmp_path / "r.jsonl")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "t2i: R@1" in out.output and "i2t: R@1" in out.output
    out = r.invoke(app, ["fit", "--adapter", "cross-modal-adapter", "--dataset", str(mpath), "--backbone", TINY,
                         "--data-root", str(data), "--set", "epochs=1", "--set", "batch_size=4"])  # fmt: skip
    assert out.exit_code == 1 and "pass --protocol retrieval" in out.output
    out = r.invoke(app, ["fit", "--adapter", "cross-modal-adapter", "--protocol", "retrieval", "--dataset",
                         str(mpath), "--backbone", TINY, "--data-root", str(data), "--set", "epochs=1", "--set",
                         "batch_size=4", "--results", str(tmp_path / "r.jsonl")])  # fmt: skip
    assert out.exit_code == 0, out.output
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["method"] for x in recs] == ["zero-shot", "cross-modal-adapter"]
    assert all(x["protocol"] == "retrieval" for x in recs)


def test_retrieval_sweep_and_leaderboard(captions_dataset, tmp_path, tiny):
    from featcache.leaderboard import write_leaderboard
    from featcache.sweep import load_sweep, run_sweep

    data, mpath = captions_dataset
    extract(mpath, tiny, data_root=data, cache_dir=tmp_path / "c", workers=0, progress=False)
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'protocol = "retrieval"\nbackbones = ["{TINY}"]\ndatasets = ["{mpath}"]\nmethods = ["zero-shot"]\n'
        f'seeds = [1]\ndata_root = "{data}"\n[[variants]]\nname = "cma"\nmethod = "cross-modal-adapter"\n'
        "options = { epochs = 1, batch_size = 4 }\n"
    )
    s = load_sweep(sweep)
    assert [j.shots for j in s.jobs] == [0, 0]
    counts = run_sweep(s, tmp_path / "r.jsonl", cache_dir=tmp_path / "c", progress=False, echo=lambda _: None)
    assert counts["done"] == 2 and counts["failed"] == 0
    wide, long, _ = write_leaderboard(tmp_path / "r.jsonl", "retrieval")
    assert sorted(wide["method"]) == ["cma", "zero-shot"]
    assert wide["toycaps/t2x_r10"].tolist() == [100.0, 100.0]


def test_two_processes_match_one_with_the_same_global_batch(captions_dataset, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank encodes half of every global batch of 6 pairs; the InfoNCE
    gathers both halves, so the updates equal a single process's."""
    import socket
    import subprocess
    import sys

    data, mpath = captions_dataset
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = ["--set", "epochs=2", "--set", "batch_size=5", "--set", "lr=0.01", "--set", "warmup=0"]
    args = ["fit", "--adapter", "cross-modal-adapter", "--protocol", "retrieval", "--dataset", str(mpath),
            "--backbone", TINY, "--data-root", str(data), "--device", "cpu", *sets]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "cli.main", *args, "--save", str(tmp_path / "ddp")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("retrieval (test)") == 1  # one process reports
    opts = {"epochs": 2, "batch_size": 5, "lr": 0.01, "warmup": 0.0}
    fit_retrieval_streaming("cross-modal-adapter", dataset=str(mpath), backbone=TINY, data_root=data, options=opts,
                            device="cpu", progress=False, save=tmp_path / "one")  # fmt: skip
    a = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_bert_adam_has_no_bias_correction():
    from featcache.streaming.retrieval_trainer import BertAdam

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = BertAdam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    p.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step()
    m, v = 0.1 * torch.tensor([0.5, 0.25]), 0.02 * torch.tensor([0.25, 0.0625])
    want = torch.tensor([1.0, -2.0]) - 0.1 * (m / (v.sqrt() + 1e-6) + 0.2 * torch.tensor([1.0, -2.0]))
    assert torch.allclose(p.detach(), want.double(), atol=1e-12)
    # Adam with bias correction would have moved each weight by lr * sign(g) (+ decay) instead
    assert not torch.allclose(
        p.detach(), (torch.tensor([1.0, -2.0]) - 0.1 * (1 + 0.2 * torch.tensor([1.0, -2.0]))).double()
    )


def test_killed_run_resumes_from_its_last_epoch(captions_dataset, tmp_path, monkeypatch):
    from featcache.streaming.retrieval_trainer import BertAdam

    data, mpath = captions_dataset
    kw = {"dataset": str(mpath), "backbone": TINY, "data_root": data, "device": "cpu", "progress": False,
          "options": {"epochs": 2, "batch_size": 6, "lr": 0.01}}  # fmt: skip
    clean = fit_retrieval_streaming("cross-modal-adapter", **kw, save=tmp_path / "clean")
    real_step, calls = BertAdam.step, {"n": 0}

    def crash_in_epoch_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 12 captions, batch 6: two steps per epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(BertAdam, "step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        fit_retrieval_streaming("cross-modal-adapter", **kw, save=tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(BertAdam, "step", real_step)
    resumed = fit_retrieval_streaming("cross-modal-adapter", **kw, save=tmp_path / "run")
    assert resumed.metrics == clean.metrics
    a, b = (torch.load(p / "state.pt", weights_only=True) for p in (tmp_path / "clean", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
