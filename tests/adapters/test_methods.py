"""Every cached method: registry, hand-computed logits, learning on a store with structure, determinism."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from featcache.adapters import FitData, MethodError, adapter_config, create_adapter, list_adapters
from featcache.api import _evaluate_task, resolve_config
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit

TRAINED = ["linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f", "mm-attn"]


def test_registry_lists_every_method():
    assert set(TRAINED) | {"zero-shot"} <= set(list_adapters())


def test_registry_errors():
    with pytest.raises(MethodError, match="unknown method 'coop-x'; available: .*clip-adapter"):
        create_adapter("coop-x")
    with pytest.raises(MethodError, match="method 'clip-adapter' has no option 'lam'; options: .*ratio"):
        adapter_config("clip-adapter", lam=0.2)
    with pytest.raises(MethodError, match="option 'ratio' of 'clip-adapter' needs a float, got 'big'"):
        adapter_config("clip-adapter", ratio="big")
    assert adapter_config("clip-adapter", ratio="0.5", epochs="3").ratio == 0.5
    assert adapter_config("tip-adapter", search_scale="5,2").search_scale == [5.0, 2.0]
    assert adapter_config("tip-adapter", search_steps="10,4").search_steps == [10, 4]


def test_zero_shot_logits_by_hand():
    zs = create_adapter("zero-shot", dim=2)
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(zs(v, t), torch.tensor([[0.0, 100.0], [80.0, 60.0]]))
    assert zs.trainable_params() == 0


def test_clip_adapter_shape_count_and_residual():
    ca = create_adapter("clip-adapter", dim=512)
    assert ca.trainable_params() == 2 * 512 * 128  # D->D/4->D, no biases
    v = F.normalize(torch.randn(3, 512), dim=-1)
    t = F.normalize(torch.randn(4, 512), dim=-1)
    plain = create_adapter("clip-adapter", dim=512, ratio=0.0)
    torch.testing.assert_close(plain(v, t), 100 * v @ t.t())
    a = ca.fc(v)
    want = 100 * F.normalize(0.2 * a + 0.8 * v, dim=-1) @ t.t()
    torch.testing.assert_close(ca(v, t), want)


def _fitdata(n_classes=3, dim=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n_classes * k, dim, generator=g), dim=-1)
    y = torch.arange(n_classes).repeat(k)
    t = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    return FitData(x, y, t, val_x=x.clone(), val_y=y.clone())


def test_tip_adapter_formula_by_hand():
    data = _fitdata()
    tip = create_adapter("tip-adapter", dim=4, search=False, alpha=2.0, beta=3.0)
    fit(tip, data)
    v = F.normalize(torch.randn(5, 4), dim=-1)
    onehot = F.one_hot(data.train_y, 3).float()
    want = 100 * v @ data.text.t() + 2.0 * torch.exp(-3.0 * (1 - v @ data.train_x.t())) @ onehot
    torch.testing.assert_close(tip(v, data.text), want)
    # classes without cache entries get the zero-shot logits; a mapped class gets its own cache column
    novel = tip(v, data.text[:2], torch.tensor([-1, -1]))
    torch.testing.assert_close(novel, 100 * v @ data.text[:2].t())
    mapped = tip(v, data.text[[2, 0]], torch.tensor([2, -1]))
    torch.testing.assert_close(mapped[:, 0], want[:, 2])
    assert tip.trainable_params() == 0


def test_tip_search_uses_val_and_keeps_first_best():
    data = _fitdata()
    tip = create_adapter("tip-adapter", dim=4, search_steps=[4, 3], search_scale=[2.0, 1.0])
    fit(tip, data)
    # val = train rows: every candidate classifies perfectly, so the first grid point wins
    assert float(tip.beta) == pytest.approx(0.1) and float(tip.alpha) == pytest.approx(0.1)


def test_tip_adapter_f_trains_keys_and_per_dataset_defaults():
    assert resolve_config("tip-adapter", "oxford_flowers").alpha == 10.0
    assert resolve_config("tip-adapter", "oxford_flowers").search_scale == [50.0, 50.0]
    assert resolve_config("tip-adapter-f", "eurosat").epochs == 100
    assert resolve_config("tip-adapter", "oxford_flowers", {"alpha": 3}).alpha == 3.0
    data = _fitdata(k=4)
    tf = create_adapter("tip-adapter-f", dim=4, lr=0.05)
    fit(tf, data)
    assert tf.trainable_params() == 12 * 4
    assert not torch.allclose(tf.keys, data.train_x)  # the keys moved


def _tip_problem(n_classes=40, shots=4, dim=32, noise=2.5, seed=0, unequal=False):
    """A cache with many wrong val rows (so the α, β grid has real competition), optionally uneven shots."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    y = torch.arange(n_classes).repeat(shots)
    if unequal:
        y = y[torch.randperm(len(y), generator=g)[: len(y) - n_classes // 2]]
    x = F.normalize(means[y] + noise * torch.randn(len(y), dim, generator=g) / dim**0.5, dim=-1)
    vy = torch.arange(n_classes).repeat(3)
    vx = F.normalize(means[vy] + noise * torch.randn(len(vy), dim, generator=g) / dim**0.5, dim=-1)
    t = F.normalize(0.3 * means + 0.7 * F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1), dim=-1)
    return FitData(x, y, t, val_x=vx, val_y=vy)


@pytest.mark.parametrize(("unequal", "keys_scale", "scale"), [(False, 1.0, [7.0, 3.0]), (True, 1.3, [12.0, 10.0]),
                                                             (False, 0.9, [50.0, 50.0])])  # fmt: skip
def test_tip_search_counts_equal_the_dense_grid(unequal, keys_scale, scale):
    """The pruned α loop counts exactly what scoring every logit matrix with argmax counts, at every grid point."""
    data = _tip_problem(unequal=unequal)
    tip = create_adapter("tip-adapter", dim=32, search_scale=scale, search_steps=[30, 20])
    tip.setup(data)
    with torch.no_grad():
        tip.keys.mul_(keys_scale)  # trained keys are not unit-norm
    fast = tip._grid_counts(data.val_x, data.val_y, data.text, chunk=50)
    dense = tip._grid_counts_dense(data.val_x, data.val_y, data.text, chunk=50)
    assert 0 < dense.min() and dense.max() < len(data.val_y)  # neither trivial nor saturated
    assert torch.equal(fast, dense)


@pytest.mark.parametrize("unequal", [False, True])
def test_tip_adapter_f_step_matches_plain_autograd(unequal):
    """The in-place cache Function gives the plain formula's logits and key gradient (to float rounding)."""
    data = _tip_problem(unequal=unequal)
    tf = create_adapter("tip-adapter-f", dim=32, alpha=1.7, beta=2.5)
    tf.setup(data)
    with torch.no_grad():
        tf.keys.add_(0.05 * torch.randn(tf.keys.shape, generator=torch.Generator().manual_seed(4)))
    v, y = data.val_x[:50], data.val_y[:50]
    keys = tf.keys.detach().clone().requires_grad_()
    onehot = F.one_hot(tf.key_labels, int(tf.num_classes)).float()
    want = 100 * v @ data.text.t() + 1.7 * torch.exp(-2.5 * (1.0 - v @ keys.t())) @ onehot
    F.cross_entropy(want, y).backward()
    got = tf(v, data.text)
    F.cross_entropy(got, y).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tf.keys.grad, keys.grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # scoring without gradients goes through the chunked path: the same numbers
        torch.testing.assert_close(tf(v, data.text), got.detach(), rtol=0, atol=0)


def test_tip_adapter_precision_option():
    data = _tip_problem()
    exact = create_adapter("tip-adapter-f", dim=32, epochs=2)
    fit(exact, data)
    low = create_adapter("tip-adapter-f", dim=32, precision="bf16")
    low.setup(data)
    low.load_state_dict(exact.state_dict())
    with torch.no_grad():
        a, b = exact.cache_logits(data.val_x, 3.0), low.cache_logits(data.val_x, 3.0)
    assert (a - b).abs().max() > 0  # it is not the float32 path
    torch.testing.assert_close(b, a, rtol=0.02, atol=0.02)  # affinities within bfloat16's 2^-9, times beta
    trained = create_adapter("tip-adapter-f", dim=32, epochs=2, precision="bf16")
    fit(trained, data)  # trains through the bf16 key gradient; keys and optimiser stay float32
    start = data.train_x[torch.argsort(data.train_y, stable=True)]
    assert trained.keys.dtype == torch.float32 and (trained.keys - start).abs().max() > 1e-4  # the keys moved
    with pytest.raises(MethodError, match="precision"):
        create_adapter("tip-adapter", precision="fp8")


def test_linear_probe_matches_sklearn_and_refuses_novel():
    from sklearn.linear_model import LogisticRegression

    data = _fitdata(k=5)
    lp = create_adapter("linear-probe", dim=4, c=0.5)
    fit(lp, data)
    clf = LogisticRegression(C=0.5, max_iter=1000).fit(data.train_x.double().numpy(), data.train_y.numpy())
    v = F.normalize(torch.randn(6, 4), dim=-1)
    want = torch.from_numpy(clf.decision_function(v.double().numpy())).float()
    torch.testing.assert_close(lp(v, data.text), want, atol=1e-4, rtol=1e-4)
    assert lp.trainable_params() == 3 * 4 + 3
    with pytest.raises(MethodError, match="cannot score other classes"):
        lp(v, data.text, torch.tensor([0, -1, 1]))


@pytest.mark.parametrize("method", TRAINED)
def test_fitted_methods_beat_zero_shot_on_base_classes(synth, method):
    with Store.open(synth) as st:
        task = build_task(st, "base2novel", shots=16, seed=1)
        zs = create_adapter("zero-shot", dim=st.dim)
        fit(zs, task.fit)
        base_zs = _evaluate_task(zs, task)["base_acc"]
        # as fit_method seeds it for seed 1, default options; except mm-attn's patience: here an epoch is one step
        # (80 rows) and val accuracy stays flat for ~18 steps, longer than the paper's patience of 10 epochs
        opts = {"patience": 20} if method == "mm-attn" else {}
        m = create_adapter(method, dim=st.dim, seed=1, **opts)
        fit(m, task.fit, seed=1)
        got = _evaluate_task(m, task)
    assert got["base_acc"] > base_zs + 10, (got, base_zs)
    if method == "linear-probe":
        assert got["novel_acc"] is None and got["hm"] is None
    else:
        assert got["novel_acc"] is not None and 0 <= got["hm"] <= 100


@pytest.mark.parametrize("method", ["clip-adapter", "tip-adapter-f", "mm-attn"])
def test_determinism_under_a_seed(synth, method):
    with Store.open(synth) as st:
        task = build_task(st, "fewshot", shots=4, seed=2)
        states = []
        for seed in (7, 7, 8):
            m = create_adapter(method, dim=st.dim, seed=seed, epochs=5, patience=0)
            fit(m, task.fit, seed=seed)
            states.append({k: v.clone() for k, v in m.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_early_stopping_and_best_val_restore(synth):
    with Store.open(synth) as st:
        task = build_task(st, "fewshot", shots=4, seed=1)
        m = create_adapter("clip-adapter", dim=st.dim, epochs=200, patience=3, lr=0.05)
        r = fit(m, task.fit)
        assert r.epochs == r.best_epoch + 3 < 200  # stopped 3 epochs after the best
        from featcache.evaluate import accuracy

        assert accuracy(m, task.fit.val_x, task.fit.val_y, task.fit.text) == r.best_val_acc
        last = create_adapter("clip-adapter", dim=st.dim, epochs=r.epochs, patience=0, select="last", lr=0.05)
        fit(last, task.fit)
        assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), last.state_dict().values(),
                                                          strict=True))  # fmt: skip


def test_methods_that_select_on_val_need_one(synth):
    with Store.open(synth) as st:
        task = build_task(st, "fewshot", shots=4, seed=1, val_from="none")
        with pytest.raises(MethodError, match="'tip-adapter' selects on a validation split.*--val-from train"):
            fit(create_adapter("tip-adapter", dim=st.dim), task.fit)
        fit(create_adapter("zero-shot", dim=st.dim), task.fit)  # needs none


def test_augmented_views_are_sampled_per_epoch(tmp_path):
    from conftest import synthetic_store

    p = synthetic_store(tmp_path / "aug.h5", aug_views=3)
    with Store.open(p) as st:
        task = build_task(st, "fewshot", shots=4, seed=1)
        assert task.fit.train_aug.shape == (40, 3, 32)
        tip = create_adapter("tip-adapter", dim=st.dim)
        fit(tip, task.fit)  # keys = mean of the raw augmented views (unit view x its norm), normalised
        raw = task.fit.train_aug * task.fit.train_aug_norms[..., None]
        torch.testing.assert_close(tip.keys, F.normalize(raw.mean(1), dim=-1))
        ca = create_adapter("clip-adapter", dim=st.dim, epochs=2, patience=0)
        clean = dataclasses.replace(task.fit, train_aug=None)
        a, b = create_adapter("clip-adapter", dim=st.dim, epochs=2, patience=0), ca
        fit(a, clean)
        fit(b, task.fit)
        assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                         strict=True))  # fmt: skip


def test_tip_cache_sum_with_unequal_shots_matches_one_hot():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(7, 4, generator=g), dim=-1)
    y = torch.tensor([2, 0, 2, 1, 0, 2, 2])  # 2, 1, 4 rows per class
    t = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    tip = create_adapter("tip-adapter", dim=4, search=False, alpha=1.5, beta=2.0)
    fit(tip, FitData(x, y, t, val_x=x, val_y=y))
    v = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    want = 100 * v @ t.t() + 1.5 * torch.exp(-2.0 * (1 - v @ x.t())) @ F.one_hot(y, 3).float()
    torch.testing.assert_close(tip(v, t), want)


def test_accuracy_of_an_empty_set_is_none_not_nan():
    from featcache.evaluate import accuracy, harmonic_mean

    zs = create_adapter("zero-shot", dim=2)
    assert accuracy(zs, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.eye(2)) is None
    assert harmonic_mean(80.0, None) is None and harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
