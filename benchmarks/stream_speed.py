"""Streaming-path step times on ViT-B-16 shapes (random init; speed does not depend on the weights).

One run, one machine, the same batch: seconds per training step (forward + backward + SGD step, text encoder
included) for
  1. layer-mma through the full backbone vs from the partial-backbone cache (tokens entering block 5, so only
     blocks 5-12 run); goal: the cache at least 2x faster;
  2. maple through the full backbone;
  3. coop from cached image features vs through the (frozen) image encoder.

  python benchmarks/stream_speed.py [--arch ViT-B-16] [--batch-size 8] [--classes 10] [--repeats 3]
"""

import argparse
import logging
import time

import open_clip
import torch
import torch.nn.functional as F

from featcache.adapters import create_adapter
from featcache.backbones import load_backbone
from featcache.streaming.layer_mma import LayerMMA
from featcache.streaming.maple import MaPLe
from featcache.streaming.partial import encode_from_tokens, vision_tokens

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arch", default="ViT-B-16")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--classes", type=int, default=10)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
logging.getLogger().setLevel(logging.ERROR)

bb = load_backbone(f"{args.arch}/random", device="cpu", precision="fp32")
model, B, C = bb.model, args.batch_size, args.classes
images = torch.randn(B, 3, bb.image_size, bb.image_size)
labels = torch.arange(B) % C
tokens = bb.tokenizer([f"a photo of a class{i}." for i in range(C)])
scale = model.logit_scale.exp().detach()
print(
    f"torch {torch.__version__} | {torch.get_num_threads()} threads | {args.arch} random init | batch {B} | {C} classes"
)


def timed(step) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def sgd_step(params, image_features) -> None:
    opt = sgd_step.opts.setdefault(id(params), torch.optim.SGD(params, lr=1e-3, momentum=0.9))
    t = F.normalize(model.encode_text(tokens), dim=-1)
    loss = F.cross_entropy(scale * F.normalize(image_features(), dim=-1) @ t.t(), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


sgd_step.opts = {}

# 1. layer-mma: full backbone vs partial cache
mma = LayerMMA.for_model(model)
mma.attach(model)
layer = mma.config.first_block - 1
with torch.no_grad():
    cached = vision_tokens(model, images, layer).half()  # what `featcache extract --cache-layer` stores
p_mma = list(mma.parameters())
full = timed(lambda: sgd_step(p_mma, lambda: model.encode_image(images)))
part = timed(lambda: sgd_step(p_mma, lambda: encode_from_tokens(model, cached.float(), layer)))
LayerMMA.detach(model)
print(f"layer-mma  full backbone   {full:7.3f} s/step  ({B / full:6.1f} images/s)")
print(
    f"layer-mma  partial cache   {part:7.3f} s/step  ({B / part:6.1f} images/s)  ratio {full / part:.2f}x (goal >= 2x)"
)

# 2. maple
maple = MaPLe.for_model(model, open_clip.get_tokenizer(args.arch))
maple.attach(model)
p_maple = list(maple.parameters())
t_maple = timed(lambda: sgd_step(p_maple, lambda: model.encode_image(images)))
MaPLe.detach(model)
print(f"maple      full backbone   {t_maple:7.3f} s/step  ({1 / t_maple:6.2f} steps/s)")

# 3. coop: cached image features vs the frozen image encoder in the loop
coop = create_adapter("coop", dim=bb.embed_dim)
coop.bind(bb)
names = [f"class{i}" for i in range(C)]
with torch.no_grad():
    feats = F.normalize(model.encode_image(images), dim=-1)
opt = torch.optim.SGD(coop.parameters(), lr=2e-3, momentum=0.9)


def coop_step(image_features) -> None:
    loss = F.cross_entropy(coop.score(image_features(), None, None, names), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def encoded() -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(images), dim=-1)


t_cached = timed(lambda: coop_step(lambda: feats))
t_encoder = timed(lambda: coop_step(encoded))
print(f"coop       cached features {t_cached:7.3f} s/step  ({1 / t_cached:6.2f} steps/s)")
ratio = t_encoder / t_cached
print(f"coop       image encoder   {t_encoder:7.3f} s/step  ({1 / t_encoder:6.2f} steps/s)  ratio {ratio:.2f}x")
