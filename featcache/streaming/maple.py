"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023; seed 002, reference
muzairkhattak/multimodal-prompt-learning).

Text prompt "a photo of a {class}." with the embeddings of "a photo" (positions 1..2) replaced by 2 learnable
context vectors (initialised from those embeddings). Vision prompts are made from the text context by
Linear(512->768) and appended after the patch tokens before ln_pre (197 -> 199 tokens for ViT-B/16). Deep
prompts, depth 9: at the input of blocks 2..9, fresh text prompts (N(0, 0.02), [2, 512]) replace text positions
1..2, and their projections (8 Linear(512->768), which start as copies of one layer: the reference's
`_get_clones(single_layer, depth - 1)`, trained independently) replace the last 2 vision tokens; blocks 10-12
carry on what block 9 produced. 3,555,072 parameters on ViT-B-16 shapes.
The text prompts sit at positions 1..2, before every prompt's EOT token, so the trainer's text encoding on prompts
cut after their last EOT (featcache.text) is exact for MaPLe too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .inject import BlockWrapper, Injected, SubmoduleWrapper, text_tower, vision_tower


@dataclass
class MaPLeConfig:
    n_ctx: int = field(default=2, metadata={"help": "context tokens per prompt", "ge": 1})
    depth: int = field(default=9, metadata={"help": "prompt depth (3 for cross-dataset / DG)", "ge": 1})
    ctx_init: str = field(default="a photo of a", metadata={"help": "initial words; the first n_ctx are learned"})
    # reference training
    optimizer: str = field(default="sgd", metadata={"help": "optimizer (the reference's SGD)", "choices": ["sgd"]})
    lr: float = field(default=0.0035, metadata={"help": "learning rate (0.0026 for cross-dataset / DG)", "gt": 0})
    epochs: int = field(
        default=5, metadata={"help": "epochs (2 for cross-dataset / DG); 0: evaluate the untrained method", "ge": 0}
    )
    batch_size: int = field(default=4, metadata={"help": "images per step", "ge": 1})
    warmup_epochs: int = field(default=1, metadata={"help": "constant warm-up epochs at 1e-5", "ge": 0})
    schedule: str = field(default="cosine", metadata={"help": "cosine after warm-up", "choices": ["cosine"]})


class MaPLe(Injected):
    """The prompts only; `attach(model, tokenizer)` injects them into an open_clip CLIP model."""

    selection = "validation-free"  # the reference trains 5 epochs and reports the last

    def __init__(self, config: MaPLeConfig, text_width: int, vision_width: int, ctx_init: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        n, deep = config.n_ctx, config.depth - 1
        ctx = ctx_init.clone() if ctx_init is not None else torch.randn(n, text_width) * 0.02
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(text_width, vision_width)
        self.deep_text = nn.ParameterList(nn.Parameter(torch.randn(n, text_width) * 0.02) for _ in range(deep))
        one = nn.Linear(text_width, vision_width)  # the reference's _get_clones: deep copies of one layer
        self.deep_proj = nn.ModuleList(copy.deepcopy(one) for _ in range(deep))

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer, config: MaPLeConfig | None = None) -> MaPLe:
        config = config or MaPLeConfig()
        owner, tblocks = text_tower(model)
        _, vblocks = vision_tower(model)
        with torch.no_grad():  # initialise the context from the embeddings of the first n_ctx words
            tokens = tokenizer([config.ctx_init])
            ctx = owner.token_embedding(tokens)[0, 1 : 1 + config.n_ctx].float()
        return cls(config, tblocks[0].ln_1.normalized_shape[0], vblocks[0].ln_1.normalized_shape[0], ctx)

    def attach(self, model: nn.Module) -> nn.Module:
        n = self.config.n_ctx
        owner, tblocks = text_tower(model)
        visual, vblocks = vision_tower(model)

        def text_first(e: torch.Tensor) -> torch.Tensor:  # token embeddings: positions 1..n become the context
            ctx = self.ctx.to(e.dtype).expand(e.shape[0], -1, -1)
            return torch.cat([e[:, :1], ctx, e[:, 1 + n :]], dim=1)

        def vision_first(x: torch.Tensor) -> torch.Tensor:  # before ln_pre: append the projected context
            return torch.cat([x, self.proj(self.ctx).to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)

        owner.token_embedding = SubmoduleWrapper(owner.token_embedding, post=lambda _, e: text_first(e))
        visual.ln_pre = SubmoduleWrapper(visual.ln_pre, pre=vision_first)
        for i in range(self.config.depth - 1):  # blocks 2..depth (1-indexed) get fresh prompts at their input

            def text_pre(x: torch.Tensor, i=i) -> torch.Tensor:
                p = self.deep_text[i].to(x.dtype).expand(x.shape[0], -1, -1)
                return torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)

            def vision_pre(x: torch.Tensor, i=i) -> torch.Tensor:
                p = self.deep_proj[i](self.deep_text[i]).to(x.dtype).expand(x.shape[0], -1, -1)
                return torch.cat([x[:, :-n], p], dim=1)

            tblocks[i + 1] = BlockWrapper(tblocks[i + 1], pre=text_pre)
            vblocks[i + 1] = BlockWrapper(vblocks[i + 1], pre=vision_pre)
        return model
