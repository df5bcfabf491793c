"""EOT-truncated text encoding and the text half of the partial cache: exact, on fewer positions."""

import json
import logging
from types import SimpleNamespace

import open_clip
import pytest
import torch

from featcache.backbones import _CONFIG_DIR, _open_clip
from featcache.streaming.layer_mma import LayerMMA, LayerMMAConfig
from featcache.streaming.maple import MaPLe, MaPLeConfig
from featcache.streaming.partial import encode_from_tokens, encode_text_from_prefix, text_prefix, vision_tokens
from featcache.streaming.trainer import _StepLoss, fit_streaming
from featcache.text import encode_text_truncated, truncated_length

logging.getLogger().setLevel(logging.ERROR)

PROMPTS = ["a photo of a zero.", "a photo of a rather long and winding class name, with a comma.", "x", ""]


def tiny_cfg(layers: int = 2) -> dict:
    _open_clip()
    cfg = json.loads((_CONFIG_DIR / "featcache-tiny.json").read_text())
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
    return cfg


def build(cls=open_clip.model.CLIP, layers: int = 2, **text):
    cfg = tiny_cfg(layers)
    cfg["text_cfg"].update(text)
    torch.manual_seed(0)
    return cls(**cfg).eval().requires_grad_(False)


@pytest.fixture
def tiny4():
    return build(layers=4), open_clip.get_tokenizer("featcache-tiny")


def test_truncated_equals_full_on_the_tiny_model(tiny):
    tokens = tiny.tokenizer(PROMPTS)
    assert truncated_length(tiny.model, tokens) == int(tokens.argmax(-1).max()) + 1 < 20  # of 77 positions
    with torch.no_grad():
        full, cut = tiny.model.encode_text(tokens), encode_text_truncated(tiny.model, tokens)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["custom-text", "custom-text-cls", "no-causal-mask", "pool-last"])
def test_other_towers(kind):
    """CustomTextCLIP cuts through its own TextTransformer; where the cut is not exact the tower runs in full."""
    tok = open_clip.get_tokenizer("featcache-tiny")
    tokens = tok(PROMPTS)
    if kind == "custom-text":
        model, cut = build(open_clip.model.CustomTextCLIP), True
    elif kind == "custom-text-cls":
        model, cut = build(open_clip.model.CustomTextCLIP, embed_cls=True), False  # CoCa's appended CLS
    elif kind == "no-causal-mask":
        model, cut = build(no_causal_mask=True), False
    else:
        model, cut = build(pool_type="last"), False
    assert (truncated_length(model, tokens) < 77) == cut
    with torch.no_grad():
        torch.testing.assert_close(encode_text_truncated(model, tokens), model.encode_text(tokens), rtol=0, atol=1e-5)


def _method(kind, model, tok):
    if kind == "layer-mma":
        return LayerMMA.for_model(model, LayerMMAConfig(first_block=2, scale=1.0))  # a visible adapter effect
    return MaPLe.for_model(model, tok, MaPLeConfig(depth=3))


@pytest.mark.parametrize("kind", ["layer-mma", "maple"])
def test_truncated_equals_full_with_injected_methods(tiny4, kind):
    """Values and the gradients reaching the method's parameters, through the wrappers of layer-mma and MaPLe."""
    model, tok = tiny4
    tokens = tok([f"a photo of a {c}." for c in ("cat", "dog", "red fox", "x")])
    method = _method(kind, model, tok)
    with torch.no_grad():
        torch.nn.init.normal_(next(iter(method.parameters())), std=0.5)  # away from the initialisation
    method.attach(model)
    out = []
    for encode in (model.encode_text, lambda t: encode_text_truncated(model, t)):
        method.zero_grad()
        t = encode(tokens)
        (t * torch.linspace(-1, 1, t.shape[1])).sum().backward()
        out.append((t.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
    method.detach(model)
    (full, g_full), (cut, g_cut) = out
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    assert g_full.keys() == g_cut.keys() and len(g_full) > 0
    for name in g_full:
        torch.testing.assert_close(g_cut[name], g_full[name], rtol=1e-4, atol=1e-5)


def test_text_prefix_resumes_where_it_stopped(tiny4):
    model, tok = tiny4
    tokens = tok(PROMPTS)
    mma = LayerMMA.for_model(model, LayerMMAConfig(first_block=3, scale=1.0))
    mma.attach(model)
    with torch.no_grad():
        prefix = text_prefix(model, tokens, 2)
        assert prefix.x.shape[1] == prefix.tokens.shape[1] == truncated_length(model, tokens)
        torch.testing.assert_close(encode_text_from_prefix(model, prefix, 2), model.encode_text(tokens),
                                   rtol=0, atol=1e-5)  # fmt: skip
    mma.detach(model)


def test_cached_step_equals_full_step(tiny4):
    """The partial-backbone step (vision from tokens entering block 3, text from the once-per-run prefix) gives the
    full-backbone step's loss and gradients when the tokens are kept in float32."""
    model, tok = tiny4
    bb = SimpleNamespace(model=model)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    tokens = tok([f"a photo of a {c}." for c in ("red", "green", "blue")])
    mma = LayerMMA.for_model(model, LayerMMAConfig(first_block=3, scale=1.0))
    with torch.no_grad():
        cached = vision_tokens(model, images, 2)
    mma.attach(model)
    results = []
    for layer, x in ((None, images), (2, cached)):
        step = _StepLoss(mma, bb, tokens, layer)
        for _ in range(2):  # the second step reuses the text prefix of the first
            mma.zero_grad()
            loss = step(x, labels)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in mma.named_parameters()}))
        assert bool(step._text_prefix) == (layer is not None)
    mma.detach(model)
    (l_full, g_full), (l_cut, g_cut) = results
    torch.testing.assert_close(l_cut, l_full, rtol=0, atol=1e-6)
    for name in g_full:
        torch.testing.assert_close(g_cut[name], g_full[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # and the vision half alone, for the record
        torch.testing.assert_close(encode_from_tokens(model, cached, 2), model.visual(images), rtol=0, atol=0)


def test_training_and_evaluation_run_the_text_tower_on_cut_prompts(monkeypatch):
    lengths = []
    real = open_clip.transformer.ResidualAttentionBlock.forward

    def record(self, q_x, *a, attn_mask=None, **k):
        if attn_mask is not None:  # the text tower (the vision tower runs unmasked)
            lengths.append(q_x.shape[1])
        return real(self, q_x, *a, attn_mask=attn_mask, **k)

    monkeypatch.setattr(open_clip.transformer.ResidualAttentionBlock, "forward", record)
    fit_streaming("maple", dataset="digits", backbone="featcache-tiny/random", shots=2, progress=False,
                  options={"depth": 2, "epochs": 1, "batch_size": 8})  # fmt: skip
    assert lengths and max(lengths) < 20
