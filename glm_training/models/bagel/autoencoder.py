"""FLUX's autoencoder, with the parameter names of the official `ae.safetensors`.

Layout facts from the official BAGEL repository (`modeling/autoencoder.py`, itself from
black-forest-labs/flux): an encoder `conv_in -> down[i].block[j] (+ down[i].downsample) ->
mid.block_1 / mid.attn_1 / mid.block_2 -> norm_out -> conv_out` producing mean and log-variance
(2 * z_channels), a mirrored decoder with `num_res_blocks + 1` blocks per level and
`up[i].upsample`, GroupNorm(32 groups, eps 1e-6), swish, downsampling with a (0, 1, 0, 1) zero
pad and a stride-2 3x3 conv, nearest 2x upsampling, and latents normalised as
`scale_factor * (z - shift_factor)`. BAGEL's `encode` samples the posterior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_training.models.bagel.config import AEConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), an empty `attn` list, and a resampler."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample_name is not None:
            self.add_module(resample_name, resample)


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: AEConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, factor in enumerate(mult):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * factor))
                block_in = ch * factor
            last = level == len(mult) - 1
            self.down.append(_Level(blocks, None if last else "downsample", None if last else Downsample(block_in)))
        self.mid = _Middle(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: AEConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in)
        levels: list[nn.Module] = []
        for level in reversed(range(len(mult))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[level]))
                block_in = ch * mult[level]
            first = level == 0
            levels.insert(0, _Level(blocks, None if first else "upsample", None if first else Upsample(block_in)))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoEncoder(nn.Module):
    """Images in [-1, 1] <-> normalised latents (z_channels, H / downsample, W / downsample)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior sample (BAGEL's default) or mean, normalised by scale and shift."""
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scale_factor + self.config.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))
