"""AdamW choice: torch's fused kernel where every parameter allows it, the default otherwise."""

import torch

from mgll.encoder.config import load_config
from mgll.encoder.trainer import build_optimizer
from mgll.optim import adamw, fused_supported


def _layer():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def test_fused_supported_by_dtype_and_device():
    cpu = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))]
    assert fused_supported(cpu)
    assert fused_supported([{"params": cpu[:1]}, {"params": cpu[1:]}])
    assert not fused_supported([torch.zeros(3, device="meta")])
    assert not fused_supported([torch.zeros(3, dtype=torch.int64)])
    assert not fused_supported([])


def test_adamw_fused_on_cpu_and_explicit_choice_wins():
    params = list(_layer().parameters())
    assert adamw(params, lr=1e-3).defaults["fused"] is True
    assert not adamw(params, lr=1e-3, fused=False).defaults["fused"]
    assert not adamw(params, lr=1e-3, foreach=True).defaults["fused"]


def test_fused_steps_match_the_default_kernel():
    """Same updates as torch's single-tensor AdamW (to float rounding), with weight decay groups."""
    a, b = _layer(), _layer()
    groups = lambda m: [  # noqa: E731
        {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0},
        {"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
    ]
    opt_a = adamw(groups(a), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(a.parameters()), next(_layer().parameters()))  # it did train


def test_trainer_optimizer_is_fused_with_open_clip_decay_groups():
    model = _layer()
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    cfg = load_config(overrides=["train.weight_decay=0.2"])
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert (
        len(decay["params"]) == 2 and len(no_decay["params"]) == 5
    )  # 2 weights; 2 biases, 2 LN, logit scale
    assert not build_optimizer(model, cfg, fused=False).defaults["fused"]
