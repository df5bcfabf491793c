"""The shared training loop's optimiser: Adam(W) as PyTorch's fused kernel, the same update as the loop."""

import pytest
import torch

from featcache.adapters import adapter_config
from featcache.train import _optimizer


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_optimizer_is_the_per_parameter_update(kind):
    cfg = adapter_config("clip-adapter", optimizer=kind, lr=1e-2, weight_decay=1e-2, eps=1e-4)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(300, 7, generator=g), torch.randn(5, generator=g)]
    fused = [torch.nn.Parameter(p.clone()) for p in start]
    loop = [torch.nn.Parameter(p.clone()) for p in start]
    opt = _optimizer(cfg, fused)
    assert opt.defaults["fused"] is True
    Ref = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    ref = Ref(loop, lr=1e-2, weight_decay=1e-2, eps=1e-4, foreach=False)
    for _ in range(25):
        grads = [torch.randn(p.shape, generator=g) for p in start]
        for ps, o in ((fused, opt), (loop, ref)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float rounding only
