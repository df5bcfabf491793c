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
        torch.testing.assert_close(vision_tokens(bb.model, images, 1).half(), toks)
        mma.attach(bb.model)
        text = F.normalize(bb.model.encode_text(bb.tokenizer(["a photo of a zero.", "a photo of a one."])), dim=-1)
        full = 100 * F.normalize(bb.model.encode_image(images), dim=-1) @ text.t()
        cached = 100 * F.normalize(encode_from_tokens(bb.model, toks.float(), 1), dim=-1) @ text.t()
        mma.detach(bb.model)
    # float16 tokens: cosine similarities agree within 1e-4, i.e. CLIP's x100 logits within 1e-2 (measured 4.4e-3)
    assert (full - cached).abs().max() < 1e-2
    assert (full - cached).abs().max() > 0  # the float16 storage is really in the path
    tc.close()
    assert path.name == "digits__fixed__tokens1.h5"


def test_layer_mma_trains_from_the_token_cache(tmp_path, monkeypatch):
    extract_tokens("digits", "featcache-tiny/random", 1, cache_dir=tmp_path, augment_views=2, progress=False)
    import open_clip

    calls = {"embeds": 0}
    real = open_clip.transformer.VisionTransformer._embeds

    def count(self, x):
        calls["embeds"] += 1
        return real(self, x)

    monkeypatch.setattr(open_clip.transformer.VisionTransformer, "_embeds", count)
    rec = fit_streaming("layer-mma", dataset="digits", backbone="featcache-tiny/random", shots=2, progress=False,
                        options={"first_block": 2, "epochs": 3, "batch_size": 8}, cache_layer=1,
                        cache_dir=tmp_path)  # fmt: skip
    assert calls["embeds"] == 0  # no image ever went through the patch embedding: only block 2 ran
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
