"""--pre-projection: the pooled vision tensor before the last projection, stored beside the features with the
projection itself; raw-feature norms; imports with pre-projection features; format-2 stores."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featcache.errors import FingerprintMismatch, StoreError
from featcache.extract import encode_batch, extract, last_projection
from featcache.store import Store, StoreWriter


def _digits_images(tiny, split: str, rows: list[int], views: int = 0):
    """Clean images [B, 3, H, W] and (views > 0) their seeded augmented views [B, V, 3, H, W], as extraction
    makes them."""
    from featcache.data import ImageDataset, augment_transform, resolve_split
    from featcache.manifests import load_manifest

    m = load_manifest("digits")
    si = resolve_split(m, m.scheme(None), split, "/nonexistent")
    ds = ImageDataset(si.items, si.source, tiny.preprocess, split=split, aug=augment_transform(tiny.preprocess_cfg),
                      aug_views=views, aug_seed=0)  # fmt: skip
    got = [ds[r] for r in rows]
    return torch.stack([g[1] for g in got]), (torch.stack([g[2] for g in got]) if views else None)


def test_vit_pre_projection_is_ln_post_token_before_proj(pre_store, tiny):
    visual = tiny.model.visual
    x, _ = _digits_images(tiny, "val", [0, 1, 2, 3])
    with torch.no_grad():  # open_clip's own steps, by hand: embed, blocks, ln_post(token), then @ proj
        pooled, _ = visual._pool(visual.transformer(visual._embeds(x)))
        raw = pooled @ visual.proj
    with Store.open(pre_store) as st:
        assert st.fingerprint["pre_projection"] == "on" and st.projection_source() == "visual.proj"
        weight, bias = st.projection()
        torch.testing.assert_close(weight, visual.proj.detach())
        assert torch.equal(bias, torch.zeros(64))
        pre = st.pre_features("val")
        assert pre.features.shape == (360, 64) and pre.aug is None
        torch.testing.assert_close(pre.features[:4], pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.norms("val")[:4], raw.norm(dim=-1), atol=1e-5, rtol=1e-5)
        # the features are the projected pre-projection rows, normalised; views alike
        torch.testing.assert_close(F.normalize(pre.features @ weight + bias, dim=-1), st.split("val").features,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        tr, tr_pre = st.split("train"), st.pre_features("train")
        assert tr_pre.aug.shape == (1077, 2, 64) and tr.aug_norms.shape == (1077, 2)
        projected = tr_pre.aug @ weight + bias
        torch.testing.assert_close(F.normalize(projected, dim=-1), tr.aug, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(projected.norm(dim=-1), tr.aug_norms, atol=1e-4, rtol=1e-5)
        assert "projection" in st.summary() and st.summary()["projection"]["shape"] == [64, 64]
    assert isinstance(visual.proj, torch.nn.Parameter)  # the model got its projection back


def test_pre_projection_is_part_of_the_fingerprint(pre_store, tiny, digits_store):
    # a store that keeps pre-projection features serves a request without them (it keeps more, not other rows)
    same = extract("digits", tiny, cache_dir=pre_store.parent.parent, workers=0, progress=False, augment_views=2,
                   dtype="float32", splits=["val"])  # fmt: skip
    assert same == pre_store
    with Store.open(pre_store) as st:
        assert st.fingerprint["pre_projection"] == "on" and st.has_pre_projection
    # one made without them cannot grow them for its finished rows: refused, naming the field and the fix
    with pytest.raises(
        FingerprintMismatch, match="'pre_projection' differs: store has 'off', expected 'on'.*--overwrite"
    ):
        extract("digits", tiny, cache_dir=digits_store.parent.parent, workers=0, progress=False,
                pre_projection=True, splits=["val"])  # fmt: skip
    with Store.open(digits_store) as st:  # made without it: the readers name the fix
        assert st.fingerprint["pre_projection"] == "off" and not st.has_pre_projection
        with pytest.raises(StoreError, match=r"no pre-projection features; re-extract with --pre-projection"):
            st.pre_features("val")
        with pytest.raises(StoreError, match=r"no projection matrix; re-extract with --pre-projection"):
            st.projection()


def _tiny_resnet():
    import open_clip

    from featcache.backbones import Backbone, BackboneSpec

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, head_width=8,
                                                               image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    ).eval()  # fmt: skip
    spec = BackboneSpec("tiny-rn/random", "tiny-rn", None, "random")
    return Backbone(spec, model, None, None, torch.device("cpu"), "fp32", "none")


def test_resnet_pre_projection_is_the_attention_pool_before_c_proj():
    bb = _tiny_resnet()
    pool = bb.model.visual.attnpool
    c_proj = pool.c_proj
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    unit, norms, pre = encode_batch(bb, x, pre_projection=True)
    with torch.no_grad():
        full = bb.model.encode_image(x)
        # ProLIP's reference way (clip/model.py:69-89): the attention pool with an identity out-projection, token 0
        fmap = bb.model.visual.layer4(bb.model.visual.layer3(bb.model.visual.layer2(bb.model.visual.layer1(
            bb.model.visual.stem(x)))))  # fmt: skip
        t = fmap.flatten(2).permute(2, 0, 1)
        t = torch.cat([t.mean(0, keepdim=True), t]) + pool.positional_embedding[:, None]
        width = t.shape[-1]
        ref, _ = F.multi_head_attention_forward(
            t, t, t, width, pool.num_heads, None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            None, None, False, 0.0, torch.eye(width), torch.zeros(width), training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
        )  # fmt: skip
    assert pre.shape == (3, 256)
    torch.testing.assert_close(pre, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unit, F.normalize(full, dim=-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(norms, full.norm(dim=-1))
    weight, bias, source = last_projection(bb.model)
    assert source == "visual.attnpool.c_proj" and weight.shape == (256, 16)
    torch.testing.assert_close(pre @ weight + bias, full, atol=1e-5, rtol=1e-5)
    assert pool.c_proj is c_proj  # restored
    unit2, norms2, none = encode_batch(bb, x)
    assert none is None  # without: the model's own forward, equal to float rounding (c_proj as a separate F.linear)
    torch.testing.assert_close(unit2, unit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(norms2, norms, atol=1e-6, rtol=1e-6)


def test_unknown_towers_are_refused_before_anything_is_written():
    from featcache.errors import DataError

    model = torch.nn.Module()
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(DataError, match="--pre-projection needs an open_clip VisionTransformer .* is Linear"):
        last_projection(model)


def _npz(tmp_path, pre=True, break_proj=False, **extra):
    g = np.random.default_rng(0)
    w = g.standard_normal((6, 4)).astype(np.float32)
    arrays = {"classnames": np.array(["a", "b"]), "text_features": g.standard_normal((2, 4))}
    for s, n in (("train", 4), ("test", 3)):
        p = g.standard_normal((n, 6)).astype(np.float32)
        arrays |= {f"{s}_features": p @ w + 0.5, f"{s}_labels": np.arange(n) % 2}
        if pre:
            arrays[f"{s}_pre"] = p
    if pre:
        arrays |= {"projection_weight": -w if break_proj else w, "projection_bias": np.full(4, 0.5, np.float32)}
    arrays |= extra
    np.savez(tmp_path / "f.npz", **arrays)
    return tmp_path / "f.npz", arrays


def test_import_with_pre_projection_features(tmp_path):
    from featcache.importers import import_npz

    src, arrays = _npz(tmp_path)
    p = import_npz(src, "pre", cache_dir=tmp_path, dtype="float32")
    with Store.open(p) as st:
        assert st.fingerprint["pre_projection"] == "on" and st.projection_source() == "imported"
        w, b = st.projection()
        np.testing.assert_allclose(w.numpy(), arrays["projection_weight"])
        np.testing.assert_allclose(st.pre_features("test").features.numpy(), arrays["test_pre"], rtol=1e-6)
        raw = torch.from_numpy(arrays["train_features"])
        torch.testing.assert_close(st.norms("train"), raw.norm(dim=-1))
    (tmp_path / "plain").mkdir()
    plain = import_npz(_npz(tmp_path / "plain", pre=False)[0], "plain", cache_dir=tmp_path)
    with Store.open(plain) as st:
        assert st.fingerprint["pre_projection"] == "off" and not st.has_pre_projection


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("mismatch", r"train_pre @ projection_weight \(\+ bias\) does not give train_features .*pass the projection"),
        ("no_projection", "pre-projection features need the projection matrix and vice versa"),
        ("missing_split", "test_features has no test_pre; give pre-projection features for every split or none"),
    ],
)
def test_bad_pre_projection_imports_are_one_line(tmp_path, kind, message):
    from featcache.importers import import_npz

    src, arrays = _npz(tmp_path, break_proj=kind == "mismatch")
    if kind != "mismatch":
        drop = ("projection_weight", "projection_bias") if kind == "no_projection" else ("test_pre",)
        np.savez(src, **{k: v for k, v in arrays.items() if k not in drop})
    with pytest.raises(StoreError, match=message):
        import_npz(src, "bad", cache_dir=tmp_path)
    assert not (tmp_path / "imported" / "bad.h5").exists()


def test_format_2_stores_still_read_and_say_what_they_lack(tmp_path, pre_store):
    old = tmp_path / "old.h5"
    old.write_bytes(pre_store.read_bytes())
    with h5py.File(old, "a") as f:  # what featcache wrote before format 3: no norms, no pre_projection field
        f.attrs["format"] = "2"
        del f.attrs["pre_projection"]
        for s in ("train", "val", "test"):
            for name in ("norms", "aug_norms", "pre", "pre_aug"):
                if name in f[f"splits/{s}"]:
                    del f[f"splits/{s}/{name}"]
        del f["projection"]
    with Store.open(old) as st:
        assert st.fingerprint["pre_projection"] == "off" and st.norms("train") is None
        assert st.split("train").aug_norms is None and st.split("train").aug.shape == (1077, 2, 64)
    with pytest.raises(StoreError, match="store format 2 .*pass --overwrite to rebuild it"):
        StoreWriter(old, {"dtype": "float32"})  # extending or resuming one needs a rebuild


def test_a_batch_must_bring_every_dataset_its_split_keeps(tmp_path):
    w = StoreWriter(tmp_path / "s.h5", {"dtype": "float32"})
    try:
        w.begin_split("train", 2, 4, aug_views=1, norms=True, pre_dim=3)
        x = torch.ones(2, 4)
        with pytest.raises(StoreError, match="a batch for split 'train' lacks 'pre_aug' but the split keeps one"):
            w.write_batch("train", 2, x, [0, 1], ["a", "b"], x[:, None], norms=torch.ones(2),
                          aug_norms=torch.ones(2, 1), pre=torch.ones(2, 3))  # fmt: skip
        assert w.split_state("train") == (0, 0, False)  # nothing was counted
    finally:
        w.discard()


def test_cli_extract_pre_projection(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    args = ["extract", "--dataset", "digits", "--backbone", "featcache-tiny/random", "--splits", "val",
            "--cache-dir", str(tmp_path), "--workers", "0", "--quiet", "--pre-projection"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    path = tmp_path / "featcache-tiny__random" / "digits__fixed.h5"
    with Store.open(path) as st:
        assert st.fingerprint["pre_projection"] == "on" and st.pre_features("val").features.shape == (360, 64)
    r = CliRunner().invoke(app, args[:-1])  # the same store without it: kept as it is, up to date
    assert r.exit_code == 0, r.output
    with Store.open(path) as st:
        assert st.fingerprint["pre_projection"] == "on"
