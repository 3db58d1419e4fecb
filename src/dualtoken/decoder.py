"""Pixel decoder: post-quant ResNet block, then a taming / RQ-VAE style conv decoder (docs/METHOD.md "Pixel decoder")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


def _norm(channels: int, config: DecoderConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """``nin(x) + conv2(drop(act(norm2(conv1(act(norm1(x)))))))``; ``nin`` is a 1x1 conv when channels change."""

    def __init__(self, in_channels: int, out_channels: int, config: DecoderConfig, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm2 = _norm(out_channels, config)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions, with a residual connection."""

    def __init__(self, channels: int, config: DecoderConfig) -> None:
        super().__init__()
        self.norm = _norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(batch, channels, height * width).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: DecoderConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ConvDecoder(nn.Module):
    """Latent (B, in_channels, h', w') -> image (B, out_channels, h' * 2^(n-1), w' * 2^(n-1)); no tanh, no clamp."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        levels = len(config.channel_mult)
        channels = config.channels * config.channel_mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)  # decides where attention goes, not the tensor size
        self.conv_in = nn.Conv2d(config.in_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, config)
        self.up = nn.ModuleList([UpLevel() for _ in range(levels)])  # up[i]: level i, 0 = full resolution
        for level in reversed(range(levels)):
            out_channels = config.channels * config.channel_mult[level]
            up = self.up[level]
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(channels, out_channels, config))
                channels = out_channels
                if resolution in config.attn_resolutions:
                    up.attn.append(AttnBlock(channels, config))
            if level != 0:
                up.upsample = Upsample(channels)
                resolution *= 2
        self.norm_out = _norm(channels, config)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for index, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[index](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PixelDecoder(nn.Module):
    """Up-projected pixel tokens (B, h*w, W) on grid (h, w) -> image: reshape, optional resize, post-quant block, decoder."""

    def __init__(self, width: int, grid: tuple[int, int], config: DecoderConfig) -> None:
        super().__init__()
        self.grid = grid
        self.latent_size = tuple(config.latent_size) if config.latent_size is not None else None
        self.post_quant_conv = ResnetBlock(width, config.in_channels, config, kernel_size=1)
        self.decoder = ConvDecoder(config)

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.decoder.conv_out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, width = tokens.shape
        latent = tokens.reshape(batch, *self.grid, width).permute(0, 3, 1, 2)  # (B, W, h, w)
        if self.latent_size is not None:
            latent = F.interpolate(latent, size=self.latent_size, mode="bilinear", align_corners=False)
        return self.decoder(self.post_quant_conv(latent))
