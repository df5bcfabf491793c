"""What every method shares: the input bundle it fits on, the module interface, the config base, the registry.

A method is one file: a config dataclass (defaults and help text live there), an `Adapter` subclass, and a
`@register("name", Config)` line. `create_adapter(name, **overrides)` builds one; `list_adapters()` lists them.

Each config field declares its valid values once, in its metadata, and `check_config` enforces them for the CLI,
the API and sweeps alike: "ge", "gt", "le", "lt" (numbers; on a list-valued field, every element) and "choices"
(the allowed strings). Every float must also be finite unless the metadata says "allow_inf": True (NaN never
is). A subclass that redeclares a field (another default) without any of these keys keeps the bounds of the
base class's field.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
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
    train_aug_norms: torch.Tensor | None = None  # [N, V] norms of the raw views (raw = view x norm), if stored
    # (weight [W, D], bias [D]) of the last visual projection, for methods on pre-projection features (ProLIP)
    projection: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])


@dataclass
class TrainConfig:
    """Options of the shared training loop (featcache.train.fit). Methods override the defaults."""

    epochs: int = field(default=20, metadata={"help": "maximum training epochs", "ge": 1})
    batch_size: int = field(default=256, metadata={"help": "rows per optimisation step", "ge": 1})
    lr: float = field(default=1e-3, metadata={"help": "learning rate", "gt": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay", "ge": 0})
    optimizer: str = field(
        default="adamw", metadata={"help": "adam, adamw or sgd", "choices": ["adam", "adamw", "sgd"]}
    )
    eps: float = field(default=1e-8, metadata={"help": "Adam/AdamW epsilon", "gt": 0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "ge": 0, "le": 1})
    schedule: str = field(
        default="cosine",
        metadata={"help": "constant or cosine (per step, over all epochs)", "choices": ["constant", "cosine"]},
    )
    patience: int = field(
        default=0, metadata={"help": "early-stopping patience in epochs on val accuracy (0: off)", "ge": 0}
    )
    select: str = field(
        default="best-val",
        metadata={
            "help": "best-val: restore the best-val epoch; last: keep the last epoch",
            "choices": ["best-val", "last"],
        },
    )


class Adapter(nn.Module, abc.ABC):
    """An embedding-level method: logits for images against any set of class text features."""

    name: str = ""
    needs_val: bool = False  # searches hyperparameters or early-stops on the few-shot val split
    needs_train: bool = True  # looks at training rows; False (zero-shot): no draw, runs on a test-only store
    trainable: bool = True  # trained by the shared loop after `setup`
    class_agnostic: bool = True  # can score classes it was not trained on (novel classes, other datasets)
    selection: str = ""  # the reference's selection: validation-free, few-shot-val or val (SELECTIONS)
    # what its images are: "features" (unit-norm CLIP features) or "pre-projection" (raw pooled vision features
    # before the last projection, read through Store.pre_projection_view(); FitData.projection holds that projection)
    inputs: str = "features"

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
    return check_config(config_cls(**{k: _coerce(name, fields[k], v) for k, v in overrides.items()}), name)


BOUND_KEYS = ("ge", "gt", "le", "lt", "choices", "allow_inf")
_OPS = {"ge": (">=", lambda x, b: x >= b), "gt": (">", lambda x, b: x > b), "le": ("<=", lambda x, b: x <= b),
        "lt": ("<", lambda x, b: x < b)}  # fmt: skip


def field_bounds(config_cls: type, key: str) -> dict[str, Any]:
    """The bound keys of a config field: its own metadata's, or, when a subclass redeclares the field only to
    change its default, those of the nearest base class that declares any."""
    for klass in config_cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(key)
        if f is not None and any(k in f.metadata for k in BOUND_KEYS):
            return {k: f.metadata[k] for k in BOUND_KEYS if k in f.metadata}
    return {}


def check_config(cfg: Any, name: str) -> Any:
    """Refuse a config holding a value outside its field's declared bounds, of the wrong kind, or a NaN or
    infinity, in one line naming the option; returns the config. Runs wherever a config is built or handed
    in, so a bad value stops before any data is read."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        bounds = field_bounds(type(cfg), f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        is_list = isinstance(default, (list, tuple))
        if is_list and not isinstance(value, (list, tuple)):
            raise MethodError(f"option '{f.name}' of '{name}' must be a list, got {value!r}")
        kind = _kind(f, default)
        for x in value if is_list else [value]:
            _check_value(name, f.name, x, kind, bounds, " (every element)" if is_list else "")
    return cfg


def _kind(f: dataclasses.Field, default: Any) -> type:
    """A field's scalar type (a list field's element type): from its annotation when it names one, since
    `logit_scale: float = 100` must take 50.5; else from the default."""
    ann = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")).replace(" ", "")
    for t in (bool, int, float, str):
        if ann in (t.__name__, f"{t.__name__}|None", f"list[{t.__name__}]"):
            return t
    if isinstance(default, (list, tuple)):
        return type(default[0]) if default else float
    return type(default)


def _check_value(name: str, key: str, x: Any, kind: type, bounds: dict[str, Any], each: str) -> None:
    def bad(why: str) -> MethodError:
        shown = x
        if isinstance(x, numbers.Real) and not isinstance(x, bool):  # numpy scalars print as plain numbers
            shown = int(x) if isinstance(x, numbers.Integral) else float(x)
        return MethodError(f"option '{key}' of '{name}'{each} must be {why}, got {shown!r}")

    if x is None:  # an optional option left unset (e.g. "use the model's own logit scale")
        return
    if kind is bool and not isinstance(x, bool):
        raise bad("true or false")
    if kind is str and not isinstance(x, str):
        raise bad("a string")
    if kind is int and (isinstance(x, bool) or not isinstance(x, numbers.Integral)):
        raise bad("an integer")
    numeric = kind in (int, float) or any(k in bounds for k in _OPS)
    if numeric and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise bad("a number")
    if "choices" in bounds and x not in bounds["choices"]:
        raise bad(f"one of {', '.join(map(str, bounds['choices']))}")
    if numeric and (math.isnan(x) or (math.isinf(x) and not bounds.get("allow_inf"))):
        raise bad("finite")
    for op, (sign, ok) in _OPS.items():
        if op in bounds and not ok(x, bounds[op]):
            raise bad(f"{sign} {bounds[op]:g}")


def config_help(name: str) -> list[tuple[str, Any, str]]:
    """(option, default, help) for every option of a method, for --help style listings; the help ends with the
    option's bounds, so the listing says what `check_config` will accept."""
    out = []
    cls = _entry(name).config_cls
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = f.metadata.get("help", "")
        bounds = field_bounds(cls, f.name)
        if all(str(c) in text for c in bounds.get("choices", [])):  # the help already names them
            bounds.pop("choices", None)
        limits = describe_bounds(bounds)
        out.append((f.name, default, f"{text} [{limits}]" if limits else text))
    return out


def describe_bounds(bounds: dict[str, Any]) -> str:
    """Bounds as text: ">= 0, <= 1" or "one of adam, adamw, sgd"."""
    parts = [f"{sign} {bounds[op]:g}" for op, (sign, _) in _OPS.items() if op in bounds]
    if "choices" in bounds:
        parts.append("one of " + ", ".join(map(str, bounds["choices"])))
    return ", ".join(parts)


def create_adapter(name: str, config: Any = None, dim: int = 512, seed: int | None = None, **overrides: Any) -> Adapter:
    """Build a method for embeddings of width `dim` from its config (or the defaults plus overrides).
    With a seed, initial weights come from that seed (the global RNG is left as it was)."""
    entry = _entry(name)
    cfg = config if config is not None else adapter_config(name, **overrides)
    if config is not None:
        cfg = check_config(dataclasses.replace(config, **overrides) if overrides else config, name)
    if seed is None:
        return entry.cls(cfg, dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.cls(cfg, dim)


def _coerce(method: str, f: dataclasses.Field, value: Any) -> Any:
    """Turn `--set key=value` strings into the field's type (int, float, bool, str, lists of them; "none" for an
    optional field left unset)."""
    if not isinstance(value, str):
        return value
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kind = _kind(f, default)
    is_list = isinstance(default, (list, tuple))
    try:
        if is_list:
            return type(default)(kind(v) for v in value.split(","))
        if default is None and value.lower() in ("none", "null"):
            return None
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(value)
    except ValueError:
        raise MethodError(
            f"option '{f.name}' of '{method}' needs a {kind.__name__}{' list' if is_list else ''}, got {value!r}"
        ) from None
    return value
