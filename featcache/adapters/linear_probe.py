"""Linear probe, as CoOp's lpclip runs it: scikit-learn logistic regression (lbfgs, max_iter 1000) on image
features, C chosen on the few-shot validation set by a coarse grid and then log-space bisection.

It has no text side, so it cannot score classes it was not trained on: novel accuracy is not applicable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Adapter, FitData, MethodError, TrainConfig, register


@dataclass
class LinearProbeConfig(TrainConfig):
    c_grid: list = field(
        default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6], metadata={"help": "initial C grid"}
    )
    search_steps: int = field(default=8, metadata={"help": "log-space bisection steps around the best grid C"})
    max_iter: int = field(default=1000, metadata={"help": "lbfgs iterations"})
    c: float = field(default=0.0, metadata={"help": "use this C and skip the search (0: search on val)"})
    epochs: int = field(default=0, metadata={"help": "closed form: no gradient training"})


@register("linear-probe", LinearProbeConfig)
class LinearProbe(Adapter):
    trainable = False
    class_agnostic = False

    def __init__(self, config: LinearProbeConfig, dim: int = 512):
        super().__init__(config, dim)
        self.needs_val = config.c <= 0
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("c_value", torch.zeros(()))

    def setup(self, data: FitData) -> None:
        from sklearn.linear_model import LogisticRegression

        x, y = data.train_x.cpu().double().numpy(), data.train_y.cpu().numpy()
        cfg = self.config

        def train(c: float) -> LogisticRegression:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs convergence warnings at extreme C
                return LogisticRegression(solver="lbfgs", max_iter=cfg.max_iter, C=c).fit(x, y)

        if cfg.c > 0:
            c_final, clf = cfg.c, train(cfg.c)
        else:
            vx, vy = data.val_x.cpu().double().numpy(), data.val_y.cpu().numpy()

            def score(clf) -> float:
                return float((clf.predict(vx) == vy).mean())

            accs = [score(train(c)) for c in cfg.c_grid]
            peak = float(cfg.c_grid[int(np.argmax(accs))])
            left, right = 0.1 * peak, 10.0 * peak
            c_final, clf = peak, None
            for _ in range(cfg.search_steps):  # lpclip's binary search, in log10 space
                cl, cr = train(left), train(right)
                if score(cl) < score(cr):
                    c_final, clf = right, cr
                    left, right = 10 ** (0.5 * (np.log10(right) + np.log10(left))), right
                else:
                    c_final, clf = left, cl
                    left, right = left, 10 ** (0.5 * (np.log10(right) + np.log10(left)))
            if clf is None:
                clf = train(peak)
        w = np.zeros((data.num_classes, x.shape[1]))
        b = np.full(data.num_classes, -np.inf)
        if len(clf.classes_) == 2:  # sklearn stores one row for two classes
            w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            w[clf.classes_[0]], b[clf.classes_[0]] = 0.0, 0.0
        else:
            w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
        dev = data.train_x.device
        self.weight = torch.as_tensor(w, dtype=torch.float32, device=dev)
        self.bias = torch.as_tensor(b, dtype=torch.float32, device=dev)
        self.c_value = torch.tensor(float(c_final), device=dev)

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
