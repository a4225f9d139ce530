"""GroupNorm with VD's neighbours fused in: an optional per-(sample, channel) shift added to the input first (the
ResnetBlock's time embedding) and an optional SiLU after the affine, read and written through strides, so that
a channels-last UNet needs no layout copies (CUDA's own GroupNorm reads NCHW: two copies per norm).

Split reduction, two kernels over the same grid (sample x block of groups, chunk of pixels):
  1. `_chunk_moments`: each program reduces its chunk of its groups, tile by tile, to (mean, M2) per group in
     float32. A tile is centred on its groups' own means before squaring (two passes over registers) and tiles are
     merged with Chan's formula, so an activation of mean 1e3 and spread 1 keeps its variance (sum /
     sum-of-squares would lose it).
  2. `_normalize`: each program merges the partials of its groups (a few dozen numbers each, the same way), then
     normalises, applies the affine and the SiLU, and stores its chunk in the input's memory format.
Chunking the pixels fills the card where one program per group would leave it idle (64 groups at batch 2).
A block is one group in NCHW memory, where a group's pixels are contiguous. In channels-last memory a group's
channels are only C/G values (10 at SD's 320 channels: 20 bytes, loaded 4 bytes at a time), so a program takes
enough neighbouring groups for a row of at least 128 bytes (8 groups: 80 channels) and loads 16-byte vectors;
within a tile a lane's group is its channel // (C/G).
Statistics are torch's: mean and biased variance over C/G x H x W, eps inside the square root.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from vd.kernels.common import LAUNCH_OPTIONS, check_float, next_pow2

# Chunks per group at most (and fewer where the partials would cost too much, see `plan`).
MAX_CHUNKS = 128


@triton.jit
def _silu(x):
    """x * sigmoid(x) without overflow: exp only of -|x|."""
    e = tl.exp(-tl.abs(x))
    return x * tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load_shift(shift, n, c, c_ok, ssn, ssc, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """The shift of channels c of sample n in float32 (zeros without one)."""
    if HAS_SHIFT:
        s = tl.load(shift + n * ssn + c * ssc, mask=c_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_C], tl.float32)
    return s


@triton.jit
def _member(CG: tl.constexpr, GB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_G, BLOCK_C]: whether lane j of a tile holds a channel of the block's group i."""
    j = tl.arange(0, BLOCK_C)
    return ((j // CG)[None, :] == tl.arange(0, BLOCK_G)[:, None]) & (j < GB * CG)[None, :]


@triton.jit
def _per_group(lanes, member):
    """The sum over each group's lanes: [BLOCK_C] -> [BLOCK_G]."""
    return tl.sum(tl.where(member, lanes[None, :], 0.0), axis=1)


@triton.jit
def _per_lane(groups, member):
    """Each lane's group value: [BLOCK_G] -> [BLOCK_C]."""
    return tl.sum(tl.where(member, groups[:, None], 0.0), axis=0)


@triton.jit(do_not_specialize=["n_chunks"])  # hw % 16 == 0 is specialised: it lets NCHW loads vectorise
def _chunk_moments(x, shift, part, hw, n_chunks, sxn, sxc, sxp, ssn, ssc,
                   GROUPS: tl.constexpr, CG: tl.constexpr, GB: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, TILES: tl.constexpr):
    row, k = tl.program_id(0), tl.program_id(1)  # row = sample * GROUPS / GB + block of GB groups; k = chunk
    n, g0 = row // (GROUPS // GB), row % (GROUPS // GB) * GB
    j = tl.arange(0, BLOCK_C)
    c, c_ok = g0 * CG + j, j < GB * CG
    member = _member(CG, GB, BLOCK_C, BLOCK_G)
    s = _load_shift(shift, n, c, c_ok, ssn, ssc, HAS_SHIFT, BLOCK_C)
    base = x + n.to(tl.int64) * sxn
    mean, m2, count = tl.zeros([BLOCK_G], tl.float32), tl.zeros([BLOCK_G], tl.float32), 0.0
    for i in range(TILES):  # a chunk is TILES tiles (a constant bound: Triton's CPU interpreter needs one)
        p0 = (k * TILES + i) * BLOCK_P
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < hw)[:, None] & c_ok[None, :]
        v = tl.load(base + p[:, None] * sxp + c[None, :] * sxc, mask=ok, other=0.0).to(tl.float32) + s[None, :]
        n_tile = (tl.maximum(tl.minimum(hw - p0, BLOCK_P), 0) * CG).to(tl.float32)  # per group; 0 past the end
        m_tile = _per_group(tl.sum(tl.where(ok, v, 0.0), axis=0), member) / tl.maximum(n_tile, 1.0)
        d = tl.where(ok, v - _per_lane(m_tile, member)[None, :], 0.0)
        total = count + n_tile
        delta = m_tile - mean
        mean += delta * (n_tile / total)
        m2 += _per_group(tl.sum(d * d, axis=0), member) + delta * delta * (count * (n_tile / total))
        count = total
    gi = tl.arange(0, BLOCK_G)
    out = part + ((n * GROUPS + g0 + gi) * n_chunks + k) * 2
    tl.store(out, mean, mask=gi < GB)
    tl.store(out + 1, m2, mask=gi < GB)


@triton.jit(do_not_specialize=["n_chunks", "eps"])
def _normalize(x, shift, weight, bias, y, part, hw, n_chunks, eps, sxn, sxc, sxp, syn, syc, syp, ssn, ssc,
               GROUPS: tl.constexpr, CG: tl.constexpr, GB: tl.constexpr, HAS_SHIFT: tl.constexpr,
               SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
               TILES: tl.constexpr, BLOCK_K: tl.constexpr):
    row, k = tl.program_id(0), tl.program_id(1)
    n, g0 = row // (GROUPS // GB), row % (GROUPS // GB) * GB
    # each group's statistics from the partials of all its chunks (every chunk is full but the last): [BLOCK_G]
    ks, gi = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_G)
    k_ok = ks < n_chunks
    known = k_ok[:, None] & (gi < GB)[None, :]
    at = part + ((n * GROUPS + g0 + gi)[None, :] * n_chunks + ks[:, None]) * 2
    means = tl.load(at, mask=known, other=0.0)
    m2s = tl.load(at + 1, mask=known, other=0.0)
    counts = tl.where(k_ok, tl.minimum(hw - ks * (TILES * BLOCK_P), TILES * BLOCK_P) * CG, 0).to(tl.float32)
    total = tl.sum(counts)
    mean = tl.sum(means * counts[:, None], axis=0) / total
    dm = tl.where(known, means - mean[None, :], 0.0)
    rstd = tl.rsqrt((tl.sum(m2s, axis=0) + tl.sum(counts[:, None] * dm * dm, axis=0)) / total + eps)

    j = tl.arange(0, BLOCK_C)
    c, c_ok = g0 * CG + j, j < GB * CG
    member = _member(CG, GB, BLOCK_C, BLOCK_G)
    mean, rstd = _per_lane(mean, member), _per_lane(rstd, member)
    s = _load_shift(shift, n, c, c_ok, ssn, ssc, HAS_SHIFT, BLOCK_C)
    scale = tl.load(weight + c, mask=c_ok, other=0.0).to(tl.float32) * rstd
    b = tl.load(bias + c, mask=c_ok, other=0.0).to(tl.float32)
    src, dst = x + n.to(tl.int64) * sxn, y + n.to(tl.int64) * syn
    for i in range(TILES):
        p = (k * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (p < hw)[:, None] & c_ok[None, :]
        v = tl.load(src + p[:, None] * sxp + c[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        out = (v + s[None, :] - mean[None, :]) * scale[None, :] + b[None, :]
        if SILU:
            out = _silu(out)
        tl.store(dst + p[:, None] * syp + c[None, :] * syc, out.to(y.dtype.element_ty), mask=ok)


def plan(hw: int, cg: int, gb: int = 1, itemsize: int = 2, tile: int = 2048,
         tiles_per_chunk: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_P pixels, BLOCK_C channels) per tile for programs of `gb` groups of `cg` channels, tiles per chunk and
    chunks per group: tiles of about `tile` elements, `tiles_per_chunk` tiles per program (a power of two), more
    where a group would have too many chunks. Each program of `_normalize` reads its groups' partials of all
    chunks, 8 bytes each, against the (hw / chunks) x gb x cg x itemsize bytes of activation it reads: chunks are
    capped at sqrt(hw x cg x itemsize / 32), so the partials stay under a quarter of that, and at MAX_CHUNKS."""
    block_c = next_pow2(gb * cg)
    block_p = min(next_pow2(hw), max(1, tile // block_c))
    tiles = -(-hw // block_p)
    max_chunks = max(1, min(MAX_CHUNKS, math.isqrt(hw * cg * itemsize // 32)))
    per = max(next_pow2(tiles_per_chunk), next_pow2(-(-tiles // max_chunks)))
    return block_p, block_c, per, -(-tiles // per)


def groups_per_program(groups: int, cg: int, channel_stride: int, itemsize: int) -> int:
    """1 where a group's pixels are contiguous (NCHW). Where channels are (channels-last), the fewest whole groups
    whose channels make a row of at least 128 bytes that 16-byte loads can read (all of them if none do)."""
    if channel_stride != 1:
        return 1
    fits = [b for b in range(1, groups + 1) if groups % b == 0 and b * cg * itemsize >= 128
            and b * cg * itemsize % 16 == 0]
    return fits[0] if fits else groups


@torch.compiler.disable  # torch.compile runs it as it is, outside its graphs
def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, shift: Tensor | None = None,
               silu: bool = False, *, tile: int = 2048, tiles_per_chunk: int = 1, num_warps: int = 4,
               group_block: int | None = None) -> Tensor:
    """silu?(GroupNorm(x + shift[:, :, None, None])) for x [N, C, *spatial] in any memory format (the output
    keeps it); shift [N, C] or None. `tile`, `tiles_per_chunk`, `num_warps` and `group_block` (groups per
    program, a divisor of `groups`; None: `groups_per_program`) are tuning knobs (benchmarks)."""
    check_float("x", x)
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"x must be [N, C, ...] with C divisible by groups={groups}, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must have shape ({c},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if shift is not None and shift.shape != (n, c):
        raise ValueError(f"shift must have shape ({n}, {c}), got {tuple(shift.shape)}")
    if group_block is not None and (group_block < 1 or groups % group_block):
        raise ValueError(f"group_block must divide groups={groups}, got {group_block}")
    if x.numel() == 0:
        return torch.empty_like(x)
    weight, bias = weight.contiguous(), bias.contiguous()  # read with unit stride (parameters already are)
    try:
        xv = x.view(n, c, -1)  # the spatial dims as one, if their strides allow (NCHW and NHWC both do)
    except RuntimeError:
        x = x.contiguous()
        xv = x.view(n, c, -1)
    y = torch.empty_like(x)  # same strides as x when x is dense, so the view below never copies
    yv = y.view(n, c, -1)
    hw, cg = xv.shape[2], c // groups
    gb = group_block or groups_per_program(groups, cg, xv.stride(1), x.element_size())
    block_p, block_c, per, n_chunks = plan(hw, cg, gb, x.element_size(), tile, tiles_per_chunk)
    part = torch.empty(n * groups, n_chunks, 2, device=x.device, dtype=torch.float32)
    s = shift if shift is not None else part  # any pointer; not read without HAS_SHIFT
    ss = shift.stride() if shift is not None else (0, 0)
    grid = (n * groups // gb, n_chunks)
    blocks = dict(GROUPS=groups, CG=cg, GB=gb, HAS_SHIFT=shift is not None, BLOCK_P=block_p, BLOCK_C=block_c,
                  BLOCK_G=next_pow2(gb), TILES=per, num_warps=num_warps, **LAUNCH_OPTIONS)
    _chunk_moments[grid](xv, s, part, hw, n_chunks, *xv.stride(), *ss, **blocks)
    _normalize[grid](xv, s, weight, bias, yv, part, hw, n_chunks, float(eps), *xv.stride(), *yv.stride(), *ss,
                     SILU=silu, BLOCK_K=next_pow2(n_chunks), **blocks)
    return y
