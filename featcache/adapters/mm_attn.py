"""Multi-Modal Adapter with masked attention ("mm-attn"; seed 001, reference code dqmis/clip-mma).

Per image the sequence is [t_1 .. t_C, v] (class texts first, image last). It goes down to a small width
(Linear, Linear, no activation), through one nn.MultiheadAttention, and back up (Linear, GELU, Linear):
o = up(MHA(down(seq))). Each token is then mixed with its own adapter output,
v' = n((1-lam) v + lam n(o_img)), t'_c = n((1-lam) t_c + lam n(o_c)), and logits_c = scale * v' . t'_c.
Text features therefore differ per image.

Two masks. "bias" is what the reference code runs: a float 0/1 mask, which PyTorch ADDS to the scores, so
nothing is masked and text<->image pairs get +1 (this reproduces the published numbers). "hard" is the paper's
mask: text tokens see only the image, the image sees only the texts.

The naive forward materialises B*heads*(C+1)^2 scores and a [B, C, D] tensor. This file computes the same
numbers without either, exactly (no approximation; only the float summation order differs):
- Text queries/keys/values do not depend on the image. With "bias", a text row's scores against the other
  texts are the same for every image, so their softmax statistics (row max m, sum of exps Z, exp-weighted sum
  of values N) are computed once per call; each image adds one key (itself, score + 1), merged by a stable
  log-sum-exp update: out = (a N + b v_img) / (a Z + b). With "hard", a text row has one allowed key, so its
  output is the image's value: one vector per image, shared by all classes.
- out_proj and up[0] are affine and the attention weights of a row sum to 1, so W_up0 W_out is applied per
  head to the values before mixing; the mix then lands directly in the 32-wide bottleneck, where GELU runs.
- up[2] (u = W2 g + b2) is never formed per (image, class): ||u||^2, t.u and v'.u are quadratic/linear in g,
  through W2^T W2, W2^T b2, W2^T t and W2^T v', and those three numbers are all the logit needs.
The image row is only [B, D] and is computed directly. Tests compare against nn.MultiheadAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, MethodError, TrainConfig, register

MASKS = ("bias", "hard")


@dataclass
class MMAttnConfig(TrainConfig):
    lam: float = field(
        default=0.2,
        metadata={
            "help": "weight on the adapter output (CLI: --lambda); v' = n((1-lambda) v + lambda n(o)). 0.2 on the "
            "adapter output reproduces the published setup (the reference code, like CLIP-Adapter); the paper's "
            "formula reads the other way round (lambda on the original embedding)"
        },
    )
    mask: str = field(
        default="bias",
        metadata={
            "help": "bias: the reference code's float 0/1 mask, which PyTorch adds to the scores (+1 on "
            "text<->image pairs, nothing masked; reproduces the published table). hard: the paper's mask, each "
            "text token attends only to the image token and the image token only to the text tokens"
        },
    )
    bottleneck: int = field(default=32, metadata={"help": "inner width of the down- and upsampler"})
    width: int = field(default=128, metadata={"help": "attention width"})
    heads: int = field(default=4, metadata={"help": "attention heads (must divide width)"})
    logit_scale: float = field(default=100.0, metadata={"help": "multiplier on the cosine logits (CLIP's 100)"})
    # reference training (paper notebooks)
    optimizer: str = field(default="adam", metadata={"help": "adam, adamw or sgd"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step"})
    epochs: int = field(default=200, metadata={"help": "maximum training epochs"})
    schedule: str = field(default="constant", metadata={"help": "constant or cosine (per step, over all epochs)"})
    patience: int = field(default=20, metadata={"help": "early-stopping patience in epochs on val accuracy (0: off)"})
    select: str = field(
        default="best-val", metadata={"help": "best-val: restore the best-val epoch; last: keep the last epoch"}
    )


@register("mm-attn", MMAttnConfig)
class MMAttn(Adapter):
    """Texts and image attend to each other per image; both sides get a residual adapter update."""

    needs_val = True
    trainable = True
    class_agnostic = True

    def __init__(self, config: MMAttnConfig, dim: int = 512):
        super().__init__(config, dim)
        if config.mask not in MASKS:
            raise MethodError(f"mm-attn: mask must be one of {', '.join(MASKS)}, got {config.mask!r}")
        if config.width % config.heads:
            raise MethodError(f"mm-attn: heads ({config.heads}) must divide width ({config.width})")
        r, w = config.bottleneck, config.width
        self.down = nn.Sequential(nn.Linear(dim, r), nn.Linear(r, w))
        self.attn = nn.MultiheadAttention(w, config.heads, dropout=0.0)
        self.up = nn.Sequential(nn.Linear(w, r), nn.GELU(), nn.Linear(r, dim))

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        cfg, lam = self.config, float(self.config.lam)
        dtype = self.up[2].weight.dtype
        v, t = images.to(dtype), text.to(dtype)
        B, C, H = v.shape[0], t.shape[0], cfg.heads
        d = cfg.width // H
        sm = 1.0 / math.sqrt(d)
        bias = cfg.mask == "bias"

        # q, k, v of every text token (once per call) and of every image token: [C or B, H, d]
        qt, kt, vt = F.linear(self.down(t), self.attn.in_proj_weight, self.attn.in_proj_bias).view(C, 3, H, d).unbind(1)
        qv, kv, vv = F.linear(self.down(v), self.attn.in_proj_weight, self.attn.in_proj_bias).view(B, 3, H, d).unbind(1)

        # image row: attends to the C texts (+1 with "bias") and, with "bias", to itself (+0). [B, D]
        s_img = torch.einsum("bhd,chd->bhc", qv, kt) * sm
        if bias:
            s_self = (qv * kv).sum(-1, keepdim=True) * sm
            p = torch.cat([s_img + 1.0, s_self], -1).softmax(-1)
            att = torch.einsum("bhc,chd->bhd", p[..., :C], vt) + p[..., C:] * vv
        else:
            att = torch.einsum("bhc,chd->bhd", s_img.softmax(-1), vt)
        o_img = self.up(self.attn.out_proj(att.reshape(B, H * d)))
        vp = F.normalize((1 - lam) * v + lam * F.normalize(o_img, dim=-1), dim=-1)  # v'

        W2, b2 = self.up[2].weight, self.up[2].bias  # [D, r], [D]
        if bias:
            # fold out_proj and up[0] into the values, per head: P_h = W_up0 W_out[:, head h]. Each head's attention
            # weights sum to 1, so adding (W_up0 b_out + b_up0) / H to every head's values adds it exactly once.
            P = (self.up[0].weight @ self.attn.out_proj.weight).view(-1, H, d)  # [r, H, d]
            b_fold = (self.up[0].weight @ self.attn.out_proj.bias + self.up[0].bias) / H
            pvt = torch.einsum("chd,rhd->hcr", vt, P) + b_fold  # [H, C, r]
            pvv = torch.einsum("bhd,rhd->bhr", vv, P) + b_fold  # [B, H, r]
            # text -> text part of each text row, shared by the batch: max, sum of exps, exp-weighted values
            s_tt = torch.einsum("chd,khd->hck", qt, kt) * sm  # [H, C, C]
            m = s_tt.amax(-1).detach()  # the shift cancels exactly; no gradient needed through it
            e = torch.exp(s_tt - m[..., None])
            z, n = e.sum(-1).T, e @ pvt  # [C, H], [H, C, r]
            # one extra key per text row: the image (score + 1), merged by a stable log-sum-exp update
            s_ti = torch.einsum("chd,bhd->bch", qt, kv) * sm + 1.0  # [B, C, H]
            mx = torch.maximum(m.T, s_ti).detach()
            a, g = torch.exp(m.T - mx), torch.exp(s_ti - mx)
            den = a * z + g
            a, g = a / den, g / den
            text_part = torch.bmm(a.transpose(0, 1), n.transpose(0, 1)).transpose(0, 1)  # [B, C, r]
            h = self.up[1](torch.baddbmm(text_part, g, pvv))  # GELU in the bottleneck; u = W2 h + b2 never formed
            # ||u||^2 = h^T (W2^T W2) h + 2 (W2^T b2) h + ||b2||^2;  t.u = (W2^T t) h + t.b2;  v'.u likewise
            hG = torch.addmm(2 * (W2.T @ b2), h.view(-1, h.shape[-1]), W2.T @ W2).view_as(h)
            nu = (torch.linalg.vecdot(hG, h) + b2 @ b2).clamp_min(torch.finfo(dtype).tiny).sqrt()  # [B, C]
            tu = torch.linalg.vecdot(h, t @ W2) + t @ b2
            vu = torch.bmm(h, (vp @ W2)[:, :, None]).squeeze(-1) + (vp @ b2)[:, None]
            tu, vu = tu / nu, vu / nu  # t.u/|u|, v'.u/|u|: [B, C]
        else:
            # every text row attends only to the image: its output is the image's value, shared by all classes
            u = F.normalize(self.up(self.attn.out_proj(vv.reshape(B, H * d))), dim=-1)  # [B, D]
            tu = u @ t.T  # [B, C]
            vu = (vp * u).sum(-1, keepdim=True)  # [B, 1]

        # logit = s v'.t' with t' = n((1-lam) t + lam u/|u|): expand the norm and the dot product
        tn2 = (1 - lam) ** 2 * (t * t).sum(-1) + 2 * lam * (1 - lam) * tu + lam**2
        return cfg.logit_scale * ((1 - lam) * (vp @ t.T) + lam * vu) / tn2.sqrt()
