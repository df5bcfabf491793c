"""CoOp trains from cached image features and runs only the text encoder."""

import pytest
import torch

from featcache.adapters import MethodError, create_adapter
from featcache.api import fit_method, load_run


def test_parameter_count():
    assert create_adapter("coop", dim=512).trainable_params() == 16 * 512
    assert create_adapter("coop", dim=512, ctx_init="a photo of a").trainable_params() == 4 * 512


def test_cached_path_never_runs_the_image_encoder(digits_store, monkeypatch, tmp_path):
    import open_clip

    def no_images(*a, **k):
        raise AssertionError("the image encoder ran")

    monkeypatch.setattr(open_clip.model.CLIP, "encode_image", no_images)
    run = fit_method("coop", dataset="digits", backbone="featcache-tiny/random", cache_dir=digits_store.parent.parent,
                     shots=4, options={"epochs": 15, "lr": 0.05}, save=tmp_path / "run")  # fmt: skip
    losses = [h["loss"] for h in run.fit.history]
    assert losses[-1] < losses[0]  # the context learns
    assert run.record.trainable_params == 16 * 64 and run.record.metrics["novel_acc"] is not None
    # the saved context reloads into a fresh model and scores identically
    adapter, meta = load_run(tmp_path / "run")
    x = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    names = run.task.fit.classnames
    torch.testing.assert_close(adapter.score(x, None, None, names), run.adapter.score(x, None, None, names))
    assert torch.equal(adapter.ctx, run.adapter.ctx)


def test_coop_needs_names_and_a_backbone(tmp_path):
    c = create_adapter("coop", dim=8)
    with pytest.raises(MethodError, match="scores classes by name"):
        c.score(torch.zeros(1, 8), None)
    with pytest.raises(MethodError, match="bind it first"):
        c.score(torch.zeros(1, 8), None, None, ["a"])


def test_text_runs_on_the_prompts_cut_after_their_eot():
    """class_text encodes max(EOT)+1 positions, not 77: the same features, and the same gradient on the context."""
    import torch.nn.functional as F

    from featcache.backbones import load_backbone
    from featcache.text import truncated_length

    bb = load_backbone("featcache-tiny/random", device="cpu", precision="fp32")  # bind wraps its token embedding
    coop = create_adapter("coop", dim=64)
    coop.bind(bb)
    names = ["zero", "a long class name with several words"]
    cut = coop.class_text(names)
    tokens = coop._tokens[tuple(names)]
    assert truncated_length(bb.model, tokens) < 30  # 16 context tokens + a name, of 77 positions
    full = F.normalize(bb.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    grads = [torch.autograd.grad(t[:, 0].sum() - t[:, 1].sum(), coop.ctx)[0] for t in (cut, full)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def _plain(bb, coop, prompts):
    """n(CLIP text features) of prompts through the model's own token embedding (no context put in)."""
    import torch.nn.functional as F

    wrapper = coop._bound[1]
    post, wrapper._post = wrapper._post, None
    try:
        with torch.no_grad():
            return F.normalize(bb.model.encode_text(bb.tokenizer(prompts)), dim=-1)
    finally:
        wrapper._post = post


def test_ctx_init_keeps_leftover_tokens_before_the_class_name(tiny):
    """The reference's PromptLearner: n_ctx = number of words (3 for 'itap of a', which is 4 tokens: it|ap|of|a);
    the prompt is 'itap of a <name>.', its first 3 token positions become the context, and the leftover 'a' stays
    (frozen) before the class name. At init the context is those tokens' embeddings, so the prompted text is
    exactly CLIP's text of the plain prompt."""
    import copy

    bb = copy.deepcopy(tiny)
    coop = create_adapter("coop", dim=64, ctx_init="itap of a")
    coop.bind(bb)
    assert coop.ctx.shape == (3, 64) and coop.trainable_params() == 3 * 64
    names = ["zero", "red_fox"]
    tokens = coop._tokens.setdefault(tuple(names), bb.tokenizer(["itap of a zero.", "itap of a red fox."]))
    assert tokens[0, 1:8].tolist() == bb.tokenizer(["itap of a zero."])[0, 1:8].tolist()
    torch.testing.assert_close(coop.class_text(names), _plain(bb, coop, ["itap of a zero.", "itap of a red fox."]),
                               rtol=0, atol=1e-5)  # fmt: skip
    # after training moves the context: [SOS] ctx_1..3 'a' <name> '.' [EOT] enters the text tower
    with torch.no_grad():
        coop.ctx.add_(torch.randn_like(coop.ctx))
    seen = {}
    hook = bb.model.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        coop.class_text(names)
    finally:
        hook.remove()
    plain = coop._bound[1].block(tokens)
    x = seen["x"] - bb.model.positional_embedding[: seen["x"].shape[1]]
    torch.testing.assert_close(x[:, 1:4], coop.ctx.detach().expand(2, -1, -1))
    torch.testing.assert_close(x[:, 4:], plain[:, 4 : x.shape[1]])  # 'a', the name, '.', EOT: the reference's suffix
    assert int(tokens[0, 4]) == int(bb.tokenizer(["a"])[0, 1])  # the leftover token is 'a'


def test_underscores_become_spaces_and_words_are_counted_on_single_spaces(tiny):
    import copy

    bb = copy.deepcopy(tiny)
    coop = create_adapter("coop", dim=64, ctx_init="a_photo_of_a")
    coop.bind(bb)
    assert coop.prefix == "a photo of a" and coop.ctx.shape[0] == 4
    coop.class_text(["red_fox"])
    assert torch.equal(coop._tokens[("red_fox",)], bb.tokenizer(["a photo of a red fox."]))
    torch.testing.assert_close(coop.ctx, coop._bound[1].block(bb.tokenizer(["a photo of a"]))[0, 1:5])
    assert create_adapter("coop", dim=64, ctx_init="a  photo").ctx.shape[0] == 3  # "a  photo".split(" ")


def test_two_coops_on_one_backbone_keep_their_own_context(tiny):
    """The token-embedding wrapper is installed once per model; each CoOp must still use its own context (and a
    later ctx_init must start from the plain word embeddings, not from another CoOp's context)."""
    import copy

    bb, alone = copy.deepcopy(tiny), copy.deepcopy(tiny)
    names = ["zero", "one", "two"]
    a = create_adapter("coop", dim=64, seed=1)
    b = create_adapter("coop", dim=64, seed=2)
    b_alone = copy.deepcopy(b)
    a.bind(bb)
    ta = a.class_text(names).detach()
    b.bind(bb)
    c = create_adapter("coop", dim=64, ctx_init="a photo of a")
    c.bind(bb)
    b_alone.bind(alone)
    torch.testing.assert_close(b.class_text(names), b_alone.class_text(names), rtol=0, atol=0)
    torch.testing.assert_close(a.class_text(names), ta, rtol=0, atol=0)  # a's own context after b and c bound
    assert not torch.allclose(a.class_text(names), b.class_text(names))
    torch.testing.assert_close(c.ctx, c._bound[1].block(bb.tokenizer(["a photo of a"]))[0, 1:5])
    (ga,) = torch.autograd.grad(a.class_text(names).sum(), [a.ctx])
    assert ga.abs().sum() > 0
    b.ctx.grad = None
    b.class_text(names).sum().backward()
    assert b.ctx.grad is not None and a.ctx.grad is None
