"""TaskRes: logits by hand, the residual's scale against the reference's raw text base, the reference's optimiser
and schedule replayed by hand, per-dataset and per-shots defaults, views, unseen classes, learning, selection,
save/load and the CLI under both protocols."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from training_free_helpers import assert_test_split_unread, import_synthetic, round_trip
from typer.testing import CliRunner

import featcache.train
from featcache.adapters import FitData, create_adapter
from featcache.api import _evaluate_task, fit_method, resolve_config
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def _problem(n_classes=4, dim=6, k=5, views=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    x = F.normalize(means[y] + torch.randn(len(y), dim, generator=g, dtype=dtype) / dim**0.5, dim=-1)
    aug = None
    if views:
        aug = F.normalize(x[:, None] + 0.3 * torch.randn(len(y), views, dim, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(0.3 * means + F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1), dim=-1)
    return FitData(x, y, t, train_aug=aug)


def test_logits_by_hand_and_parameter_count():
    d = _problem()
    m = create_adapter("taskres", dim=6, alpha=0.7, base_norm=3.0)
    m.setup(d)
    assert m.trainable_params() == 4 * 6 and torch.equal(m.residual, torch.zeros(4, 6, dtype=torch.float64))
    with torch.no_grad():
        m.residual.copy_(torch.randn(4, 6, dtype=torch.float64))
    v = d.train_x[:3]
    x = m.residual.detach().numpy()
    for i in range(3):
        for c in range(4):
            tc = 3.0 * d.text[c].numpy() + 0.7 * x[c]
            want = 100.0 * float(v[i].numpy() @ tc) / math.sqrt(float(tc @ tc))
            assert m(v, d.text)[i, c].item() == pytest.approx(want, rel=1e-12)
    # at zero residual it is zero-shot CLIP whatever base_norm is
    z = create_adapter("taskres", dim=6, base_norm=7.0)
    z.setup(d)
    torch.testing.assert_close(z(v, d.text), 100.0 * v @ d.text.t(), rtol=1e-12, atol=1e-12)


def test_base_norm_reproduces_the_reference_raw_base():
    """The reference adds alpha·x to the raw text features b (norm ||b||); with base_norm = ||b|| on the unit-norm
    store text, the logits are the reference's for every residual."""
    d = _problem()
    s = 9.3
    raw = s * d.text  # one template: the raw features are the unit ones times their norm
    m = create_adapter("taskres", dim=6, alpha=0.5, base_norm=s)
    m.setup(d)
    with torch.no_grad():
        m.residual.copy_(torch.randn(4, 6, dtype=torch.float64))
    ref = 100.0 * F.normalize(d.train_x, dim=-1) @ F.normalize(raw + 0.5 * m.residual, dim=-1).t()
    torch.testing.assert_close(m(d.train_x, d.text), ref, rtol=1e-12, atol=1e-12)


def _reference_run(d: FitData, raw: torch.Tensor, alpha: float, epochs: int, lr: float, bs: int, seed: int):
    """geekyutao/TaskRes under Dassl, by hand: residual zeros; Adam(lr, weight_decay=5e-4) (L2 in the gradient);
    epoch 0 at the warm-up lr 1e-5, then CosineAnnealingLR(T_max=epochs) stepped once per epoch from the top;
    batches of `bs` in a random order, the last partial batch dropped; CE on 100·n(v)·n(b + alpha·x)ᵀ; the last
    epoch kept. The batch order is drawn as featcache's loop draws it (torch.randperm on a seeded generator)."""
    x = torch.zeros_like(raw, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    n = len(d.train_y)
    for e in range(epochs):
        opt.param_groups[0]["lr"] = 1e-5 if e == 0 else lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - n % bs, bs):
            idx = perm[i : i + bs]
            logits = 100.0 * d.train_x[idx] @ F.normalize(raw + alpha * x, dim=-1).t()
            loss = F.cross_entropy(logits, d.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return x.detach()


def test_training_replays_the_reference_optimiser_and_schedule():
    d = _problem(k=7)  # 28 rows, batch 8: 3 steps per epoch and 4 rows dropped
    s, alpha, epochs, lr = 6.0, 0.5, 12, 2e-2
    want = _reference_run(d, s * d.text, alpha, epochs, lr, 8, seed=3)
    m = create_adapter("taskres", dim=6, alpha=alpha, base_norm=s, epochs=epochs, lr=lr, batch_size=8)
    res = fit(m, d, seed=3)
    assert res.epochs == epochs and res.best_epoch is None  # no val, no selection: the last epoch
    torch.testing.assert_close(m.residual.detach(), want, rtol=1e-9, atol=1e-12)
    assert want.abs().max() > 1e-3  # it did move


def test_per_dataset_and_per_shots_defaults():
    assert resolve_config("taskres", "oxford_flowers").alpha == 1.0
    assert resolve_config("taskres", "dtd").alpha == 0.5 and resolve_config("taskres", "dtd").lr == 2e-3
    assert resolve_config("taskres", "imagenet").lr == 2e-4
    assert [resolve_config("taskres", "dtd", shots=k).epochs for k in (1, 2, 4, 8, 16)] == [100] * 3 + [200] * 2
    assert resolve_config("taskres", "dtd", {"epochs": 7}, shots=16).epochs == 7  # the user's word wins
    cfg = resolve_config("taskres", "dtd")
    assert (cfg.optimizer, cfg.weight_decay, cfg.batch_size, cfg.schedule, cfg.warmup_epochs, cfg.warmup_lr,
            cfg.select, cfg.drop_last) == ("adam", 5e-4, 256, "dassl-cosine", 1, 1e-5, "last", True)  # fmt: skip


def test_views_one_random_view_per_epoch_or_clean():
    d = _problem(views=3)
    clean = FitData(d.train_x, d.train_y, d.text)
    runs = {}
    for name, data, views in (("auto", d, "auto"), ("clean", d, "clean"), ("none", clean, "auto")):
        m = create_adapter("taskres", dim=6, epochs=3, lr=0.05, batch_size=8, views=views)
        fit(m, data, seed=1)
        runs[name] = m.residual.detach()
    assert torch.equal(runs["clean"], runs["none"])  # views=clean ignores the stored views
    assert not torch.allclose(runs["auto"], runs["clean"])  # auto trains on them


def test_unseen_classes_get_no_residual():
    d = _problem()
    m = create_adapter("taskres", dim=6, base_norm=2.0)
    m.setup(d)
    with torch.no_grad():
        m.residual.copy_(torch.randn(4, 6, dtype=torch.float64))
    other = F.normalize(torch.randn(3, 6, dtype=torch.float64), dim=-1)
    v = d.train_x[:5]
    torch.testing.assert_close(m(v, other, torch.full((3,), -1)), 100.0 * v @ other.t(), rtol=1e-12, atol=1e-12)
    # a target class that is a training class (by name) keeps that class's residual
    mixed = m(v, torch.cat([d.text[2:3], other[:1]]), torch.tensor([2, -1]))
    torch.testing.assert_close(mixed[:, 0], m(v, d.text)[:, 2])
    torch.testing.assert_close(mixed[:, 1], 100.0 * v @ other[0])


def test_learns_on_the_synthetic_store(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=4)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1)
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter("taskres", dim=st.dim, epochs=100)
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":
                assert got["novel_acc"] == base["novel_acc"]  # novel classes: zero residual, zero-shot


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


def test_selection_never_reads_test_or_val(imported, monkeypatch):
    """Validation-free: the test split is not read while fitting, and val accuracy is never computed."""

    def no_val(*a, **k):
        raise AssertionError("taskres looked at validation rows")

    monkeypatch.setattr(featcache.train, "accuracy", no_val)
    assert_test_split_unread("taskres", imported, monkeypatch, {"epochs": 3})
    run = fit_method("taskres", name="synth", cache_dir=imported, shots=4, options={"epochs": 3})
    assert run.record.selection == "validation-free" and run.task.fit.val_x is not None


def test_save_load_round_trip(imported, tmp_path):
    run = fit_method("taskres", name="synth", cache_dir=imported, shots=4, options={"epochs": 20},
                     save=tmp_path / "run")  # fmt: skip
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["epochs"] == 20 and meta["selection"] == "validation-free"
    assert run.record.trainable_params == 5 * 32  # base2novel: the 5 base classes
    round_trip(run, tmp_path / "run", 32)


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol):
    from cli.main import app

    runner = CliRunner()
    cache = digits_store.parent.parent
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["fit", "--adapter", "taskres", "--dataset", "digits", "--backbone", "featcache-tiny/random",
                            "--cache-dir", str(cache), "--shots", "4", "--protocol", protocol, "--results", str(out),
                            "--save", str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    rec = json.loads(out.read_text())
    classes = 10 if protocol == "fewshot" else 5
    assert rec["method"] == "taskres" and rec["trainable_params"] == classes * 64 and rec["config"]["epochs"] == 100
    assert rec["selection"] == "validation-free" and rec["fit"]["epochs"] == 100
    b2n = {f"{m}{k}" for m in ("base_acc", "novel_acc", "hm") for k in ("", "5")}  # top-1 and top-5
    keys = {"acc", "acc5"} if protocol == "fewshot" else b2n
    assert set(rec["metrics"]) == keys and all(v is not None for v in rec["metrics"].values())
    e = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(cache)])
    assert e.exit_code == 0 and "digits -> digits  xd" in e.output, e.output + e.stderr
