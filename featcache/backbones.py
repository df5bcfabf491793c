"""open_clip backbones addressed by one id string, loaded through open_clip's own API and fingerprinted.

Ids:
  ARCH/TAG           an open_clip architecture with a pretrained tag, e.g. ViT-B-16-quickgelu/openai
  ARCH/random        the architecture with random weights (torch seed 0), e.g. featcache-tiny/random
  ARCH/PATH          the architecture with weights from a local checkpoint file
  hf-hub:ORG/REPO    config and weights from the Hugging Face hub
  local-dir:DIR      config and weights from a local folder (open_clip_config.json + weights)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import BackboneError

TINY_ARCH = "featcache-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def _open_clip():
    """Import open_clip and register featcache's own model configs (the tiny test architecture) once."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
    return open_clip


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone id: what to ask open_clip for."""

    id: str
    model_name: str  # argument to open_clip.create_model_and_transforms
    pretrained: str | None  # tag or checkpoint path; None for random init or schema ids
    kind: str  # "tag" | "random" | "file" | "hf-hub" | "local-dir"

    @property
    def arch(self) -> str:
        return self.model_name


def parse_backbone(backbone_id: str) -> BackboneSpec:
    """Parse and check a backbone id without loading anything (cheap; raises BackboneError with a fix)."""
    bid = backbone_id.strip()
    if bid.startswith("hf-hub:"):
        if not bid[len("hf-hub:") :]:
            raise BackboneError("empty hf-hub id; use hf-hub:ORG/REPO")
        return BackboneSpec(bid, bid, None, "hf-hub")
    if bid.startswith("local-dir:"):
        d = Path(bid[len("local-dir:") :]).expanduser()
        if not d.is_dir():
            raise BackboneError(f"{bid}: folder not found; local-dir: needs a folder with open_clip_config.json")
        return BackboneSpec(bid, f"local-dir:{d}", None, "local-dir")
    open_clip = _open_clip()
    if "/" not in bid:
        raise BackboneError(
            f"backbone '{bid}' names no weights; use {bid}/TAG (see `featcache backbones {bid}`), "
            f"{bid}/random or {bid}/PATH-TO-CHECKPOINT"
        )
    arch, tag = bid.split("/", 1)
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower()[:6] in m.lower()][:8]
        raise BackboneError(f"unknown architecture '{arch}'; similar: {', '.join(close) or 'none'}")
    if tag == "random":
        return BackboneSpec(bid, arch, None, "random")
    path = Path(tag).expanduser()
    if path.is_file() or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not path.is_file():
            raise BackboneError(f"checkpoint file not found: {path}")
        return BackboneSpec(bid, arch, str(path), "file")
    known = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in known:
        raise BackboneError(
            f"unknown pretrained tag '{tag}' for {arch}; known: {', '.join(known) or 'none'} "
            "(or 'random', or a checkpoint file path)"
        )
    model_qg = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    tag_qg = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    if model_qg != tag_qg:
        fix = f"{arch}-quickgelu" if tag_qg else arch.replace("-quickgelu", "")
        hint = f"use {fix}/{tag}" if fix in open_clip.list_models() else "pick the matching architecture"
        raise BackboneError(
            f"{bid}: weights '{tag}' were trained with{'' if tag_qg else 'out'} QuickGELU but {arch} "
            f"uses {'GELU' if tag_qg else 'QuickGELU'}, which silently lowers accuracy; {hint}"
        )
    return BackboneSpec(bid, arch, tag, "tag")


def pick_device(device: str = "auto") -> torch.device:
    """auto = cuda if available, else Apple mps, else cpu. A named device must exist here: refused in one line
    before anything is loaded or written, not deep inside the first forward pass."""
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise BackboneError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BackboneError(f"--device {device}: {why}; use --device cpu (or auto)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackboneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise BackboneError(f"--device {device}: Apple MPS is not available here; use --device cpu (or auto)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(precision: str, device: torch.device) -> str:
    """auto = fp16 on cuda (what CoOp-family code runs), fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise BackboneError(f"unknown precision '{precision}'; use fp32, bf16, fp16 or auto")
    return precision


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Content hash of the weights, so a cache is tied to the exact parameters that made it."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Backbone:
    """A frozen open_clip model with its eval preprocessing and tokenizer."""

    spec: BackboneSpec
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    precision: str
    weights_sha256: str
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") else -1

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit-norm float32 features on the model's device."""
        with self._autocast():
            f = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Prompts -> [N, D] unit-norm float32 features (on the cpu)."""
        from .text import encode_text_truncated

        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            with self._autocast():
                f = encode_text_truncated(self.model, tokens)  # exact: causal towers stop at the last EOT
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    def fingerprint(self) -> dict[str, str]:
        """The store fingerprint fields that describe this backbone."""
        return {
            "backbone": self.spec.id,
            "weights": self.spec.pretrained if self.spec.kind == "tag" else self.spec.kind,
            "weights_sha256": self.weights_sha256,
            "preprocessing": "open_clip eval transform " + json.dumps(self.preprocess_cfg, sort_keys=True),
            "precision": self.precision,
        }


def load_backbone(
    backbone_id: str,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Build the model through open_clip (weights via open_clip's loaders), freeze it, move it to the device."""
    spec = parse_backbone(backbone_id)
    open_clip = _open_clip()
    dev = pick_device(device)
    prec = pick_precision(precision, dev)
    try:
        if spec.kind == "random":
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: that is the point here
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    model, _, preprocess = open_clip.create_model_and_transforms(spec.model_name, pretrained=None)
            finally:
                root.setLevel(level)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model_name, pretrained=spec.pretrained, cache_dir=cache_dir
            )
        tokenizer = open_clip.get_tokenizer(spec.model_name, cache_dir=cache_dir)
    except BackboneError:
        raise
    except Exception as e:  # network, bad checkpoint: one line with the cause, blaming what can be to blame
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackboneError(_load_failure(spec, msg)) from e
    model.eval().requires_grad_(False)
    sha = state_dict_sha256(model)
    model.to(dev)
    pp = dict(open_clip.get_model_preprocess_cfg(model))
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    return Backbone(spec, model, preprocess, tokenizer, dev, prec, sha, pp)


def _load_failure(spec: BackboneSpec, reason: str) -> str:
    """Why a backbone did not load, in one line. Only downloads can fail for want of a network; a local file or
    folder that open_clip cannot read is not a checkpoint for the architecture, and saying "no network?" then
    sends the user the wrong way."""
    if len(reason) > 160:  # torch's and hub's messages run on with advice that does not apply here
        reason = reason.split(". ")[0]
    head = f"could not load backbone '{spec.id}'"
    if spec.kind == "file":
        return f"{head}: {spec.pretrained} is not an open_clip checkpoint for {spec.arch} ({reason})"
    if spec.kind == "local-dir":
        return f"{head}: {spec.id[len('local-dir:') :]} does not hold an open_clip model ({reason})"
    if spec.kind == "random":
        return f"{head}: {reason}"
    return f"{head}: {reason} (no network? download the weights on a connected machine or pass a local checkpoint)"


def backbone_slug(backbone_id: str) -> str:
    """A folder name for a backbone id (checkpoint paths are shortened to name + hash of the path)."""
    spec_arch, _, rest = backbone_id.partition("/")
    if rest and (os.sep in rest or rest.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        digest = hashlib.sha1(str(Path(rest).expanduser().resolve()).encode()).hexdigest()[:8]
        backbone_id = f"{spec_arch}/{Path(rest).name}-{digest}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id.replace("/", "__"))
    return slug if slug.strip(".") else slug.replace(".", "_") or "_"  # never ".", ".." or "": a folder of its own
