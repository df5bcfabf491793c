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
scikit-learn's accuracy. Every C is solved once (the bisection revisits C values); a line search costs two
products with the features whatever its number of trial steps (the logits are linear along the line), and what
every cold start shares (the data term at zero and the first direction) is computed once per search.
`solver=sklearn` runs scikit-learn itself, as before.

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
        metadata={"help": "torch solver: precision of the feature products, logits and residuals (the weights, "
                  "sums and the L-BFGS state stay float64, except on MPS). float64 reproduces scikit-learn's "
                  "iterates to ~1e-12; float32 to ~1e-5, which can move a bisection step on a near tie",
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
        shared: dict = {}

        def train(c: float) -> torch.Tensor:
            if c not in solved:
                start = None
                if cfg.warm_start and solved:
                    start = solved[min(solved, key=lambda k: abs(math.log(k) - math.log(c)))]
                solved[c] = fit_logistic(x, y, len(present), c, cfg.tol, cfg.max_iter, start, state, shared)
            return solved[c]

        if cfg.c > 0:
            c_final, w = cfg.c, train(cfg.c)
        else:
            vx, vy = data.val_x.to(x.dtype), data.val_y

            def score(w: torch.Tensor) -> float:
                wx, bx = _full_rows(w, len(present))
                pred = present[(vx @ wx.to(x.dtype).t() + bx.to(x.dtype)).argmax(-1)]
                return int((pred == vy).sum()) / len(vy)

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
    shared: dict | None = None,
) -> torch.Tensor:
    """scikit-learn's lbfgs LogisticRegression(C=c) on x [n, D], labels y in 0..K-1: returns [rows, D + 1]
    (weights, then the bias; one row for two classes, as scikit-learn's binomial model, else K rows).
    `shared`: a dict kept across the calls of one C search on the same x, y (see _Logistic)."""
    rows = 1 if n_classes == 2 else n_classes
    size = rows * (x.shape[1] + 1)
    w0 = torch.zeros(size, dtype=state, device=x.device) if start is None else start.to(state).flatten().clone()
    obj = _Logistic(x, y, rows, 1.0 / (c * len(x)), state, shared if start is None else None)
    return lbfgs(obj, w0, tol, max_iter).view(rows, -1)


class _Logistic:
    """scikit-learn's objective f(w) = (1/n) Σ_i CE(W x_i + b, y_i) + λ/2 ||W||² for lbfgs, evaluated the way a
    line search needs it: the logits are linear along a line, z(w + a d) = z(w) + a z(d), so a line search
    costs one product with X for the direction and one for the gradient at the accepted step, however many
    trial steps it takes (values and slopes come from z alone). Logits, residuals and products are in the
    features' dtype, sums and the iterate in `state`.

    `shared` (cold starts only) keeps what is the same for every C: the data term and its gradient at w = 0,
    where the penalty's gradient vanishes, and so the first direction −∇f(0) and its logits."""

    def __init__(self, x, y, rows, lam, state, shared):
        self.x, self.y, self.rows, self.lam, self.state, self.shared = x, y, rows, lam, state, shared
        self.n, self.d = x.shape
        self.idx = torch.arange(self.n, device=x.device)
        self.lines = 0

    def _data(self, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(1/n) Σ CE at logits z [n, rows], and the residual r = ∂(Σ CE)/∂z (softmax − one-hot)."""
        if self.rows == 1:  # binomial: log(1 + e^z) − y z
            yf = self.y.to(z.dtype)[:, None]
            f = (torch.nn.functional.softplus(z) - yf * z).sum(dtype=self.state)
            return float(f) / self.n, torch.sigmoid(z) - yf
        ls = torch.log_softmax(z, 1)
        f = -float(ls[self.idx, self.y].sum(dtype=self.state)) / self.n
        r = ls.exp_()
        r[self.idx, self.y] -= 1.0
        return f, r

    def _grad(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        g = torch.empty(self.rows, self.d + 1, dtype=self.state, device=w.device)
        g[:, : self.d] = r.t() @ self.x
        g[:, self.d] = r.sum(0, dtype=self.state)
        g.div_(self.n)[:, : self.d].add_(w.view(self.rows, -1)[:, : self.d], alpha=self.lam)
        return g.view(-1)

    def _logits(self, w: torch.Tensor) -> torch.Tensor:
        wm = w.view(self.rows, -1)
        return torch.addmm(wm[:, self.d].to(self.x.dtype), self.x, wm[:, : self.d].to(self.x.dtype).t())

    def _penalty(self, w: torch.Tensor) -> float:
        wm = w.view(self.rows, -1)[:, : self.d]
        return 0.5 * self.lam * float(torch.dot(wm.flatten(), wm.flatten()))

    def start(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """f and ∇f at the starting point."""
        if self.shared is not None and "f0" in self.shared:  # w = 0: the logits are 0, the penalty's gradient too
            f, g = self.shared["f0"]
            self.z = torch.zeros(self.n, self.rows, dtype=self.x.dtype, device=w.device)
            return f, g.clone()
        self.z = self._logits(w)
        f, r = self._data(self.z)
        f, g = f + self._penalty(w), self._grad(w, r)
        if self.shared is not None:
            self.shared["f0"] = (f, g.clone())
        return f, g

    def line(self, w: torch.Tensor, d: torch.Tensor) -> Callable[[float], tuple[float, float]]:
        """phi(a) = (f(w + a d), f'(w + a d)·d); the last trial is kept for `accept`."""
        first = self.shared is not None and self.lines == 0
        self.lines += 1
        if first and "zd" in self.shared:
            zd = self.shared["zd"]
        else:
            zd = self._logits(d)
            if first:
                self.shared["zd"] = zd
        wm, dm = (v.view(self.rows, -1)[:, : self.d].flatten() for v in (w, d))
        ww, wd, dd = float(torch.dot(wm, wm)), float(torch.dot(wm, dm)), float(torch.dot(dm, dm))

        def phi(a: float) -> tuple[float, float]:
            z = torch.add(self.z, zd, alpha=a)
            f, r = self._data(z)
            self.trial = a, z, r, f + 0.5 * self.lam * (ww + 2 * a * wd + a * a * dd)
            slope = float((r * zd).sum(dtype=self.state)) / self.n + self.lam * (wd + a * dd)
            return self.trial[3], slope

        return phi

    def accept(self, w: torch.Tensor, d: torch.Tensor, a: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Move to w + a d, the last trial of the line: (w, f, ∇f)."""
        ta, self.z, r, f = self.trial
        assert ta == a, "the accepted step is the line search's last trial"
        w = torch.add(w, d, alpha=a)
        return w, f, self._grad(w, r)


EPS = float(np.finfo(np.float64).eps)


def lbfgs(obj, w: torch.Tensor, tol: float = 1e-4, max_iter: int = 1000, memory: int = 10, max_ls: int = 50):
    """Minimise the objective `obj` (start / line / accept, as _Logistic) from the flat vector w with
    L-BFGS-B's unconstrained iteration as scipy runs it for scikit-learn (lbfgsb.f mainlb / lnsrlb):
    direction −H∇f (H the limited-memory BFGS inverse of the last `memory` pairs, H0 = sᵀy/yᵀy of the last
    update; −∇f while the memory is empty), first step min(1/||d||, 1e10) then 1, Moré–Thuente line search
    (at most max_ls evaluations); updates with sᵀy <= eps·(−∇fᵀs) are skipped; a failed line search clears the
    memory and retries (or stops if it was already empty); stops when max|∇f| <= tol, when f falls by at most
    64 eps relative, or after max_iter iterations."""
    f, g = obj.start(w)
    if float(torch.linalg.vector_norm(g, math.inf)) <= tol:
        return w
    mem = _Memory(memory, len(w), w.dtype, w.device)
    it = 0
    while it < max_iter:
        d = mem.direction(g)
        gd = float(torch.dot(g, d))
        stp = min(1.0 / float(torch.linalg.vector_norm(d)), 1e10) if it == 0 else 1.0
        stp = more_thuente(obj.line(w, d), f, gd, stp, 1e10, max_ls) if gd < 0 else None
        if stp is None:  # no acceptable step: keep the iterate; restart from steepest descent, or stop
            if not mem.order:
                break
            mem.clear()
            continue
        f_old, g_old = f, g
        w, f, g = obj.accept(w, d, stp)
        it += 1
        if float(torch.linalg.vector_norm(g, math.inf)) <= tol or f_old - f <= 64 * EPS * max(abs(f_old), abs(f), 1):
            break
        sy = (float(torch.dot(g, d)) - gd) * stp
        if sy > EPS * (-gd * stp):
            mem.push(d.mul_(stp), g - g_old, sy)
    return w


class _Memory:
    """The (s, y) pairs of L-BFGS in one [2m, P] buffer (s rows, then y rows; slots reused oldest first) with
    their small Gram blocks, so that H g is two matrix-vector products and an m x m triangular solve, in the
    compact form of Byrd, Nocedal and Schnabel (1994) that L-BFGS-B uses:
        H g = γ g + S p − γ Y u,  u = R⁻¹ Sᵀg,  p = R⁻ᵀ((D + γ YᵀY) u − γ Yᵀg),
    R the upper triangle of SᵀY, D its diagonal, γ = sᵀy / yᵀy of the newest pair."""

    def __init__(self, m: int, size: int, dtype: torch.dtype, device: torch.device):
        self.m = m
        self.buf = torch.zeros(2 * m, size, dtype=dtype, device=device)  # unused slots: 0, never NaN in addmv
        self.sty = torch.zeros(m, m, dtype=torch.float64)  # [i, j] = s_iᵀ y_j, by slot
        self.yty = torch.zeros(m, m, dtype=torch.float64)
        self.order: list[int] = []  # slots, oldest first

    def clear(self) -> None:
        self.order = []

    def push(self, s: torch.Tensor, y: torch.Tensor, sy: float) -> None:
        k = self.order.pop(0) if len(self.order) == self.m else next(i for i in range(self.m) if i not in self.order)
        self.buf[k], self.buf[self.m + k] = s, y
        self.order.append(k)
        col = torch.mv(self.buf, y).to(device="cpu", dtype=torch.float64)
        self.sty[:, k], self.yty[:, k], self.yty[k, :] = col[: self.m], col[self.m :], col[self.m :]
        self.sty[k, k] = sy  # lbfgsb's matupd stores sᵀy as computed by the line search

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """−H g."""
        if not self.order:
            return -g
        o = torch.tensor(self.order)
        ab = torch.mv(self.buf, g).to(device="cpu", dtype=torch.float64)
        a, yg = ab[o], ab[self.m + o]
        r = self.sty[o][:, o].triu()
        yy = self.yty[o][:, o]
        gamma = float(r[-1, -1] / yy[-1, -1])
        u = torch.linalg.solve_triangular(r, a[:, None], upper=True)
        p = torch.linalg.solve_triangular(r.t(), (r.diagonal()[:, None] * u + gamma * yy @ u - gamma * yg[:, None]),
                                          upper=False)  # fmt: skip
        coef = torch.zeros(2 * self.m, dtype=torch.float64)
        coef[o], coef[self.m + o] = p[:, 0], -gamma * u[:, 0]
        return torch.addmv(g, self.buf.t(), coef.to(device=g.device, dtype=g.dtype), beta=gamma).neg_()


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
