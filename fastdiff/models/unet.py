"""The DDPM U-Net (Ho et al. 2020, Appendix B) with the improved-DDPM options
(Nichol & Dhariwal 2021): learned variance, multi-head attention, scale-shift norm and
class labels (with a "no label" row for classifier-free guidance).

Norm+SiLU and attention go through `fastdiff.nn.GroupNormSiLU` / `fastdiff.nn.SelfAttention2d`,
the fused-kernel modules.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.diffusion import GaussianDiffusion
from fastdiff.nn import GroupNormSiLU, SelfAttention2d
from fastdiff.schedule import NoiseSchedule


#: The diffusers-family options of UNet and the values that give fastdiff's own network.
_DEFAULT_OPTIONS: Dict[str, Any] = dict(channels=None, norm_eps=1e-5, flip_sin_to_cos=False, freq_shift=0.0,
                                        downsample_padding=1, center_input_sample=False, null_label=True,
                                        mid_attention=True, mid_attention_norm=True)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": dict(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
    # A few hundred thousand parameters: tests and quick CPU runs.
    "tiny": dict(image_size=32, in_channels=3, model_channels=16, channel_mult=(1, 2, 2),
                 num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, num_groups=8),
    # 1.1M parameters at 16x16, between "tiny" and "small": `fastdiff demo` (recognisable
    # shapes after minutes of 2-core CPU training) and tests/data/shapes16-cfg.safetensors.
    "demo": dict(image_size=16, in_channels=3, model_channels=32, channel_mult=(1, 2, 2),
                 num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, num_groups=8),
    # A couple of million parameters.
    "small": dict(image_size=32, in_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                  num_res_blocks=2, attention_resolutions=(8,), dropout=0.1, num_groups=16),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Eq. 99 (Vaswani et al.): sin(t / 10000^(i/(d/2 - freq_shift))) and cos(...) for i < d/2, laid
    out as [all sines, all cosines] ([cosines, sines] when flip_sin_to_cos; a fixed permutation of
    the interleaved layout, which the following Linear absorbs). freq_shift and flip_sin_to_cos are
    diffusers' names (Ho et al.'s TensorFlow code is freq_shift=1). t: (B,) -> (B, dim) float32."""
    half = dim // 2
    if freq_shift == 0:
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    else:
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block with time-embedding injection (Ho et al.; scale-shift norm from
    Nichol & Dhariwal: the embedding sets (scale, shift) of the second norm, before SiLU)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, num_groups: int,
                 use_scale_shift_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNormSiLU(num_groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = GroupNormSiLU(num_groups, out_ch, eps=eps, act=not use_scale_shift_norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution. padding=0 pads one row and column at the bottom and right
    only (Ho et al.'s TensorFlow "SAME" padding for stride 2; diffusers' downsample_padding=0)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One res block, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: Optional[nn.Module]):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


def _level_widths(image_size: int, model_channels: int, channel_mult: Sequence[int],
                  channels: Optional[Tuple[int, ...]], num_groups: int, downsample_padding: int):
    """(model_channels, channel_mult, widths of the levels), checked: explicit `channels` (the
    diffusers form) or model_channels x channel_mult (fastdiff's)."""
    if channels is not None:
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive widths, got {channels}")
        model_channels, channel_mult = channels[0], (1,) * len(channels)
    widths = channels if channels is not None else tuple(model_channels * m for m in channel_mult)
    if image_size % (2 ** (len(widths) - 1)):
        raise ValueError(f"image_size={image_size} must be divisible by 2**(number of levels - 1)="
                         f"{2 ** (len(widths) - 1)}")
    for width in widths:
        if width % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide every level's width (got {width})")
    if downsample_padding not in (0, 1):
        raise ValueError(f"downsample_padding must be 0 or 1, got {downsample_padding!r}")
    return model_channels, channel_mult, widths


class UNet(nn.Module):
    """The DDPM U-Net: model(x_t, t, y=None) -> eps / x0 / v prediction (and the variance
    channels for a learned variance: 2C outputs, mean first).

    image_size, in_channels: the data (sample_shape = (in_channels, image_size, image_size)).
    model_channels, channel_mult: width of level i is model_channels * channel_mult[i].
    num_res_blocks: per encoder level (the decoder has one more, as Ho et al.).
    attention_resolutions: feature-map sizes (e.g. 16) at which self-attention follows each block.
    num_heads / num_head_channels: attention heads (num_head_channels, when given, wins).
    use_scale_shift_norm: Nichol & Dhariwal's FiLM-style conditioning of the second norm.
    num_classes: class-conditional; y=None or y == num_classes means "no label".
    learn_sigma / diffusion: 2C output channels when learn_sigma or diffusion.learned_variance;
        `diffusion` (a GaussianDiffusion) is carried for fastdiff.sample. Without one the model
        carries Ho et al.'s default: linear schedule, T=1000, eps prediction, and fixed_small
        variance (learned_range, with the hybrid loss, when learn_sigma).

    default_guidance_scale: the classifier-free guidance w `fastdiff.sample(model, y=...)` uses
    when given none; 0 here, set from the training config when a trained model is loaded.

    Options for diffusers' UNet2DModel family (fastdiff.interop.diffusers); their defaults give
    fastdiff's own network, parameter for parameter:
    channels: explicit width per level (diffusers' block_out_channels), instead of
        model_channels * channel_mult; model_channels is then channels[0].
    norm_eps: epsilon of every GroupNorm. flip_sin_to_cos, freq_shift: the time embedding's
        layout and frequencies (see timestep_embedding). downsample_padding: 1, or 0 for
        bottom/right padding (see Downsample). center_input_sample: the network sees 2 x - 1.
    null_label: class-conditional models get an extra "no label" embedding row (y=None, for
        classifier-free guidance); False (diffusers' class embeddings) makes y required.
    mid_attention: self-attention between the two middle res blocks (diffusers' add_attention);
        mid_attention_norm: its GroupNorm (diffusers drops it for scale-shift models unless
        attn_norm_num_groups is set).
    """

    default_guidance_scale: float = 0.0

    def __init__(self, image_size: int = 32, in_channels: int = 3, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_heads: int = 1,
                 num_head_channels: Optional[int] = None, use_scale_shift_norm: bool = False,
                 num_classes: Optional[int] = None, learn_sigma: bool = False, num_groups: int = 32,
                 out_channels: Optional[int] = None, diffusion=None, *, channels: Optional[Sequence[int]] = None,
                 norm_eps: float = 1e-5, flip_sin_to_cos: bool = False, freq_shift: float = 0.0,
                 downsample_padding: int = 1, center_input_sample: bool = False, null_label: bool = True,
                 mid_attention: bool = True, mid_attention_norm: bool = True):
        super().__init__()
        if diffusion is None:
            diffusion = GaussianDiffusion(NoiseSchedule.linear(1000),
                                          variance="learned_range" if learn_sigma else "fixed_small",
                                          loss="hybrid" if learn_sigma else "simple")
        if not isinstance(diffusion, GaussianDiffusion):
            raise TypeError(f"diffusion must be a fastdiff.GaussianDiffusion, got {type(diffusion).__name__}")
        if diffusion.learned_variance:
            learn_sigma = True
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        if channels is not None:
            channels = tuple(int(c) for c in channels)
        model_channels, channel_mult, widths = _level_widths(image_size, model_channels, channel_mult, channels,
                                                             num_groups, downsample_padding)
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), dropout=dropout,
                           num_heads=num_heads, num_head_channels=num_head_channels,
                           use_scale_shift_norm=use_scale_shift_norm, num_classes=num_classes,
                           learn_sigma=learn_sigma, num_groups=num_groups, out_channels=out_channels)
        # the diffusers-family options, recorded only when they differ from fastdiff's network
        # (configs saved before they existed stay what they were)
        extra = dict(channels=channels, norm_eps=float(norm_eps), flip_sin_to_cos=bool(flip_sin_to_cos),
                     freq_shift=float(freq_shift), downsample_padding=downsample_padding,
                     center_input_sample=bool(center_input_sample), null_label=bool(null_label),
                     mid_attention=bool(mid_attention), mid_attention_norm=bool(mid_attention_norm))
        self.config.update({k: v for k, v in extra.items() if v != _DEFAULT_OPTIONS[k]})
        self.sample_shape: Tuple[int, int, int] = (in_channels, image_size, image_size)
        self.diffusion = diffusion
        self.num_classes = num_classes
        self.null_label = bool(null_label)
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), float(freq_shift)
        self.center_input_sample = bool(center_input_sample)
        emb_ch = 4 * model_channels

        def attention(ch: int, norm: bool = True) -> nn.Module:
            attn = SelfAttention2d(ch, num_heads=num_heads, num_groups=num_groups, head_dim=num_head_channels,
                                   eps=norm_eps, norm=norm)
            _zero_init(attn.proj_out)  # Ho et al.: the block starts as the identity
            return attn

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_ch, dropout, num_groups, use_scale_shift_norm, eps=norm_eps)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = (nn.Embedding(num_classes + int(self.null_label), emb_ch)
                            if num_classes is not None else None)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        def attention_at(size: int, width: int) -> Optional[nn.Module]:
            return attention(width) if size in attention_resolutions else None

        skip_chs, ch, size = self._build_encoder(widths, image_size, num_res_blocks, res, attention_at,
                                                 downsample_padding)
        self.mid = _Level(res(ch, ch), attention(ch, mid_attention_norm) if mid_attention else None)
        self.mid2 = res(ch, ch)
        ch = self._build_decoder(widths, size, ch, skip_chs, num_res_blocks, res, attention_at)
        self.norm_out = GroupNormSiLU(num_groups, ch, eps=norm_eps)
        self.conv_out = _zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _build_encoder(self, widths, image_size, num_res_blocks, res, attention_at, downsample_padding):
        """self.down; returns the width of every output the decoder will concatenate, and the
        bottom's width and size."""
        self.down = nn.ModuleList()
        skip_chs = [self.model_channels]
        ch, size = self.model_channels, image_size
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(_Level(res(ch, out), attention_at(size, out)))
                ch = out
                skip_chs.append(ch)
            if level != len(widths) - 1:
                self.down.append(Downsample(ch, downsample_padding))
                skip_chs.append(ch)
                size //= 2
        return skip_chs, ch, size

    def _build_decoder(self, widths, size, ch, skip_chs, num_res_blocks, res, attention_at) -> int:
        """self.up (one more block per level than the encoder, as Ho et al.); returns the top width."""
        self.up = nn.ModuleList()
        for level, out in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_Level(res(ch + skip_chs.pop(), out), attention_at(size, out)))
                ch = out
            if level != 0:
                self.up.append(Upsample(ch))
                size *= 2
        return ch

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNet":
        """A named configuration ("ddpm-cifar10", "tiny", "small"); keyword arguments override it."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t_emb = timestep_embedding(t, self.model_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift)
        emb = self.time_embed(t_emb.to(self.conv_in.weight.dtype))
        if self.label_embed is not None:
            if y is None:
                if not self.null_label:
                    raise ValueError("y is required: this class-conditional UNet has no 'no label' row "
                                     "(null_label=False)")
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("y given to a UNet built without num_classes")
        if self.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
            skips.append(h)
        h = self.mid2(self.mid(h, emb), emb)
        for block in self.up:
            if isinstance(block, _Level):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(self.norm_out(h))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def compile(model: nn.Module, **kwargs) -> nn.Module:  # noqa: A001 - fastdiff.compile, by design
    """torch.compile(model, **kwargs): the fused ops are opaque custom ops, so the U-Net
    compiles without graph breaks (fullgraph=True works)."""
    # Static shapes unless asked: after a first compile at other sizes in the same process,
    # dynamo's automatic dynamic shapes made inductor order the fused ops' layout-dependent
    # output strides symbolically, which it cannot ("cannot determine truth value of
    # Relational"); a new shape recompiles instead.
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)
