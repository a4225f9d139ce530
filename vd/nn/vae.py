"""AutoencoderKL (the LDM "kl-f8" first stage): images [B, 3, H, W] in [-1, 1] <-> latents [B, 4, H/8, W/8].

Names follow diffusers' AutoencoderKL; the original `kl-f8.pth` names are mapped by `weights_convert`.
The encoder and decoder are separate parts, so a generation-only load never builds the encoder.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vd.nn.config import VAEConfig
from vd.nn.fusable import GroupNorm
from vd.nn.layers import Downsample, ResnetBlock, Upsample

VAE_PARTS = frozenset({"encoder", "decoder"})
EPS = 1e-6  # parity: every norm of the VAE uses 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions of the mid block, with its own GroupNorm and residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, ch, eps=EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(y)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        y = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + y.transpose(1, 2).reshape(b, c, h, w)


def _mid_block(ch: int, groups: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, groups, EPS) for _ in range(2)])
    mid.attentions = nn.ModuleList([VAEAttention(ch, groups)] if attention else [])
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    h = mid.resnets[0](h)
    for attn in mid.attentions:
        h = attn(h)
    return mid.resnets[1](h)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            block = nn.Module()
            prev = chs[max(i - 1, 0)]
            block.resnets = nn.ModuleList(
                [ResnetBlock(prev if j == 0 else ch, ch, None, g, EPS) for j in range(cfg.layers_per_block)])
            if i < len(chs) - 1:
                block.downsamplers = nn.ModuleList([Downsample(ch, padding=0)])
            self.down_blocks.append(block)
        self.mid_block = _mid_block(chs[-1], g, cfg.mid_attention)
        self.conv_norm_out = GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
        h = _run_mid(self.mid_block, h)
        return self.conv_out(self.conv_norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_channels[::-1], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = _mid_block(chs[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            block = nn.Module()
            prev = chs[max(i - 1, 0)]
            block.resnets = nn.ModuleList(
                [ResnetBlock(prev if j == 0 else ch, ch, None, g, EPS) for j in range(cfg.layers_per_block + 1)])
            if i < len(chs) - 1:
                block.upsamplers = nn.ModuleList([Upsample(ch)])
            self.up_blocks.append(block)
        self.conv_norm_out = GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h)
        return self.conv_out(self.conv_norm_out(h, silu=True))


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents (unscaled: multiply samples by `scaling_factor`); draw with
    vd.sampling.encode_latents, which takes one generator or one per image."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig, parts: frozenset[str] = VAE_PARTS):
        super().__init__()
        if not parts <= VAE_PARTS:
            raise ValueError(f"parts must be a subset of {sorted(VAE_PARTS)}, got {sorted(parts)}")
        self.config, self.parts = cfg, frozenset(parts)
        if "encoder" in parts:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.quant_conv else None
        if "decoder" in parts:
            self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                    if cfg.post_quant_conv else None)
            self.decoder = Decoder(cfg)

    def encode(self, x: Tensor) -> LatentDistribution:
        """Images in [-1, 1] -> the posterior over (unscaled) latents."""
        self._require("encoder")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images, roughly in [-1, 1]."""
        self._require("decoder")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this AutoencoderKL was built without its {part} (parts={sorted(self.parts)})")
