"""APE: the channel criterion against the reference's loops, logits by hand, the (beta, alpha, gamma) search against
the reference loop, the shared exact grid counter, per-dataset defaults, learning, selection, save/load, CLI."""

import math

import pytest
import torch
import torch.nn.functional as F
from training_free_helpers import assert_test_split_unread, cli_fit_and_eval, import_synthetic, round_trip

from featcache.adapters import FitData, create_adapter
from featcache.adapters.ape import ape_criterion
from featcache.adapters.grid_search import affine_grid_counts, combine, first_best
from featcache.api import _evaluate_task, fit_method, resolve_config
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def _problem(n_classes=5, dim=12, k=3, noise=1.5, seed=0, dtype=torch.float64, n_val=4):
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


def test_criterion_equals_the_reference_loops():
    """utils.py:48-65 with only_use_txt=False, loop by loop (float64)."""
    d = _problem()
    keys = F.normalize((d.train_aug * d.train_aug_norms[..., None]).mean(1), dim=-1)
    order = torch.argsort(d.train_y, stable=True)
    keys, labels = keys[order], d.train_y[order]
    n_cls, shots, dim = 5, 3, 12
    feats = torch.cat([d.text[:, None], keys.reshape(n_cls, shots, dim)], dim=1)
    sim_sum, count = torch.zeros(dim, dtype=torch.float64), 0
    for i in range(n_cls):
        for j in range(n_cls):
            for m in range(shots + 1):
                for n in range(shots + 1):
                    if i != j:
                        sim_sum += feats[i, m] * feats[j, n]
                        count += 1
    want = -0.3 * (sim_sum / count) + 0.7 * torch.var(d.text.t(), dim=1)
    torch.testing.assert_close(ape_criterion(d.text, keys, labels, [0.3, 0.7]), want, rtol=1e-10, atol=1e-12)


def test_logits_by_hand():
    """main.py:36-70 step by step: channels, renormalisation, KL value weights in bits, the cache term."""
    d = _problem()
    m = create_adapter("ape", dim=12, feat_num=7, w=[0.6, 0.4], search=False, alpha=1.25, beta=2.25, gamma=0.375)
    fit(m.double(), d)  # (alpha, beta, gamma: float32 buffers, so values exact in float32)
    keys = F.normalize((d.train_aug * d.train_aug_norms[..., None]).mean(1), dim=-1)  # mean of raw views, normalised
    order = torch.argsort(d.train_y, stable=True)
    keys, labels = keys[order], d.train_y[order]
    idx = torch.topk(ape_criterion(d.text, keys, labels, [0.6, 0.4]), k=7)[1]
    assert torch.equal(m.channels, idx)
    clip_w = d.text.t()  # [D, C] as the reference holds it
    new_w = clip_w[idx, :] / clip_w[idx, :].norm(dim=0, keepdim=True)
    new_keys = keys[:, idx] / keys[:, idx].norm(dim=-1, keepdim=True)
    values = F.one_hot(labels, 5).double()
    key_logits = (new_keys @ new_w).softmax(1)
    cache_div = torch.sum(values * torch.log2((values + 1e-6) / (key_logits + 1e-6)), dim=1)[:, None]
    soft = values * (cache_div * 0.375).exp()
    v = F.normalize(torch.randn(6, 12, dtype=torch.float64), dim=-1)
    new_v = v[:, idx] / v[:, idx].norm(dim=-1, keepdim=True)
    want = 100.0 * v @ clip_w + ((-1) * (2.25 - 2.25 * (new_v @ new_keys.t()))).exp() @ soft * 1.25
    torch.testing.assert_close(m(v, d.text), want, rtol=1e-10, atol=1e-10)
    # classes never trained on get zero-shot logits; a mapped class its own column
    torch.testing.assert_close(m(v, d.text[:2], torch.tensor([-1, -1])), 100.0 * v @ d.text[:2].t())
    torch.testing.assert_close(m(v, d.text[[4, 0]], torch.tensor([4, -1]))[:, 0], want[:, 4])
    assert m.trainable_params() == 0


def _reference_search(m, d):
    """main.py:74-93: beta outer, alpha, gamma inner, best_search_acc = 0, strict >."""
    cfg = m.config
    betas = [i * (cfg.search_scale[0] - 0.1) / cfg.search_steps[0] + 0.1 for i in range(cfg.search_steps[0])]
    alphas = [i * (cfg.search_scale[1] - 0.1) / cfg.search_steps[1] + 0.1 for i in range(cfg.search_steps[1])]
    gammas = [i * cfg.search_scale[2] / cfg.search_steps[2] for i in range(cfg.search_steps[2])]
    onehot = F.one_hot(m.key_labels, int(m.num_classes)).to(d.val_x.dtype)
    r_ff = F.normalize(d.val_x[:, m.channels], dim=-1) @ m.keys.t()
    r_fw = 100.0 * d.val_x @ d.text.t()
    best, best_abg, counts = 0, (0, 0, 0), []
    for beta in betas:
        for alpha in alphas:
            for gamma in gammas:
                soft = onehot * (m.divergence[:, None] * gamma).exp()
                logits = r_fw + ((-1) * (beta - beta * r_ff)).exp() @ soft * alpha
                acc = int((logits.argmax(-1) == d.val_y).sum())
                counts.append(acc)
                if acc > best:
                    best, best_abg = acc, (alpha, beta, gamma)
    return best_abg, torch.tensor(counts).view(len(betas), len(alphas), len(gammas))


@pytest.mark.parametrize("seed", range(4))
def test_search_matches_the_reference_loop(seed):
    d = _problem(n_classes=8, dim=16, k=4, noise=3.0, seed=seed, dtype=torch.float32, n_val=10)
    m = create_adapter("ape", dim=16, feat_num=10, search_scale=[7.0, 7.0, 1.0], search_steps=[12, 8, 5])
    fit(m, d)
    (a, b, g), dense = _reference_search(m, d)
    counts = m.grid_counts(d.val_x, d.val_y, d.text)
    assert 0 < dense.min() and dense.max() < len(d.val_y)  # a real competition
    # the reference multiplies by the one-hot values; featcache sums per class: equal up to float rounding
    assert (counts - dense).abs().max() <= 1
    assert (float(m.alpha), float(m.beta), float(m.gamma)) == pytest.approx((a, b, g))


@pytest.mark.parametrize(("n_terms", "seed"), [(1, 0), (2, 1), (2, 2), (3, 3)])
def test_affine_grid_counts_equal_dense_argmax(n_terms, seed):
    """The shared exact counter (gda, ape, tip-x) against scoring every grid point's logits with argmax,
    including ties (quantised logits) and negative terms."""
    g = torch.Generator().manual_seed(seed)
    n, c = 300, 9
    y = torch.randint(c, (n,), generator=g)
    base = torch.randn(n, c, generator=g) * 5
    terms = [torch.randn(n, c, generator=g) * (j + 1) for j in range(n_terms)]
    if seed == 2:  # ties everywhere
        base, terms = base.round(), [t.round() for t in terms]
    coefs = torch.rand(17, n_terms, generator=g) * 3
    coefs[3] = coefs[5]  # a repeated point
    dense = torch.tensor([int((combine(base, terms, list(row)).argmax(-1) == y).sum()) for row in coefs])
    torch.testing.assert_close(affine_grid_counts(base, terms, coefs, y, chunk=64), dense, rtol=0, atol=0)
    assert first_best(dense) == int(torch.argmax(dense)) and first_best(torch.zeros(3)) is None


def test_per_dataset_defaults_and_wide_q():
    cfg = resolve_config("ape", "eurosat")
    assert cfg.w == [0.9, 0.1] and cfg.feat_num == 700 and cfg.search_scale == [30.0, 5.0, 1.5]
    cfg = resolve_config("ape", "imagenet")
    assert cfg.feat_num == 500 and cfg.search_steps == [200, 20, 5]
    assert resolve_config("ape", "dtd", {"feat_num": 300}).feat_num == 300
    d = _problem(dtype=torch.float32)
    m = create_adapter("ape", dim=12, feat_num=800, search_steps=[4, 3, 2])  # Q above D: every channel
    fit(m, d)
    assert len(m.channels) == 12 and sorted(m.channels.tolist()) == list(range(12))


def test_clean_views():
    d = _problem(dtype=torch.float32)
    m = create_adapter("ape", dim=12, feat_num=6, views="clean", search=False)
    fit(m, d)
    order = torch.argsort(d.train_y, stable=True)
    torch.testing.assert_close(m.keys, F.normalize(d.train_x[order][:, m.channels], dim=-1))


def test_learns_on_the_synthetic_store(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=3)
    with Store.open(p) as st:
        for protocol in ("fewshot", "base2novel"):
            task = build_task(st, protocol, shots=8, seed=1)
            zs = create_adapter("zero-shot", dim=st.dim)
            m = create_adapter("ape", dim=st.dim, feat_num=24, search_steps=[40, 10, 5])
            fit(m, task.fit)
            got, base = _evaluate_task(m, task), _evaluate_task(zs, task)
            key = "acc" if protocol == "fewshot" else "base_acc"
            assert got[key] > base[key] + 10, (protocol, got, base)
            if protocol == "base2novel":  # novel classes: zero-shot
                assert got["novel_acc"] == base["novel_acc"]
    assert math.isfinite(float(m.alpha))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, synth):
    return import_synthetic(tmp_path_factory.mktemp("cache"), synth)


def test_test_split_is_never_read_while_fitting(imported, monkeypatch):
    assert_test_split_unread("ape", imported, monkeypatch, {"search_steps": [20, 5, 5]})


def test_save_load_round_trip(imported, tmp_path):
    run = fit_method("ape", name="synth", cache_dir=imported, shots=4, save=tmp_path / "run",
                     options={"feat_num": 20, "search_steps": [20, 5, 5]})  # fmt: skip
    round_trip(run, tmp_path / "run", 32)


@pytest.mark.parametrize("protocol", ["fewshot", "base2novel"])
def test_cli_fit_and_eval(digits_store, tmp_path, protocol):
    rec = cli_fit_and_eval("ape", digits_store, tmp_path, protocol, ["search_steps=20,5,5"])
    assert rec["config"]["val_draw"] == "full" and rec["config"]["feat_num"] == 800
