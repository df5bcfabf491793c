"""mm-attn speed: the exact fast path against naive attention over the full [C+1]-token sequence.

Times one training step (forward + backward of cross-entropy on random labels) at ImageNet size: C = 1000 classes,
D = 512, B = 256 images, for both masks. The naive version is the straightforward implementation (as in the
tests' oracle): it builds the [C+1, B, D] sequence and runs the module's own nn.MultiheadAttention with the
reference masks, materialising B*heads*(C+1)^2 scores and [B, C, D] tensors. Weights are the default init with
the attention sharpened (speed does not depend on the values); both run on the same module. Goal: >= 10x.

  python benchmarks/mm_attn_speed.py
  python benchmarks/mm_attn_speed.py --classes 100 --batch-size 64 --repeats 5
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from featcache.adapters import create_adapter
from featcache.adapters.mm_attn import MMAttn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--classes", type=int, default=1000)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation; the best is reported")
args = parser.parse_args()


def naive(model: MMAttn, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The straightforward forward: full sequence, full attention with the reference mask, D-wide outputs."""
    cfg, lam = model.config, model.config.lam
    B, C = images.shape[0], text.shape[0]
    seq = torch.cat([text[:, None].expand(C, B, -1), images[None]], 0)  # [C+1, B, D]
    x = model.down(seq)
    cross = torch.zeros(C + 1, C + 1, dtype=torch.bool)
    cross[:C, C] = cross[C, :C] = True
    mask = cross.to(x.dtype) if cfg.mask == "bias" else ~cross  # float 0/1 is added; bool True blocks
    o = F.normalize(model.up(model.attn(x, x, x, attn_mask=mask, need_weights=False)[0]), dim=-1)
    vp = F.normalize((1 - lam) * images + lam * o[C], dim=-1)
    tp = F.normalize((1 - lam) * text[:, None] + lam * o[:C], dim=-1)  # [C, B, D]
    return cfg.logit_scale * torch.einsum("bd,cbd->bc", vp, tp)


def step(fn, model: MMAttn, v: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = fn(v, t)
    F.cross_entropy(logits, y).backward()
    return time.perf_counter() - t0, logits.detach()


B, C, D = args.batch_size, args.classes, args.dim
print(
    f"torch {torch.__version__} | threads {torch.get_num_threads()} | cpus {os.cpu_count()} | B {B} C {C} D {D} | "
    f"load avg {os.getloadavg()[0]:.1f} (other processes slow both timings)"
)
g = torch.Generator().manual_seed(0)
v = F.normalize(torch.randn(B, D, generator=g), dim=-1)
t = F.normalize(torch.randn(C, D, generator=g), dim=-1)
y = torch.randint(0, C, (B,), generator=g)
for mask in ("bias", "hard"):
    torch.manual_seed(0)
    model = create_adapter("mm-attn", dim=D, mask=mask)
    with torch.no_grad():
        model.attn.in_proj_weight.mul_(3.0)
    times, grads = {}, {}
    for name, fn in (("fast", model), ("naive", lambda a, b, m=model: naive(m, a, b))):
        step(fn, model, v, t, y)  # warm-up
        runs = [step(fn, model, v, t, y) for _ in range(args.repeats)]
        times[name] = [r[0] for r in runs]
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if name == "fast":
            fast_logits = runs[-1][1]
        else:
            naive_logits = runs[-1][1]
    err = (fast_logits - naive_logits).abs().max().item()
    gerr = ((grads["fast"] - grads["naive"]).norm() / grads["naive"].norm()).item()
    assert err < 1e-3 and gerr < 1e-3, (err, gerr)
    tf, tn = min(times["fast"]), min(times["naive"])
    print(
        f"mask {mask:4s}  fast {tf:.3f} s/step  naive {tn:.3f} s/step  ratio {tn / tf:6.1f}x  "
        f"(goal >= 10x: {'met' if tn / tf >= 10 else 'NOT met'})  | max |logit diff| {err:.1e}, "
        f"grad rel diff {gerr:.1e}  | runs fast {', '.join(f'{x:.3f}' for x in times['fast'])}; "
        f"naive {', '.join(f'{x:.2f}' for x in times['naive'])}"
    )
