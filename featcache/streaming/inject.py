"""Injection helpers: wrap an open_clip transformer block (or any submodule) without touching its code.

open_clip's blocks are called as `block(x, attn_mask=...)` on batch-first [B, L, D] tensors; a wrapper keeps
the original block as a child and adds to (or edits) its input or output. `restore` puts the originals back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GradScale(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by `k` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.k, None


def grad_scale(x: torch.Tensor, k: float) -> torch.Tensor:
    return GradScale.apply(x, k)


class BlockWrapper(nn.Module):
    """Runs `pre(x)` before and `post(x_in, x_out)` after an unmodified block."""

    def __init__(
        self,
        block: nn.Module,
        pre: Callable[[torch.Tensor], torch.Tensor] | None = None,
        post: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.block = block
        self._pre, self._post = pre, post

    def __getattr__(self, name: str):
        """Everything else (open_clip asks blocks for get_weight_dtype, ln_1, ...) comes from the wrapped block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._pre is not None:
            x = self._pre(x)
        out = self.block(x, *args, **kwargs)
        return self._post(x, out) if self._post is not None else out


def restore(module: nn.Module) -> None:
    """Undo every wrapper below `module` (block wrappers and submodule wrappers alike)."""
    for name, child in list(module.named_children()):
        if isinstance(child, (BlockWrapper, SubmoduleWrapper)):
            setattr(module, name, child.block)
        else:
            restore(child)


class SubmoduleWrapper(BlockWrapper):
    """The same wrapper for a non-block submodule (token embedding, ln_pre): `pre`/`post` around it."""


class Injected(nn.Module):
    """Base of the full-backbone methods: trainable parts that `attach` into a model and `detach` from it."""

    @staticmethod
    def detach(model: nn.Module) -> nn.Module:
        restore(model)
        return model

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def text_tower(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the module holding the text transformer, its resblocks) for open_clip's CLIP and CustomTextCLIP."""
    owner = model.text if hasattr(model, "text") else model
    return owner, owner.transformer.resblocks


def vision_tower(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    visual = model.visual
    if not hasattr(visual, "transformer"):
        raise TypeError("this method needs an open_clip ViT image tower (timm and ResNet towers are not supported)")
    return visual, visual.transformer.resblocks
