"""Building blocks of the diffusion U-Net, on the fused ops (fastdiff.ops).

`GroupNormSiLU` is the "normalise, then activate" pair that opens every residual block;
`SelfAttention2d` is the DDPM attention block (Ho et al. 2020, the 16x16 resolution):
GroupNorm, one q/k/v projection, attention over the H*W positions, an output projection
initialised to zero (the block starts as the identity), and the residual.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdiff.ops import attention, group_norm_silu
from fastdiff.ops.attention import MAX_HEAD_DIM


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class GroupNormSiLU(nn.Module):
    """silu(GroupNorm(x)) in one fused pass; `act=False` gives plain nn.GroupNorm.

    Parameters are named `weight` and `bias` as in nn.GroupNorm, so state dicts carry over.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: bool = True) -> None:
        super().__init__()
        _check_positive_int("num_groups", num_groups)
        _check_positive_int("num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups must divide num_channels={num_channels}, got {num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = float(eps)
        self.affine = bool(affine)
        self.act = bool(act)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.act)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"act={self.act}")


class SelfAttention2d(nn.Module):
    """x + proj_out(attention(q, k, v)), q, k, v = qkv(GroupNorm(x)) over the H*W positions.

    `head_dim`, when given, sets the number of heads to channels // head_dim (it must
    divide channels) and overrides `num_heads`. The projections act on each position
    (1x1 convolutions written as nn.Linear on the token axis).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, head_dim: int = None,
                 eps: float = 1e-5, norm: bool = True) -> None:
        super().__init__()
        _check_positive_int("channels", channels)
        _check_positive_int("num_heads", num_heads)
        if head_dim is not None:
            _check_positive_int("head_dim", head_dim)
            if channels % head_dim != 0:
                raise ValueError(f"head_dim must divide channels={channels}, got {head_dim}")
            num_heads = channels // head_dim
        if channels % num_heads != 0:
            raise ValueError(f"num_heads must divide channels={channels}, got {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        # norm=False: no GroupNorm before the projections (diffusers' scale-shift middle block)
        self.norm = GroupNormSiLU(num_groups, channels, eps=eps, act=False) if norm else nn.Identity()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # DDPM: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C), a view for channels_last
        qkv = self.qkv(tokens).view(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, head_dim), head dim dense
        if self.head_dim <= MAX_HEAD_DIM:
            out = attention(q, k, v)
        else:  # wider heads than the fused kernel serves (e.g. one head of 512 channels): torch's SDPA
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h * w, c)
        out = self.proj_out(out)  # (B, L, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"{self.channels}, num_heads={self.num_heads}, head_dim={self.head_dim}"
