"""CoOp (Zhou et al., IJCV 2022): 16 learnable context vectors in front of each class name, text side only.

Prompt: [SOS] ctx_1 .. ctx_16 <class name> . [EOS], the context shared by all classes, initialised N(0, 0.02)
(or from the words of `ctx_init`). Only the text encoder has to run while training: the image encoder sees no
prompt, so the images come straight from the feature cache. logits = exp(logit_scale) · n(v) · n(t)ᵀ.
Reference training: SGD lr 0.002, 200 epochs, batch 32, cosine, and CoOp reports the last epoch.

The text tower is injected, not forked: a wrapper around the model's token embedding puts the context at
positions 1..n_ctx; open_clip's own text tower does the rest, run on the prompts cut after their last EOT token
(featcache.text: exact, and about 20-25 of the 77 positions for 16 context tokens and a name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..streaming.inject import SubmoduleWrapper, text_tower
from ..text import encode_text_truncated
from .base import Adapter, MethodError, TrainConfig, register


@dataclass
class CoOpConfig(TrainConfig):
    n_ctx: int = field(default=16, metadata={"help": "learnable context tokens"})
    ctx_init: str = field(default="", metadata={"help": "initial words (their count sets n_ctx); empty: N(0, 0.02)"})
    optimizer: str = field(default="sgd", metadata={"help": "adam, adamw or sgd"})
    lr: float = field(default=0.002, metadata={"help": "learning rate"})
    epochs: int = field(default=200, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "rows per optimisation step"})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine"})
    select: str = field(default="last", metadata={"help": "last (CoOp reports the last epoch) or best-val"})


@register("coop", CoOpConfig)
class CoOp(Adapter):
    needs_backbone = True  # the text encoder runs every step; images come from the cache

    def __init__(self, config: CoOpConfig, dim: int = 512):
        super().__init__(config, dim)
        n = len(config.ctx_init.split()) if config.ctx_init else config.n_ctx
        self.ctx = nn.Parameter(torch.randn(n, dim) * 0.02)
        self._bound: tuple = ()  # (backbone,) kept out of the state dict and the parameters
        self._tokens: dict[tuple[str, ...], torch.Tensor] = {}

    def bind(self, backbone) -> None:
        """Attach to a frozen open_clip model (a Backbone) whose text tower this method prompts."""
        model = backbone.model
        owner, blocks = text_tower(model)
        width = blocks[0].ln_1.normalized_shape[0]
        if self.ctx.shape[1] != width:
            self.ctx = nn.Parameter(torch.randn(self.ctx.shape[0], width) * 0.02)
        if self.config.ctx_init:
            with torch.no_grad():
                tokens = backbone.tokenizer([self.config.ctx_init]).to(backbone.device)
                self.ctx.data = owner.token_embedding(tokens)[0, 1 : 1 + self.ctx.shape[0]].float().cpu()
        n = self.ctx.shape[0]

        def put_context(_, e: torch.Tensor) -> torch.Tensor:
            ctx = self.ctx.to(e.dtype).expand(e.shape[0], -1, -1)
            return torch.cat([e[:, :1], ctx, e[:, 1 + n :]], dim=1)

        if not isinstance(owner.token_embedding, SubmoduleWrapper):
            owner.token_embedding = SubmoduleWrapper(owner.token_embedding, post=put_context)
        self._bound = (backbone,)

    def class_text(self, classnames: list[str]) -> torch.Tensor:
        """[C, D] unit-norm text features of the prompted class names (gradients reach the context)."""
        if not self._bound:
            raise MethodError("coop needs the backbone that made the store (bind it first)")
        bb = self._bound[0]
        key = tuple(classnames)
        if key not in self._tokens:
            placeholder = " ".join(["X"] * self.ctx.shape[0])
            self._tokens[key] = bb.tokenizer([f"{placeholder} {c}." for c in classnames]).to(bb.device)
        return F.normalize(encode_text_truncated(bb.model, self._tokens[key]).float(), dim=-1)

    def score(self, images, text, class_ids=None, classnames=None) -> torch.Tensor:
        if classnames is None:
            raise MethodError("coop scores classes by name; no class names were given")
        t = self.class_text(classnames).to(images.device)
        return self._bound[0].model.logit_scale.exp().float() * images @ t.t()

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise MethodError("coop needs class names: call score(images, text, class_ids, classnames)")
