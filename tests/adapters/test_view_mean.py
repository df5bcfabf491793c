"""Tip-Adapter, APE and Tip-X cache keys from augmented views: the reference's normalize(mean of raw views), from
the stored unit views and their raw norms; featcache's old normalised mean as the named option."""

import pytest
import torch
import torch.nn.functional as F

from featcache.adapters import FitData, MethodError, create_adapter
from featcache.adapters.grid_search import view_mean
from featcache.protocols import build_task
from featcache.store import Store
from featcache.train import fit


def test_raw_mean_equals_the_tiny_models_raw_views_by_hand(pre_store, tiny):
    from featcache.data import ImageDataset, augment_transform, resolve_split
    from featcache.manifests import load_manifest

    m = load_manifest("digits")
    si = resolve_split(m, m.scheme(None), "train", "/nonexistent")
    ds = ImageDataset(si.items, si.source, tiny.preprocess, split="train", aug=augment_transform(tiny.preprocess_cfg),
                      aug_views=2, aug_seed=0)  # fmt: skip
    rows = [0, 1, 5, 9]
    views = torch.stack([ds[r][2] for r in rows])  # [4, 2, 3, H, W], the seeded views extraction made
    with torch.no_grad():
        raw = tiny.model.encode_image(views.flatten(0, 1)).view(4, 2, -1)  # the encoder's own, unnormalised
    want = F.normalize(raw.mean(1), dim=-1)  # build_cache_model: mean over views, then normalise
    with Store.open(pre_store) as st:
        tr = st.split("train")
        got = view_mean(tr.aug[rows], tr.aug_norms[rows])
        old = view_mean(tr.aug[rows], tr.aug_norms[rows], "normalised")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (old - want).abs().max() > 1e-4  # the two means differ by 100x the tolerance: the test tells them apart


@pytest.mark.parametrize("method", ["tip-adapter", "ape", "tip-x"])
def test_methods_key_on_the_raw_mean_and_keep_the_old_one_as_an_option(pre_store, method):
    with Store.open(pre_store) as st:
        task = build_task(st, "fewshot", shots=4, seed=1)
    d = task.fit
    order = torch.argsort(d.train_y, stable=True)
    raw = F.normalize((d.train_aug * d.train_aug_norms[..., None]).mean(1), dim=-1)[order]
    unit = F.normalize(d.train_aug.mean(1), dim=-1)[order]
    opts = {"feat_num": 40} if method == "ape" else {}
    for how, want in (("raw", raw), ("normalised", unit)):
        m = create_adapter(method, dim=64, search=False, view_mean=how, **opts)
        fit(m, d)
        if method == "ape":  # keys restricted to the selected channels, renormalised
            want = F.normalize(want[:, m.channels], dim=-1)
        torch.testing.assert_close(m.keys.detach(), want, atol=1e-6, rtol=1e-6)
    assert create_adapter(method).config.view_mean == "raw"  # the reference's is the default


@pytest.mark.parametrize("method", ["tip-adapter", "ape", "tip-x"])
def test_a_store_without_norms_names_the_fix(method):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    y = torch.arange(3).repeat(2)
    aug = F.normalize(torch.randn(6, 2, 8, generator=g), dim=-1)
    d = FitData(x, y, F.normalize(torch.randn(3, 8, generator=g), dim=-1), val_x=x, val_y=y, train_aug=aug)
    with pytest.raises(MethodError, match=r"re-extract it \(featcache extract \.\.\. --overwrite\) or --set "
                                          "view_mean=normalised"):  # fmt: skip
        fit(create_adapter(method, dim=8, search=False), d)
    fit(create_adapter(method, dim=8, search=False, view_mean="normalised"), d)  # the old behaviour runs
    fit(create_adapter(method, dim=8, search=False), FitData(x, y, d.text, val_x=x, val_y=y))  # no views: no norms
