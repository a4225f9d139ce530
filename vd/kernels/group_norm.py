"""GroupNorm with VD's neighbours fused in: an optional per-(sample, channel) shift added to the input first (the
ResnetBlock's time embedding) and an optional SiLU after the affine, read and written through strides, so that
a channels-last UNet needs no layout copies (CUDA's own GroupNorm reads NCHW: two copies per norm).

Split reduction, two kernels over the same grid (sample x group, chunk of pixels):
  1. `_chunk_moments`: each program reduces its chunk of one group, tile by tile, to (mean, M2) in float32. A tile
     is centred on its own mean before squaring (two passes over registers) and tiles are merged with Chan's
     formula, so an activation of mean 1e3 and spread 1 keeps its variance (sum / sum-of-squares would lose it).
  2. `_normalize`: each program merges the partials of its group (a few dozen numbers, the same way), then
     normalises, applies the affine and the SiLU, and stores its chunk in the input's memory format.
Chunking the pixels fills the card where one program per group would leave it idle (64 groups at batch 2).
Statistics are torch's: mean and biased variance over C/G x H x W, eps inside the square root.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from vd.kernels.common import check_float, next_pow2

# Chunks per group at most: every program of the second kernel reads all its group's partials, so many small
# chunks (the VAE's 512 x 512 pixels in tiles of 512) would read about as much as the activation itself.
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


@triton.jit(do_not_specialize=["n_chunks"])  # hw % 16 == 0 is specialised: it lets NCHW loads vectorise
def _chunk_moments(x, shift, part, hw, n_chunks, sxn, sxc, sxp, ssn, ssc,
                   GROUPS: tl.constexpr, CG: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    row, k = tl.program_id(0), tl.program_id(1)  # row = sample * GROUPS + group; k = chunk of pixels
    n, g = row // GROUPS, row % GROUPS
    j = tl.arange(0, BLOCK_C)
    c, c_ok = g * CG + j, j < CG
    s = _load_shift(shift, n, c, c_ok, ssn, ssc, HAS_SHIFT, BLOCK_C)
    base = x + n.to(tl.int64) * sxn
    mean, m2, count = 0.0, 0.0, 0.0
    for i in range(TILES):  # a chunk is TILES tiles (a constant bound: Triton's CPU interpreter needs one)
        p0 = (k * TILES + i) * BLOCK_P
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < hw)[:, None] & c_ok[None, :]
        v = tl.load(base + p[:, None] * sxp + c[None, :] * sxc, mask=ok, other=0.0).to(tl.float32) + s[None, :]
        n_tile = (tl.maximum(tl.minimum(hw - p0, BLOCK_P), 0) * CG).to(tl.float32)  # 0 past the end
        m_tile = tl.sum(tl.where(ok, v, 0.0)) / tl.maximum(n_tile, 1.0)
        d = tl.where(ok, v - m_tile, 0.0)
        total = count + n_tile
        delta = m_tile - mean
        mean += delta * (n_tile / total)
        m2 += tl.sum(d * d) + delta * delta * (count * (n_tile / total))
        count = total
    out = part + (row * n_chunks + k) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit(do_not_specialize=["n_chunks", "eps"])
def _normalize(x, shift, weight, bias, y, part, hw, n_chunks, eps, sxn, sxc, sxp, syn, syc, syp, ssn, ssc,
               GROUPS: tl.constexpr, CG: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, BLOCK_K: tl.constexpr):
    row, k = tl.program_id(0), tl.program_id(1)
    n, g = row // GROUPS, row % GROUPS
    # the group's statistics from the partials of all its chunks (every chunk is full but the last)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < n_chunks
    means = tl.load(part + (row * n_chunks + ks) * 2, mask=k_ok, other=0.0)
    m2s = tl.load(part + (row * n_chunks + ks) * 2 + 1, mask=k_ok, other=0.0)
    counts = tl.where(k_ok, tl.minimum(hw - ks * (TILES * BLOCK_P), TILES * BLOCK_P) * CG, 0).to(tl.float32)
    total = tl.sum(counts)
    mean = tl.sum(means * counts) / total
    dm = tl.where(k_ok, means - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(m2s) + tl.sum(counts * dm * dm)) / total + eps)

    j = tl.arange(0, BLOCK_C)
    c, c_ok = g * CG + j, j < CG
    s = _load_shift(shift, n, c, c_ok, ssn, ssc, HAS_SHIFT, BLOCK_C)
    scale = tl.load(weight + c, mask=c_ok, other=0.0).to(tl.float32) * rstd
    b = tl.load(bias + c, mask=c_ok, other=0.0).to(tl.float32)
    src, dst = x + n.to(tl.int64) * sxn, y + n.to(tl.int64) * syn
    for i in range(TILES):
        p = (k * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (p < hw)[:, None] & c_ok[None, :]
        v = tl.load(src + p[:, None] * sxp + c[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        out = (v + s[None, :] - mean) * scale[None, :] + b[None, :]
        if SILU:
            out = _silu(out)
        tl.store(dst + p[:, None] * syp + c[None, :] * syc, out.to(y.dtype.element_ty), mask=ok)


def plan(hw: int, cg: int, tile: int = 2048, tiles_per_chunk: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_P pixels, BLOCK_C channels) per tile, tiles per chunk and chunks per group: tiles of about `tile`
    elements, `tiles_per_chunk` tiles per program (a power of two), more if a group would have over MAX_CHUNKS."""
    block_c = next_pow2(cg)
    block_p = min(next_pow2(hw), max(1, tile // block_c))
    tiles = -(-hw // block_p)
    per = max(next_pow2(tiles_per_chunk), next_pow2(-(-tiles // MAX_CHUNKS)))
    return block_p, block_c, per, -(-tiles // per)


@torch.compiler.disable  # torch.compile runs it as it is, outside its graphs
def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, shift: Tensor | None = None,
               silu: bool = False, *, tile: int = 2048, tiles_per_chunk: int = 1, num_warps: int = 4) -> Tensor:
    """silu?(GroupNorm(x + shift[:, :, None, None])) for x [N, C, *spatial] in any memory format (the output
    keeps it); shift [N, C] or None. `tile`, `tiles_per_chunk` and `num_warps` are tuning knobs (benchmarks)."""
    check_float("x", x)
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"x must be [N, C, ...] with C divisible by groups={groups}, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must have shape ({c},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if shift is not None and shift.shape != (n, c):
        raise ValueError(f"shift must have shape ({n}, {c}), got {tuple(shift.shape)}")
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
    block_p, block_c, per, n_chunks = plan(hw, cg, tile, tiles_per_chunk)
    part = torch.empty(n * groups, n_chunks, 2, device=x.device, dtype=torch.float32)
    s = shift if shift is not None else part  # any pointer; not read without HAS_SHIFT
    ss = shift.stride() if shift is not None else (0, 0)
    grid = (n * groups, n_chunks)
    _chunk_moments[grid](xv, s, part, hw, n_chunks, *xv.stride(), *ss, GROUPS=groups, CG=cg,
                         HAS_SHIFT=shift is not None, BLOCK_P=block_p, BLOCK_C=block_c, TILES=per,
                         num_warps=num_warps)
    _normalize[grid](xv, s, weight, bias, yv, part, hw, n_chunks, float(eps), *xv.stride(), *yv.stride(), *ss,
                     GROUPS=groups, CG=cg, HAS_SHIFT=shift is not None, SILU=silu, BLOCK_P=block_p,
                     BLOCK_C=block_c, TILES=per, BLOCK_K=next_pow2(n_chunks), num_warps=num_warps)
    return y
