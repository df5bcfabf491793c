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
numbers without either, exactly (no approximation; only the float rounding order differs):
- Text queries/keys/values do not depend on the image. With "bias", a text row's scores against the other
  texts are the same for every image, so their log-sum-exp lse and softmax-weighted values n are computed once
  per call (_Attention); each image adds one key (itself, score s + 1), which takes the weight
  g = sigmoid(s + 1 - lse) and leaves 1 - g = sigmoid(lse - s - 1) to the texts: out = (1 - g) n + g v_img.
  The image row merges its own key into its attention over the texts the same way. With "hard", a text row
  has one allowed key, so its output is the image's value: one vector per image, shared by all classes.
- out_proj and up[0] are affine and the attention weights of a row sum to 1, so W_up0 W_out is applied per
  head to the values before mixing; the mix then lands directly in the 32-wide bottleneck, where GELU runs.
- up[2] (u = W2 h + b2) is never formed per (image, class): ||u||^2, t.u and v'.u are quadratic/linear in h,
  through W2^T W2, W2^T b2, W2^T t and W2^T v', and those three numbers are all the logit needs.
- The per-(image, class) part (_BottleneckMix) runs in cache-sized tiles with a hand-written backward; no
  [B, C, 32] tensor is allocated per call (on this CPU a fresh 16 MB tensor costs more in page faults than the
  arithmetic on it): training keeps the tiles in a workspace reused from step to step.
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
            "formula reads the other way round (lambda on the original embedding)",
            "ge": 0,
            "le": 1,
        },
    )
    mask: str = field(
        default="bias",
        metadata={
            "help": "bias: the reference code's float 0/1 mask, which PyTorch adds to the scores (+1 on "
            "text<->image pairs, nothing masked; reproduces the published table). hard: the paper's mask, each "
            "text token attends only to the image token and the image token only to the text tokens",
            "choices": list(MASKS),
        },
    )
    bottleneck: int = field(default=32, metadata={"help": "inner width of the down- and upsampler", "ge": 1})
    width: int = field(default=128, metadata={"help": "attention width", "ge": 1})
    heads: int = field(default=4, metadata={"help": "attention heads (must divide width)", "ge": 1})
    logit_scale: float = field(
        default=100.0, metadata={"help": "multiplier on the cosine logits (CLIP's 100)", "gt": 0}
    )
    # reference training (paper notebooks)
    optimizer: str = field(default="adam", metadata={"help": "adam, adamw or sgd"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step"})
    epochs: int = field(default=200, metadata={"help": "maximum training epochs"})
    schedule: str = field(default="constant", metadata={"help": "constant or cosine (per step, over all epochs)"})
    patience: int = field(
        default=10,
        metadata={
            "help": "early-stopping patience in epochs on val accuracy (0: off); 10 as in the paper (seed 001, "
            "section 4: 'early stopping with a patience of ten epochs')"
        },
    )
    select: str = field(
        default="best-val", metadata={"help": "best-val: restore the best-val epoch; last: keep the last epoch"}
    )


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _Attention(torch.autograd.Function):
    """Softmax attention of queries q [Nq, H, d] (pre-scaled by 1/sqrt(d)) over keys k [Nk, H, d] with values
    vals [H, Nk, r]: returns (lse [H, Nq], out [Nq, H, r]), each query row's log-sum-exp of scores and its
    softmax-weighted values. The other keys a row has (the image token) are merged outside from lse.

    The [H, Nq, Nk] scores are made ROWS query rows at a time (about 1 MB, so they stay in cache and are never
    page-faulted in) and backward recomputes them instead of keeping them."""

    ROWS = 128

    @staticmethod
    def _probs(qh, kh, c0, c1):
        s = torch.bmm(qh[:, c0:c1], kh.transpose(1, 2))  # [H, rows, Nk]
        return s, torch.softmax(s, -1)

    @staticmethod
    def forward(ctx, q, k, vals):
        qh, kh, vals = q.transpose(0, 1), k.transpose(0, 1), vals.contiguous()  # [H, N, d]
        (H, Nq, _), r = qh.shape, vals.shape[-1]
        lse, out = vals.new_empty(H, Nq), vals.new_empty(Nq, H, r)
        for c0, c1 in _tiles(Nq, _Attention.ROWS):
            s, prob = _Attention._probs(qh, kh, c0, c1)
            lse[:, c0:c1] = s.amax(-1) - prob.amax(-1).log()  # the largest probability is exp(max - lse) >= 1/Nk
            out[c0:c1] = torch.bmm(prob, vals).transpose(0, 1)
        ctx.save_for_backward(qh, kh, vals)
        return lse, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlse, dout):
        qh, kh, vals = ctx.saved_tensors
        dout = dout.transpose(0, 1)  # [H, Nq, r]
        dq, dk, dvals = qh.new_empty(qh.shape), kh.new_zeros(kh.shape), torch.zeros_like(vals)  # contiguous
        for c0, c1 in _tiles(qh.shape[1], _Attention.ROWS):
            _, prob = _Attention._probs(qh, kh, c0, c1)
            ds = torch._softmax_backward_data(torch.bmm(dout[:, c0:c1], vals.transpose(1, 2)), prob, -1, prob.dtype)
            ds.addcmul_(prob, dlse[:, c0:c1, None])  # d lse / d s = prob
            torch.bmm(ds, kh, out=dq[:, c0:c1])
            dk.baddbmm_(ds.transpose(1, 2), qh[:, c0:c1])
            dvals.baddbmm_(prob.transpose(1, 2), dout[:, c0:c1])
        return dq.transpose(0, 1), dk.transpose(0, 1), dvals


class _Workspace:
    """Scratch memory a module keeps while training: one step's tiles, written by forward and read by backward
    instead of being recomputed, in a buffer reused step after step (page-faulted in once). `gen` tells backward
    whether its forward's tiles are still there: any later forward, or an earlier backward (which overwrites
    them), moves it on, and backward then recomputes the tiles instead."""

    def __init__(self):
        self.buf, self.gen = None, 0

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        b = self.buf
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            self.buf = like.new_empty(numel)
        self.gen += 1
        return self.buf


class _BottleneckMix(torch.autograd.Function):
    """The per-(image, class) part of the "bias" fast path, in tiles, with a hand-written backward.

    Inputs: q [C, H, d] text queries (pre-scaled), k [B, H, d] image keys, bias [H, C] (1 - the text rows'
    log-sum-exp), n [C, H, r] (text rows' text-only output), p [B, H, r] (image values), all folded to the r-wide
    bottleneck, and G [r, r], w [r], T [C, r], V [B, r]. Per (b, c) and head, the image key takes the weight
    g = sigmoid(u), u = q[c].k[b] + 1 - lse[c], and the texts the rest, sigmoid(-u) = 1 - g; then
        x = sum_h sigmoid(-u_h) n[c, h] + sigmoid(u_h) p[b, h],   h = GELU(x),
        outputs  q = h^T G h + 2 w.h,   t = T[c].h,   v = V[b].h     (each [B, C]).
    The [B, C, r] intermediates are made one tile at a time
    (128 x 128 pairs, a few MB, which stay in cache); no [B, C, r] tensor is ever allocated per call (on this CPU a
    fresh 16 MB tensor costs more in page faults than the arithmetic on it). In training the tiles go to the
    module's reused workspace for backward (ws, see _Workspace), which otherwise recomputes them from the small
    inputs. The contractions over heads and over r are batched matmuls; q, v and w.h come out of one matmul with
    [G | w | V[b]], and backward gets dh, dG, dw and dV from two more with L = [2 dq h | 2 dq | dv]."""

    TILE_B, TILE_C = 128, 128

    @staticmethod
    def _mix(qh, kh, bias, n, p, b0, b1, c0, c1, out=None):
        """u [H, bb, cc], the weights g = sigmoid(u) [H, bb, cc] and 1 - g [H, cc, bb] (each matmul below then reads
        its operand in place), x and h = GELU(x) [bb, cc, r]; into `out` (views of the workspace) if given."""
        qc, kb, bc = qh[:, c0:c1], kh[:, b0:b1], bias[:, c0:c1, None]
        u_, g_, a_, x_, h_ = out or (None,) * 5
        u = torch.baddbmm(bc.transpose(1, 2), kb, qc.transpose(1, 2), out=u_)
        g = torch.sigmoid(u, out=g_)  # the image's weight
        a = torch.baddbmm(bc, qc, kb.transpose(1, 2), out=a_).neg_().sigmoid_()  # the texts' weight 1 - g
        x = torch.bmm(g.permute(1, 2, 0), p[b0:b1], out=x_)
        x += torch.bmm(a.permute(1, 2, 0), n[c0:c1]).transpose(0, 1)
        h = F.gelu(x) if h_ is None else torch._C._nn.gelu(x, out=h_)
        return u, g, a, x, h

    @staticmethod
    def _tile_views(buf, B, C, H, r):
        """Per tile, contiguous views (u, g, a, x, h) of one flat buffer, in loop order."""
        views, off = [], 0
        for b0, b1 in _tiles(B, _BottleneckMix.TILE_B):
            for c0, c1 in _tiles(C, _BottleneckMix.TILE_C):
                bb, cc = b1 - b0, c1 - c0
                shapes = [(H, bb, cc), (H, bb, cc), (H, cc, bb), (bb, cc, r), (bb, cc, r)]
                tile = []
                for s in shapes:
                    tile.append(buf[off : off + math.prod(s)].view(s))
                    off += math.prod(s)
                views.append(tile)
        return views

    @staticmethod
    def forward(ctx, q, k, bias, n, p, G, w, T, V, ws):
        qh, kh = q.transpose(0, 1), k.transpose(0, 1)  # [H, C, d], [H, B, d]
        n, p, T = n.contiguous(), p.contiguous(), T.contiguous()
        (H, B, _), C, r = kh.shape, q.shape[0], n.shape[-1]
        M = torch.empty(B, r, r + 2, dtype=G.dtype, device=G.device)  # per image [G | w | V[b]]
        M[:, :, :r] = (G + G.T) / 2  # only h^T G h is used
        M[:, :, r] = w
        M[:, :, r + 1] = V
        out_q, out_t, out_v = (n.new_empty(B, C) for _ in range(3))
        keep = ws is not None and any(ctx.needs_input_grad)  # training: keep the tiles for backward
        views = iter(_BottleneckMix._tile_views(ws.take(B * C * (3 * H + 2 * r), n), B, C, H, r) if keep else ())
        for b0, b1 in _tiles(B, _BottleneckMix.TILE_B):
            for c0, c1 in _tiles(C, _BottleneckMix.TILE_C):
                h = _BottleneckMix._mix(qh, kh, bias, n, p, b0, b1, c0, c1, next(views, None))[4]
                Y = torch.bmm(h, M[b0:b1])  # [bb, cc, r + 2]: G h, w.h, V[b].h
                torch.add(torch.linalg.vecdot(Y[..., :r], h), Y[..., r], alpha=2, out=out_q[b0:b1, c0:c1])
                out_v[b0:b1, c0:c1] = Y[..., r + 1]
                torch.linalg.vecdot(h, T[c0:c1], out=out_t[b0:b1, c0:c1])
        ctx.save_for_backward(qh, kh, bias, n, p, M, T)
        ctx.ws, ctx.gen = (ws, ws.gen) if keep else (None, None)
        return out_q, out_t, out_v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dt, dv):
        qh, kh, bias, n, p, M, T = ctx.saved_tensors
        (H, B, _), C, r = kh.shape, qh.shape[1], n.shape[-1]
        kept = ctx.ws is not None and ctx.ws.gen == ctx.gen  # no forward (nor backward) has reused them since
        views = iter(_BottleneckMix._tile_views(ctx.ws.buf, B, C, H, r) if kept else ())
        if kept:
            ctx.ws.gen += 1  # consumed (u is overwritten below): a second backward recomputes
        dqh, dkh = qh.new_zeros(qh.shape), kh.new_zeros(kh.shape)  # [H, C, d], [H, B, d], contiguous
        dbias, dn, dp, dT = torch.zeros_like(bias), torch.zeros_like(n), torch.zeros_like(p), torch.zeros_like(T)
        R = M.new_zeros(B, r + 2, r)  # per image [sum 2 dq h h^T ; sum 2 dq h ; sum dv h]
        Mt = M.transpose(1, 2)
        for b0, b1 in _tiles(B, _BottleneckMix.TILE_B):
            for c0, c1 in _tiles(C, _BottleneckMix.TILE_C):
                u, g, a, x, h = next(views, None) or _BottleneckMix._mix(qh, kh, bias, n, p, b0, b1, c0, c1)
                L = h.new_empty(*h.shape[:2], r + 2)
                dq2 = 2 * dq[b0:b1, c0:c1]
                torch.mul(h, dq2[..., None], out=L[..., :r])
                L[..., r] = dq2
                L[..., r + 1] = dv[b0:b1, c0:c1]
                dh = torch.bmm(L, Mt[b0:b1]).addcmul_(dt[b0:b1, c0:c1, None], T[c0:c1])
                dx = torch.ops.aten.gelu_backward(dh, x)  # [bb, cc, r]
                R[b0:b1] += torch.bmm(L.transpose(1, 2), h)
                dT[c0:c1] += torch.bmm(dt[b0:b1, c0:c1].T.contiguous()[:, None], h.transpose(0, 1)).squeeze(1)
                dp[b0:b1] += torch.bmm(g.transpose(0, 1), dx)
                dn[c0:c1] += torch.bmm(a.transpose(0, 1), dx.transpose(0, 1))
                # du = g (1 - g) (dx.p - dx.n), laid out [bb, H, cc]
                du = torch.bmm(p[b0:b1], dx.transpose(1, 2))
                du -= torch.bmm(n[c0:c1], dx.permute(1, 2, 0)).permute(2, 1, 0).contiguous()
                du *= g.transpose(0, 1)
                du *= u.neg_().sigmoid_().transpose(0, 1)
                dbias[:, c0:c1] += du.sum(0)
                dqh[:, c0:c1] += torch.bmm(du.permute(1, 2, 0), kh[:, b0:b1])
                dkh[:, b0:b1] += torch.bmm(du.transpose(0, 1), qh[:, c0:c1])
        Rs = R.sum(0)
        return dqh.transpose(0, 1), dkh.transpose(0, 1), dbias, dn, dp, Rs[:r] / 2, Rs[r], dT, R[:, r + 1], None


@register("mm-attn", MMAttnConfig)
class MMAttn(Adapter):
    selection = "few-shot-val"  # early stopping and the best-val epoch
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
        self._ws = _Workspace()  # training-time scratch (not state): see _Workspace

    def train(self, mode: bool = True):
        if not mode:
            self._ws.buf = None  # evaluation keeps no tiles: give the memory back
        return super().train(mode)

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
        lse_img, att = _Attention.apply(qv * sm, kt, vt.transpose(0, 1))  # over the texts: [H, B], [B, H, d]
        if bias:  # merge the image's own key (score + 0; the texts' scores are + 1)
            w_self = torch.sigmoid((qv * kv).sum(-1) * sm - 1.0 - lse_img.T)[..., None]  # [B, H, 1]
            att = att + w_self * (vv - att)
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
            # text -> text part of each text row, shared by the batch: its log-sum-exp and its softmax-weighted values
            qs = qt * sm
            lse, n_tt = _Attention.apply(qs, kt, pvt)  # [H, C], [C, H, r]
            # one extra key per text row, the image (score + 1): it takes weight sigmoid(s_ti + 1 - lse), the texts
            # the rest
            G, w2 = W2.T @ W2, W2.T @ b2
            q, tu, vu = _BottleneckMix.apply(qs, kv, 1.0 - lse, n_tt, pvv, G, w2, t @ W2, vp @ W2, self._ws)
            # ||u||^2 = h^T (W2^T W2) h + 2 (W2^T b2) h + ||b2||^2;  t.u = (W2^T t) h + t.b2;  v'.u likewise
            nu = (q + b2 @ b2).clamp_min(torch.finfo(dtype).tiny).sqrt()  # [B, C]
            tu = (tu + t @ b2) / nu  # t.u/|u|: [B, C]
            vu = (vu + (vp @ b2)[:, None]) / nu  # v'.u/|u|: [B, C]
        else:
            # every text row attends only to the image: its output is the image's value, shared by all classes
            u = F.normalize(self.up(self.attn.out_proj(vv.reshape(B, H * d))), dim=-1)  # [B, D]
            tu = u @ t.T  # [B, C]
            vu = (vp * u).sum(-1, keepdim=True)  # [B, 1]

        # logit = s v'.t' with t' = n((1-lam) t + lam u/|u|): expand the norm and the dot product
        tn2 = (1 - lam) ** 2 * (t * t).sum(-1) + 2 * lam * (1 - lam) * tu + lam**2
        return cfg.logit_scale * ((1 - lam) * (vp @ t.T) + lam * vu) / tn2.sqrt()
