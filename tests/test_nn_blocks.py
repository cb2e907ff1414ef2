"""fastdiff.nn blocks against plain-torch formulations, and torch.compile(fullgraph=True)
of a block built on both fused ops."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import GroupNormSiLU, SelfAttention2d
from fastdiff.ops import _backend, use_backend

native = pytest.mark.skipif(_backend.native_lib is None, reason="fastdiff._C not built")


def _attention_block_torch(block: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The DDPM attention block in plain torch ops (nn.GroupNorm, softmax), float64."""
    x = x.double()
    b, c, h, w = x.shape
    p = {k: t.detach().double() for k, t in block.state_dict().items()}
    hn = F.group_norm(x, block.norm.num_groups, p["norm.weight"], p["norm.bias"], block.norm.eps)
    tokens = hn.reshape(b, c, h * w).transpose(1, 2)
    q, k, v = F.linear(tokens, p["qkv.weight"], p["qkv.bias"]).chunk(3, dim=-1)
    heads, d = block.num_heads, c // block.num_heads
    q, k, v = (t.reshape(b, h * w, heads, d).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    out = F.linear(attn.transpose(1, 2).reshape(b, h * w, c), p["proj_out.weight"], p["proj_out.bias"])
    return x + out.transpose(1, 2).reshape(b, c, h, w)


def _randomise(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.3)


# --------------------------------------------------------------------------- GroupNormSiLU
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native)])
@pytest.mark.parametrize("act", [True, False])
def test_group_norm_silu_module_matches_nn_group_norm(backend, act):
    torch.manual_seed(0)
    ours = GroupNormSiLU(4, 16, act=act)
    theirs = nn.GroupNorm(4, 16)
    _randomise(theirs)
    ours.load_state_dict(theirs.state_dict())  # same parameter names
    x = torch.randn(3, 16, 7, 5, requires_grad=True)
    with use_backend(backend):
        y = ours(x)
    expected = F.silu(theirs(x)) if act else theirs(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    g_ours = torch.autograd.grad(y, [x, ours.weight, ours.bias], grad)
    g_theirs = torch.autograd.grad(expected, [x, theirs.weight, theirs.bias], grad)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_silu_module_without_affine_and_repr():
    m = GroupNormSiLU(2, 8, affine=False)
    assert m.weight is None and m.bias is None and len(list(m.parameters())) == 0
    assert repr(m) == "GroupNormSiLU(2, 8, eps=1e-05, affine=False, act=True)"
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(m(x), F.silu(F.group_norm(x, 2)), rtol=1e-5, atol=1e-5)


def test_group_norm_silu_module_bad_arguments():
    with pytest.raises(ValueError, match="num_groups must divide num_channels=6, got 4"):
        GroupNormSiLU(4, 6)
    with pytest.raises(TypeError, match="num_channels must be an int"):
        GroupNormSiLU(2, 6.0)


# --------------------------------------------------------------------------- SelfAttention2d
def test_attention_block_starts_as_identity():
    block = SelfAttention2d(32, num_heads=2, num_groups=8)
    x = torch.randn(2, 32, 5, 6)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native)])
@pytest.mark.parametrize("heads,head_dim", [(1, None), (4, None), (1, 8)], ids=["1head", "4heads", "head_dim8"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_attention_block_matches_torch(backend, heads, head_dim, channels_last):
    block = SelfAttention2d(32, num_heads=heads, num_groups=8, head_dim=head_dim)
    _randomise(block, seed=1)
    x = torch.randn(2, 32, 7, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with use_backend(backend):
        y = block(x)
    expected = _attention_block_torch(block, x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    # gradients against autograd of the plain-torch block (inputs and every parameter)
    grad = torch.randn(y.shape, dtype=torch.float64)
    with use_backend(backend):
        g_ours = torch.autograd.grad(block(x), [x] + list(block.parameters()), grad.float())
    xd = x.detach().double().requires_grad_(True)
    block64 = SelfAttention2d(32, num_heads=heads, num_groups=8, head_dim=head_dim).double()
    block64.load_state_dict(block.state_dict())
    with use_backend("reference"):
        g_ref = torch.autograd.grad(block64(xd), [xd] + list(block64.parameters()), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


def test_attention_block_head_dim_sets_heads_and_bad_arguments():
    assert SelfAttention2d(64, head_dim=16).num_heads == 4
    with pytest.raises(ValueError, match="num_heads must divide channels=32, got 3"):
        SelfAttention2d(32, num_heads=3)
    with pytest.raises(ValueError, match="head_dim must divide channels=32, got 12"):
        SelfAttention2d(32, head_dim=12)
    with pytest.raises(ValueError, match="num_groups must divide num_channels=32"):
        SelfAttention2d(32, num_groups=5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 32, H, W\)"):
        SelfAttention2d(32, num_groups=8)(torch.randn(2, 16, 4, 4))
    assert "num_heads=2, head_dim=16" in repr(SelfAttention2d(32, num_heads=2, num_groups=8))


# --------------------------------------------------------------------------- torch.compile
@native
def test_compile_fullgraph_matches_eager():
    """One small block using both ops: compiles without graph breaks, matches eager, and
    its backward runs through the registered autograd."""
    torch.manual_seed(0)
    block = nn.Sequential(GroupNormSiLU(4, 16), SelfAttention2d(16, num_heads=2, num_groups=4))
    _randomise(block, seed=2)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    with use_backend("native"):
        eager = block(x)
        g_eager = torch.autograd.grad(eager.square().sum(), x)[0]
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)
        g_out = torch.autograd.grad(out.square().sum(), x)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_out, g_eager, rtol=1e-4, atol=1e-4)
