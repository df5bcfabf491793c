"""EOT-truncated text encoding for open_clip text towers: the same features from fewer positions.

open_clip's text transformer is causal and pools one position per prompt (pool type 'argmax': the EOT token,
which has the highest id), so no position after the last EOT of a batch can influence any output. Running the
tower on the tokens cut to max(EOT) + 1 positions, with the positional embedding and the causal mask cut to the
same length, gives the same features (up to float summation order) for a fraction of the work: "a photo of a
{class}." needs 8-15 of CLIP's 77 positions, CoOp's 16 context tokens + a name about 20-25. Prompt learners that
overwrite positions before the EOT (CoOp's context at 1..16, MaPLe's prompts at 1..2 of the input and of its deep
blocks) keep the cut exact.

Where the cut would not be exact the tower runs at full length: a bidirectional tower (no causal mask), pool type
'last' or 'none', an appended CLS embedding (CoCa). A tower that is not open_clip's own transformer (HF text
towers) goes through `encode_text` unchanged.

The pieces (`embed_text`, `run_text_blocks`, `text_head`) let a caller stop after some blocks and resume later:
the partial-backbone path keeps the tokens entering the first adapted text block for a whole run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class TextInput(NamedTuple):
    """The text tower's state between blocks: batch-first [B, L, D] tokens, the attention mask sized to L, and the
    (cut) token ids that the pooling reads."""

    x: torch.Tensor
    attn_mask: torch.Tensor | None
    tokens: torch.Tensor


def _owner(model: nn.Module) -> nn.Module:
    """The module holding the text transformer: CLIP itself, or CustomTextCLIP's `text` tower."""
    return model.text if hasattr(model, "text") else model


def _is_text_transformer(owner: nn.Module) -> bool:
    """Whether `owner` is open_clip's TextTransformer (CustomTextCLIP's tower). open_clip is imported here, not at
    module level: a model to look at exists only once open_clip is loaded, and commands that read cached features
    never pay for it (importing featcache.adapters stays free of open_clip and torchvision)."""
    from open_clip.transformer import TextTransformer

    return isinstance(owner, TextTransformer)


def _pool_type(owner: nn.Module) -> str:
    return owner.pool_type if _is_text_transformer(owner) else owner.text_pool_type


def _eos_id(owner: nn.Module) -> int | None:
    return getattr(owner, "eos_id" if _is_text_transformer(owner) else "text_eos_id", None)


def is_open_clip_text(model: nn.Module) -> bool:
    return hasattr(getattr(_owner(model), "transformer", None), "resblocks")


def truncated_length(model: nn.Module, tokens: torch.Tensor) -> int:
    """How many leading positions can influence the pooled features: the last pooled position + 1 where the cut is
    exact (causal mask, pool 'argmax' / 'eos' / 'first', no appended CLS), else all of them."""
    owner, full = _owner(model), tokens.shape[1]
    if getattr(owner, "attn_mask", None) is None or getattr(owner, "cls_emb", None) is not None:
        return full
    pool = _pool_type(owner)
    if pool == "argmax":
        last = tokens.argmax(dim=-1).max()
    elif pool == "eos":
        last = (tokens == _eos_id(owner)).int().argmax(dim=-1).max()
    elif pool == "first":
        return 1
    else:
        return full
    return int(last) + 1


def embed_text(model: nn.Module, tokens: torch.Tensor) -> TextInput:
    """Token + positional embeddings of the cut tokens (through any wrapper on the token embedding), with the
    causal mask cut to the same length: what open_clip feeds its first text block."""
    owner = _owner(model)
    if not is_open_clip_text(model):
        raise TypeError("EOT truncation needs open_clip's own text transformer (HF text towers are not supported)")
    tokens = tokens[:, : truncated_length(model, tokens)]
    if _is_text_transformer(owner):  # CustomTextCLIP: its own _embeds (CLS, pad mask, position slicing)
        x, mask = owner._embeds(tokens)
    else:  # CLIP.encode_text's embedding, with the positional embedding cut to the length
        cast = owner.transformer.get_cast_dtype()
        x = owner.token_embedding(tokens).to(cast)
        x = x + owner.positional_embedding[: x.shape[1]].to(cast)
        mask = owner.attn_mask
    if mask is not None and mask.dim() == 2:  # the plain causal mask is stored at full length
        mask = mask[: x.shape[1], : x.shape[1]]
    return TextInput(x, mask, tokens)


def run_text_blocks(model: nn.Module, inp: TextInput, start: int = 0, stop: int | None = None) -> TextInput:
    """Text blocks start..stop-1 (0-indexed), called as open_clip's Transformer calls them."""
    transformer = _owner(model).transformer
    batch_first = getattr(transformer, "batch_first", True)
    x = inp.x if batch_first else inp.x.transpose(0, 1)
    for blk in transformer.resblocks[start:stop]:
        x = blk(x, attn_mask=inp.attn_mask)
    return inp._replace(x=x if batch_first else x.transpose(0, 1))


def text_head(model: nn.Module, inp: TextInput) -> torch.Tensor:
    """After the last block: open_clip's final LayerNorm, pooling and projection."""
    owner, x = _owner(model), inp.x
    if getattr(owner, "cls_emb", None) is not None:  # CoCa: the appended CLS, normalised after pooling
        pooled = owner.ln_final(x[:, -1])
    else:
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(owner.ln_final(x), inp.tokens, _pool_type(owner), eos_token_id=_eos_id(owner))
    proj = owner.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def encode_text_truncated(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on max(EOT) + 1 positions instead of the context length."""
    if not is_open_clip_text(model):
        return model.encode_text(tokens)
    return text_head(model, run_text_blocks(model, embed_text(model, tokens)))
