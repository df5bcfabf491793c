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
from . import clip_adapter, coop, linear_probe, mm_attn, tip_adapter, zero_shot  # noqa: E402, F401
