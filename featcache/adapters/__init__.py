"""Embedding-level methods (one file each) and their registry."""

from .base import (
    Adapter,
    FitData,
    MethodError,
    TrainConfig,
    adapter_config,
    config_help,
    create_adapter,
    list_adapters,
    register,
)

__all__ = [
    "Adapter", "FitData", "MethodError", "TrainConfig", "adapter_config", "config_help", "create_adapter",
    "list_adapters", "register",
]  # fmt: skip

# each method registers itself on import
from . import (  # noqa: E402, F401  # noqa: E402, F401
    ape,  # noqa: E402, F401
    clap,
    clip_adapter,
    coop,
    gda,  # noqa: E402, F401
    linear_probe,
    lpp,
    mm_attn,
    prolip,
    taskres,  # noqa: E402, F401
    tip_adapter,
    tip_x,  # noqa: E402, F401
    zero_shot,
)
