import json

import pytest
import torch

from featcache.backbones import backbone_slug, load_backbone, parse_backbone, pick_device, pick_precision
from featcache.errors import BackboneError


def test_parse_ids():
    assert parse_backbone("ViT-B-16-quickgelu/openai").kind == "tag"
    s = parse_backbone("ViT-B-32/laion2b_s34b_b79k")
    assert (s.model_name, s.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_backbone("featcache-tiny/random").kind == "random"
    assert parse_backbone("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K").kind == "hf-hub"


@pytest.mark.parametrize(
    "bid,msg",
    [
        ("ViT-B-16/openai", "trained with QuickGELU but ViT-B-16 uses GELU.*use ViT-B-16-quickgelu/openai"),
        ("ViT-B-16", "names no weights; use ViT-B-16/TAG"),
        ("ViT-Q-99/openai", "unknown architecture 'ViT-Q-99'"),
        ("ViT-B-32/nonsense", "unknown pretrained tag 'nonsense' for ViT-B-32; known: .*laion2b_s34b_b79k"),
        ("ViT-B-32/missing.pt", "checkpoint file not found"),
        ("local-dir:/no/such/dir", "folder not found"),
    ],
)
def test_bad_ids_are_refused_with_a_fix(bid, msg):
    with pytest.raises(BackboneError, match=msg):
        parse_backbone(bid)


def test_tiny_is_deterministic_and_unit_norm(tiny):
    again = load_backbone("featcache-tiny/random", device="cpu")
    assert again.weights_sha256 == tiny.weights_sha256
    assert tiny.embed_dim == 64 and tiny.image_size == 32
    t = tiny.encode_texts(["a photo of a cat.", "a photo of a dog."])
    assert t.shape == (2, 64)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(t[0], t[1])
    assert all(not p.requires_grad for p in tiny.model.parameters())
    fp = tiny.fingerprint()
    assert fp["weights"] == "random" and '"size": [32, 32]' in fp["preprocessing"]


def test_local_checkpoint_file_and_local_dir(tiny, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), ckpt)
    b = load_backbone(f"featcache-tiny/{ckpt}", device="cpu")
    assert b.spec.kind == "file"
    assert b.weights_sha256 == tiny.weights_sha256  # same tensors, same hash
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.encode_images(x), tiny.encode_images(x))

    from featcache.backbones import _CONFIG_DIR

    d = tmp_path / "tinydir"
    d.mkdir()
    cfg = json.loads((_CONFIG_DIR / "featcache-tiny.json").read_text())
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(tiny.model.state_dict(), d / "open_clip_pytorch_model.bin")
    c = load_backbone(f"local-dir:{d}", device="cpu")
    assert c.weights_sha256 == tiny.weights_sha256
    torch.testing.assert_close(c.encode_images(x), tiny.encode_images(x))


def test_other_weights_change_the_hash(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    sd["logit_scale"] += 1.0
    ckpt = tmp_path / "other.pt"
    torch.save(sd, ckpt)
    assert load_backbone(f"featcache-tiny/{ckpt}", device="cpu").weights_sha256 != tiny.weights_sha256


def test_device_and_precision():
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(BackboneError, match="unknown precision 'fp8'"):
        pick_precision("fp8", torch.device("cpu"))


def test_bf16_is_close_to_fp32(tiny):
    b = load_backbone("featcache-tiny/random", device="cpu", precision="bf16")
    x = torch.randn(4, 3, 32, 32)
    cos = (b.encode_images(x) * tiny.encode_images(x)).sum(-1)
    assert cos.min() > 0.99 and b.fingerprint()["precision"] == "bf16"


def test_slug():
    assert backbone_slug("ViT-B-16-quickgelu/openai") == "ViT-B-16-quickgelu__openai"
    assert backbone_slug("hf-hub:laion/x") == "hf-hub_laion__x"
    a, b = backbone_slug("ViT-B-16/a/ckpt.pt"), backbone_slug("ViT-B-16/b/ckpt.pt")
    assert a != b and a.startswith("ViT-B-16__ckpt.pt-")
