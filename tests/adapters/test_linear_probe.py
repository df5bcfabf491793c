"""Linear probe: the torch solver follows scikit-learn's lbfgs path (weights, C search, accuracy), the binomial
case, absent classes, warm starts, and the line search's Wolfe conditions."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featcache.adapters import FitData, MethodError, create_adapter
from featcache.adapters import linear_probe as lp
from featcache.train import fit


def _problem(n_classes=6, dim=16, k=8, noise=2.0, seed=0, vk=6):
    """Overlapping classes: the probe needs tens of iterations and the search has real choices to make."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=-1)

    def draw(kk):
        y = torch.arange(n_classes).repeat(kk)
        return F.normalize(means[y] + noise * torch.randn(len(y), dim, generator=g, dtype=torch.float64) / dim**0.5,
                           dim=-1), y  # fmt: skip

    (x, y), (vx, vy), (tx, ty) = draw(k), draw(vk), draw(30)
    t = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=-1)
    return FitData(x.float(), y, t.float(), val_x=vx.float(), val_y=vy), tx.float(), ty


def _sklearn(x, y, c, tol=1e-4, max_iter=1000):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=c, tol=tol, max_iter=max_iter).fit(x.double().numpy(), y.numpy())


@pytest.mark.parametrize("c", [0.5, 1e2, 1e5])
def test_torch_follows_sklearns_path(c):
    """The same iterates as scikit-learn, also at large C where both stop far from the minimum."""
    data, _, _ = _problem()
    clf = _sklearn(data.train_x, data.train_y, c)
    want = torch.from_numpy(np.concatenate([clf.coef_, clf.intercept_[:, None]], 1))
    got = lp.fit_logistic(data.train_x.double(), data.train_y, 6, c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    got32 = lp.fit_logistic(data.train_x, data.train_y, 6, c)
    assert got32.dtype == torch.float64  # the iterate stays float64; only the feature products are float32
    # float32 products can put max|grad| on the other side of tol (C=0.5 here: one more step), hence the margin
    torch.testing.assert_close(got32, want, rtol=0, atol=2e-3 * float(want.abs().max()))


def test_far_from_the_minimum_at_large_c():
    """Why the path matters: sklearn's tol=1e-4 stops well before the optimum at large C, so a converged solver
    would give different weights (and accuracy) than lpclip's."""
    data, _, _ = _problem()
    early = lp.fit_logistic(data.train_x.double(), data.train_y, 6, 1e5)
    converged = lp.fit_logistic(data.train_x.double(), data.train_y, 6, 1e5, tol=1e-10, max_iter=20000)
    assert (converged - early).abs().max() > 0.2 * early.abs().max()


def test_adapter_matches_sklearn_path_and_accuracy():
    data, tx, ty = _problem(seed=1)
    runs = {}
    for opts in ({"solver": "sklearn"}, {"solver": "torch"}, {"solver": "torch", "dtype": "float64"}):
        m = create_adapter("linear-probe", dim=16, **opts)
        fit(m, data)
        runs[tuple(opts.values())] = (float(m.c_value), (m(tx, data.text).argmax(-1) == ty).double().mean().item(), m)
    (c_s, acc_s, sk), (c_t, acc_t, t32), (c_64, acc_64, t64) = runs.values()
    assert c_s == c_t == c_64 and c_s not in (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # the bisection moved
    assert abs(acc_s - acc_t) <= 0.003 and acc_s == acc_64
    torch.testing.assert_close(t64.weight, sk.weight, rtol=0, atol=1e-6)
    assert t32.weight.dtype == torch.float32 and t32.bias.dtype == torch.float32


def test_search_picks_the_same_c_as_sklearn_on_other_draws():
    for seed in (2, 3):
        data, _, _ = _problem(seed=seed, noise=2.5)
        picks = []
        for solver in ("sklearn", "torch"):
            m = create_adapter("linear-probe", dim=16, solver=solver)
            fit(m, data)
            picks.append(float(m.c_value))
        assert picks[0] == picks[1], (seed, picks)


def test_binary_problem_uses_sklearns_binomial_model():
    data, tx, _ = _problem(n_classes=2, k=10)
    clf = _sklearn(data.train_x, data.train_y, 3.0)
    m = create_adapter("linear-probe", dim=16, c=3.0, dtype="float64")
    fit(m, data)
    torch.testing.assert_close(m.weight[1].double(), torch.from_numpy(clf.coef_[0]), rtol=0, atol=1e-6)
    assert float(m.weight[0].abs().max()) == 0.0 and float(m.bias[0]) == 0.0
    want = torch.from_numpy(clf.decision_function(tx.double().numpy()))
    got = m(tx, data.text)
    torch.testing.assert_close((got[:, 1] - got[:, 0]).double(), want, rtol=0, atol=1e-5)


def test_a_class_without_train_rows_is_never_predicted():
    data, tx, _ = _problem(n_classes=4)
    keep = data.train_y != 2
    data = FitData(data.train_x[keep], data.train_y[keep], data.text, val_x=data.val_x, val_y=data.val_y)
    for solver in ("torch", "sklearn"):
        m = create_adapter("linear-probe", dim=16, c=1.0, solver=solver)
        fit(m, data)
        assert float(m.bias[2]) == -math.inf and (m(tx, data.text).argmax(-1) != 2).all()
    assert m.trainable_params() == 4 * 16 + 4


def test_each_c_is_solved_once_and_warm_starts_come_from_the_nearest_c(monkeypatch):
    data, _, _ = _problem()
    calls = []
    real = lp.fit_logistic

    def spy(x, y, k, c, tol, max_iter, start, state, shared):
        calls.append((c, None if start is None else start.clone()))
        out = real(x, y, k, c, tol, max_iter, start, state, shared)
        solved[c] = out
        return out

    solved: dict = {}
    monkeypatch.setattr(lp, "fit_logistic", spy)
    fit(create_adapter("linear-probe", dim=16), data)  # default: cold starts, every C once
    cs = [c for c, _ in calls]
    assert len(cs) == len(set(cs)) and all(s is None for _, s in calls)
    calls.clear()
    solved.clear()
    fit(create_adapter("linear-probe", dim=16, warm_start=True, tol=1e-8), data)
    assert calls[0][1] is None
    for i, (c, start) in enumerate(calls[1:], 1):
        near = min((d for d, _ in calls[:i]), key=lambda d: abs(math.log(d) - math.log(c)))
        torch.testing.assert_close(start, solved[near], rtol=0, atol=0)


def test_shared_first_evaluations_change_nothing():
    data, _, _ = _problem()
    shared: dict = {}
    for c in (1e4, 1.0, 30.0):
        alone = lp.fit_logistic(data.train_x, data.train_y, 6, c)
        assert torch.equal(lp.fit_logistic(data.train_x, data.train_y, 6, c, shared=shared), alone)
    assert sorted(shared) == ["f0", "zd"]


def test_warm_and_cold_starts_reach_the_same_minimum_when_converged():
    data, _, _ = _problem()
    x, y = data.train_x.double(), data.train_y
    cold = lp.fit_logistic(x, y, 6, 1.0, tol=1e-10, max_iter=5000)
    start = lp.fit_logistic(x, y, 6, 10.0, tol=1e-10, max_iter=5000)
    warm = lp.fit_logistic(x, y, 6, 1.0, tol=1e-10, max_iter=5000, start=start)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6)


def test_line_search_satisfies_the_strong_wolfe_conditions():
    def phi(a):  # f(a) = (a - 3)^4 - a, minimum where 4 (a - 3)^3 = 1
        return (a - 3) ** 4 - a, 4 * (a - 3) ** 3 - 1

    f0, g0 = phi(0.0)
    for start in (1e-3, 1.0, 50.0):
        a = lp.more_thuente(phi, f0, g0, start, 1e10, 50)
        f, g = phi(a)
        assert f <= f0 + 1e-3 * a * g0 and abs(g) <= 0.9 * abs(g0), (start, a)


def test_options_are_checked():
    with pytest.raises(MethodError, match="solver.*must be one of torch, sklearn"):
        create_adapter("linear-probe", solver="newton")
    with pytest.raises(MethodError, match="dtype.*must be one of float32, float64"):
        create_adapter("linear-probe", dtype="bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data, _, _ = _problem()
    cpu = create_adapter("linear-probe", dim=16)
    fit(cpu, data)
    dev = FitData(*(t.cuda() for t in (data.train_x, data.train_y, data.text, data.val_x, data.val_y)))
    gpu = create_adapter("linear-probe", dim=16)
    fit(gpu, dev)
    assert gpu.weight.is_cuda and float(gpu.c_value) == float(cpu.c_value)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-3)
