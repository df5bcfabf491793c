"""LP++: a linear probe on the image features plus class-wise multipliers of the zero-shot text logits, with
Lipschitz step sizes and the epoch chosen on a K-shot validation set (Huang et al., CVPR 2024).

Reference FereshteShakeri/FewShot-CLIP-Strong-Baseline methods/linear_probe_p2.py (with methods/utils.py):
    logits = v Wᵀ + b + α ⊙ (v tᵀ)                      W [C, D], b [C], α [C]; t the unit-norm class text (:129)
    W init: the per-class SUM of the train features (compute_centroids: the division is commented out);
    b init: nn.Linear's default U(−1/√D, 1/√D); α init: 250 · mean_c mean_{i: y_i = c} v_i · t_c, one value for
    every class (calculate_init_alpha, compute_centroids_alpha: the diagonal, then the mean).
Training, full batch, 300 epochs (configs/base.yaml train_epoch): one CE step per epoch on (W, b) by SGD with
momentum 0.9 and lr_w = 4N / λmax(FᵀF) (calculate_lr_w, F [N, D] the train features), and every 10 epochs a plain
step α ← α − lr_α · ∇α with lr_α = N / (4 max_k Σ_i (v_i·t_k)²) (calculate_lr_alpha). The reference never zeroes
α's gradient (zero_grad covers the classifier only), so that step uses the sum of every epoch's gradient so far;
`alpha_grad` offers the zeroed variant. After every epoch the val accuracy is computed and the last epoch with
accuracy >= the best so far is kept (:141-155); the val set is K per class (val_draw=k-shot). The train features
are one augmented view per image, drawn once (views=one). The reference runs in float16 on CUDA; this runs in the
features' dtype. Classes without a trained row score with the text term alone, mean(α) · v·t (`novel_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import FitData, TrainConfig, register
from .linear_head import LinearHead, class_mean, training_views


@dataclass
class LppConfig(TrainConfig):
    epochs: int = field(default=300, metadata={"help": "full-batch epochs (train_epoch 300)", "ge": 0})
    batch_size: int = field(
        default=0, metadata={"help": "0: full batch, one step per epoch (the reference; the only choice)",
                             "ge": 0, "le": 0},
    )  # fmt: skip
    lr: float = field(
        default=0.0,
        metadata={"help": "SGD step for W, b; 0: the reference's 4N / λmax(FᵀF) (calculate_lr_w)", "ge": 0.0},
    )
    alpha_lr: float = field(
        default=0.0,
        metadata={"help": "step for α; 0: the reference's N / (4 max_k Σ_i (v_i·t_k)²) (calculate_lr_alpha)",
                  "ge": 0.0},
    )  # fmt: skip
    alpha_every: int = field(default=10, metadata={"help": "epochs between α steps (the reference: 10)", "ge": 1})
    alpha_grad: str = field(
        default="accumulate",
        metadata={"help": "accumulate: α's gradient is never zeroed, each α step uses the sum since epoch 1 (the "
                  "reference); zeroed: the sum since the last α step", "choices": ["accumulate", "zeroed"]},
    )  # fmt: skip
    alpha_scale: float = field(
        default=250.0, metadata={"help": "α init = alpha_scale · mean same-class image-text cosine", "ge": 0.0}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum on W, b", "ge": 0.0, "lt": 1.0})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay on W, b (reference: 0)", "ge": 0.0})
    optimizer: str = field(default="sgd", metadata={"help": "the reference's SGD", "choices": ["sgd"]})
    schedule: str = field(default="constant", metadata={"help": "constant step sizes", "choices": ["constant"]})
    select: str = field(
        default="best-val",
        metadata={"help": "best-val: the last epoch whose val accuracy is >= the best so far (the reference); "
                  "last: the last epoch, no val needed", "choices": ["best-val", "last"]},
    )  # fmt: skip
    val_draw: str = field(
        default="k-shot",
        metadata={"help": "val rows the epoch is chosen on: k-shot (K per class from the val split, the "
                  "reference's; on ImageNet it draws them from train, disjoint from the support set: use "
                  "--val-from train), dassl (min(K,4) per class), full", "choices": ["dassl", "k-shot", "full"]},
    )  # fmt: skip
    views: str = field(
        default="auto",
        metadata={"help": "one: one stored augmented view per image, drawn once (the reference's single augmented "
                  "pass; the store's views are RandomResizedCrop 0.08-1, the reference's 0.5-1); clean: the clean "
                  "features; auto: one when the store has views, else clean", "choices": ["auto", "one", "clean"]},
    )  # fmt: skip
    novel_logits: str = field(
        default="alpha",
        metadata={"help": "classes without a trained row: alpha (mean(α) · v·t, the model's text term without a "
                  "visual term) or clip (100 · v·t); both rank like zero-shot among such classes",
                  "choices": ["alpha", "clip"]},
    )  # fmt: skip


def lipschitz_steps(x: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """(lr_w, lr_α): 4N / λmax(FᵀF) and N / (4 max_k Σ_i (v_i·t_k)²) (calculate_lr_w, calculate_lr_alpha)."""
    n = len(x)
    x64 = x.detach().cpu().double()  # float64 on the CPU: a D x D eigenproblem, and MPS has no float64
    top = float(torch.linalg.eigvalsh(x64.t() @ x64)[-1])
    return 4.0 * n / top, n / (4.0 * float((x64 @ text.detach().cpu().double().t()).pow(2).sum(0).max()))


def init_alpha(x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, scale: float = 250.0) -> float:
    """scale · mean over classes of the mean cosine between the class's images and its own text."""
    per_class = class_mean(x @ text.t(), y, len(text)).diagonal()
    return scale * float(per_class.mean())


@register("lp++", LppConfig)
class LinearProbePP(LinearHead):
    selection = "few-shot-val"

    def __init__(self, config: LppConfig, dim: int = 512):
        super().__init__(config, dim)
        self.needs_val = config.select == "best-val"
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("alpha", torch.zeros(0))

    def setup(self, data: FitData) -> None:
        cfg, gen = self.config, self.generator()
        x, y = training_views(data, cfg.views, "one", gen)
        n, d = x.shape
        c = data.num_classes
        text = data.text.to(x.dtype)
        lr_w, lr_a = lipschitz_steps(x, text)
        lr_w, lr_a = cfg.lr or lr_w, cfg.alpha_lr or lr_a
        weight = class_mean(x, y, c) * torch.bincount(y, minlength=c)[:, None].to(x.dtype)  # class sums
        bound = 1.0 / math.sqrt(d)
        bias = (torch.rand(c, generator=gen, dtype=x.dtype) * 2 * bound - bound).to(x.device)
        alpha = torch.full((c,), init_alpha(x, y, text, cfg.alpha_scale), dtype=x.dtype, device=x.device)
        params = [t.requires_grad_(True) for t in (weight, bias, alpha)]
        weight, bias, alpha = params
        opt = torch.optim.SGD([weight, bias], lr=lr_w, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        text_x = x @ text.t()
        use_val = cfg.select == "best-val" and data.val_x is not None and len(data.val_y) > 0
        text_v = data.val_x.to(x.dtype) @ text.t() if use_val else None
        best, snap = -1.0, None
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                loss = F.cross_entropy(torch.addmm(bias, x, weight.t()) + alpha * text_x, y)
                opt.zero_grad(set_to_none=True)  # the classifier's gradients only, as the reference
                loss.backward()
                opt.step()
                if (epoch + 1) % cfg.alpha_every == 0:
                    with torch.no_grad():
                        alpha -= lr_a * alpha.grad
                    if cfg.alpha_grad == "zeroed":
                        alpha.grad = None
                if use_val:
                    with torch.no_grad():
                        logits = torch.addmm(bias, data.val_x.to(x.dtype), weight.t()) + alpha * text_v
                        acc = int((logits.argmax(-1) == data.val_y).sum())  # correct rows
                    if acc >= best:  # ties go to the later epoch
                        best, snap = acc, [p.detach().clone() for p in params]
        if snap is None:
            snap = [p.detach().clone() for p in params]
        self.weight, self.bias, self.alpha = snap

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        text_logits = images @ text.t()
        if class_ids is None:
            return torch.addmm(self.bias, images, self.weight.t()) + self.alpha * text_logits
        seen = class_ids >= 0
        ids = class_ids.clamp(min=0)
        visual = torch.addmm(self.bias[ids], images, self.weight[ids].t()) * seen
        unseen = self.alpha.mean() if self.config.novel_logits == "alpha" else images.new_tensor(100.0)
        return visual + torch.where(seen, self.alpha[ids], unseen) * text_logits

    def trainable_params(self) -> int:
        return int(self.weight.numel() + self.bias.numel() + self.alpha.numel())
