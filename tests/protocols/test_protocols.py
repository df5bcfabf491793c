import math
import random
from collections import defaultdict

import pytest
import torch

from featcache.adapters import MethodError
from featcache.protocols import base_novel_split, build_task, fewshot_draw, sample_per_class
from featcache.store import Store

TRAIN = [2, 0, 2, 1, 0, 2, 1, 1, 0, 2]
VAL = [1, 1, 0, 2, 2, 0, 0, 1]


def dassl_generate_fewshot(labels, k):
    """Dassl's DatasetBase.generate_fewshot_dataset + split_dataset_by_label, on the global random module."""
    tracker = defaultdict(list)
    for i, y in enumerate(labels):
        tracker[y].append(i)
    out = []
    for _, items in tracker.items():
        out.extend(random.sample(items, k) if len(items) >= k else items)
    return out


def test_draw_matches_hand_computed_values():
    # computed once with CPython's random: seed(1), then train K=2 and val min(2, 4)=2 with the same state
    assert fewshot_draw(TRAIN, VAL, 2, seed=1) == ([2, 5, 1, 4, 3, 6], [1, 7, 6, 5, 3, 4])
    assert fewshot_draw(TRAIN, VAL, 3, seed=3) == ([2, 5, 0, 4, 8, 1, 7, 3, 6], [1, 0, 7, 6, 5, 2, 3, 4])


@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 2), (4, 3), (16, 1)])
def test_draw_equals_dassl_code(shots, seed):
    rng = random.Random(99)
    train = [rng.randrange(7) for _ in range(300)]
    val = [rng.randrange(7) for _ in range(80)]
    state = random.getstate()
    random.seed(seed)
    want_train = dassl_generate_fewshot(train, shots)
    want_val = dassl_generate_fewshot(val, min(shots, 4))
    random.setstate(state)
    assert fewshot_draw(train, val, shots, seed) == (want_train, want_val)
    before = random.random()
    random.setstate(state)
    fewshot_draw(train, val, shots, seed)
    assert random.random() == before  # the global random state is left alone


def test_short_classes_are_an_error_unless_allowed():
    with pytest.raises(MethodError, match=r"4 shots asked, but class 0 \('a'\) has only 3 training rows"):
        fewshot_draw(TRAIN, None, 4, 1, classnames=["a", "b", "c"])
    rows, val = fewshot_draw(TRAIN, None, 4, 1, allow_short_classes=True)
    assert sorted(rows) == list(range(10)) and val is None  # every class holds <= 4: Dassl takes them whole


def test_all_rows_when_shots_below_one():
    assert sample_per_class(TRAIN, 0, random.Random(0)) == list(range(10))


@pytest.mark.parametrize("n,base", [(1, 1), (2, 1), (5, 3), (47, 24), (101, 51), (397, 199)])
def test_base_novel_halves(n, base):
    labels = list(range(n))[::-1] * 2
    b, nv = base_novel_split(labels)
    assert b == list(range(base)) and nv == list(range(base, n)) and len(b) == math.ceil(n / 2)


def test_task_base2novel(synth):
    with Store.open(synth) as st:
        task = build_task(st, "base2novel", shots=4, seed=1)
        assert task.classes == [0, 1, 2, 3, 4]
        assert task.fit.train_x.shape == (20, 32) and sorted(task.fit.train_y.tolist()) == sorted(list(range(5)) * 4)
        assert task.fit.val_x.shape == (20, 32)  # min(4, 4) per base class
        torch.testing.assert_close(task.fit.text, st.text()[:5])
        # the sampled rows are the Dassl draw over all classes, then the base classes kept
        labels = st.split("train").labels.tolist()
        rows, _ = fewshot_draw(labels, st.split("val").labels.tolist(), 4, 1)
        assert task.train_rows == [r for r in rows if labels[r] < 5]
        sets = task.eval_sets()
        assert sets["base"].y.max() == 4 and len(sets["base"].y) == 150
        assert sets["novel"].y.tolist()[:5] == [0, 1, 2, 3, 4]  # relabelled 5..9 -> 0..4
        torch.testing.assert_close(sets["novel"].text, st.text()[5:])
        assert sets["novel"].class_ids.tolist() == [-1] * 5 and sets["base"].class_ids.tolist() == list(range(5))


def test_task_fewshot_and_val_from_train(synth):
    with Store.open(synth) as st:
        task = build_task(st, "fewshot", shots=2, seed=2, val_from="train")
        assert task.classes == list(range(10)) and len(task.fit.train_y) == 20
        assert not set(task.val_rows) & set(task.train_rows)  # validation rows are unused train rows
        assert len(task.val_rows) == 20
        with pytest.raises(MethodError, match="unknown protocol 'b2n'"):
            build_task(st, "b2n")


def test_val_from_train_continues_the_random_state():
    # seed 1, one shot: train rows [2, 8, 3]; validation then comes from the unused rows with the same state
    assert fewshot_draw(TRAIN, None, 1, 1, val_from_train=True) == ([2, 8, 3], [5, 1, 7])
    assert fewshot_draw(TRAIN, None, 1, 1) == ([2, 8, 3], None)


def test_target_with_the_same_class_list_maps_one_to_one(synth):
    from featcache.protocols import target_eval_set

    with Store.open(synth) as st:
        names = st.classnames
        assert target_eval_set(st, names).class_ids.tolist() == list(range(10))
        # a training list that repeats a name (CLIP's ImageNet names do): by-name lookup takes the first
        other = ["class 3"] + [f"x{i}" for i in range(9)] + ["class 3"]
        ids = target_eval_set(st, other).class_ids.tolist()
        assert ids[3] == 0 and ids.count(-1) == 9
