"""Evaluation protocols, exactly as CoOp/Dassl run them (../shared/methods.md §1).

- few-shot draw: Dassl's `generate_fewshot_dataset` (train K per class, then val min(K, 4) per class with the
  same random state; a method whose reference selects on other val rows asks for K per class or the whole val
  split through its `val_draw`);
- base-to-novel: base = first ceil(n/2) sorted labels, novel = the rest, each relabelled and evaluated only
  among its own classes;
- all-class few-shot; cross-dataset and domain generalization evaluate a trained method on other stores.

A `Task` holds what fitting may see (`FitData`: sampled train and val rows, class text) and only *loaders* for
the evaluation sets, so the test split is not even read until evaluation.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..adapters.base import FitData, MethodError
from ..store import Store

PROTOCOLS = ("base2novel", "fewshot")
VAL_DRAWS = ("dassl", "k-shot", "full")


def sample_per_class(labels: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """Dassl: group row positions by label in order of first appearance (rows keep their order inside a
    group); take `rng.sample(group, k)` per group, or the whole group if it is smaller. k < 1: every row."""
    if k < 1:
        return list(range(len(labels)))
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    out: list[int] = []
    for rows in groups.values():
        out.extend(rng.sample(rows, k) if len(rows) >= k else rows)
    return out


def check_shots(shots: int) -> None:
    """Training rows per class: K >= 1, or 0 for every row. Negative counts meant "all" once, by accident; they
    are refused so that a record's shots always says what was drawn."""
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or shots < 0:
        raise MethodError(f"shots must be a whole number >= 0 (0: every training row), got {shots!r}")


def fewshot_draw(
    train_labels: Sequence[int],
    val_labels: Sequence[int] | None,
    shots: int,
    seed: int,
    classnames: Sequence[str] | None = None,
    allow_short_classes: bool = False,
    val_from_train: bool = False,
    val_draw: str = "dassl",
) -> tuple[list[int], list[int] | None]:
    """The (train rows, val rows) Dassl draws for (shots, seed). A class with fewer than `shots` training rows is
    an error unless `allow_short_classes` (then, as Dassl does, the whole class is taken). `val_labels=None` and
    `val_from_train`: validation is drawn, with the same random state, from the train rows not chosen.

    val_draw: "dassl" (min(K, 4) per class, with the random state the train draw left), "k-shot" (K per class,
    the same way: LP++ and ProLIP's K-shot val), "full" (every row: the whole val split, or every unused train
    row); the train rows are the same whichever is asked. shots 0 takes every training row; negative is refused."""
    check_shots(shots)
    if val_draw not in VAL_DRAWS:
        raise MethodError(f"unknown val_draw '{val_draw}'; use one of: {', '.join(VAL_DRAWS)}")
    if shots >= 1 and not allow_short_classes:
        counts: dict[int, int] = {}
        for y in train_labels:
            counts[int(y)] = counts.get(int(y), 0) + 1
        short = sorted((n, y) for y, n in counts.items() if n < shots)
        if short:
            n, y = short[0]
            name = f" ({classnames[y]!r})" if classnames is not None and y < len(classnames) else ""
            raise MethodError(
                f"{shots} shots asked, but class {y}{name} has only {n} training rows; use fewer shots "
                "(or --allow-short-classes to take whole classes, as Dassl does)"
            )
    rng = random.Random(seed)  # the same sequence as Dassl's random.seed(seed), without touching global state
    train = sample_per_class(train_labels, shots, rng)
    if val_labels is not None:
        return train, _draw_val(val_labels, shots, rng, val_draw)
    if not val_from_train:
        return train, None
    chosen = set(train)
    rest = [i for i in range(len(train_labels)) if i not in chosen]
    picked = _draw_val([train_labels[i] for i in rest], shots, rng, val_draw)
    return train, [rest[i] for i in picked]


def _draw_val(labels: Sequence[int], shots: int, rng: random.Random, val_draw: str) -> list[int]:
    if val_draw == "full":
        return list(range(len(labels)))
    return sample_per_class(labels, shots if val_draw == "k-shot" else min(shots, 4), rng)


def base_novel_split(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """Sorted labels present; base = first ceil(n/2), novel = the rest."""
    present = sorted({int(y) for y in labels})
    m = math.ceil(len(present) / 2)
    return present[:m], present[m:]


def rows_sha256(rows: Sequence[int] | None) -> str | None:
    if rows is None:
        return None
    return hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()


@dataclass
class EvalSet:
    """Images and labels of one evaluation (relabelled to 0..C-1), the classes' text, and which training class
    each one is (-1: never trained on)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    text: torch.Tensor
    class_ids: torch.Tensor
    classnames: list[str] = field(default_factory=list)


@dataclass
class Task:
    """One protocol instance on one store: the fit data plus lazily loaded evaluation sets."""

    protocol: str
    shots: int
    seed: int
    fit: FitData
    classes: list[int]  # store labels trained on, in training-label order
    train_rows: list[int]
    val_rows: list[int] | None
    eval_loaders: dict[str, Callable[[], EvalSet]] = field(default_factory=dict)

    def eval_sets(self) -> dict[str, EvalSet]:
        return {name: load() for name, load in self.eval_loaders.items()}


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label is in `classes`, relabelled to the position of their label in `classes`."""
    remap = torch.full((int(y.max()) + 1 if len(y) else 1,), -1, dtype=torch.long, device=y.device)
    remap[torch.tensor(classes, dtype=torch.long, device=y.device)] = torch.arange(len(classes), device=y.device)
    new = remap[y]
    keep = new >= 0
    return x[keep], new[keep]


def build_task(
    store: Store,
    protocol: str = "base2novel",
    shots: int = 16,
    seed: int = 1,
    template: str | None = None,
    val_from: str = "val",
    allow_short_classes: bool = False,
    device: str | torch.device = "cpu",
    val_draw: str = "dassl",
) -> Task:
    """Draw the few-shot sets and prepare the protocol's evaluation sets (loaded only when asked for).

    val_from: "val" draws validation from the store's val split (CoOp/Dassl); "train" draws it from the
    train rows not chosen for training (for stores with no val split, e.g. ImageNet's CoOp scheme); "none"
    gives no validation set. val_draw: how many val rows per class (fewshot_draw): dassl, k-shot or full."""
    _check_protocol(protocol)
    if val_from not in ("val", "train", "none"):
        raise MethodError(f"unknown val source '{val_from}'; use val, train or none")
    if "train" not in store.splits:
        raise MethodError(
            f"{store.path.name} has no train split to draw shots from (it has: {', '.join(store.splits) or 'none'}); "
            "extract it (featcache extract with --splits train), or fit a method that trains nothing "
            "(--adapter zero-shot)"
        )
    y_train = store.labels("train").tolist()  # draw on labels, then read only the drawn rows
    classnames = store.classnames
    has_val = val_from == "val" and "val" in store.splits  # no val split: methods that need one say so
    val_labels = store.labels("val").tolist() if has_val else None
    rows, vrows = fewshot_draw(y_train, val_labels, shots, seed, classnames, allow_short_classes, val_from == "train",
                               val_draw)  # fmt: skip
    val_x = val_y = None
    if vrows is not None:
        val = store.rows("val" if has_val else "train", vrows, device=device, aug=False)
        val_x, val_y = val.features, val.labels
    text_all = store.text(template).to(device)
    train = store.rows("train", rows, device=device)
    tr_x, tr_y, tr_aug, tr_norms = train.features, train.labels, train.aug, train.aug_norms

    if protocol == "base2novel":
        base, novel = base_novel_split(tr_y.tolist())
        classes = base
    else:
        classes = sorted({int(y) for y in tr_y.tolist()})
        base, novel = classes, []

    keep = torch.isin(tr_y, torch.tensor(classes, device=tr_y.device))
    fx, fy = select_classes(tr_x, tr_y, classes)
    faug = tr_aug[keep] if tr_aug is not None else None
    fnorms = tr_norms[keep] if tr_norms is not None else None
    projection = store.projection(device) if store.inputs == "pre-projection" else None
    if val_x is not None:
        val_x, val_y = select_classes(val_x, val_y, classes)
    fit = FitData(
        train_x=fx, train_y=fy, text=text_all[classes], val_x=val_x, val_y=val_y, train_aug=faug,
        classnames=[classnames[c] for c in classes], protocol=protocol, train_aug_norms=fnorms, projection=projection,
    )  # fmt: skip

    kept_rows = [r for r, k in zip(rows, keep.tolist(), strict=True) if k]
    loaders = _eval_loaders(store, protocol, base, novel, text_all, device)
    return Task(protocol, shots, seed, fit, classes, kept_rows, vrows, loaders)


def trainless_task(
    store: Store, protocol: str = "base2novel", template: str | None = None, device: str | torch.device = "cpu"
) -> Task:
    """The protocol's evaluation sets for a method that trains nothing (zero-shot): no few-shot draw, so no train
    or val split is read and none needs to exist. The classes are all of the store's (base-to-novel: the first
    ceil(C/2) base, the rest novel, as a draw over every class would give); shots and rows are recorded as none."""
    _check_protocol(protocol)
    classnames = store.classnames
    text_all = store.text(template).to(device)
    everything = list(range(len(classnames)))
    base, novel = base_novel_split(everything) if protocol == "base2novel" else (everything, [])
    empty = torch.empty(0, text_all.shape[1], device=device)
    fit = FitData(
        train_x=empty, train_y=torch.empty(0, dtype=torch.long, device=device), text=text_all[base],
        classnames=[classnames[c] for c in base], protocol=protocol,
    )  # fmt: skip
    return Task(protocol, 0, 0, fit, base, [], None, _eval_loaders(store, protocol, base, novel, text_all, device))


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise MethodError(f"unknown protocol '{protocol}'; use one of: {', '.join(PROTOCOLS)}")


def _eval_loaders(
    store: Store, protocol: str, base: list[int], novel: list[int], text_all: torch.Tensor, device
) -> dict[str, Callable[[], EvalSet]]:
    """Loaders of the protocol's test sets (read only when called, after fitting): base2novel's base and novel
    classes, each among its own, or fewshot's one set of every trained class."""
    classnames = store.classnames

    def loader(name: str, cls: list[int], seen: bool) -> Callable[[], EvalSet]:
        def load() -> EvalSet:
            test = store.split("test", device=device, aug=False)
            x, y = select_classes(test.features, test.labels, cls)
            ids = torch.arange(len(cls), device=device) if seen else torch.full((len(cls),), -1, device=device)
            return EvalSet(name, x, y, text_all[cls], ids, [classnames[c] for c in cls])

        return load

    if protocol == "base2novel":
        return {"base": loader("base", base, True), "novel": loader("novel", novel, False)}
    return {"all": loader("all", base, True)}


def target_eval_set(
    store: Store,
    train_classnames: list[str],
    template: str | None = None,
    device: str | torch.device = "cpu",
) -> EvalSet:
    """The whole test split of another store (cross-dataset, domain generalization) with its own class names;
    a target class counts as trained on when its name equals a training class name."""
    test = store.split("test", device=device, aug=False)
    if list(store.classnames) == list(train_classnames):  # the same class list (ImageNet -> V2, Sketch)
        ids = torch.arange(len(train_classnames), device=device)
    else:  # by name; a name the training list repeats maps to its first occurrence
        index: dict[str, int] = {}
        for i, n in enumerate(train_classnames):
            index.setdefault(n, i)
        ids = torch.tensor([index.get(n, -1) for n in store.classnames], dtype=torch.long, device=device)
    return EvalSet("target", test.features, test.labels, store.text(template).to(device), ids, store.classnames)
