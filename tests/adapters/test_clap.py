"""ZS-LP and CLAP: logits by hand, the penalty, the multipliers and the augmented-Lagrangian step by hand, one
SGD step against autograd, the Dassl schedule and batches, learning, selection, save/load and the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from training_free_helpers import assert_test_split_unread, import_synthetic, round_trip
from typer.testing import CliRunner

import featcache.adapters.clap as clap
import featcache.train
from featcache.adapters import FitData, MethodError, create_adapter
from featcache.api import _evaluate_task, fit_method
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def _problem(n_classes=3, dim=4, k=4, views=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    x = F.normalize(means[y] + 0.5 * torch.randn(len(y), dim, generator=g, dtype=dtype), dim=-1)
    aug = F.normalize(x[:, None] + 0.3 * torch.randn(len(y), views, dim, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(means + 0.8 * torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    return FitData(x, y, t, val_x=x.clone(), val_y=y.clone(), train_aug=aug)


def test_zs_lp_logits_by_hand_and_zero_shot_fallback():
    d = _problem()
    m = create_adapter("zs-lp", dim=4, epochs=0)
    fit(m, d)
    v = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(m(v, d.text), 100 * v @ d.text.t())  # untrained: W = t, zero-shot
    w = torch.tensor([[2.0, 0, 0, 0], [0, 0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m.weight = w
    want = 100 * v @ (w / w.norm(dim=-1, keepdim=True)).t()
    torch.testing.assert_close(m(2.0 * v, d.text), want)  # both sides normalised
    other = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=-1)
    got = m(v, torch.cat([d.text[[2]], other]), torch.tensor([2, -1, -1]))
    torch.testing.assert_close(got[:, 0], want[:, 2])
    torch.testing.assert_close(got[:, 1:], 100 * v @ other.t())  # never-trained classes: text, same scale 100
    assert m.trainable_params() == 3 * 4


def test_penalty_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 4.0]])
    lam = torch.tensor([0.5, 2.0, 0.1])
    # ||W - t||^2 = 4, 0, 25; mean of λ·h = (2 + 0 + 2.5) / 3
    assert float(clap.penalty(w, t, lam, "l2")) == pytest.approx(1.5)
    cos = torch.tensor([1 / math.sqrt(5), 1.0, 0.0])
    assert float(clap.penalty(w, t, lam, "cosine")) == pytest.approx(float((lam * (1 - cos)).mean()))


def test_zero_shot_multipliers_by_hand():
    d = _problem()
    base = 3.0 * d.text  # raw-space base: the zero-shot logits normalise it
    p = torch.softmax(100 * d.train_x @ d.text.t(), -1)
    want = torch.stack([p[d.train_y == c, c].mean() for c in range(3)])
    lam = clap.zero_shot_multipliers(d.train_x, d.train_y, base, 100.0, "zero-shot")
    torch.testing.assert_close(lam, want)
    torch.testing.assert_close(clap.zero_shot_multipliers(d.train_x, d.train_y, base, 100, "corrected"),
                               want * 3 / want.sum())  # fmt: skip
    torch.testing.assert_close(clap.zero_shot_multipliers(d.train_x, d.train_y, base, 100, "constant"),
                               torch.full((3,), float(want.mean()), dtype=torch.float64))  # fmt: skip
    assert torch.equal(clap.zero_shot_multipliers(d.train_x, d.train_y, base, 100, "balanced"), torch.ones(3).double())


def test_augmented_lagrangian_step_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 4.0]])  # h = 4, 0, 25
    lam, rho = torch.tensor([0.5, 0.2, -3.0]), torch.tensor([0.0, 1.0, 0.1])
    new_lam, new_rho = clap.lagrangian_step(w, t, lam, rho)
    assert new_lam.tolist() == pytest.approx([0.5, 0.2, 0.0])  # max(0, λ + ρ h): -3 + 2.5 < 0 -> 0
    assert new_rho.tolist() == [4.0, 0.0, 25.0]


def test_adaptive_multipliers_update_after_every_epoch(monkeypatch):
    d = _problem()
    seen = []
    real = clap.lagrangian_step

    def spy(w, base, lam, rho):
        seen.append((lam.clone(), rho.clone()))
        return real(w, base, lam, rho)

    monkeypatch.setattr(clap, "lagrangian_step", spy)
    fixed = create_adapter("clap", dim=4, epochs=3, seed=1)
    fit(fixed, d)
    assert seen == []
    m = create_adapter("clap", dim=4, epochs=3, seed=1, multipliers="adaptive")
    fit(m, d)
    assert len(seen) == 3 and torch.equal(seen[0][1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(seen[0][0], fixed.lam)  # starts from the zero-shot multipliers
    torch.testing.assert_close(seen[1][0], seen[0][0])  # the first step has ρ = 0: λ unchanged
    assert not torch.equal(m.lam, fixed.lam)


def test_one_step_against_autograd():
    """clean features, 12 rows < 256: one full batch per epoch, so one epoch is one SGD step on CE + penalty."""
    d = _problem()
    m = create_adapter("clap", dim=4, epochs=1, warmup_epochs=0, schedule="constant", views="clean", text_norm=2.0)
    fit(m, d)
    base = 2.0 * d.text
    w = base.clone().requires_grad_()
    lam = clap.zero_shot_multipliers(d.train_x, d.train_y, base, 100.0, "zero-shot")
    logits = 100 * d.train_x @ F.normalize(w, dim=-1).t()
    (F.cross_entropy(logits, d.train_y) + (lam * (w - base).pow(2).sum(-1)).mean()).backward()
    torch.testing.assert_close(m.weight, (base - 0.1 * w.grad).detach())  # momentum buffer = grad at step 1
    torch.testing.assert_close(m.lam, lam)


def test_dassl_schedule():
    cfg = clap.ZsLpConfig()
    assert clap.dassl_lr(cfg, 0) == 1e-5 and clap.dassl_lr(cfg, 1) == pytest.approx(0.1)
    assert clap.dassl_lr(cfg, 2) == pytest.approx(0.05 * (1 + math.cos(math.pi / 300)))
    assert clap.dassl_lr(cfg, 299) == pytest.approx(0.05 * (1 + math.cos(298 * math.pi / 300)))


@pytest.mark.parametrize(("n_img", "views", "batches"), [(40, "each", [120]), (600, "clean", [256, 256]),
                                                         (600, "each", [256, 256]), (100, "clean", [100])])  # fmt: skip
def test_batches_per_epoch_follow_dassl(monkeypatch, n_img, views, batches):
    """floor(N/256) batches of 256 from the shuffled pool of views when N >= 256 (drop_last), else one batch."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_img) % 4
    x = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    aug = F.normalize(torch.randn(n_img, 3, 8, generator=g), dim=-1)
    d = FitData(x, y, F.normalize(torch.randn(4, 8, generator=g), dim=-1), train_aug=aug)
    sizes = []
    real = clap.cosine_logits

    def spy(images, weight, scale):
        sizes.append(len(images))
        return real(images, weight, scale)

    monkeypatch.setattr(clap, "cosine_logits", spy)
    fit(create_adapter("zs-lp", dim=8, epochs=2, views=views), d)
    assert sizes == batches * 2


def test_views_and_options_are_checked():
    d = _problem()
    clean = FitData(d.train_x, d.train_y, d.text)
    with pytest.raises(MethodError, match="views=each needs a store extracted with --augment-views"):
        fit(create_adapter("clap", dim=4, views="each", epochs=1), clean)
    fit(create_adapter("clap", dim=4, epochs=1), clean)  # auto: the clean features
    with pytest.raises(MethodError, match="multipliers.*must be one of fixed, adaptive"):
        create_adapter("clap", multipliers="sometimes")


def test_determinism_under_a_seed():
    d = _problem()
    runs = []
    for seed in (4, 4, 5):
        m = create_adapter("clap", dim=4, epochs=5, seed=seed, batch_size=8)
        fit(m, d)
        runs.append(m.weight.clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("method", ["zs-lp", "clap"])
def test_learns_on_the_synthetic_store_and_keeps_zero_shot_novel(tmp_path, method):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=3)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1)
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter(method, dim=st.dim, seed=1)
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":
                assert got["novel_acc"] == base["novel_acc"]  # novel classes score with their text


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


@pytest.mark.parametrize("method", ["zs-lp", "clap"])
def test_validation_free_never_reads_test_or_val(imported, monkeypatch, method):
    def no_val(*a, **k):
        raise AssertionError(f"{method} looked at validation rows")

    monkeypatch.setattr(featcache.train, "accuracy", no_val)
    assert_test_split_unread(method, imported, monkeypatch, {"epochs": 3})
    run = fit_method(method, name="synth", cache_dir=imported, shots=4, options={"epochs": 3})
    assert run.record.selection == "validation-free" and run.task.fit.val_x is not None


def test_save_load_round_trip(imported, tmp_path):
    run = fit_method("clap", name="synth", cache_dir=imported, shots=4, options={"epochs": 20},
                     save=tmp_path / "run")  # fmt: skip
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["constraint"] == "l2" and meta["config"]["multipliers"] == "fixed"
    assert run.record.trainable_params == 5 * 32  # base2novel: the 5 base classes
    round_trip(run, tmp_path / "run", 32)


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
@pytest.mark.parametrize("method", ["zs-lp", "clap"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol, method):
    from cli.main import app

    runner = CliRunner()
    cache = digits_store.parent.parent
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["fit", "--adapter", method, "--dataset", "digits", "--backbone", "featcache-tiny/random",
                            "--cache-dir", str(cache), "--shots", "4", "--protocol", protocol, "--results", str(out),
                            "--save", str(tmp_path / "run"), "--set", "epochs=30"])  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    rec = json.loads(out.read_text())
    classes = 10 if protocol == "fewshot" else 5
    assert rec["method"] == method and rec["trainable_params"] == classes * 64 and rec["config"]["epochs"] == 30
    assert rec["selection"] == "validation-free"
    b2n = {f"{m}{k}" for m in ("base_acc", "novel_acc", "hm") for k in ("", "5")}  # top-1 and top-5
    keys = {"acc", "acc5"} if protocol == "fewshot" else b2n
    assert set(rec["metrics"]) == keys and all(v is not None for v in rec["metrics"].values())
    e = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(cache)])
    assert e.exit_code == 0 and "digits -> digits  xd" in e.output, e.output + e.stderr
