"""Cross-Modal Adapter (Jiang et al., Pattern Recognition 2025; seed 003, reference LeapLabTHU/Cross-Modal-Adapter).

Houlsby-style residual bottlenecks after both sublayers (attention, MLP) of every block of both encoders. For a
sublayer output h of width w:  A(h) = h + [W_u · act(W_d h + b_d) + b_u ; W_s · act(W_d h + b_d) + b_s],
down-projection W_d: w -> r (r = 8) per modality; the up-projection's first w - d_s output channels come from a
per-modality W_u, its LAST d_s = 16 channels from W_s, b_s, which are ONE tensor pair shared by the vision and text
adapter at the same block and sublayer (the reference's `vt_adapter_up_share_*`). Every projection has a bias.
Weights trunc-normal std 0.01, biases zero; QuickGELU.

Per block and sublayer on ViT-B/32 shapes (vision 768, text 512):
  vision 768*8+8 + 8*752+752 = 12,920;  text 512*8+8 + 8*496+496 = 8,568;  shared 8*16+16 = 144;  sum 21,632,
  x 12 blocks x 2 sublayers = 519,168 trainable parameters.

Injection: open_clip's block computes x + ls_1(attention(ln_1(x))) and x + ls_2(mlp(ln_2(x))); wrapping ls_1 / ls_2
(nn.Identity in CLIP; with LayerScale the adapter sees the scaled output) puts A right before the residual add.

Pairing: block l of vision shares with block l of text, as in the reference. Towers of different depth (ViT-L/14:
24 vision vs 12 text blocks) are refused with MethodError: the reference indexes the shared tensors by vision block
and has no rule for them (it would fail with an IndexError), and any pairing we picked would be a new method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import MethodError
from .inject import Injected, SubmoduleWrapper, text_tower, vision_tower

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class CrossModalAdapterConfig:
    reduction: int = field(
        default=8, metadata={"help": "bottleneck width r (reference adapter_reduction_dims)", "ge": 1}
    )
    share_dim: int = field(
        default=16,
        metadata={
            "help": "d_s: last output channels of each up-projection shared by vision and text (0: unshared)",
            "ge": 0,
        },
    )
    init_std: float = field(
        default=0.01, metadata={"help": "trunc-normal std of the adapter weights (biases zero)", "ge": 0}
    )
    activation: str = field(
        default="quick_gelu",
        metadata={"help": "bottleneck activation: quick_gelu | gelu | relu", "choices": list(_ACTIVATIONS)},
    )
    # reference training (CLIP4Clip-style retrieval, MSR-VTT)
    optimizer: str = field(
        default="bertadam",
        metadata={
            "help": "BertAdam: Adam without bias correction, decoupled weight decay, betas/eps below; or adamw",
            "choices": ["bertadam", "adamw"],
        },
    )
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate", "gt": 0})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1", "ge": 0, "lt": 1})
    beta2: float = field(default=0.98, metadata={"help": "Adam beta2", "ge": 0, "lt": 1})
    eps: float = field(default=1e-6, metadata={"help": "Adam epsilon", "gt": 0})
    weight_decay: float = field(
        default=0.2, metadata={"help": "weight decay on adapter weights (biases get none)", "ge": 0}
    )
    warmup: float = field(
        default=0.1, metadata={"help": "warm-up proportion of all steps, then cosine (lr_at)", "ge": 0, "le": 1}
    )
    clip_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient-norm clip before each step (0: off)", "ge": 0}
    )
    epochs: int = field(default=5, metadata={"help": "epochs; 0: evaluate the untrained method", "ge": 0})
    batch_size: int = field(default=128, metadata={"help": "caption-video pairs per step", "ge": 1})
    max_frames: int = field(default=12, metadata={"help": "frames per video (sampled uniformly at 1 fps)", "ge": 1})
    frame_pooling: str = field(
        default="mean",
        metadata={
            "help": "frame features -> video feature: mean | softmax (text-conditioned)",
            "choices": ["mean", "softmax"],
        },
    )
    softmax_temperature: float = field(
        default=5.0,
        metadata={"help": "temperature of the text-conditioned softmax over frames (reference q_score_temp)", "ge": 0},
    )
    logit_scale: float | None = field(
        default=None,
        metadata={"help": "None: the model's own frozen logit_scale.exp(); a number overrides it", "gt": 0},
    )


def _linear(i: int, o: int, std: float) -> nn.Linear:
    layer = nn.Linear(i, o)
    nn.init.trunc_normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class _Adapter(nn.Module):
    """One modality's adapter at one block/sublayer. `up_share` is held, not registered: its owner is
    CrossModalAdapter.share, so the shared tensors appear once in parameters() and state_dict()."""

    def __init__(self, width: int, share: nn.Linear | None, cfg: CrossModalAdapterConfig):
        super().__init__()
        d_s = share.out_features if share is not None else 0
        self.down = _linear(width, cfg.reduction, cfg.init_std)
        self.up_unique = _linear(cfg.reduction, width - d_s, cfg.init_std) if width > d_s else None
        self.__dict__["up_share"] = share
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.down(h.to(self.down.weight.dtype)))
        parts = [m(z) for m in (self.up_unique, self.up_share) if m is not None]
        return h + torch.cat(parts, dim=-1).to(h.dtype)


class CrossModalAdapter(Injected):
    """The adapters only; `attach(model)` injects them into an open_clip CLIP model's blocks.

    Index i = 2 * block + sublayer (0 attention, 1 MLP), as in the reference's stacked tensors."""

    selection = "validation-free"  # the last epoch (CLIP4Clip's code picks the best epoch on test; featcache never)

    def __init__(self, config: CrossModalAdapterConfig, text_width: int, vision_width: int, num_blocks: int):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise MethodError(
                f"cross-modal-adapter: unknown activation '{config.activation}'; use {list(_ACTIVATIONS)}"
            )
        if not 0 <= config.share_dim <= min(text_width, vision_width):
            raise MethodError(f"cross-modal-adapter: share_dim must be in 0..{min(text_width, vision_width)}")
        self.config = config
        n, r = 2 * num_blocks, config.reduction
        self.share = nn.ModuleList(
            _linear(r, config.share_dim, config.init_std) for _ in range(n if config.share_dim else 0)
        )
        shared = list(self.share) if config.share_dim else [None] * n
        self.vision = nn.ModuleList(_Adapter(vision_width, s, config) for s in shared)
        self.text = nn.ModuleList(_Adapter(text_width, s, config) for s in shared)

    @classmethod
    def for_model(cls, model: nn.Module, config: CrossModalAdapterConfig | None = None) -> CrossModalAdapter:
        _, tblocks = text_tower(model)
        _, vblocks = vision_tower(model)
        if len(tblocks) != len(vblocks):
            raise MethodError(
                f"cross-modal-adapter pairs vision and text blocks one to one; this model has {len(vblocks)} vision "
                f"and {len(tblocks)} text blocks (use a backbone whose towers have equal depth, e.g. ViT-B/32, B/16)"
            )
        tw = tblocks[0].ln_1.normalized_shape[0]
        vw = vblocks[0].ln_1.normalized_shape[0]
        return cls(config or CrossModalAdapterConfig(), tw, vw, len(tblocks))

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap ls_1 / ls_2 of every block of both towers of `model` (which stays otherwise unmodified)."""
        for adapters, (_, resblocks) in ((self.text, text_tower(model)), (self.vision, vision_tower(model))):
            for b, block in enumerate(resblocks):
                for s, name in enumerate(("ls_1", "ls_2")):
                    ls = getattr(block, name)
                    if isinstance(ls, SubmoduleWrapper):
                        raise MethodError("cross-modal-adapter: this model already has adapters attached; detach first")
                    adapter = adapters[2 * b + s]
                    setattr(block, name, SubmoduleWrapper(ls, post=lambda _x, out, a=adapter: a(out)))
        return model

    def param_groups(self) -> list[dict]:
        """Optimizer groups as in the reference: weight decay on the adapter weights, none on the biases."""
        decay = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch pairs (pair i is row i, column i): CLIP4Clip's CrossEn over the rows and over
    the columns, averaged, so retrieval is trained in both directions."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def lr_at(cfg: CrossModalAdapterConfig, step: int, total_steps: int) -> float:
    """BertAdam's warmup_cosine, as the reference trains: x = step / total_steps over the WHOLE run; lr * x / warmup
    while x < warmup, else lr * 0.5 * (1 + cos(pi * x)). The cosine is not restarted after warm-up (so the lr drops
    from ~lr to 0.976 lr at x = 0.1), and `step` counts the updates already made, so the first update uses lr 0."""
    if total_steps < 1:
        raise ValueError("total_steps must be at least 1")
    x = step / total_steps
    if x < cfg.warmup:
        return cfg.lr * x / cfg.warmup
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * x))
