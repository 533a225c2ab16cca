"""The model code is plain PyTorch a researcher can lift: torch.func transforms run through whole networks, and
hooks (LoRA / peft wrappers, spectral norm, activation capture) see every layer a forward pass uses.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_blocks.py
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402
import dit  # noqa: E402


def tiny_dit(adaln):
    torch.manual_seed(0)
    model = dit.DiT(16, 4, 3, 32, 2, 2, num_classes=10, learn_sigma=True, adaln=adaln)
    for p in model.parameters():  # zero-initialised gates and heads would hide a broken branch
        torch.nn.init.normal_(p, std=0.1)
    return model.double().eval()


def tiny_unet():
    torch.manual_seed(0)
    net = ddpm.UNet(img_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.1, norm_groups=4,
                    num_classes=10)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.double().eval()


NETS = {f"dit-{v}": (lambda v=v: tiny_dit(v), 16) for v in dit.ADALN_VARIANTS}
NETS["ddpm-unet"] = (tiny_unet, 8)


def inputs(size, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return x, torch.tensor([3.0, 500.0, 999.0][:n], dtype=torch.float64), torch.tensor([1, 7, 10][:n])


@pytest.mark.parametrize("name", list(NETS))
def test_jvp_and_vmap_run_through_the_whole_network(name):
    build, size = NETS[name]
    net = build()
    x, t, y = inputs(size)
    v = torch.randn_like(x)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # the fused CPU attention kernels have no forward-mode rule
        out, tangent = torch.func.jvp(lambda x_: net(x_, t, y), (x,), (v,))
        # float64 central difference: truncation ~eps^2 |f'''| ~ 1e-12, rounding ~1e-16 |f| / eps ~ 1e-10
        eps = 1e-6
        fd = (net(x + eps * v, t, y) - net(x - eps * v, t, y)) / (2 * eps)
        per_sample = torch.func.vmap(lambda a, b, c: net(a[None], b[None], c[None])[0])(x, t, y)
        batched = net(x, t, y)
    torch.testing.assert_close(out, batched, rtol=0, atol=0)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8 * fd.abs().max().item())
    # float64 with batch 1 vs batch 3: the same sums (up to BLAS blocking), ~1e-15 relative
    torch.testing.assert_close(per_sample, batched, rtol=1e-12, atol=1e-12 * batched.abs().max().item())


@pytest.mark.parametrize("name", list(NETS))
def test_forward_hooks_fire_on_every_conv_and_linear(name):
    build, size = NETS[name]
    net = build()
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    fired = set()
    for n, m in layers.items():
        m.register_forward_hook(lambda mod, args, out, n=n: fired.add(n))
    net(*inputs(size))
    assert layers and fired == set(layers), sorted(set(layers) - fired)
    # a hook that changes a layer's output changes the network's output: nothing bypasses the module
    first = next(iter(layers.values()))
    before = net(*inputs(size))
    first.register_forward_hook(lambda mod, args, out: out * 2)
    assert not torch.equal(net(*inputs(size)), before)
