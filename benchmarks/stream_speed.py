"""Streaming-path step times on ViT-B-16 shapes (random init; speed does not depend on the weights).

One run, one machine, the same batch: seconds per training step (forward + backward + SGD step, text encoder
included), each step exactly what the trainer runs (featcache.streaming.trainer's step module), for
  1. layer-mma through the full backbone vs from the partial-backbone cache (vision tokens entering block 5 stored
     in float16, so only vision blocks 5-12 run; the text tokens entering text block 5 computed once per run, so
     only text blocks 5-12 run); goal: the cache at least 2x faster;
  2. maple through the full backbone;
  3. coop from cached image features vs through the (frozen) image encoder.
Every text encoder runs on the prompts cut after their last EOT token (exact; both paths alike). The step
functions are timed in interleaved rounds (best of --repeats each), so slow spells of a shared machine hit them
alike; --breakdown adds the per-block costs that bound the layer-mma ratio.

  python benchmarks/stream_speed.py [--arch ViT-B-16] [--batch-size 8] [--classes 10] [--repeats 3] [--breakdown]
"""

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from featcache.adapters import create_adapter
from featcache.backbones import load_backbone
from featcache.streaming.layer_mma import LayerMMA
from featcache.streaming.maple import MaPLe
from featcache.streaming.partial import vision_tokens
from featcache.streaming.trainer import _StepLoss
from featcache.text import truncated_length

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arch", default="ViT-B-16")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--classes", type=int, default=10)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--breakdown", action="store_true", help="also time one vision block's forward and backward")
args = parser.parse_args()
logging.getLogger().setLevel(logging.ERROR)

bb = load_backbone(f"{args.arch}/random", device="cpu", precision="fp32")
model, B, C = bb.model, args.batch_size, args.classes
images = torch.randn(B, 3, bb.image_size, bb.image_size)
labels = torch.arange(B) % C
names = [f"class{i}" for i in range(C)]
tokens = bb.tokenizer([f"a photo of a {c}." for c in names])  # layer-mma's template; MaPLe's prompt reads the same
ctx = model.positional_embedding.shape[0]
print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {args.arch} random init | batch {B} | "
      f"{C} classes | text on {truncated_length(model, tokens)} of {ctx} positions (EOT truncation)")  # fmt: skip


def timed(*steps) -> list[float]:
    """Best seconds per call of each step, the steps interleaved round by round (one warm-up round first)."""
    best = [float("inf")] * len(steps)
    for r in range(args.repeats + 1):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            if r:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def sgd(params, loss_fn):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


# 1. layer-mma: full backbone vs partial cache (the cached path's first step also computes the run's text prefix)
mma = LayerMMA.for_model(model)
mma.attach(model)
layer = mma.vision_blocks[0]
with torch.no_grad():
    cached = vision_tokens(model, images, layer).half()  # what `featcache extract --cache-layer 4` stores
full_loss, part_loss = _StepLoss(mma, bb, tokens, None), _StepLoss(mma, bb, tokens, layer)
full, part = timed(sgd(mma.parameters(), lambda: full_loss(images, labels)),
                   sgd(mma.parameters(), lambda: part_loss(cached, labels)))  # fmt: skip
n_blocks, n_text = len(model.visual.transformer.resblocks), len(model.transformer.resblocks)
print(
    f"layer-mma  full backbone   {full:7.3f} s/step  ({B / full:6.1f} images/s)  vision 1-{n_blocks}, text 1-{n_text}"
)
print(f"layer-mma  partial cache   {part:7.3f} s/step  ({B / part:6.1f} images/s)  vision {layer + 1}-{n_blocks}, "
      f"text {mma.blocks[0] + 1}-{n_text}  ratio {full / part:.2f}x (goal >= 2x)")  # fmt: skip

if args.breakdown:  # per vision block on the cached tokens' shape
    x = cached.float()
    plain, adapted = model.visual.transformer.resblocks[0], model.visual.transformer.resblocks[layer + 1]

    def no_input_grad() -> None:  # blocks up to the first adapted one: nothing upstream needs a gradient
        plain(x)

    def graph_forward() -> None:
        adapted(x.detach().requires_grad_())

    def forward_backward() -> None:  # the later adapted blocks: the gradient flows back through them to the input
        adapted(x.detach().requires_grad_()).sum().backward()

    f, fg, fb = timed(no_input_grad, graph_forward, forward_backward)
    n_grad = len(mma.vision_blocks) - 1  # blocks the gradient flows back through: all after the first adapted one
    k_full = n_blocks - n_grad
    k_part = k_full - layer
    print(
        f"  vision block without input gradient {f:.3f} s (full blocks 1-{k_full}, cached {layer + 1}-{k_full});"
        f" with: forward {fg:.3f} + backward {fb - fg:.3f} = {fb:.3f} s (blocks {k_full + 1}-{n_blocks})"
    )
    bound = (k_full * f + n_grad * fb) / (k_part * f + n_grad * fb)
    print(
        f"  vision bound: ({k_full} x {f:.3f} + {n_grad} x {fb:.3f}) / ({k_part} x {f:.3f} + {n_grad} x {fb:.3f}) = "
        f"{bound:.2f}x; with a free backward {n_blocks}/{n_blocks - layer} = {n_blocks / (n_blocks - layer):.2f}x"
    )
LayerMMA.detach(model)

# 2. maple
maple = MaPLe.for_model(model, bb.tokenizer)
maple.attach(model)
maple_loss = _StepLoss(maple, bb, tokens, None)
(t_maple,) = timed(sgd(maple.parameters(), lambda: maple_loss(images, labels)))
MaPLe.detach(model)
print(f"maple      full backbone   {t_maple:7.3f} s/step  ({1 / t_maple:6.2f} steps/s)")

# 3. coop: cached image features vs the frozen image encoder in the loop
coop = create_adapter("coop", dim=bb.embed_dim)
coop.bind(bb)  # wraps the token embedding for good: the last use of this model
with torch.no_grad():
    feats = F.normalize(model.encode_image(images), dim=-1)


def encoded() -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(images), dim=-1)


t_cached, t_encoder = timed(
    sgd(coop.parameters(), lambda: F.cross_entropy(coop.score(feats, None, None, names), labels)),
    sgd(coop.parameters(), lambda: F.cross_entropy(coop.score(encoded(), None, None, names), labels)),
)
coop_len = truncated_length(model, coop._tokens[tuple(names)])
print(f"coop       cached features {t_cached:7.3f} s/step  ({1 / t_cached:6.2f} steps/s)  text on {coop_len} positions")
print(f"coop       image encoder   {t_encoder:7.3f} s/step  ({1 / t_encoder:6.2f} steps/s)  "
      f"ratio {t_encoder / t_cached:.2f}x")  # fmt: skip
