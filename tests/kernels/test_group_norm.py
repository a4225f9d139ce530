"""The fused GroupNorm kernel against torch's GroupNorm (in float64) in Triton's CPU interpreter: both memory
formats, fp32 and fp16, with and without the shift and the SiLU, sizes that fill no block, and activations far
from zero (mean 300, spread 1) where a sum / sum-of-squares variance would lose most of its digits."""

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  (no triton is a failure here, not a skip)

from helpers import rel_err
from vd.kernels.group_norm import group_norm, groups_per_program, plan

# fp32: the rounding of inputs near 300 (ulp 3e-5) against a spread of 1; fp16: the output's (2^-11 relative).
# A sum / sum-of-squares variance in fp32 is off by about 1e-3 at mean 300.
# bf16: one unit in the last place (2^-7): Triton's interpreter truncates to bf16 where a GPU rounds to nearest
TOL = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _reference(x, weight, bias, groups, eps, shift, silu):
    x = x.double() + (shift.double()[:, :, None, None] if shift is not None else 0)
    y = F.group_norm(x, groups, weight.double(), bias.double(), eps)
    return F.silu(y) if silu else y


def _inputs(shape, groups, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    weight = (1 + 0.2 * torch.randn(c, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(c, generator=g)).to(dtype)
    shift = torch.randn(n, c, generator=g).to(dtype)
    return x, weight, bias, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("offset,with_shift,silu", [(0.0, True, True), (300.0, False, False), (300.0, True, True)])
def test_group_norm(check, dtype, channels_last, offset, with_shift, silu):
    # C/G = 10 (SD's 320 channels over 32 groups); 5 x 7 pixels: tiles of 4 pixels, 4 tiles per chunk, 3 chunks
    # (the last with 3 pixels and 3 empty tiles)
    x, weight, bias, shift = _inputs((2, 20, 5, 7), 2, dtype, offset)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    shift = shift if with_shift else None
    y = group_norm(x, weight, bias, 2, 1e-5, shift, silu, tile=64, tiles_per_chunk=4)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride()  # written in the input's memory format
    check(rel_err(y.double(), _reference(x, weight, bias, 2, 1e-5, shift, silu)), TOL[dtype])


@pytest.mark.parametrize("group_block", [1, 2, 3, 6, None])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_group_norm_blocks_of_groups(check, group_block, channels_last):
    """A program may take several neighbouring groups (channels-last rows of 16-byte loads): 3 of 6 groups of
    C/G = 5 leave lanes and group slots of the block unused; the statistics stay each group's own."""
    x, weight, bias, shift = _inputs((2, 30, 5, 3), 6, torch.float32, 300.0, seed=3)
    x[:, 5:10] -= 290  # groups of different means: a mix-up of groups' statistics is not a rounding error
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = group_norm(x, weight, bias, 6, 1e-5, shift, True, tile=64, tiles_per_chunk=2, group_block=group_block)
    assert y.stride() == x.stride()
    check(rel_err(y.double(), _reference(x, weight, bias, 6, 1e-5, shift, True)), TOL[torch.float32])


def test_groups_per_program():
    """One group in NCHW memory; in channels-last memory the fewest whole groups making a row of >= 128 bytes
    read in 16-byte vectors: SD's 320, 640 and 1280 channels over 32 groups, the VAE's 128 channels, fp32."""
    assert groups_per_program(32, 10, 64 * 64, 2) == 1
    assert [groups_per_program(32, cg, 1, 2) for cg in (10, 20, 40, 4)] == [8, 4, 2, 16]
    assert groups_per_program(32, 10, 1, 4) == 4
    assert groups_per_program(3, 5, 1, 2) == 3  # no row of 16-byte vectors: all groups in one program


def test_group_norm_bfloat16(check):
    x, weight, bias, shift = _inputs((2, 20, 5, 7), 2, torch.bfloat16, 0.0)
    x = x.to(memory_format=torch.channels_last)
    y = group_norm(x, weight, bias, 2, 1e-5, shift, True, tile=64, tiles_per_chunk=4)
    check(rel_err(y.double(), _reference(x, weight, bias, 2, 1e-5, shift, True)), TOL[torch.bfloat16])


@pytest.mark.parametrize("shape,groups", [((1, 24, 1, 1), 4), ((3, 8, 2, 3), 8), ((2, 6, 17), 2)],
                         ids=["one-pixel", "one-channel-groups", "1-d"])
def test_group_norm_other_shapes(check, shape, groups):
    """The text UNet's flat blocks (one pixel), groups of one channel, and inputs with one spatial dimension."""
    x, weight, bias, shift = _inputs(shape, groups, torch.float32, 1.0, seed=1)
    y = group_norm(x, weight, bias, groups, 1e-6, shift, True)
    check(rel_err(y.double(), _reference(x[..., None] if x.dim() == 3 else x, weight, bias, groups, 1e-6, shift,
                                         True).view(shape)), TOL[torch.float32])


def test_group_norm_non_dense_input(check):
    """A strided view whose spatial dims cannot be merged is read through a copy; the result is the same."""
    x, weight, bias, _ = _inputs((2, 16, 6, 10), 4, torch.float32, 0.0, seed=2)
    view = x[:, :, :, ::2]
    check(rel_err(group_norm(view, weight, bias, 4, 1e-5).double(), _reference(view, weight, bias, 4, 1e-5, None,
                                                                             False)), TOL[torch.float32])


def test_plan_splits_large_groups():
    """Tiles of about `tile` elements. A group has at most MAX_CHUNKS = 128 chunks, and at most
    sqrt(H x W x C/G x itemsize / 32), which keeps the partials every program of `_normalize` reads under a quarter
    of its activation: SD's 320 channels at 64x64 (C/G = 10), in NCHW and in channels-last memory (8 groups per
    program: 16 pixels a tile, 8 tiles a chunk, not 128 chunks of 2 tiles); the VAE's 128 at 512x512 (C/G = 4)."""
    assert plan(64 * 64, 10, 1, 2, 2048, 1) == (128, 16, 1, 32)
    assert plan(64 * 64, 10, 8, 2, 2048, 1) == (16, 128, 8, 32)
    assert plan(512 * 512, 4, 1, 2, 2048, 1) == (512, 4, 4, 128)


def test_group_norm_refuses_bad_input():
    x, weight, bias, shift = _inputs((2, 8, 3, 3), 4, torch.float32, 0.0)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        group_norm(x.double(), weight, bias, 4, 1e-5)
    with pytest.raises(ValueError, match="C divisible by groups=3"):
        group_norm(x, weight, bias, 3, 1e-5)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\)"):
        group_norm(x, weight, bias, 4, 1e-5, shift[:1])
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(8,\)"):
        group_norm(x, weight[:4], bias, 4, 1e-5)
    with pytest.raises(ValueError, match="group_block must divide groups=4, got 3"):
        group_norm(x, weight, bias, 4, 1e-5, group_block=3)
