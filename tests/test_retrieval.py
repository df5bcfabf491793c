"""Retrieval ranks and recalls against hand-computed values (ties count against the query)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featcache.errors import FeatcacheError
from featcache.retrieval import (
    evaluate_retrieval,
    group_frames,
    item_to_text_ranks,
    make_set,
    text_to_item_ranks,
)


def _e(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float64), dim=-1)


def _images_set():
    # items are the basis vectors e0, e1, e2; captions 0, 1 describe item 0, caption 2 item 1, caption 3 item 2
    items = torch.eye(4, dtype=torch.float64)[:3]
    caps = torch.stack([_e(1, 0, 0, 0), _e(0.5, 1, 0, 0), _e(1, 1, 0, 0), _e(0, 0, 0, 1)])
    return make_set(items, torch.arange(3), caps, torch.tensor([0, 0, 1, 2]), 3, video=False)


def test_text_to_image_ranks_by_hand():
    # c0: sims [1, 0, 0] -> 1; c1: [.447, .894, 0], item 0 second -> 2; c2: [.707, .707, 0], a tie with item 0
    # counts against the query -> 2; c3: all 0, everything tied -> 3
    assert text_to_item_ranks(_images_set()).tolist() == [1, 2, 2, 3]


def test_image_to_text_ranks_by_hand():
    # item 0: best own caption c0 (1.0), nobody else >= 1 -> 1; item 1: own c2 (.707), c1 (.894) is above -> 2;
    # item 2: own c3 scores 0 and the three other captions tie at 0 -> 4
    assert item_to_text_ranks(_images_set()).tolist() == [1, 2, 4]


def test_metrics_by_hand():
    m = evaluate_retrieval(_images_set())
    assert m["t2i_r1"] == pytest.approx(25.0)
    assert m["t2i_r5"] == pytest.approx(100.0)
    assert m["t2i_medr"] == pytest.approx(2.0)
    assert m["t2i_meanr"] == pytest.approx(2.0)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_medr"] == pytest.approx(2.0)
    assert m["i2t_meanr"] == pytest.approx(7 / 3)
    assert set(m) == {f"{d}_{k}" for d in ("t2i", "i2t") for k in ("r1", "r5", "r10", "medr", "meanr")}


def test_median_of_even_count_is_the_mean_of_the_middle_two():
    items = torch.eye(3, dtype=torch.float64)
    caps = torch.stack([_e(1, 0, 0), _e(0, 1, 0), _e(0, 0, 1), _e(1, 0, 0.5)])
    # caption 3 describes item 2 but points at item 0: rank 2 (item 0 above, item 1 below)
    rs = make_set(items, torch.arange(3), caps, torch.tensor([0, 1, 2, 2]), 3, video=False)
    assert text_to_item_ranks(rs).tolist() == [1, 1, 1, 2]
    assert evaluate_retrieval(rs)["t2i_medr"] == 1.0
    assert np.median([1, 1, 2, 2]) == 1.5  # the convention the docstring names


def test_chunking_does_not_change_ranks():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 16, generator=g)
    item = torch.arange(50) // 3  # 17 items, up to 3 frames each
    caps = torch.randn(40, 16, generator=g)
    cap_item = torch.randint(0, 17, (40,), generator=g)
    rs = make_set(rows, item, caps, cap_item, 17, video=True)
    for pool in ("mean", "softmax"):
        big = evaluate_retrieval(rs, pool)
        small = evaluate_retrieval(rs, pool, budget=7)
        assert big == small


def test_softmax_pooling_by_hand():
    # one video with frames e0, e1 and a second video e2; caption e0 (for video 0)
    frames = torch.stack([_e(1, 0, 0), _e(0, 1, 0), _e(0, 0, 1)])
    rs = make_set(frames, torch.tensor([0, 0, 1]), _e(1, 0, 0)[None], torch.tensor([0]), 2, video=True)
    w1, w2 = math.exp(5) / (math.exp(5) + 1), 1 / (math.exp(5) + 1)
    want = w1 / math.sqrt(w1**2 + w2**2)  # t.p / |p| with p = w1 e0 + w2 e1
    from featcache.retrieval import _Scorer

    assert _Scorer(rs, "softmax", 5.0)(slice(None), slice(None))[0, 0].item() == pytest.approx(want, abs=1e-12)
    assert _Scorer(rs, "mean", 5.0)(slice(None), slice(None))[0, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert _Scorer(rs, "softmax", 5.0)(slice(None), slice(None))[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    m = evaluate_retrieval(rs, "softmax")
    assert m["t2v_r1"] == 100.0 and m["v2t_r1"] == 100.0 and m["v2t_meanr"] == 1.0  # video 1 has no caption


def test_group_frames_pads_in_order():
    rows = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 2)
    frames, mask = group_frames(rows, torch.tensor([0, 0, 0, 2, 2]), 3)
    assert frames.shape == (3, 3, 2)
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    assert frames[2, :2, 0].tolist() == [3.0, 4.0]


def test_items_without_frames_are_dropped_with_their_captions():
    rows = torch.eye(3)[[0, 2]]  # item 1 lost its only image
    rs = make_set(rows, torch.tensor([0, 2]), torch.eye(3), torch.tensor([0, 1, 2]), 3, video=False)
    assert rs.num_items == 2 and rs.caption_item.tolist() == [0, 1]


def test_unknown_pooling_is_refused():
    with pytest.raises(FeatcacheError, match="unknown frame pooling 'max'"):
        evaluate_retrieval(_images_set(), "max")
