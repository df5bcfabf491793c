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
