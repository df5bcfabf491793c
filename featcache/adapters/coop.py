"""CoOp (Zhou et al., IJCV 2022): 16 learnable context vectors in front of each class name, text side only.

Prompt: [SOS] ctx_1 .. ctx_16 <class name> . [EOS], the context shared by all classes, initialised N(0, 0.02)
(or from the words of `ctx_init`). Only the text encoder has to run while training: the image encoder sees no
prompt, so the images come straight from the feature cache. logits = exp(logit_scale) · n(v) · n(t)ᵀ.
Reference training: SGD lr 0.002, 200 epochs, batch 32, cosine, and CoOp reports the last epoch.

As the reference's PromptLearner (KaiyangZhou/CoOp trainers/coop.py): `_` becomes a space in `ctx_init` and in
the class names; n_ctx = len(ctx_init.split(" ")) (words, not tokens); the prompt is "<ctx_init> <name>." and
its first n_ctx token positions after SOS become the context, initialised from those tokens' embeddings. An
initial context whose words split into more tokens than words ("itap of a" is 4 tokens) thus keeps its leftover
tokens, frozen, between the context and the class name.

The text tower is injected, not forked: a wrapper around the model's token embedding puts the context at
positions 1..n_ctx (installed once per model; each CoOp bound to the model points it at its own context before
every text pass, so several CoOps can share one backbone); open_clip's own text tower does the rest, run on the
prompts cut after their last EOT token (featcache.text: exact, and about 20-25 of the 77 positions for 16 context
tokens and a name).
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
    n_ctx: int = field(default=16, metadata={"help": "learnable context tokens", "ge": 1})
    ctx_init: str = field(
        default="",
        metadata={"help": "initial words ('_' = space; their count, split on ' ', sets n_ctx; leftover tokens stay "
                  "fixed before the class name, as the reference); empty: N(0, 0.02)"},
    )  # fmt: skip
    optimizer: str = field(default="sgd", metadata={"help": "adam, adamw or sgd"})
    lr: float = field(default=0.002, metadata={"help": "learning rate"})
    epochs: int = field(default=200, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "rows per optimisation step"})
    schedule: str = field(default="cosine", metadata={"help": "constant or cosine"})
    select: str = field(default="last", metadata={"help": "last (CoOp reports the last epoch) or best-val"})


class ContextSlot(SubmoduleWrapper):
    """CoOp's wrapper around a model's token embedding; `_post` is the context of the CoOp encoding right now."""


@register("coop", CoOpConfig)
class CoOp(Adapter):
    selection = "validation-free"  # CoOp reports the last epoch (select=last)
    needs_backbone = True  # the text encoder runs every step; images come from the cache

    def __init__(self, config: CoOpConfig, dim: int = 512):
        super().__init__(config, dim)
        init = config.ctx_init.replace("_", " ")
        n = len(init.split(" ")) if init else config.n_ctx
        self.prefix = init or " ".join(["X"] * n)  # the words before each class name
        self.ctx = nn.Parameter(torch.randn(n, dim) * 0.02)
        self._bound: tuple = ()  # (backbone, token-embedding wrapper) kept out of the state dict and the parameters
        self._tokens: dict[tuple[str, ...], torch.Tensor] = {}

    def bind(self, backbone) -> None:
        """Attach to a frozen open_clip model (a Backbone) whose text tower this method prompts."""
        model = backbone.model
        owner, blocks = text_tower(model)
        width = blocks[0].ln_1.normalized_shape[0]
        if self.ctx.shape[1] != width:
            self.ctx = nn.Parameter(torch.randn(self.ctx.shape[0], width) * 0.02)
        if not isinstance(owner.token_embedding, ContextSlot):  # once per model, shared by every CoOp on it
            owner.token_embedding = ContextSlot(owner.token_embedding)
        wrapper = owner.token_embedding
        if self.config.ctx_init:  # from the plain embedding, not through another CoOp's context
            with torch.no_grad():
                tokens = backbone.tokenizer([self.prefix]).to(backbone.device)
                self.ctx.data = wrapper.block(tokens)[0, 1 : 1 + self.ctx.shape[0]].float().cpu()
        self._bound = (backbone, wrapper)
        wrapper._post = self._put_context

    def _put_context(self, _, e: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, W] -> positions 1..n_ctx replaced by this method's context."""
        ctx = self.ctx.to(e.dtype).expand(e.shape[0], -1, -1)
        return torch.cat([e[:, :1], ctx, e[:, 1 + ctx.shape[1] :]], dim=1)

    def class_text(self, classnames: list[str]) -> torch.Tensor:
        """[C, D] unit-norm text features of the prompted class names (gradients reach the context)."""
        if not self._bound:
            raise MethodError("coop needs the backbone that made the store (bind it first)")
        bb, wrapper = self._bound
        key = tuple(classnames)
        if key not in self._tokens:
            prompts = [f"{self.prefix} {c.replace('_', ' ')}." for c in classnames]
            self._tokens[key] = bb.tokenizer(prompts).to(bb.device)
        wrapper._post = self._put_context  # the model may be shared with another CoOp: use this one's context
        return F.normalize(encode_text_truncated(bb.model, self._tokens[key]).float(), dim=-1)

    def score(self, images, text, class_ids=None, classnames=None) -> torch.Tensor:
        if classnames is None:
            raise MethodError("coop scores classes by name; no class names were given")
        t = self.class_text(classnames).to(images.device)
        return self._bound[0].model.logit_scale.exp().float() * images @ t.t()

    def forward(self, images: torch.Tensor, text: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise MethodError("coop needs class names: call score(images, text, class_ids, classnames)")
