"""The noisy classifier of classifier guidance (Dhariwal & Nichol 2021): the U-Net's
encoder half, conditioned on the timestep, with a pooled linear head, trained on x_t.

    classifier(x_t, t) -> logits (B, num_classes)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from fastdiff.models.unet import Downsample, GroupNormSiLU, ResBlock, SelfAttention2d, _Level, timestep_embedding

CLASSIFIER_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(image_size=32, in_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(8,), num_groups=8),
    "small": dict(image_size=32, in_channels=3, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_groups=8),
}


class NoisyClassifier(nn.Module):
    """Time-conditioned classifier of noised images: p(y | x_t, t)."""

    def __init__(self, num_classes: int, image_size: int = 32, in_channels: int = 3, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (8,), dropout: float = 0.0, num_groups: int = 8,
                 num_heads: int = 1):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        for m in channel_mult:
            if (model_channels * m) % num_groups:
                raise ValueError(f"num_groups={num_groups} must divide every width model_channels*mult "
                                 f"(got {model_channels * m})")
        self.config = dict(num_classes=num_classes, image_size=image_size, in_channels=in_channels,
                           model_channels=model_channels, channel_mult=tuple(channel_mult),
                           num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions),
                           dropout=dropout, num_groups=num_groups, num_heads=num_heads)
        self.num_classes = num_classes
        self.model_channels = model_channels
        self.sample_shape = (in_channels, image_size, image_size)
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch, size = model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = model_channels * mult
                attn = SelfAttention2d(out, num_heads=num_heads, num_groups=num_groups) \
                    if size in attention_resolutions else None
                self.down.append(_Level(ResBlock(ch, out, emb_ch, dropout, num_groups), attn))
                ch = out
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                size //= 2
        self.mid = ResBlock(ch, ch, emb_ch, dropout, num_groups)
        self.norm_out = GroupNormSiLU(num_groups, ch)
        self.head = nn.Linear(ch, num_classes)

    @classmethod
    def preset(cls, name: str, num_classes: int, **overrides) -> "NoisyClassifier":
        if name not in CLASSIFIER_PRESETS:
            raise ValueError(f"preset must be one of {tuple(CLASSIFIER_PRESETS)}, got {name!r}")
        return cls(num_classes=num_classes, **{**CLASSIFIER_PRESETS[name], **overrides})

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.conv_in.weight.dtype))
        h = self.conv_in(x)
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
        h = self.norm_out(self.mid(h, emb))
        return self.head(h.mean(dim=(2, 3)))  # global average pool, then the class logits
