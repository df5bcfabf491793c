"""Linear probe, as CoOp's lpclip runs it: multinomial logistic regression on image features, C chosen on the
few-shot validation set by a coarse grid and then log-space bisection.

For each C the probe minimises scikit-learn's LogisticRegression(solver="lbfgs") objective, which it scales by
the number of rows n (sklearn/linear_model/_logistic.py: l2_reg_strength = 1 / (C · n)):
    f(W, b) = (1/n) Σ_i CE(W x_i + b, y_i) + 1/(2 C n) · ||W||²      (the bias is not penalised)
The default solver (`solver=torch`) is scikit-learn's own algorithm ported to torch, so that it stops where
scikit-learn stops: L-BFGS-B without bounds (memory 10, the first step 1/||∇f||, then 1), the Moré–Thuente line
search (ftol 1e-3, gtol 0.9, xtol 0.1, at most 50 evaluations), stopping when max|∇f| <= tol (1e-4), when f
falls by less than 64 machine epsilons (relative), or after max_iter iterations, from zero weights; two classes
use scikit-learn's single-row binomial model. At large C the probe stops well before the minimum (the gradient of
the mean loss is small from the start), so the answer depends on the path: matching the path is what matches
scikit-learn's accuracy. Every C is solved once (the bisection revisits C values). `solver=sklearn` runs
scikit-learn itself, as before.

It has no text side, so it cannot score classes it was not trained on: novel accuracy is not applicable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Adapter, FitData, MethodError, TrainConfig, register

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LinearProbeConfig(TrainConfig):
    c_grid: list = field(
        default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6],
        metadata={"help": "initial C grid (lpclip's)", "gt": 0.0},
    )
    search_steps: int = field(default=8, metadata={"help": "log-space bisection steps around the best grid C", "ge": 0})
    max_iter: int = field(default=1000, metadata={"help": "lbfgs iterations per C (lpclip: 1000)", "ge": 1})
    c: float = field(default=0.0, metadata={"help": "use this C and skip the search (0: search on val)", "ge": 0.0})
    solver: str = field(
        default="torch",
        metadata={"help": "torch: scikit-learn's L-BFGS-B path ported to torch, on the data's device; sklearn: "
                  "scikit-learn's LogisticRegression (float64, CPU)", "choices": ["torch", "sklearn"]},
    )  # fmt: skip
    dtype: str = field(
        default="float32",
        metadata={"help": "torch solver: precision of the feature products (weights, gradients and the line "
                  "search stay float64, except on MPS). float64 reproduces scikit-learn's iterates to ~1e-12",
                  "choices": list(DTYPES)},
    )  # fmt: skip
    tol: float = field(
        default=1e-4, metadata={"help": "stop when max|gradient| of the scaled objective <= tol (sklearn's tol)",
                                "gt": 0.0},
    )  # fmt: skip
    warm_start: bool = field(
        default=False,
        metadata={"help": "torch solver: start each C from the weights of the nearest C solved so far (log "
                  "distance). Faster, but with tol 1e-4 a warm start is already below the tolerance and stops "
                  "at once, so the search degenerates; use it with a much smaller tol (e.g. 1e-7), and expect a "
                  "different C and accuracy than scikit-learn's early-stopped path"},
    )  # fmt: skip
    epochs: int = field(default=0, metadata={"help": "closed form: no gradient training", "ge": 0})


@register("linear-probe", LinearProbeConfig)
class LinearProbe(Adapter):
    trainable = False
    class_agnostic = False
    selection = "few-shot-val"

    def __init__(self, config: LinearProbeConfig, dim: int = 512):
        super().__init__(config, dim)
        if config.solver not in ("torch", "sklearn"):
            raise MethodError(f"solver must be torch or sklearn, got {config.solver!r}")
        if config.dtype not in DTYPES:
            raise MethodError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        self.needs_val = config.c <= 0
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("c_value", torch.zeros(()))

    def setup(self, data: FitData) -> None:
        solve = self._torch if self.config.solver == "torch" else self._sklearn
        w, b, c = solve(data)
        dev = data.train_x.device
        self.weight = w.to(device=dev, dtype=torch.float32)
        self.bias = b.to(device=dev, dtype=torch.float32)
        self.c_value = torch.tensor(float(c), device=dev)

    def _torch(self, data: FitData) -> tuple[torch.Tensor, torch.Tensor, float]:
        cfg = self.config
        dev = data.train_x.device
        present, y = torch.unique(data.train_y, return_inverse=True)  # as sklearn: only the classes seen
        x = data.train_x.to(DTYPES[cfg.dtype])
        state = torch.float32 if dev.type == "mps" else torch.float64
        solved: dict[float, torch.Tensor] = {}

        def train(c: float) -> torch.Tensor:
            if c not in solved:
                start = None
                if cfg.warm_start and solved:
                    start = solved[min(solved, key=lambda k: abs(math.log(k) - math.log(c)))]
                solved[c] = fit_logistic(x, y, len(present), c, cfg.tol, cfg.max_iter, start, state)
            return solved[c]

        if cfg.c > 0:
            c_final, w = cfg.c, train(cfg.c)
        else:
            vx, vy = data.val_x.to(x.dtype), data.val_y

            def score(w: torch.Tensor) -> float:
                wx, bx = _full_rows(w, len(present))
                pred = present[(vx @ wx.to(x.dtype).t() + bx.to(x.dtype)).argmax(-1)]
                return float((pred == vy).double().mean())

            c_final, w = lpclip_search(train, score, cfg.c_grid, cfg.search_steps)
        wx, bx = _full_rows(w, len(present))
        weight = torch.zeros(data.num_classes, x.shape[1], dtype=state, device=dev)
        bias = torch.full((data.num_classes,), -math.inf, dtype=state, device=dev)
        weight[present], bias[present] = wx, bx
        return weight, bias, c_final

    def _sklearn(self, data: FitData) -> tuple[torch.Tensor, torch.Tensor, float]:
        from sklearn.linear_model import LogisticRegression

        x, y = data.train_x.cpu().double().numpy(), data.train_y.cpu().numpy()
        cfg = self.config

        def train(c: float) -> LogisticRegression:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs convergence warnings at extreme C
                return LogisticRegression(solver="lbfgs", max_iter=cfg.max_iter, C=c, tol=cfg.tol).fit(x, y)

        if cfg.c > 0:
            c_final, clf = cfg.c, train(cfg.c)
        else:
            vx, vy = data.val_x.cpu().double().numpy(), data.val_y.cpu().numpy()
            c_final, clf = lpclip_search(train, lambda m: float((m.predict(vx) == vy).mean()), cfg.c_grid,
                                         cfg.search_steps, cache=False)  # fmt: skip
        w = np.zeros((data.num_classes, x.shape[1]))
        b = np.full(data.num_classes, -np.inf)
        if len(clf.classes_) == 2:  # sklearn stores one row for two classes
            w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            w[clf.classes_[0]], b[clf.classes_[0]] = 0.0, 0.0
        else:
            w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
        return torch.from_numpy(w), torch.from_numpy(b), c_final

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        if class_ids is None:
            return images @ self.weight.t() + self.bias
        if (class_ids < 0).any():
            raise MethodError(
                "linear-probe weights belong to its training classes; it cannot score other classes "
                "(novel classes or another dataset's)"
            )
        return images @ self.weight[class_ids].t() + self.bias[class_ids]

    def trainable_params(self) -> int:
        return int(self.weight.numel() + self.bias.numel())


def lpclip_search(train: Callable, score: Callable, grid: list, steps: int, cache: bool = True):
    """CoOp lpclip's C search: the best of the grid (first best), then `steps` bisections in log10 space between
    peak/10 and peak·10, each keeping the better side (ties go left). Returns (C, model). With cache=False every
    C is trained again when the bisection revisits it, as lpclip does."""
    grid = [float(c) for c in grid]
    seen: dict[float, float] = {}

    def acc(c: float, model) -> float:
        if not cache or c not in seen:
            seen[c] = score(model)
        return seen[c]

    accs = [acc(c, train(c)) for c in grid]
    peak = grid[int(np.argmax(accs))]
    left, right = 0.1 * peak, 10.0 * peak
    c_final, model = peak, None
    for _ in range(steps):
        ml, mr = train(left), train(right)
        mid = 10 ** (0.5 * (np.log10(right) + np.log10(left)))
        if acc(left, ml) < acc(right, mr):
            c_final, model, left = right, mr, mid
        else:
            c_final, model, right = left, ml, mid
    return c_final, (model if model is not None else train(peak))


def _full_rows(w: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [K]) from the solver's [rows, D + 1]; the binomial row becomes sklearn's layout
    (class 0: zeros, class 1: the row)."""
    if n_classes == 2:
        w = torch.cat([torch.zeros_like(w), w])
    return w[:, :-1], w[:, -1]


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    c: float,
    tol: float = 1e-4,
    max_iter: int = 1000,
    start: torch.Tensor | None = None,
    state: torch.dtype = torch.float64,
) -> torch.Tensor:
    """scikit-learn's lbfgs LogisticRegression(C=c) on x [n, D], labels y in 0..K-1: returns [rows, D + 1]
    (weights, then the bias; one row for two classes, as scikit-learn's binomial model, else K rows)."""
    n, d = x.shape
    rows = 1 if n_classes == 2 else n_classes
    lam = 1.0 / (c * n)
    idx = torch.arange(n, device=x.device)
    yf = y.to(x.dtype)

    def loss_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        wm, b = w[:, :d], w[:, d]
        z = torch.addmm(b.to(x.dtype), x, wm.to(x.dtype).t())  # [n, rows]
        if rows == 1:  # binomial: log(1 + e^z) - y z
            z = z[:, 0]
            f = (torch.nn.functional.softplus(z) - yf * z).sum(dtype=state) / n
            r = (torch.sigmoid(z) - yf)[:, None]
        else:
            ls = torch.log_softmax(z, 1)
            f = -ls[idx, y].sum(dtype=state) / n
            r = ls.exp_()
            r[idx, y] -= 1.0
        g = torch.empty_like(w)
        g[:, :d] = (r.t() @ x).to(state) / n + lam * wm
        g[:, d] = r.sum(0, dtype=state) / n
        return float(f) + 0.5 * lam * float((wm * wm).sum()), g

    w0 = torch.zeros(rows, d + 1, dtype=state, device=x.device) if start is None else start.to(state).clone()
    return lbfgs(loss_grad, w0, tol, max_iter)


EPS = float(np.finfo(np.float64).eps)


def lbfgs(
    loss_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    w: torch.Tensor,
    tol: float = 1e-4,
    max_iter: int = 1000,
    memory: int = 10,
    max_ls: int = 50,
) -> torch.Tensor:
    """Minimise with L-BFGS-B's unconstrained iteration as scipy runs it for scikit-learn (lbfgsb.f mainlb /
    lnsrlb): direction −H∇f (two-loop recursion, H0 = sᵀy/yᵀy of the last update; −∇f while the memory is
    empty), first step min(1/||d||, 1e10) then 1, Moré–Thuente line search; updates with sᵀy <= eps·(−∇fᵀs) are
    skipped; a failed line search clears the memory and retries (or stops if it was already empty)."""
    f, g = loss_grad(w)
    if float(g.abs().max()) <= tol:
        return w
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, sᵀy)
    it = 0
    while it < max_iter:
        d = -_two_loop(g, pairs)
        gd = float((g * d).sum())
        stp = min(1.0 / float(d.norm()), 1e10) if it == 0 else 1.0
        trial: dict = {}

        def phi(a: float, w=w, d=d, trial=trial) -> tuple[float, float]:
            wa = w + d if a == 1.0 else w + a * d
            fa, ga = loss_grad(wa)
            trial.update(w=wa, f=fa, g=ga)
            return fa, float((ga * d).sum())

        stp = more_thuente(phi, f, gd, stp, 1e10, max_ls) if gd < 0 else None
        if stp is None:  # no acceptable step: keep the iterate; restart from steepest descent, or stop
            if not pairs:
                break
            pairs.clear()
            continue
        f_old, g_old = f, g
        w, f, g = trial["w"], trial["f"], trial["g"]
        it += 1
        if float(g.abs().max()) <= tol or f_old - f <= 64 * EPS * max(abs(f_old), abs(f), 1.0):
            break
        sy = (float((g * d).sum()) - gd) * stp
        if sy > EPS * (-gd * stp):
            pairs.append((stp * d, g - g_old, sy))
            if len(pairs) > memory:
                pairs.pop(0)
    return w


def _two_loop(g: torch.Tensor, pairs: list) -> torch.Tensor:
    """H g for the L-BFGS inverse Hessian of the stored (s, y) pairs, oldest first."""
    q = g.clone()
    if not pairs:
        return q
    alphas = []
    for s, y, sy in reversed(pairs):
        a = float((s * q).sum()) / sy
        alphas.append(a)
        q.add_(y, alpha=-a)
    s, y, sy = pairs[-1]
    q.mul_(sy / float((y * y).sum()))
    for (s, y, sy), a in zip(pairs, reversed(alphas), strict=True):
        q.add_(s, alpha=a - float((y * q).sum()) / sy)
    return q


def more_thuente(
    phi: Callable[[float], tuple[float, float]],
    f0: float,
    g0: float,
    stp: float,
    stpmax: float,
    max_eval: int,
    ftol: float = 1e-3,
    gtol: float = 0.9,
    xtol: float = 0.1,
) -> float | None:
    """Moré & Thuente's line search (MINPACK-2 dcsrch, stpmin = 0): a step with sufficient decrease
    f <= f0 + ftol·stp·g0 and curvature |f'| <= gtol·|g0|, or the step its safeguards settle on; the returned
    step is the last one evaluated. None when max_eval evaluations were not enough."""
    gtest = ftol * g0
    brackt, stage = False, 1
    width, width1 = stpmax, 2.0 * stpmax
    stx, fx, gx = 0.0, f0, g0
    sty, fy, gy = 0.0, f0, g0
    stmin, stmax = 0.0, 5.0 * stp
    for _ in range(max_eval):
        f, g = phi(stp)
        ftest = f0 + stp * gtest
        if stage == 1 and f <= ftest and g >= 0:
            stage = 2
        if (
            (brackt and (stp <= stmin or stp >= stmax))
            or (brackt and stmax - stmin <= xtol * stmax)
            or (stp == stpmax and f <= ftest and g <= gtest)
            or (stp == 0.0 and (f > ftest or g >= gtest))
            or (f <= ftest and abs(g) <= -gtol * g0)
        ):
            return stp
        if stage == 1 and ftest < f <= fx:  # the modified function psi(a) = f(a) - f0 - ftol·a·g0 picks the step
            stx, fxm, gxm, sty, fym, gym, stp, brackt = _step(
                stx, fx - stx * gtest, gx - gtest, sty, fy - sty * gtest, gy - gtest,
                stp, f - stp * gtest, g - gtest, brackt, stmin, stmax,
            )  # fmt: skip
            fx, fy, gx, gy = fxm + stx * gtest, fym + sty * gtest, gxm + gtest, gym + gtest
        else:
            stx, fx, gx, sty, fy, gy, stp, brackt = _step(stx, fx, gx, sty, fy, gy, stp, f, g, brackt, stmin, stmax)
        if brackt:
            if abs(sty - stx) >= 0.66 * width1:  # the interval did not shrink enough: bisect
                stp = stx + 0.5 * (sty - stx)
            width1, width = width, abs(sty - stx)
            stmin, stmax = min(stx, sty), max(stx, sty)
        else:
            stmin, stmax = stp + 1.1 * (stp - stx), stp + 4.0 * (stp - stx)
        stp = min(max(stp, 0.0), stpmax)
        if brackt and (stp <= stmin or stp >= stmax or stmax - stmin <= xtol * stmax):
            stp = stx
    return None


def _step(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """One safeguarded trial step (MINPACK-2 dcstep): cubic / quadratic / secant interpolation on the interval
    [stx, sty] holding a minimiser, by the four cases of Moré & Thuente (1994), then the interval update."""
    sgnd = math.copysign(1.0, dp) * math.copysign(1.0, dx) if dp and dx else 0.0

    def cubic(a, fa, da, b, fb, db, flip):  # the step of the cubic through (a, fa, da), (b, fb, db), from b
        theta = 3.0 * (fa - fb) / (b - a) + da + db
        s = max(abs(theta), abs(da), abs(db))
        gamma = s * math.sqrt(max(0.0, (theta / s) ** 2 - (da / s) * (db / s)))
        return -gamma if flip else gamma, theta

    if fp > fx:  # case 1: higher value, the minimum is bracketed
        gamma, theta = cubic(stx, fx, dx, stp, fp, dp, stp < stx)
        r = ((gamma - dx) + theta) / (((gamma - dx) + gamma) + dp)
        stpc = stx + r * (stp - stx)
        stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
        stpf = stpc if abs(stpc - stx) <= abs(stpq - stx) else stpc + (stpq - stpc) / 2.0
        brackt = True
    elif sgnd < 0.0:  # case 2: lower value, derivatives of opposite sign: bracketed
        gamma, theta = cubic(stx, fx, dx, stp, fp, dp, stp > stx)
        r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dx)
        stpc = stp + r * (stx - stp)
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
        brackt = True
    elif abs(dp) < abs(dx):  # case 3: lower value, same sign, the derivative shrinks
        gamma, theta = cubic(stx, fx, dx, stp, fp, dp, stp > stx)
        r = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
        if r < 0 and gamma != 0:
            stpc = stp + r * (stx - stp)
        else:
            stpc = stpmax if stp > stx else stpmin
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        if brackt:
            stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
            lim = stp + 0.66 * (sty - stp)
            stpf = min(lim, stpf) if stp > stx else max(lim, stpf)
        else:
            stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
            stpf = min(max(stpf, stpmin), stpmax)
    elif brackt:  # case 4: lower value, same sign, the derivative does not shrink: cubic towards sty
        gamma, theta = cubic(sty, fy, dy, stp, fp, dp, stp > sty)
        r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dy)
        stpf = stp + r * (sty - stp)
    else:
        stpf = stpmax if stp > stx else stpmin
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if sgnd < 0.0:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, stpf, brackt
