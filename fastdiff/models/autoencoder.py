"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022, §3 and
Appendix G): an encoder of residual blocks that halves the resolution between levels, a mid level
with one self-attention, and a diagonal Gaussian posterior q(z | x) = N(mean, diag(std^2)); a
mirrored decoder maps z back to pixels. The KL term to N(0, I) (weight ~1e-6 in LDM) only keeps the
latent scale in check; `scaling_factor` (1 / std of the latents over data) makes the scaled latents
roughly unit-variance for the diffusion model that runs on them.

The module tree and parameter names are those of diffusers' `AutoencoderKL`
(encoder.down_blocks.0.resnets.0.norm1.weight, encoder.mid_block.attentions.0.to_q.weight, ...), so
a diffusers state dict loads with `load_state_dict(strict=True)` and no rename table. The
constructor takes diffusers' config fields under the same names. Norm+SiLU runs through
`fastdiff.nn.GroupNormSiLU` and the attention through `fastdiff.ops.attention` (the fused ops).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import GroupNormSiLU
from fastdiff.ops import attention
from fastdiff.ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

#: diffusers' AutoencoderKL defaults for the fields this class reads.
AUTOENCODER_DEFAULTS: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)

_EPS = 1e-6  # every GroupNorm of the LDM autoencoder (diffusers' resnet_eps)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2*latent_channels output (mean first).

    logvar is clamped to [-30, 20] as in LDM (keeps exp() finite for an untrained encoder)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (reparameterisation, Kingma & Welling)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """x + conv2(silu(gn(conv1(silu(gn(x)))))), with a 1x1 conv on the skip when the width changes.
    No time embedding: the autoencoder is not conditioned on t."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch, eps=_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNormSiLU(groups, out_ch, eps=_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """One-head self-attention over the H*W positions with a residual (LDM's mid-level AttnBlock).

    Separate to_q/to_k/to_v projections and to_out.0, as diffusers names them. Heads wider than the
    fused kernel serves (SD's 512 channels) go through torch's SDPA."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.channels = channels
        self.group_norm = GroupNormSiLU(groups, channels, eps=_EPS, act=False)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Identity()])  # [proj, dropout slot]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, L, C)
        if MIN_HEAD_DIM <= c <= MAX_HEAD_DIM:
            out = attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](out.squeeze(1))  # (B, L, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class _Resample(nn.Module):
    """Downsample: zero-pad right/bottom by 1, 3x3 conv stride 2 (LDM's asymmetric padding).
    Upsample: nearest x2, 3x3 conv. The conv is named `conv` as in diffusers."""

    def __init__(self, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `num_layers` ResnetBlocks, then an optional down- or upsampler."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, resample: Optional[str]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([_Resample(out_ch, down=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([_Resample(out_ch, down=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = resample(x)
        return x


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], layers: int, groups: int,
                 mid_attention: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            _Level(widths[max(i - 1, 0)], w, layers, groups, None if i == last else "down") for i, w in enumerate(widths))
        self.mid_block = _MidBlock(widths[-1], groups, mid_attention)
        self.conv_norm_out = GroupNormSiLU(groups, widths[-1], eps=_EPS)  # diffusers' conv_act (SiLU) fused in
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], layers: int, groups: int,
                 mid_attention: bool) -> None:
        super().__init__()
        rev = list(reversed(widths))
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = _MidBlock(rev[0], groups, mid_attention)
        last = len(rev) - 1
        self.up_blocks = nn.ModuleList(
            _Level(rev[max(i - 1, 0)], w, layers + 1, groups, None if i == last else "up") for i, w in enumerate(rev))
        self.conv_norm_out = GroupNormSiLU(groups, widths[0], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(self.conv_norm_out(x))


def _check_config(cfg: Dict[str, Any]) -> None:
    """Reject any value this class would not compute as diffusers does, naming the field."""
    widths = cfg["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ValueError(f"block_out_channels must be a non-empty sequence of ints, got {widths!r}")
    for w in widths:
        _positive_int("block_out_channels[i]", w)
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        _positive_int(name, cfg[name])
    groups = cfg["norm_num_groups"]
    bad = [w for w in widths if w % groups]
    if bad:
        raise ValueError(f"norm_num_groups={groups} must divide every block_out_channels entry, got {list(widths)}")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"act_fn must be 'silu' (the fused GroupNorm+SiLU), got {cfg['act_fn']!r}")
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg[name])
        if len(types) != len(widths) or any(t != allowed for t in types):
            raise ValueError(f"{name} must be {len(widths)} x {allowed!r} (one per block_out_channels entry), "
                             f"got {types!r}")


class AutoencoderKL(nn.Module):
    """Rombach et al.'s KL autoencoder; diffusers' `AutoencoderKL` config fields and parameter names.

    The downsampling factor is f = 2^(len(block_out_channels) - 1): an image (B, in_channels, H, W)
    has latents (B, latent_channels, H/f, W/f). `encode(x)` returns the posterior (a
    `DiagonalGaussian`: `.mean`, `.std`, `.sample(generator)`), `decode(z)` the image;
    `forward(x)` decodes the posterior mean (or a sample with sample_posterior=True).
    `scaling_factor` multiplies latents before the diffusion model sees them (LDM §4.3.2).
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        unknown = sorted(set(config) - set(AUTOENCODER_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config field(s) {unknown}; known: {sorted(AUTOENCODER_DEFAULTS)}")
        cfg = dict(AUTOENCODER_DEFAULTS, **config)
        widths = cfg["block_out_channels"]
        n_levels = len(widths) if isinstance(widths, (list, tuple)) else 0
        for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if name not in config:  # one block per level unless given
                cfg[name] = (block,) * n_levels
        _check_config(cfg)
        cfg["block_out_channels"] = tuple(cfg["block_out_channels"])
        cfg["down_block_types"] = tuple(cfg["down_block_types"])
        cfg["up_block_types"] = tuple(cfg["up_block_types"])
        self.config = cfg
        widths, layers, groups = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"]
        latent, attn = cfg["latent_channels"], cfg["mid_block_add_attention"]
        self.in_channels, self.latent_channels = cfg["in_channels"], latent
        self.downsampling_factor = 2 ** (len(widths) - 1)
        self.scaling_factor = float(cfg["scaling_factor"])
        self.shift_factor = cfg["shift_factor"]
        self.encoder = Encoder(cfg["in_channels"], 2 * latent, widths, layers, groups, attn)  # mean and logvar
        self.decoder = Decoder(latent, cfg["out_channels"], widths, layers, groups, attn)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg["use_post_quant_conv"] else None

    def _check(self, name: str, x: torch.Tensor, channels: int, multiple: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        h, w = x.shape[2:]
        if h % multiple or w % multiple:
            raise ValueError(f"{name}'s height and width must be divisible by the downsampling factor "
                             f"{self.downsampling_factor}, got {h}x{w}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for images x: (B, in_channels, H, W), H and W divisible by the factor f."""
        self._check("x", x, self.in_channels, self.downsampling_factor)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_channels, H*f, W*f) from latents z: (B, latent_channels, H, W) (unscaled)."""
        self._check("z", z, self.latent_channels, 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def extra_repr(self) -> str:
        return (f"f={self.downsampling_factor}, latent_channels={self.latent_channels}, "
                f"scaling_factor={self.scaling_factor}")


# --------------------------------------------------------------------------- diffusers folder files
#: The two files of a diffusers AutoencoderKL folder, and the format version written.
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def diffusers_folder_files(model: AutoencoderKL, dtype: torch.dtype = torch.float32,
                           extra: Optional[Dict[str, Any]] = None) -> Dict[str, bytes]:
    """The bytes of `model` as a diffusers AutoencoderKL folder: {config.json, weights}. The config
    carries the model's current `scaling_factor` (it may have been set from data after
    construction); `extra` goes under "_fastdiff", a key diffusers ignores (it skips names with a
    leading underscore). Lives here, below the training layer, so that a training run can export
    without reaching up to fastdiff.interop."""
    import json

    from safetensors.torch import save as st_save

    config: Dict[str, Any] = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()
                   if k in AUTOENCODER_DEFAULTS})
    config["scaling_factor"] = float(model.scaling_factor)
    if extra:
        config["_fastdiff"] = extra
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in model.state_dict().items()}
    return {DIFFUSERS_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
            DIFFUSERS_WEIGHTS: st_save(tensors, metadata={"format": "pt"})}


# --------------------------------------------------------------------------- discriminator
class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017, the discriminator of LDM's autoencoder training): strided
    4x4 convolutions with GroupNorm and LeakyReLU(0.2), ending in a 1-channel map of logits, one per
    overlapping patch (receptive field about 2^(layers+2) pixels). GroupNorm instead of pix2pix's
    BatchNorm: the output of one image does not depend on the rest of its batch.

    forward(x): (B, in_channels, H, W) -> (B, 1, H', W') logits (real > 0)."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 2, groups: int = 8) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("channels", channels)
        _positive_int("layers", layers)
        self.config = dict(in_channels=in_channels, channels=channels, layers=layers, groups=groups)
        mods = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * 2 ** min(i, 3)
            stride = 2 if i < layers else 1  # the last block keeps the resolution (pix2pix's n_layers scheme)
            if nxt % groups:
                raise ValueError(f"groups={groups} must divide the discriminator widths, got {nxt}")
            mods += [nn.Conv2d(width, nxt, 4, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, nxt),
                     nn.LeakyReLU(0.2)]
            width = nxt
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
