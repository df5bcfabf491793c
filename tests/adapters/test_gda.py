"""GDA: the estimators against direct numpy computations, logits by hand, the alpha grid, the synthesised novel
classes, learning, selection never touching test, save/load, and the CLI under both protocols."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_free_helpers import assert_test_split_unread, cli_fit_and_eval, import_synthetic, round_trip

from featcache.adapters import FitData, MethodError, create_adapter
from featcache.adapters.gda import class_mean_precision, novel_discriminant, shrunk_precision
from featcache.api import _evaluate_task, fit_method
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit

GRID = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def _problem(n_classes=4, dim=6, k=5, views=3, noise=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    x = F.normalize(means[y] + noise * torch.randn(len(y), dim, generator=g, dtype=dtype) / dim**0.5, dim=-1)
    aug = F.normalize(x[:, None] + 0.3 * torch.randn(len(y), views, dim, generator=g, dtype=dtype), dim=-1)
    vy = torch.arange(n_classes).repeat(6)
    vx = F.normalize(means[vy] + noise * torch.randn(len(vy), dim, generator=g, dtype=dtype) / dim**0.5, dim=-1)
    t = F.normalize(
        0.4 * means + 0.6 * F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1), dim=-1
    )
    return FitData(x, y, t, val_x=vx, val_y=vy, train_aug=aug)


def _np_stats(x, y, n_classes):
    x, y = x.numpy(), y.numpy()
    mus = np.stack([x[y == c].mean(0) for c in range(n_classes)])
    return x, y, mus


def test_shrunk_precision_is_the_ks_estimator():
    d = _problem()
    x, y, mus = _np_stats(d.train_x, d.train_y, 4)
    z = x - mus[y]
    n, dim = z.shape
    s_w = z.T @ z  # the within-class scatter
    want = dim * np.linalg.pinv(s_w + np.trace(s_w) / (n - 1) * np.eye(dim))
    got = shrunk_precision(torch.from_numpy(z))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_class_mean_precision_is_pinv_of_the_mean_class_covariance():
    d = _problem()
    x, y, mus = _np_stats(d.train_x, d.train_y, 4)
    want = np.linalg.pinv(np.mean([np.cov(x[y == c].T) for c in range(4)], axis=0))
    counts = torch.bincount(d.train_y)
    got = class_mean_precision(torch.from_numpy(x - mus[y]), d.train_y, counts)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-8)
    with pytest.raises(MethodError, match="at least 2 rows per class"):
        class_mean_precision(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor([1, 1]))


@pytest.mark.parametrize(("protocol", "kind"), [("fewshot", "shrunk"), ("base2novel", "class-mean"), ("", "shrunk")])
def test_logits_by_hand_every_view_a_sample(protocol, kind):
    d = _problem()
    d.protocol = protocol
    m = create_adapter("gda", dim=6, search=False, alpha=0.75).double()
    fit(m, d)
    n, v, dim = d.train_aug.shape
    x, y = d.train_aug.reshape(n * v, dim), d.train_y.repeat_interleave(v)  # views each their own sample
    xn, yn, mus = _np_stats(x, y, 4)
    z = xn - mus[yn]
    if kind == "shrunk":
        s_w = z.T @ z
        p = dim * np.linalg.pinv(s_w + np.trace(s_w) / (len(z) - 1) * np.eye(dim))
    else:
        p = np.linalg.pinv(np.mean([np.cov(xn[yn == c].T) for c in range(4)], axis=0))
    w = p @ mus.T
    b = math.log(1 / 4) - 0.5 * np.einsum("cd,de,ce->c", mus, p, mus)
    v_img = F.normalize(torch.randn(7, dim, dtype=torch.float64), dim=-1)
    want = 100 * v_img.numpy() @ d.text.numpy().T + 0.75 * (v_img.numpy() @ w + b)
    np.testing.assert_allclose(m(v_img, d.text).detach().numpy(), want, rtol=1e-8, atol=1e-8)
    # a subset of the training classes (ImageNet -> ImageNet-A) takes their own columns
    sub = m(v_img, d.text[[3, 1]], torch.tensor([3, 1]))
    np.testing.assert_allclose(sub.numpy(), want[:, [3, 1]], rtol=1e-8, atol=1e-8)
    assert m.trainable_params() == 0 and len(m.support) == n * v


def test_clean_views_and_float32():
    d = _problem(dtype=torch.float32)
    m = create_adapter("gda", dim=6, views="clean", search=False)
    fit(m, d)
    assert len(m.support) == len(d.train_x) and m.weight.dtype == torch.float32
    with pytest.raises(MethodError, match="views=each needs"):
        fit(create_adapter("gda", dim=6, views="each"), FitData(d.train_x, d.train_y, d.text, d.val_x, d.val_y))


def _dense_first_best(m, d):
    """The reference loop (main_few_shots.py:67-79): best_acc = 0, best_alpha = 0.1, strict >."""
    best_acc, best_alpha = 0, 0.1
    for a in GRID:
        logits = 100.0 * d.val_x @ d.text.t() + a * (d.val_x @ m.weight + m.bias)
        acc = (logits.argmax(-1) == d.val_y).float().mean().item()
        if acc > best_acc:
            best_acc, best_alpha = acc, a
    return best_alpha


@pytest.mark.parametrize("seed", range(6))
def test_alpha_search_matches_the_reference_loop(seed):
    d = _problem(n_classes=8, dim=10, k=3, noise=2.5, seed=seed, dtype=torch.float32)
    m = create_adapter("gda", dim=10)
    fit(m, d)
    assert float(m.alpha) == pytest.approx(_dense_first_best(m, d))


def test_alpha_search_keeps_the_first_best():
    d = _problem(noise=0.2, dtype=torch.float32)
    d.val_x, d.val_y = d.train_x, d.train_y  # every candidate classifies perfectly: the first one wins
    d.text = F.normalize(torch.zeros(4, 6).index_add_(0, d.train_y, d.train_x), dim=-1)
    m = create_adapter("gda", dim=6)
    fit(m, d)
    assert float(m.alpha) == pytest.approx(1e-4)
    d.val_y = (d.val_y + 1) % 4  # no candidate scores above 0: the initial alpha stays (the reference's 0.1)
    m = create_adapter("gda", dim=6)
    fit(m, d)
    assert float(m.alpha) == pytest.approx(0.1)
    m = create_adapter("gda", dim=6, alpha=5.0)
    fit(m, d)
    assert float(m.alpha) == 5.0


def test_novel_classes_by_hand():
    """main_base2new.py:85-111 written out per class with numpy, D = 6 (the reference hard-codes 512)."""
    d = _problem(n_classes=4, k=6)
    d.protocol = "base2novel"
    m = create_adapter("gda", dim=6, search=False, alpha=0.375, novel_topk=10, novel_text_repeat=3).double()
    fit(m, d)
    g = torch.Generator().manual_seed(5)
    tn = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=-1)  # 3 novel class texts
    vecs = m.support.double().numpy()
    mus, ps = [], []
    for w in tn.numpy():
        idx = np.argsort(-(vecs @ w), kind="stable")[:10]
        xk = vecs[idx]
        mus.append(np.concatenate([xk, np.repeat(w[None], 3, 0)]).mean(0))
        cov = (xk - w).T @ (xk - w) / 9
        ps.append(6 * np.linalg.pinv(9 * cov + np.trace(cov) * np.eye(6)))
    mus, p = np.stack(mus), np.mean(ps, axis=0)
    w_new = p @ mus.T
    b_new = math.log(1 / 3) - 0.5 * np.einsum("cd,de,ce->c", mus, p, mus)
    v = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    want = 100 * v.numpy() @ tn.numpy().T + 0.375 * (v.numpy() @ w_new + b_new)
    got = m(v, tn, torch.full((3,), -1))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-8)
    wt, bt = novel_discriminant(m.support.double(), tn, 10, 3)
    np.testing.assert_allclose(wt.numpy(), w_new, rtol=1e-8, atol=1e-8)
    # the classifier is built once per class set and reused for the next batch
    assert m._novel is not None and torch.equal(m(v, tn, torch.full((3,), -1)), got)
    # a set mixing trained and new classes gets the synthesised classifier over all of its classes
    mixed = m(v, torch.cat([d.text[:1], tn]), torch.tensor([0, -1, -1, -1]))
    assert mixed.shape == (5, 4)


def test_learns_on_the_synthetic_store(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=4)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1)
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter("gda", dim=st.dim)
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":
                assert got["novel_acc"] is not None and got["novel_acc"] > 20


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


def test_test_split_is_never_read_while_fitting(imported, monkeypatch):
    assert_test_split_unread("gda", imported, monkeypatch)


def test_save_load_round_trip_keeps_novel_classes(imported, tmp_path):
    run = fit_method("gda", name="synth", cache_dir=imported, shots=4, save=tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["covariance"] == "auto" and meta["config"]["val_draw"] == "full"
    round_trip(run, tmp_path / "run", 32)  # novel classes are rebuilt from the saved support views


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol):
    cli_fit_and_eval("gda", digits_store, tmp_path, protocol)
