"""Shared test helpers: tiny diffusers configs, full re-randomisation, comparisons, seeded inputs."""

import math
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
GOLDEN = DATA / "golden"
REPO = TESTS.parent

# Two structurally different tiny image UNets (diffusers config.json dicts). A is VD's shape in miniature;
# B changes every knob our config maps: three levels, uneven attention pattern, per-level heads and context
# widths, two layers per block, deeper transformers, linear projections, sin-first embedding, a freq shift,
# a mid-block scale factor and a 1-pixel downsample padding.
TINY_UNET_A = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=16, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
TINY_UNET_B = dict(
    sample_size=8, in_channels=3, out_channels=5, block_out_channels=[16, 24, 32], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 3, 4], cross_attention_dim=[12, 16, 20], transformer_layers_per_block=[2, 1, 2],
    norm_num_groups=4, use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1,
    mid_block_scale_factor=1.5, norm_eps=1e-4, time_embedding_dim=48,
)
# Options VD leaves at their defaults; the reference's cross-attention mid block ignores only_cross_attention.
TINY_UNET_C = dict(
    sample_size=8, in_channels=2, out_channels=3, block_out_channels=[16, 24], layers_per_block=[1, 2],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4], cross_attention_dim=12,
    norm_num_groups=4, only_cross_attention=True, upcast_attention=True, conv_in_kernel=1, conv_out_kernel=5,
    center_input_sample=True, downsample_padding=0,
)
TINY_UNET_NO_MID = dict(TINY_UNET_A, mid_block_type=None, only_cross_attention=[False, True])


def flat_config(image_config: dict, in_features: int | list[int]) -> dict:
    """The text UNet matching an image UNet: same levels and context layers, flat blocks."""
    d = dict(image_config)
    d["down_block_types"] = [t.replace("2D", "Flat") for t in d["down_block_types"]]
    d["up_block_types"] = [t.replace("2D", "Flat") for t in d["up_block_types"]]
    if d.get("mid_block_type"):
        d["mid_block_type"] = d["mid_block_type"].replace("2D", "Flat")
    d["in_channels"] = d["out_channels"] = in_features
    d.pop("sample_size", None)
    return d


TINY_VAE_A = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_VAE_B = dict(block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=2, latent_channels=3,
                  in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter so that no zero or identity init can hide a wiring mistake."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if p.dim() == 1 and ("norm" in name or name.endswith("group_norm.weight")) and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the output scale (max abs of the reference)."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def random_image(seed: int, size: tuple[int, int] = (40, 56)) -> PIL.Image.Image:
    """A random RGB image of size (height, width)."""
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, decoded whole (so a truncated file fails) and closed again."""
    with PIL.Image.open(path) as image:
        image.load()
        return image.size
