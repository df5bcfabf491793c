"""The partial-backbone cache: tokens entering block L+1, and layer-mma trained from them."""

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli.main import app
from featcache.backbones import load_backbone
from featcache.data import load_image, resolve_split
from featcache.manifests import load_manifest
from featcache.streaming.layer_mma import LayerMMA, LayerMMAConfig
from featcache.streaming.partial import encode_from_tokens, extract_tokens, open_tokens, vision_tokens
from featcache.streaming.trainer import fit_streaming


def test_cached_path_equals_full_path(tmp_path):
    """For un-augmented inputs the cached path's logits equal the full path's within 1e-3 on the cosine scale
    (logits / logit_scale, i.e. n(v) . n(t)), with the tokens stored in float16.

    The float16 storage is the only difference: from float32 tokens the cached path is bit-identical to the full
    path. Rounding the tokens to float16 (relative error up to 2^-11) moves the cosines by 4.1e-5 here (1.4e-5 on
    random ViT-B-16 shapes), i.e. 4.1e-3 on CLIP's x100 logits: 1e-3 holds on the cosine scale, not on x100."""
    bb = load_backbone("featcache-tiny/random", device="cpu", precision="fp32")
    path = extract_tokens("digits", bb, 1, cache_dir=tmp_path, splits=["test"], progress=False)
    m = load_manifest("digits")
    items = resolve_split(m, m.scheme(), "test", tmp_path)
    tc = open_tokens(bb, m, "fixed", 1, tmp_path)
    rows = list(range(0, 360, 37))
    toks, _ = tc.rows("test", rows, aug=False)
    assert toks.dtype == torch.float16 and toks.shape == (len(rows), 17, 64)  # 16 patches + class token, width 64
    images = torch.stack([bb.preprocess(load_image(items.items[r].ref, items.source)) for r in rows])
    mma = LayerMMA.for_model(bb.model, LayerMMAConfig(first_block=2, scale=1.0))  # a visible adapter effect
    with torch.no_grad():
        exact = vision_tokens(bb.model, images, 1)
        torch.testing.assert_close(exact.half(), toks)
        mma.attach(bb.model)
        text = F.normalize(bb.model.encode_text(bb.tokenizer(["a photo of a zero.", "a photo of a one."])), dim=-1)
        full = F.normalize(bb.model.encode_image(images), dim=-1) @ text.t()
        cached = F.normalize(encode_from_tokens(bb.model, toks.float(), 1), dim=-1) @ text.t()
        from32 = F.normalize(encode_from_tokens(bb.model, exact, 1), dim=-1) @ text.t()
        mma.detach(bb.model)
    assert torch.equal(from32, full)  # the same ops in the same order: only the storage differs
    err = (full - cached).abs().max()
    assert 0 < err < 1e-3  # cosine scale; the float16 storage is really in the path
    tc.close()
    assert path.name == "digits__fixed__tokens1.h5"


def test_layer_mma_trains_from_the_token_cache(tmp_path, monkeypatch):
    extract_tokens("digits", "featcache-tiny/random", 1, cache_dir=tmp_path, augment_views=2, progress=False)
    import open_clip

    calls, text_runs = {"embeds": 0}, {}
    real = open_clip.transformer.VisionTransformer._embeds
    real_block = open_clip.transformer.ResidualAttentionBlock.forward

    def count(self, x):
        calls["embeds"] += 1
        return real(self, x)

    def count_text(self, q_x, *a, attn_mask=None, **k):
        if attn_mask is not None:  # a text block (the vision tower runs unmasked)
            text_runs[id(self)] = text_runs.get(id(self), 0) + 1
        return real_block(self, q_x, *a, attn_mask=attn_mask, **k)

    monkeypatch.setattr(open_clip.transformer.VisionTransformer, "_embeds", count)
    monkeypatch.setattr(open_clip.transformer.ResidualAttentionBlock, "forward", count_text)
    rec = fit_streaming("layer-mma", dataset="digits", backbone="featcache-tiny/random", shots=2, progress=False,
                        options={"first_block": 2, "epochs": 3, "batch_size": 8}, cache_layer=1,
                        cache_dir=tmp_path)  # fmt: skip
    assert calls["embeds"] == 0  # no image ever went through the patch embedding: only block 2 ran
    # 10 images, batch 8: 6 steps. Text block 1 ran once for the run's text prefix, then in the evaluation (base and
    # novel classes); text block 2, adapted, ran at every step and in the evaluation.
    assert sorted(text_runs.values()) == [1 + 2, 6 + 2]
    assert rec.metrics["base_acc"] is not None and rec.fit["epochs"] == 3


def test_cli_extract_with_cache_layer(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--dataset",
            "digits",
            "--backbone",
            "featcache-tiny/random",
            "--cache-dir",
            str(tmp_path),
            "--cache-layer",
            "1",
            "--quiet",
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output + r.stderr
    assert "token cache:" in r.output and (tmp_path / "featcache-tiny__random" / "digits__fixed__tokens1.h5").exists()
