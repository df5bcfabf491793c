"""Cross-Modal Adapter injected into unmodified open_clip models: size, weight sharing, init, detach, loss, learning."""

import copy
import json
import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from featcache.adapters import MethodError
from featcache.backbones import _CONFIG_DIR, _open_clip
from featcache.streaming.cross_modal_adapter import CrossModalAdapter, CrossModalAdapterConfig, info_nce, lr_at

logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture
def tiny_model(tiny):
    """A private copy of the tiny backbone's model (2 blocks per tower, width 64), frozen, in float64."""
    return copy.deepcopy(tiny.model).double().requires_grad_(False), tiny.tokenizer


def features(model, images, tokens):
    return F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)


def test_parameter_count_on_vit_b32_shapes():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    cma = CrossModalAdapter.for_model(model)
    vision = 768 * 8 + 8 + 8 * (768 - 16) + (768 - 16)  # down + unique up, both with biases
    text = 512 * 8 + 8 + 8 * (512 - 16) + (512 - 16)
    shared = 8 * 16 + 16  # counted once for the pair
    assert cma.trainable_params() == 12 * 2 * (vision + text + shared) == 519_168
    assert sum(p.numel() for p in cma.state_dict().values()) == 519_168  # the shared tensors are stored once
    a = cma.vision[5]
    assert (a.down.out_features, a.up_unique.out_features, a.up_share.out_features) == (8, 752, 16)
    assert cma.text[5].up_unique.out_features == 496
    unshared = CrossModalAdapter.for_model(model, CrossModalAdapterConfig(share_dim=0))
    assert unshared.trainable_params() == 24 * (768 * 8 + 8 + 8 * 768 + 768 + 512 * 8 + 8 + 8 * 512 + 512)


def test_shared_part_is_the_last_share_dim_channels_of_each_modality():
    cma = CrossModalAdapter(CrossModalAdapterConfig(), text_width=512, vision_width=768, num_blocks=1)
    with torch.no_grad():
        for a in (*cma.vision, *cma.text):
            a.up_unique.weight.zero_()
        cma.share[1].bias.fill_(1.0)
        for adapters, width in ((cma.vision, 768), (cma.text, 512)):
            h = torch.randn(2, 5, width)
            delta = adapters[1](h) - h  # index 1: block 0, MLP sublayer
            assert (delta[..., -16:] != 0).all() and (delta[..., :-16] == 0).all()


def test_unequal_tower_depths_are_refused():
    _open_clip()
    cfg = json.loads((_CONFIG_DIR / "featcache-tiny.json").read_text())
    cfg["vision_cfg"]["layers"] = 4  # like ViT-L/14: deeper vision tower
    model = open_clip.model.CLIP(**cfg)
    with pytest.raises(MethodError, match="4 vision and 2 text blocks"):
        CrossModalAdapter.for_model(model)


def test_shared_channels_are_one_parameter_and_get_gradients_from_both_towers(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    cma = CrossModalAdapter.for_model(model).double()
    for i in range(4):  # 2 blocks x 2 sublayers
        assert cma.vision[i].up_share.weight is cma.text[i].up_share.weight is cma.share[i].weight
        assert cma.vision[i].up_share.bias is cma.text[i].up_share.bias
        assert cma.vision[i].down.weight is not cma.text[i].down.weight
    cma.attach(model)
    images, tokens = torch.randn(3, 3, 32, 32, dtype=torch.float64), tok(["a cat.", "a dog.", "a red fox."])
    v, t = features(model, images, tokens)
    loss = info_nce(20 * v @ t.t())
    shared = [p for m in cma.share for p in m.parameters()]
    total = torch.autograd.grad(loss, shared, retain_graph=True)
    g_v, g_t = torch.autograd.grad(loss, (v, t), retain_graph=True)
    from_vision = torch.autograd.grad(v, shared, grad_outputs=g_v, retain_graph=True, allow_unused=True)
    from_text = torch.autograd.grad(t, shared, grad_outputs=g_t, allow_unused=True)
    CrossModalAdapter.detach(model)
    for g, gv, gt in zip(total, from_vision, from_text, strict=True):
        assert gv is not None and gt is not None  # both towers used the shared tensor
        assert gv.abs().max() > 0 and gt.abs().max() > 0
        torch.testing.assert_close(g, gv + gt, rtol=1e-9, atol=1e-15)
        assert (g - gv).abs().max() > 1e-3 * g.abs().max()  # the text share is not negligible


def test_starts_close_to_clip_and_detaches_exactly(tiny_model):
    model, tok = tiny_model
    images, tokens = torch.randn(4, 3, 32, 32, dtype=torch.float64), tok(["a photo of a cat.", "a dog."])
    plain_ls = [type(b.ls_1) for b in model.transformer.resblocks]
    with torch.no_grad():
        before = features(model, images, tokens)
        CrossModalAdapter.for_model(model).double().attach(model)
        during = features(model, images, tokens)
        CrossModalAdapter.detach(model)
        after = features(model, images, tokens)
    for b, d, a in zip(before, during, after, strict=True):
        change = (d - b).abs().max()
        assert 0 < change < 0.05  # std 0.01: a small, non-zero change of the unit-norm features
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [type(b.ls_1) for b in model.transformer.resblocks] == plain_ls
    assert all(type(b.ls_2).__name__ != "SubmoduleWrapper" for b in model.visual.transformer.resblocks)


def test_attach_twice_is_refused(tiny_model):
    model, _ = tiny_model
    cma = CrossModalAdapter.for_model(model)
    cma.attach(model)
    with pytest.raises(MethodError, match="already"):
        cma.attach(model)


def test_info_nce_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2  # row 0: [2, 0] -> 0; row 1: [1, 3] -> 1
    cols = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2  # col 0: [2, 1] -> 0; col 1: [0, 3] -> 1
    assert info_nce(logits).item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    assert info_nce(torch.zeros(3, 3)).item() == pytest.approx(math.log(3))


def test_lr_schedule_is_bertadam_warmup_cosine():
    cfg = CrossModalAdapterConfig(lr=1.0, warmup=0.1)
    assert lr_at(cfg, 0, 100) == 0.0
    assert lr_at(cfg, 5, 100) == pytest.approx(0.5)
    assert lr_at(cfg, 10, 100) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))  # the cosine runs over all steps
    assert lr_at(cfg, 50, 100) == pytest.approx(0.5)
    assert lr_at(cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_a_few_steps_lower_the_loss(tiny_model):
    model, tok = tiny_model
    model.float()
    g = torch.Generator().manual_seed(0)
    words = ["red", "dog", "cat", "sky", "car", "tree", "blue", "fox", "boat", "house", "runs", "sits"]
    captions = [" ".join(words[j] for j in torch.randint(len(words), (5,), generator=g)) for _ in range(8)]
    images, tokens = torch.randn(8, 3, 32, 32, generator=g), tok(captions)
    torch.manual_seed(0)
    cma = CrossModalAdapter.for_model(model)
    cma.attach(model)
    opt = torch.optim.AdamW(cma.param_groups(), lr=1e-3)
    losses = []
    for _ in range(20):
        v, t = features(model, images, tokens)
        loss = info_nce(model.logit_scale.exp() * v @ t.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    CrossModalAdapter.detach(model)
    assert losses[-1] < losses[0] - 0.1, losses  # std-0.01 adapters and lr 1e-3: slow but steady
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
