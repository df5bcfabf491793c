"""mm-attn: the exact fast path against a straightforward oracle that runs the module's own nn.MultiheadAttention
on the full [C+1]-token sequence with the reference masks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from featcache.adapters import adapter_config, create_adapter
from featcache.adapters.mm_attn import MMAttn, MMAttnConfig


def reference_mask(C: int, kind: str) -> torch.Tensor:
    """bias: the reference's float 0/1 tensor (1 on text<->image pairs), which PyTorch adds to the scores.
    hard: the paper's mask as a bool tensor (True = blocked): texts see only the image, the image only texts."""
    L = C + 1
    cross = torch.zeros(L, L, dtype=torch.bool)
    cross[:C, C] = True
    cross[C, :C] = True
    return cross.float() if kind == "bias" else ~cross


def oracle(model: MMAttn, images: torch.Tensor, text: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Naive forward: build the sequence [t_1..t_C, v] per image, run it through model.attn, then up()."""
    if chunk and images.shape[0] > chunk:
        return torch.cat([oracle(model, x, text) for x in images.split(chunk)])
    cfg, lam = model.config, model.config.lam
    B, C = images.shape[0], text.shape[0]
    seq = torch.cat([text[:, None].expand(C, B, -1), images[None]], 0)  # [C+1, B, D], batch_first=False
    x = model.down(seq)
    mask = reference_mask(C, cfg.mask).to(x.device)
    if mask.is_floating_point():
        mask = mask.to(x.dtype)
    o = model.up(model.attn(x, x, x, attn_mask=mask, need_weights=False)[0])  # [C+1, B, D]
    o = o / o.norm(dim=-1, keepdim=True)
    vp = (1 - lam) * images + lam * o[C]
    vp = vp / vp.norm(dim=-1, keepdim=True)  # [B, D]
    tp = (1 - lam) * text[:, None] + lam * o[:C]
    tp = tp / tp.norm(dim=-1, keepdim=True)  # [C, B, D]
    return cfg.logit_scale * torch.einsum("bd,cbd->bc", vp, tp)


def make(mask: str, dim: int = 512, seed: int = 0, sharp: float = 0.0, **kw) -> MMAttn:
    """Default init, or with sharp > 0 weights perturbed so the attention is far from uniform: the default init
    gives near-uniform attention over 1000 classes (entropy 6.91 of 6.91), sharp=10 gives entropy ~2.1 with
    many rows nearly one-hot (see test_sharp_attention_is_far_from_uniform). Nonzero in/out biases too."""
    torch.manual_seed(seed)
    model = create_adapter("mm-attn", dim=dim, mask=mask, **kw)
    if sharp:
        with torch.no_grad():
            model.down[0].weight.mul_(20.0)
            model.attn.in_proj_weight.mul_(sharp)
            model.attn.in_proj_bias.normal_(0, 0.5)
            model.attn.out_proj.bias.normal_(0, 0.1)
    return model


def inputs(B: int, C: int, dim: int = 512, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(B, dim, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(torch.randn(C, dim, generator=g, dtype=dtype), dim=-1)
    return v, t


MASK_KINDS = ["bias", "hard"]


def test_config_defaults_and_registry():
    cfg = adapter_config("mm-attn")
    assert isinstance(cfg, MMAttnConfig)
    assert (cfg.lam, cfg.mask, cfg.bottleneck, cfg.width, cfg.heads, cfg.logit_scale) == (
        0.2, "bias", 32, 128, 4, 100.0
    )  # fmt: skip
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("adam", 5e-3, 1e-4, 256, 200)
    assert (cfg.schedule, cfg.patience, cfg.select) == ("constant", 10, "best-val")  # the paper's patience
    assert (MMAttn.needs_val, MMAttn.trainable, MMAttn.class_agnostic) == (True, True, True)
    assert adapter_config("mm-attn", lam="0.3", mask="hard").lam == 0.3


def test_parameter_count_and_layout():
    model = create_adapter("mm-attn", dim=512)
    assert model.trainable_params() == 107_712
    keys = set(model.state_dict())
    assert {"down.0.weight", "down.1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
            "up.0.weight", "up.2.bias"} <= keys  # fmt: skip


def test_bad_mask_refused():
    with pytest.raises(Exception, match="mask"):
        create_adapter("mm-attn", mask="soft")


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("sharp", [0.0, 10.0])
@pytest.mark.parametrize("C", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("B", [1, 5, 32])
def test_fast_matches_oracle_float64(mask, sharp, C, B):
    model = make(mask, seed=C + B, sharp=sharp).double()
    v, t = inputs(B, C, seed=C * 7 + B, dtype=torch.float64)
    with torch.no_grad():
        fast, ref = model(v, t), oracle(model, v, t, chunk=8)
    assert fast.shape == (B, C)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("sharp", [0.0, 10.0, 20.0])
def test_fast_matches_oracle_float32(mask, sharp):
    """float32: measured against float64 truth, not just against the float32 oracle.

    Logits are 100 * cosine, so float32 rounding (eps 6e-8) of O(1) quantities already shows up around 1e-5 in
    the logits: the oracle itself is ~5e-6 off the float64 truth at C=1000. The fast path sums in another order
    (the log-sum-exp merge; ||u||^2 as g^T W2^T W2 g + 2 (W2^T b2) g + ||b2||^2) and measures ~1e-5. So: fast
    within 1e-4 of the float32 oracle (a wrong mask or a dropped term moves logits by >= 1e-2), and the fast path
    no more than 4x further from float64 truth than the oracle is (floor 2e-5). sharp=20 gives scores up to ~150,
    where an unshifted exp would overflow in float32."""
    model = make(mask, sharp=sharp)
    v, t = inputs(32, 1000)
    with torch.no_grad():
        fast, ref = model(v, t), oracle(model, v, t, chunk=8)
        truth = oracle(copy.deepcopy(model).double(), v.double(), t.double(), chunk=8)
    assert fast.isfinite().all()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4)
    err_fast, err_ref = (fast.double() - truth).abs().max(), (ref.double() - truth).abs().max()
    assert err_fast <= max(4 * err_ref, 2e-5), (err_fast, err_ref)


def test_sharp_attention_is_far_from_uniform():
    """The perturbed weights used above really exercise the softmax: low entropy, many near-one-hot rows."""
    model = make("bias", sharp=10.0)
    v, t = inputs(8, 1000)
    with torch.no_grad():
        x = model.down(torch.cat([t, v[:1]]))
        _, w = model.attn(x, x, x, attn_mask=reference_mask(1000, "bias"), average_attn_weights=False)
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)  # [heads, C+1]
    assert entropy.mean() < 0.5 * math.log(1001)
    assert (w.amax(-1) > 0.5).float().mean() > 0.25


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize(
    ("B", "C", "sharp"), [(5, 7, 10.0), (32, 100, 0.0), (32, 100, 10.0), (1, 3, 10.0), (8, 2, 0.0)]
)
def test_gradients_match_oracle_float64(mask, B, C, sharp):
    model = make(mask, seed=B * C, sharp=sharp).double()
    v, t = inputs(B, C, seed=B + C, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (model, lambda a, b: oracle(model, a, b)):
        model.zero_grad()
        F.cross_entropy(fn(v, t), y).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    fast, ref = grads
    assert set(fast) == set(ref) and len(fast) == 12
    for k in ref:
        scale = ref[k].abs().max()
        assert scale > 0, k  # every parameter gets a gradient: the comparison is not vacuous
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-6, atol=1e-6 * scale, msg=k)


def test_gradient_wrt_inputs_float64():
    model = make("bias", sharp=10.0).double()
    v, t = inputs(4, 9, dtype=torch.float64)
    outs = []
    for fn in (model, lambda a, b: oracle(model, a, b)):
        a, b = v.clone().requires_grad_(), t.clone().requires_grad_()
        (fn(a, b) * torch.linspace(-1, 1, 9, dtype=torch.float64)).sum().backward()
        outs.append((a.grad, b.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-9)


def test_reference_3d_mask_is_the_2d_mask():
    """The reference repeats its [C+1, C+1] mask to [B*heads, C+1, C+1]; the oracle's 2-D mask is the same."""
    model = make("bias", sharp=10.0).double()
    v, t = inputs(3, 5, dtype=torch.float64)
    seq = torch.cat([t[:, None].expand(5, 3, -1), v[None]], 0)
    x = model.down(seq)
    m2 = reference_mask(5, "bias").double()
    m3 = m2[None].repeat(3 * model.config.heads, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.attn(x, x, x, attn_mask=m2)[0], model.attn(x, x, x, attn_mask=m3)[0])


def test_bias_and_hard_differ_on_same_weights():
    bias = make("bias", sharp=10.0)
    hard = make("hard", sharp=10.0)
    hard.load_state_dict(bias.state_dict())
    v, t = inputs(8, 50)
    with torch.no_grad():
        lb, lh = bias(v, t), hard(v, t)
    assert (lb - lh).abs().max() > 1e-2
    with torch.no_grad():  # and each matches its own oracle, so neither is the other in disguise
        torch.testing.assert_close(lb, oracle(bias, v, t), rtol=0, atol=2e-4)
        torch.testing.assert_close(lh, oracle(hard, v, t), rtol=0, atol=2e-4)


@pytest.mark.parametrize("mask", MASK_KINDS)
def test_lambda_zero_is_zero_shot(mask):
    model = make(mask, sharp=10.0, lam=0.0)
    v, t = inputs(6, 11)
    v, t = v * 1.3, t * 0.7  # not unit norm: the method normalises both sides
    with torch.no_grad():
        out = model(v, t)
    torch.testing.assert_close(out, 100 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mask", MASK_KINDS)
def test_shapes_dim64(mask):
    model = make(mask, dim=64, sharp=10.0).double()
    for B, C in [(1, 1), (3, 10), (17, 4)]:
        v, t = inputs(B, C, dim=64, dtype=torch.float64)
        with torch.no_grad():
            out = model(v, t)
        assert out.shape == (B, C)
        torch.testing.assert_close(out, oracle(model, v, t), rtol=0, atol=1e-5)


def test_non_unit_text_norm_is_computed():
    """The fast path uses ||t_c|| rather than assuming 1."""
    model = make("bias", sharp=10.0).double()
    v, t = inputs(4, 6, dtype=torch.float64)
    t = t * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(model(v, t), oracle(model, v, t), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask", MASK_KINDS)
def test_small_tiles_match_oracle_float64(mask, monkeypatch):
    """The fast path works in tiles (images x classes, and query rows of the text/image attention); tiny tiles
    with ragged edges exercise every accumulation across tiles, forward and backward."""
    from featcache.adapters import mm_attn

    monkeypatch.setattr(mm_attn._BottleneckMix, "TILE_B", 3)
    monkeypatch.setattr(mm_attn._BottleneckMix, "TILE_C", 4)
    monkeypatch.setattr(mm_attn._Attention, "ROWS", 5)
    model = make(mask, seed=5, sharp=10.0).double()
    v, t = inputs(7, 11, seed=9, dtype=torch.float64)
    y = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(2))
    grads, logits = [], []
    for fn in (model, lambda a, b: oracle(model, a, b)):
        model.zero_grad()
        out = fn(v, t)
        F.cross_entropy(out, y).backward()
        logits.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-6 * grads[1][k].abs().max(), msg=k)


def test_kept_tiles_are_never_stale():
    """Training keeps forward's tiles for backward in a reused workspace; a later forward or an earlier backward
    invalidates them and backward recomputes: interleaved graphs and retain_graph get the same gradients."""
    model = make("bias", seed=3, sharp=10.0).double()
    v, t = inputs(6, 9, seed=4, dtype=torch.float64)
    y = torch.randint(0, 9, (6,), generator=torch.Generator().manual_seed(5))

    def grads(loss_fn):
        model.zero_grad()
        loss_fn()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    one = grads(lambda: F.cross_entropy(model(v, t), y).backward())
    v2 = v.flip(0)

    def interleaved():
        first = F.cross_entropy(model(v, t), y)
        second = F.cross_entropy(model(v2, t), y)  # overwrites the workspace
        first.backward()  # must recompute its tiles
        second.backward()

    both = grads(interleaved)
    ref = grads(lambda: (F.cross_entropy(model(v, t), y) + F.cross_entropy(model(v2, t), y)).backward())
    twice = grads(lambda: [loss.backward(retain_graph=True) for loss in [F.cross_entropy(model(v, t), y)] * 2])
    for k in one:
        torch.testing.assert_close(both[k], ref[k], rtol=1e-9, atol=1e-12, msg=k)
        torch.testing.assert_close(twice[k], 2 * one[k], rtol=1e-9, atol=1e-12, msg=k)
