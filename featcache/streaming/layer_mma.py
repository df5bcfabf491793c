"""Layer-wise Multi-Modal Adapter (MMA, Yang et al., CVPR 2024; seed 000, reference ZjjConan/Multi-Modal-Adapter).

In blocks 5-12 (1-indexed) of both encoders, a branch y = up(shared(down(ln_1(x)))) · s is added to the block
output: x = block(x) + y. Per adapted block: text down Linear(512->32)+ReLU, up Linear(32->512); vision down
Linear(768->32)+ReLU, up Linear(32->768); one shared Linear(32->32)+ReLU used by both modalities. s = 0.001 with
gradient rescaling (identity forward, grad x s then x 1/s around the branch), so the adapter weights see the
unscaled gradient. Kaiming-normal (fan_out, relu) weights, zero biases. 674,560 parameters on ViT-B-16 shapes.
Text input is the hard prompt "a photo of a {class}.". Nothing before the first adapted block is learned in either
tower, which is what the partial-backbone path exploits (featcache.streaming.partial): cached vision tokens, and
text tokens entering the first adapted text block computed once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .inject import BlockWrapper, Injected, grad_scale, text_tower, vision_tower


@dataclass
class LayerMMAConfig:
    first_block: int = field(
        default=5, metadata={"help": "first adapted block, 1-indexed (blocks 5-12 in ViT-B)", "ge": 1}
    )
    bottleneck: int = field(default=32, metadata={"help": "adapter width", "ge": 1})
    scale: float = field(
        default=1e-3, metadata={"help": "output scale s (gradients to the adapter stay unscaled)", "gt": 0}
    )
    template: str = field(default="a photo of a {}.", metadata={"help": "hard text prompt"})
    # reference training
    optimizer: str = field(default="sgd", metadata={"help": "optimizer (the reference's SGD)", "choices": ["sgd"]})
    lr: float = field(default=0.0015, metadata={"help": "learning rate", "gt": 0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "ge": 0, "le": 1})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay", "ge": 0})
    epochs: int = field(default=5, metadata={"help": "epochs; 0: evaluate the untrained method", "ge": 0})
    batch_size: int = field(default=16, metadata={"help": "images per step (128 for ImageNet)", "ge": 1})
    schedule: str = field(default="cosine", metadata={"help": "cosine over all epochs", "choices": ["cosine"]})


def _kaiming(layer: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class LayerMMA(Injected):
    """The adapters only; `attach(model)` injects them into an open_clip CLIP model's blocks."""

    selection = "validation-free"  # the reference trains 5 epochs and reports the last

    def __init__(
        self, config: LayerMMAConfig, text_width: int, vision_width: int, num_blocks: int, vision_blocks: int = 0
    ):
        super().__init__()
        self.config = config
        self.blocks = list(range(config.first_block - 1, num_blocks))  # text tower, 0-indexed
        # the vision tower adapts as many blocks, its last ones (the same blocks when both towers have equal depth;
        # e.g. ViT-L/14's 24 vision blocks pair their last 8 with text blocks 5-12)
        vb = vision_blocks or num_blocks
        self.vision_blocks = list(range(vb - len(self.blocks), vb))
        r, n = config.bottleneck, len(self.blocks)
        self.text_down = nn.ModuleList(_kaiming(nn.Linear(text_width, r)) for _ in range(n))
        self.text_up = nn.ModuleList(_kaiming(nn.Linear(r, text_width)) for _ in range(n))
        self.vision_down = nn.ModuleList(_kaiming(nn.Linear(vision_width, r)) for _ in range(n))
        self.vision_up = nn.ModuleList(_kaiming(nn.Linear(r, vision_width)) for _ in range(n))
        self.shared = nn.ModuleList(_kaiming(nn.Linear(r, r)) for _ in range(n))

    @classmethod
    def for_model(cls, model: nn.Module, config: LayerMMAConfig | None = None) -> LayerMMA:
        _, tblocks = text_tower(model)
        _, vblocks = vision_tower(model)
        tw = tblocks[0].ln_1.normalized_shape[0]
        vw = vblocks[0].ln_1.normalized_shape[0]
        return cls(config or LayerMMAConfig(), tw, vw, len(tblocks), len(vblocks))

    def branch(self, i: int, h: torch.Tensor, modality: str) -> torch.Tensor:
        down, up = (
            (self.text_down[i], self.text_up[i]) if modality == "text" else (self.vision_down[i], self.vision_up[i])
        )
        s = self.config.scale
        z = grad_scale(h, s)  # the gradient reaching x through the branch matches the forward scale
        y = up(F.relu(self.shared[i](F.relu(down(z)))))
        return s * grad_scale(y, 1.0 / s)  # forward: s * y; the adapter weights see the unscaled gradient

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap the adapted blocks of both towers of `model` (which stays otherwise unmodified)."""
        for modality, (_, resblocks) in (("text", text_tower(model)), ("vision", vision_tower(model))):
            for j, b in enumerate(self.blocks if modality == "text" else self.vision_blocks):
                block = resblocks[b]

                def post(x_in, x_out, j=j, block=block, modality=modality):
                    return x_out + self.branch(j, block.ln_1(x_in), modality)

                resblocks[b] = BlockWrapper(block, post=post)
        return model
