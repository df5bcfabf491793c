"""What every method shares: the input bundle it fits on, the module interface, the config base, the registry.

A method is one file: a config dataclass (defaults and help text live there), an `Adapter` subclass, and a
`@register("name", Config)` line. `create_adapter(name, **overrides)` builds one; `list_adapters()` lists them.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FeatcacheError


class MethodError(FeatcacheError):
    """Unknown method or option, or a method that cannot run on the data it was given."""


# What model selection looked at. A method declares one of the first three (`Adapter.selection`: the rows its
# reference selects on); a record says what a run actually did, which can also be "train-holdout".
SELECTIONS = {
    "validation-free": "no selection: fixed hyperparameters, the last epoch",
    "few-shot-val": "selects on per-class few-shot val rows (val_draw dassl: min(K, 4) per class; k-shot: K)",
    "val": "selects on the whole validation split (val_draw full)",
    "train-holdout": "selects on train rows left out of the few-shot draw (--val-from train)",
}


@dataclass
class FitData:
    """What a method may look at while fitting: the few-shot train rows, the few-shot val rows (None if the
    store has no val split) and the class text features of the classes being trained. Never the test split."""

    train_x: torch.Tensor  # [N, D] unit-norm image features
    train_y: torch.Tensor  # [N] labels in 0..C-1
    text: torch.Tensor  # [C, D] unit-norm class text features
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    train_aug: torch.Tensor | None = None  # [N, V, D] augmented views, if the store has them
    classnames: list[str] = field(default_factory=list)
    protocol: str = ""  # the protocol the rows were drawn for, for methods whose reference fits per protocol (GDA)

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])


@dataclass
class TrainConfig:
    """Options of the shared training loop (featcache.train.fit). Methods override the defaults."""

    epochs: int = field(default=20, metadata={"help": "maximum training epochs"})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    optimizer: str = field(default="adamw", metadata={"help": "adam, adamw or sgd"})
    eps: float = field(default=1e-8, metadata={"help": "Adam/AdamW epsilon"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine (per step, over all epochs)"})
    patience: int = field(default=0, metadata={"help": "early-stopping patience in epochs on val accuracy (0: off)"})
    select: str = field(
        default="best-val", metadata={"help": "best-val: restore the best-val epoch; last: keep the last epoch"}
    )


class Adapter(nn.Module, abc.ABC):
    """An embedding-level method: logits for images against any set of class text features."""

    name: str = ""
    needs_val: bool = False  # searches hyperparameters or early-stops on the few-shot val split
    trainable: bool = True  # trained by the shared loop after `setup`
    class_agnostic: bool = True  # can score classes it was not trained on (novel classes, other datasets)
    selection: str = ""  # the reference's selection: validation-free, few-shot-val or val (SELECTIONS)

    def __init__(self, config: Any, dim: int = 512):
        super().__init__()
        self.config = config
        self.dim = dim

    def uses_val(self) -> bool:
        """Whether this method, as configured, selects anything on the val rows it is given: the shared loop's
        early stopping or best-val epoch, or a hyperparameter search (the config's `search` switch; closed-form
        methods without one search when they need val). `selection` says which rows the reference selects on;
        this says whether selection happens at all (CoOp with select=best-val does; Tip-Adapter with
        search=false does not)."""
        cfg = self.config
        loop = self.trainable and getattr(cfg, "epochs", 0) > 0
        loop = loop and (getattr(cfg, "patience", 0) > 0 or getattr(cfg, "select", "last") == "best-val")
        search = bool(getattr(cfg, "search", not self.trainable and self.needs_val))
        return loop or (search and self.selection != "validation-free")

    def setup(self, data: FitData) -> None:
        """Closed-form part of fitting (caches, solvers). Runs before the training loop."""

    def finish(self, data: FitData) -> None:
        """Work after the training loop (e.g. Tip-Adapter-F's alpha/beta search on val)."""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, D], text [C, D] (both unit-norm) -> logits [B, C].

        `class_ids[c]` is the training-class index of target class c, or -1 for a class never trained on
        (novel classes, another dataset's classes); None means the training classes themselves, in order.
        Methods with per-class state (cache values, linear weights) use it; the others ignore it."""

    def score(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        classnames: list[str] | None = None,
    ) -> torch.Tensor:
        """What training and evaluation call. Methods that build their own class text from the class names
        (prompt learners such as CoOp) override this; the others are their forward."""
        return self(images, text, class_ids)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def run_selection(adapter: Adapter, data: FitData, val_from: str = "val", val_draw: str = "dassl") -> str:
    """What a fitted run's model selection looked at (a SELECTIONS key), from what happened rather than from
    what the method would like: no val rows, or a method configured not to select, is validation-free."""
    if not adapter.uses_val() or data.val_y is None or len(data.val_y) == 0:
        return "validation-free"
    if val_from == "train":
        return "train-holdout"
    return "val" if val_draw == "full" else "few-shot-val"


@dataclass(frozen=True)
class _Entry:
    name: str
    config_cls: type
    cls: type


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = _Entry(name, config_cls, cls)
        return cls

    return deco


def list_adapters() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method '{name}'; available: {', '.join(list_adapters())}")
    return _REGISTRY[name]


def adapter_config(name: str, **overrides: Any) -> Any:
    """The method's config dataclass with overrides applied; unknown keys and bad values are refused."""
    return build_config(_entry(name).config_cls, name, overrides)


def build_config(config_cls: type, name: str, overrides: dict[str, Any]) -> Any:
    """A config dataclass from `--set key=value` overrides (strings coerced to each field's type)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key in overrides:
        if key not in fields:
            raise MethodError(f"method '{name}' has no option '{key}'; options: {', '.join(sorted(fields))}")
    return config_cls(**{k: _coerce(name, fields[k], v) for k, v in overrides.items()})


def config_help(name: str) -> list[tuple[str, Any, str]]:
    """(option, default, help) for every option of a method, for --help style listings."""
    out = []
    for f in dataclasses.fields(_entry(name).config_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


def create_adapter(name: str, config: Any = None, dim: int = 512, seed: int | None = None, **overrides: Any) -> Adapter:
    """Build a method for embeddings of width `dim` from its config (or the defaults plus overrides).
    With a seed, initial weights come from that seed (the global RNG is left as it was)."""
    entry = _entry(name)
    cfg = config if config is not None else adapter_config(name, **overrides)
    if config is not None and overrides:
        cfg = dataclasses.replace(config, **overrides)
    if seed is None:
        return entry.cls(cfg, dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.cls(cfg, dim)


def _coerce(method: str, f: dataclasses.Field, value: Any) -> Any:
    """Turn `--set key=value` strings into the field's type (int, float, bool, str, float lists)."""
    if not isinstance(value, str):
        return value
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            elem = type(default[0]) if default else float
            return type(default)(elem(v) for v in value.split(","))
    except ValueError:
        kind = type(default).__name__
        raise MethodError(f"option '{f.name}' of '{method}' needs a {kind}, got {value!r}") from None
    return value
