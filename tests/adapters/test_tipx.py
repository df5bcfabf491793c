"""Tip-X: the KL affinity by hand and against the reference's own functions (both of its bugs as options), the
(alpha, beta, gamma) search against the reference loop, learning, selection, save/load, CLI."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training_free_helpers import assert_test_split_unread, cli_fit_and_eval, import_synthetic, round_trip

from featcache.adapters import FitData, MethodError, create_adapter
from featcache.api import _evaluate_task, fit_method
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def _problem(n_classes=5, dim=12, k=3, noise=1.5, seed=0, dtype=torch.float64, n_val=50):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    x = F.normalize(means[y] + noise * torch.randn(len(y), dim, generator=g, dtype=dtype) / dim**0.5, dim=-1)
    aug = F.normalize(x[:, None] + 0.3 * torch.randn(len(y), 3, dim, generator=g, dtype=dtype), dim=-1)
    vy = torch.arange(n_classes).repeat(n_val)
    vx = F.normalize(means[vy] + noise * torch.randn(len(vy), dim, generator=g, dtype=dtype) / dim**0.5, dim=-1)
    t = F.normalize(
        0.4 * means + 0.6 * F.normalize(torch.randn(n_classes, dim, generator=g, dtype=dtype), dim=-1), dim=-1
    )
    norms = 1 + 4 * torch.rand(len(y), 3, generator=g, dtype=dtype)  # raw view = aug x norm
    return FitData(x, y, t, val_x=vx, val_y=vy, train_aug=aug, train_aug_norms=norms)


# the reference's functions (tipx.py:17-66), as written there
def compute_image_text_distributions(temp, train_images_features_agg, test_features, vanilla_zeroshot_weights):
    train = nn.Softmax(dim=-1)(train_images_features_agg.T @ vanilla_zeroshot_weights / temp)
    test = nn.Softmax(dim=-1)(test_features @ vanilla_zeroshot_weights / temp)
    return train, test


def get_kl_divergence_sims(train_image_class_distribution, test_image_class_distribution):
    bs = 100
    kl_divs_sim = torch.zeros((test_image_class_distribution.shape[0], train_image_class_distribution.shape[0]),
                              dtype=test_image_class_distribution.dtype)  # fmt: skip
    for i in range(test_image_class_distribution.shape[0] // bs):
        curr_batch = test_image_class_distribution[i * bs : (i + 1) * bs]
        repeated_batch = torch.repeat_interleave(curr_batch, train_image_class_distribution.shape[0], dim=0)
        q = train_image_class_distribution
        q_repeated = torch.cat([q] * bs)
        kl = repeated_batch * (repeated_batch.log() - q_repeated.log())
        kl = kl.sum(dim=-1)
        kl = kl.view(bs, -1)
        kl_divs_sim[i * bs : (i + 1) * bs, :] = kl
    return kl_divs_sim


def scale_(x, target):
    y = (x - x.min()) / (x.max() - x.min())
    y *= target.max() - target.min()
    y += target.min()
    return y


def _keys(d):
    order = torch.argsort(d.train_y, stable=True)
    return F.normalize((d.train_aug * d.train_aug_norms[..., None]).mean(1), dim=-1)[order], d.train_y[order]


def _reference_logits(d, keys, labels, test, alpha, beta, gamma):
    """hparam_search's final test logits (tipx.py:113-126) for given alpha, beta, gamma."""
    agg, zw, onehot = keys.t(), d.text.t(), F.one_hot(labels, 5).to(d.val_x.dtype)
    train_p, test_p = compute_image_text_distributions(0.5, agg, test, zw)
    _, val_p = compute_image_text_distributions(0.5, agg, d.val_x, zw)
    test_kl = get_kl_divergence_sims(train_p, test_p)
    new_knowledge = d.val_x @ agg  # still val's at this point: the reference's bug 2
    kl_logits = -scale_(test_kl, new_knowledge) @ onehot
    cache_logits = ((-1) * (beta - beta * (test @ agg))).exp() @ onehot
    return 100.0 * test @ zw + kl_logits * gamma + cache_logits * alpha, get_kl_divergence_sims(train_p, val_p)


def test_reference_mode_equals_the_reference_code():
    """kl_range=batch, kl_rows=reference: the reference's test-time logits exactly (both bugs kept)."""
    d = _problem(n_val=50)  # 250 val rows: the last 50 keep KL 0 (bug 1)
    m = create_adapter("tip-x", dim=12, search=False, alpha=1.5, beta=2.5, gamma=0.75,
                       kl_range="batch", kl_rows="reference").double()  # fmt: skip
    fit(m, d)
    keys, labels = _keys(d)
    g = torch.Generator().manual_seed(9)
    test = F.normalize(torch.randn(230, 12, generator=g, dtype=torch.float64), dim=-1)
    want, val_kl = _reference_logits(d, keys, labels, test, 1.5, 2.5, 0.75)
    assert (val_kl[200:] == 0).all()
    torch.testing.assert_close(m(test, d.text), want, rtol=1e-9, atol=1e-9)


def test_default_mode_by_hand():
    """kl_range=val, kl_rows=all: the KL of every row, rescaled with the val KL and cosine ranges frozen at fit."""
    d = _problem()
    m = create_adapter("tip-x", dim=12, search=False, alpha=1.5, beta=2.5, gamma=0.75).double()
    fit(m, d)
    keys, labels = _keys(d)
    onehot = F.one_hot(labels, 5).double()

    def dist(x):
        return (x @ d.text.t() / 0.5).softmax(-1)

    def kl(x):  # KL(p_i || q_j) elementwise
        p, q = dist(x)[:, None], dist(keys)[None]
        return (p * (p.log() - q.log())).sum(-1)

    val_kl, val_cos = kl(d.val_x), d.val_x @ keys.t()
    v = F.normalize(torch.randn(7, 12, dtype=torch.float64), dim=-1)
    a_kl = -((kl(v) - val_kl.min()) / (val_kl.max() - val_kl.min()) * (val_cos.max() - val_cos.min()) + val_cos.min())
    want = 100 * v @ d.text.t() + (a_kl @ onehot) * 0.75 + torch.exp(-2.5 * (1 - v @ keys.t())) @ onehot * 1.5
    torch.testing.assert_close(m(v, d.text), want, rtol=1e-9, atol=1e-9)
    # one image's logits do not depend on the others scored with it
    torch.testing.assert_close(m(v[:1], d.text), want[:1], rtol=1e-9, atol=1e-9)
    # classes never trained on: zero-shot; a mapped class: its own column
    torch.testing.assert_close(m(v, d.text[:2], torch.tensor([-1, -1])), 100 * v @ d.text[:2].t())
    torch.testing.assert_close(m(v, d.text[[3, 1]], torch.tensor([3, -1]))[:, 0], want[:, 3])
    assert m.trainable_params() == 0


def _reference_search(m, d):
    """tipx.py:68-111: alpha outer, beta, gamma inner, best = 0, strict >."""
    betas, alphas, gammas = m._grid()
    keys, onehot = m.keys, F.one_hot(m.key_labels, int(m.num_classes)).to(d.val_x.dtype)
    p = (d.val_x @ d.text.t() / 0.5).softmax(-1)[:, None]
    q = (keys @ d.text.t() / 0.5).softmax(-1)[None]
    val_kl = (p * (p.log() - q.log())).sum(-1)
    new_knowledge = d.val_x @ keys.t()
    kl_logits = -scale_(val_kl, new_knowledge) @ onehot
    clip_logits = 100.0 * d.val_x @ d.text.t()
    best, best_abg, counts = 0, (0, 0, 0), []
    for alpha in alphas:
        for beta in betas:
            cache_logits = ((-1) * (beta - beta * new_knowledge)).exp() @ onehot
            for gamma in gammas:
                acc = int(((clip_logits + kl_logits * gamma + cache_logits * alpha).argmax(-1) == d.val_y).sum())
                counts.append(acc)
                if acc > best:
                    best, best_abg = acc, (alpha, beta, gamma)
    return best_abg, torch.tensor(counts).view(len(alphas), len(betas), len(gammas))


@pytest.mark.parametrize("seed", range(4))
def test_search_matches_the_reference_loop(seed):
    d = _problem(n_classes=8, dim=16, k=4, noise=3.0, seed=seed, dtype=torch.float32, n_val=12)
    m = create_adapter("tip-x", dim=16, search_scale=[20.0, 20.0, 10.0], search_steps=[10, 8, 6])
    fit(m, d)
    (a, b, g), dense = _reference_search(m, d)
    counts = m.grid_counts(d.val_x, d.val_y, d.text, m._kl(d.val_x, tail=True))
    assert 0 < dense.min() and dense.max() < len(d.val_y)
    assert (counts - dense).abs().max() <= 1  # per-class sums vs one-hot matmuls: float rounding only
    assert (float(m.alpha), float(m.beta), float(m.gamma)) == pytest.approx((a, b, g))


def test_no_val_and_bad_options():
    d = _problem(dtype=torch.float32)
    with pytest.raises(MethodError, match="selects on a validation split"):
        fit(create_adapter("tip-x", dim=12), FitData(d.train_x, d.train_y, d.text))
    m = create_adapter("tip-x", dim=12, search=False)
    fit(m, FitData(d.train_x, d.train_y, d.text, train_aug=d.train_aug, train_aug_norms=d.train_aug_norms))
    assert m.ranges[1] > m.ranges[0] and torch.isfinite(m(d.val_x, d.text)).all()
    with pytest.raises(MethodError, match="kl_range"):
        create_adapter("tip-x", kl_range="test")


def test_learns_on_the_synthetic_store(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=3)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1)
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter("tip-x", dim=st.dim, search_steps=[40, 10, 10])
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":
                assert got["novel_acc"] == base["novel_acc"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


def test_test_split_is_never_read_while_fitting(imported, monkeypatch):
    assert_test_split_unread("tip-x", imported, monkeypatch, {"search_steps": [20, 5, 5]})


def test_save_load_round_trip(imported, tmp_path):
    run = fit_method("tip-x", name="synth", cache_dir=imported, shots=4, save=tmp_path / "run",
                     options={"search_steps": [20, 5, 5]})  # fmt: skip
    round_trip(run, tmp_path / "run", 32)


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol):
    rec = cli_fit_and_eval("tip-x", digits_store, tmp_path, protocol, ["search_steps=20,5,5"])
    assert rec["config"]["kl_range"] == "val" and rec["config"]["temperature"] == 0.5
