"""LP++: initialisation and step sizes by hand, logits by hand (trained and never-trained classes), the training
loop against a direct transcription of the reference's, the K-shot val selection, learning, save/load, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_free_helpers import assert_test_split_unread, import_synthetic, round_trip
from typer.testing import CliRunner

from featcache.adapters import FitData, MethodError, create_adapter
from featcache.adapters.lpp import init_alpha, lipschitz_steps
from featcache.api import _evaluate_task, fit_method
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def _problem(n_classes=3, dim=5, k=4, views=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    x = F.normalize(means[y] + 0.7 * torch.randn(len(y), dim, generator=g, dtype=dtype), dim=-1)
    aug = F.normalize(x[:, None] + 0.3 * torch.randn(len(y), views, dim, generator=g, dtype=dtype), dim=-1)
    vy = torch.arange(n_classes).repeat(k)
    vx = F.normalize(means[vy] + 0.7 * torch.randn(len(vy), dim, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(means + 0.8 * torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    return FitData(x, y, t, val_x=vx, val_y=vy, train_aug=aug)


def test_initialisation_and_step_sizes_by_hand():
    d = _problem()
    x, y, t = d.train_x, d.train_y, d.text
    m = create_adapter("lp++", dim=5, epochs=0, views="clean", seed=3)
    fit(m, d)
    torch.testing.assert_close(m.weight, torch.stack([x[y == c].sum(0) for c in range(3)]))  # class SUMS
    diag = [float((x[y == c] @ t[c]).mean()) for c in range(3)]
    torch.testing.assert_close(m.alpha, torch.full((3,), 250 * np.mean(diag), dtype=torch.float64))
    assert init_alpha(x, y, t) == pytest.approx(250 * np.mean(diag))
    assert float(m.bias.abs().max()) <= 1 / 5**0.5 and len(set(m.bias.tolist())) == 3  # nn.Linear's U(±1/√D)
    lr_w, lr_a = lipschitz_steps(x, t)
    xn = x.numpy()
    assert lr_w == pytest.approx(4 * 12 / np.linalg.eigh(xn.T @ xn)[0].max())
    assert lr_a == pytest.approx(12 / (4 * ((xn @ t.numpy().T) ** 2).sum(0).max()))
    assert m.trainable_params() == 3 * (5 + 2)


def test_logits_by_hand_and_classes_never_trained_on():
    d = _problem()
    m = create_adapter("lp++", dim=5, epochs=30, seed=1)
    fit(m, d)
    v = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    want = v @ m.weight.t() + m.bias + m.alpha * (v @ d.text.t())
    torch.testing.assert_close(m(v, d.text), want)
    other = F.normalize(torch.randn(2, 5, dtype=torch.float64), dim=-1)
    got = m(v, torch.cat([d.text[[1]], other]), torch.tensor([1, -1, -1]))
    torch.testing.assert_close(got[:, 0], want[:, 1])
    torch.testing.assert_close(got[:, 1:], m.alpha.mean() * v @ other.t())  # the text term alone, mean α
    clip = create_adapter("lp++", dim=5, epochs=30, seed=1, novel_logits="clip")
    fit(clip, d)
    torch.testing.assert_close(clip(v, other, torch.tensor([-1, -1])), 100 * v @ other.t())


def _reference(x, y, t, vx, vy, bias0, epochs, zero_alpha_grad=False):
    """linear_probe_p2.py's loop, transcribed (float64 instead of float16)."""
    n, c = len(x), len(t)
    classifier = torch.nn.Linear(x.shape[1], c, bias=True).double()
    classifier.weight.data = torch.stack([x[y == k].sum(0) for k in range(c)])
    classifier.bias.data = bias0.clone()
    ftt = x @ t.t()
    alpha_tilde = torch.stack([ftt[y == k, k].mean() for k in range(c)]) * 4  # compute_centroids_alpha · shots
    alpha_vec = (250 / 4 * alpha_tilde).mean() * torch.ones(1, c, dtype=torch.float64)
    alpha_vec.requires_grad_(True)
    lr_alpha = n / (max(torch.sum(torch.pow(ftt, 2), dim=0)) * 4)
    lr_temp = 4 * n / max(np.linalg.eigh((x.t() @ x).numpy())[0])
    optimizer = torch.optim.SGD(classifier.parameters(), lr_temp, momentum=0.9)
    best_acc, snap = 0.0, None
    for epoch in range(epochs):
        logits = classifier(x) + torch.ones(n, 1, dtype=torch.float64) @ alpha_vec * ftt
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data
            if zero_alpha_grad:
                alpha_vec.grad.zero_()
        with torch.no_grad():
            lv = classifier(vx) + torch.ones(len(vx), 1, dtype=torch.float64) @ alpha_vec * (vx @ t.t())
        acc_val = np.mean(lv.argmax(dim=1).numpy() == vy.numpy()) * 100.0
        if acc_val >= best_acc:
            best_acc = acc_val
            snap = (classifier.weight.detach().clone(), classifier.bias.detach().clone(), alpha_vec.detach()[0].clone())
    return snap


@pytest.mark.parametrize("alpha_grad", ["accumulate", "zeroed"])
def test_training_matches_the_reference_loop(alpha_grad):
    d = _problem(seed=2)
    init = create_adapter("lp++", dim=5, epochs=0, views="clean", seed=7)
    fit(init, d)
    m = create_adapter("lp++", dim=5, epochs=45, views="clean", seed=7, alpha_grad=alpha_grad)
    fit(m, d)
    w, b, a = _reference(d.train_x, d.train_y, d.text, d.val_x, d.val_y, init.bias, 45, alpha_grad == "zeroed")
    torch.testing.assert_close(m.weight, w)
    torch.testing.assert_close(m.bias, b)
    torch.testing.assert_close(m.alpha, a)
    assert not torch.equal(m.alpha, init.alpha)  # α moved (its steps came at epochs 10, 20, 30, 40)


def test_accumulated_and_zeroed_alpha_gradients_differ():
    d = _problem(seed=2)
    grads = ("accumulate", "zeroed")
    runs = [create_adapter("lp++", dim=5, epochs=30, seed=7, select="last", alpha_grad=g) for g in grads]
    for m in runs:
        fit(m, d)
    assert not torch.allclose(runs[0].alpha, runs[1].alpha)


def test_one_augmented_view_per_image_drawn_once():
    d = _problem()
    m = create_adapter("lp++", dim=5, epochs=0, seed=5)
    fit(m, d)
    sums = m.weight  # the class sums of the rows it trains on: one stored view per image
    pick = torch.randint(3, (12,), generator=m.generator())
    x = d.train_aug[torch.arange(12), pick]
    torch.testing.assert_close(sums, torch.stack([x[d.train_y == c].sum(0) for c in range(3)]))
    with pytest.raises(MethodError, match="views=one needs a store extracted with --augment-views"):
        fit(create_adapter("lp++", dim=5, views="one"), FitData(d.train_x, d.train_y, d.text, d.val_x, d.val_y))


def test_selection_needs_val_unless_last():
    d = _problem()
    no_val = FitData(d.train_x, d.train_y, d.text)
    with pytest.raises(MethodError, match="selects on a validation split"):
        fit(create_adapter("lp++", dim=5), no_val)
    fit(create_adapter("lp++", dim=5, select="last", epochs=5), no_val)


def test_learns_on_the_synthetic_store_and_keeps_zero_shot_novel(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=3)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1, val_draw="k-shot")
            assert len(task.fit.val_y) == 8 * task.fit.num_classes
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter("lp++", dim=st.dim, seed=1)
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":
                assert got["novel_acc"] == base["novel_acc"]  # mean(α) · v·t ranks as zero-shot


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


def test_selects_on_k_shot_val_and_never_reads_test(imported, monkeypatch):
    assert_test_split_unread("lp++", imported, monkeypatch, {"epochs": 20})
    run = fit_method("lp++", name="synth", cache_dir=imported, shots=4, options={"epochs": 20})
    assert run.record.selection == "few-shot-val" and run.record.config["val_draw"] == "k-shot"
    assert len(run.task.val_rows) == 4 * 10  # K per class from val (all classes drawn, then base kept)


def test_save_load_round_trip(imported, tmp_path):
    run = fit_method("lp++", name="synth", cache_dir=imported, shots=4, options={"epochs": 20},
                     save=tmp_path / "run")  # fmt: skip
    assert run.record.trainable_params == 5 * (32 + 2)  # base2novel: the 5 base classes
    round_trip(run, tmp_path / "run", 32)


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol):
    from cli.main import app

    runner = CliRunner()
    cache = digits_store.parent.parent
    out = tmp_path / "r.jsonl"
    r = runner.invoke(app, ["fit", "--adapter", "lp++", "--dataset", "digits", "--backbone", "featcache-tiny/random",
                            "--cache-dir", str(cache), "--shots", "4", "--protocol", protocol, "--results", str(out),
                            "--save", str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    rec = json.loads(out.read_text())
    classes = 10 if protocol == "fewshot" else 5
    assert rec["method"] == "lp++" and rec["trainable_params"] == classes * (64 + 2) and rec["config"]["epochs"] == 300
    assert rec["selection"] == "few-shot-val" and rec["sampled"]["n_val"] == 4 * 10  # drawn over every class
    b2n = {f"{m}{k}" for m in ("base_acc", "novel_acc", "hm") for k in ("", "5")}  # top-1 and top-5
    keys = {"acc", "acc5"} if protocol == "fewshot" else b2n
    assert set(rec["metrics"]) == keys and all(v is not None for v in rec["metrics"].values())
    e = runner.invoke(app, ["eval", "--run", str(tmp_path / "run"), "--dataset", "digits", "--cache-dir", str(cache)])
    assert e.exit_code == 0 and "digits -> digits  xd" in e.output, e.output + e.stderr
