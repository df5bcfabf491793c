"""layer-mma and MaPLe injected into unmodified open_clip models: sizes, token layout, gradients, learning."""

import copy
import json
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from featcache.backbones import _CONFIG_DIR, _open_clip
from featcache.streaming.layer_mma import LayerMMA, LayerMMAConfig
from featcache.streaming.maple import MaPLe, MaPLeConfig

logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def vitb16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval(), open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture
def tiny4():
    """The tiny test architecture with 4 blocks per tower, random weights."""
    _open_clip()
    cfg = json.loads((_CONFIG_DIR / "featcache-tiny.json").read_text())
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 4
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer("featcache-tiny")


def logits(model, images, tokens):
    v = F.normalize(model.encode_image(images), dim=-1)
    t = F.normalize(model.encode_text(tokens), dim=-1)
    return model.logit_scale.exp() * v @ t.t()


def test_parameter_counts_on_vit_b16_shapes(vitb16):
    model, tok = vitb16
    assert LayerMMA.for_model(model).trainable_params() == 674_560
    assert MaPLe.for_model(model, tok).trainable_params() == 3_555_072
    assert MaPLe.for_model(model, tok, MaPLeConfig(depth=3)).trainable_params() == 2 * 512 + 393_984 * 3 + 2 * 1024


def test_maple_token_layout_on_vit_b16(vitb16):
    model, tok = vitb16
    model = copy.deepcopy(model)
    maple = MaPLe.for_model(model, tok)
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]

        return hook

    model.visual.transformer.resblocks[0].register_forward_pre_hook(keep("v0"))
    maple.attach(model)
    model.transformer.resblocks[1].block.register_forward_pre_hook(keep("t1"))
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, 224, 224))
        model.encode_text(tok(["a photo of a dog."]))
    assert seen["v0"].shape == (1, 199, 768)  # 196 patches + class token + 2 prompts
    torch.testing.assert_close(seen["t1"][0, 1:3], maple.deep_text[0])  # block 2's input positions 1..2
    emb = model.token_embedding(tok(["a photo of a dog."]))
    torch.testing.assert_close(emb[0, 1:3], maple.ctx)
    # the context starts as the embeddings of "a photo"
    torch.testing.assert_close(maple.ctx, model.token_embedding.block(tok(["a photo"]))[0, 1:3])


def test_maple_deep_projections_start_as_copies_of_one_layer(vitb16):
    """The reference builds them with _get_clones(nn.Linear(...), depth - 1): eight equal layers at init, separate
    parameters (they train apart); the shallow projection and the deep text prompts are drawn on their own."""
    model, tok = vitb16
    maple = MaPLe.for_model(model, tok)
    first = maple.deep_proj[0]
    assert len(maple.deep_proj) == 8
    for layer in maple.deep_proj[1:]:
        assert torch.equal(layer.weight, first.weight) and torch.equal(layer.bias, first.bias)
        assert layer.weight.data_ptr() != first.weight.data_ptr()
    assert not torch.equal(maple.proj.weight, first.weight)
    assert not torch.equal(maple.deep_text[0], maple.deep_text[1])
    with torch.no_grad():
        maple.deep_proj[1].weight.add_(1.0)  # one trains without moving the others
    assert torch.equal(maple.deep_proj[2].weight, first.weight)


def test_layer_mma_starts_close_to_clip_and_detaches_cleanly(tiny4):
    model, tok = tiny4
    images, tokens = torch.randn(3, 3, 32, 32), tok(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        before = logits(model, images, tokens)
        mma = LayerMMA.for_model(model, LayerMMAConfig(first_block=2))
        assert mma.blocks == [1, 2, 3]
        mma.attach(model)
        during = logits(model, images, tokens)
        LayerMMA.detach(model)
        after = logits(model, images, tokens)
    cosine_change = (during - before).abs().max() / model.logit_scale.exp()
    assert 0 < cosine_change < 1e-2  # scale 0.001: a small, non-zero change
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(type(b).__name__ == "ResidualAttentionBlock" for b in model.transformer.resblocks)


def test_layer_mma_adapters_receive_unscaled_gradients(tiny4):
    model, tok = tiny4
    images, tokens = torch.randn(4, 3, 32, 32, requires_grad=True), tok(["a cat.", "a dog.", "a fox."])
    labels = torch.tensor([0, 1, 2, 0])
    model.double()
    images = images.detach().double().requires_grad_()
    cfg = LayerMMAConfig(first_block=3)
    mma = LayerMMA.for_model(model, cfg).double()
    plain = copy.deepcopy(mma)
    plain.branch = lambda i, h, modality: (
        plain.config.scale
        * (  # the same branch without gradient rescaling
            (plain.text_up[i] if modality == "text" else plain.vision_up[i])(
                F.relu(plain.shared[i](F.relu((plain.text_down[i] if modality == "text" else plain.vision_down[i])(h))))
            )
        )
    )
    grads = []
    for adapter in (mma, plain):
        adapter.attach(model)
        images.grad = None
        F.cross_entropy(logits(model, images, tokens), labels).backward()
        LayerMMA.detach(model)
        grads.append(({n: p.grad.clone() for n, p in adapter.named_parameters()}, images.grad.clone()))
    (ours, img_ours), (ref, img_ref) = grads
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name] / cfg.scale, rtol=1e-7, atol=1e-12)
        assert ours[name].abs().max() > 100 * ref[name].abs().max()  # plainly not the scaled-down gradient
    torch.testing.assert_close(img_ours, img_ref)  # nothing else sees a rescaled gradient


@pytest.mark.parametrize("method", ["layer-mma", "maple"])
def test_a_few_steps_reduce_the_loss(tiny4, method):
    model, tok = tiny4
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 3, 1, 1, generator=g)
    labels = torch.arange(3).repeat(4)
    images = means[labels] + 0.3 * torch.randn(12, 3, 32, 32, generator=g)
    tokens = tok([f"a photo of a {c}." for c in ("red", "green", "blue")])
    if method == "layer-mma":
        adapter = LayerMMA.for_model(model, LayerMMAConfig(first_block=2, scale=1.0))
    else:
        adapter = MaPLe.for_model(model, tok, MaPLeConfig(depth=3))
    adapter.attach(model)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(logits(model, images, tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad for p in model.parameters())  # the backbone stays frozen


@pytest.mark.parametrize("arch,params", [("ViT-B-32", 674_560), ("ViT-L-14", None)])
def test_other_vits_built_from_configs(arch, params):
    model = open_clip.create_model(arch, pretrained=None)
    mma = LayerMMA.for_model(model)
    if params is not None:
        assert mma.trainable_params() == params
    else:  # ViT-L/14: text width 768 and 12 blocks, vision width 1024 and 24 blocks: the last 8 of each
        assert mma.blocks == list(range(4, 12)) and mma.vision_blocks == list(range(16, 24))
        assert mma.trainable_params() == 8 * ((768 * 32 + 32 + 32 * 768 + 768) + (1024 * 32 + 32 + 32 * 1024 + 1024)
                                              + 32 * 32 + 32)  # fmt: skip
        maple = MaPLe.for_model(model, open_clip.get_tokenizer(arch))
        assert maple.proj.weight.shape == (1024, 768)
    mma.attach(model)
    with torch.no_grad():
        size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        assert model.encode_image(torch.randn(1, 3, size, size)).shape[0] == 1
    LayerMMA.detach(model)
