"""A residual add and the LayerNorm after it in one pass, the TransformerBlock's `x = x + attn(...)` followed by
`norm_next(x)`: reads x and r once, writes x + r (the residual stream goes on) and LayerNorm(x + r). The norm
sees x + r rounded to x's dtype, as it would unfused; statistics in float32, centred in registers."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from vd.kernels.common import LAUNCH_OPTIONS, check_float, next_pow2


@triton.jit(do_not_specialize=["rows", "eps"])
def _add_layer_norm(x, r, weight, bias, s, y, rows, eps, sx, sr, ss, sy,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ok = (m < rows)[:, None] & (d < D)[None, :]
    v = (tl.load(x + m[:, None] * sx + d[None, :], mask=ok, other=0.0).to(tl.float32)
         + tl.load(r + m[:, None] * sr + d[None, :], mask=ok, other=0.0).to(tl.float32))
    v = v.to(s.dtype.element_ty)
    tl.store(s + m[:, None] * ss + d[None, :], v, mask=ok)
    v = v.to(tl.float32)
    mean = tl.sum(v, axis=1) / D
    c = tl.where(ok, v - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(c * c, axis=1) / D + eps)
    w = tl.load(weight + d, mask=d < D, other=0.0).to(tl.float32)
    b = tl.load(bias + d, mask=d < D, other=0.0).to(tl.float32)
    out = c * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y + m[:, None] * sy + d[None, :], out.to(y.dtype.element_ty), mask=ok)


@torch.compiler.disable  # torch.compile runs it as it is, outside its graphs
def add_layer_norm(x: Tensor, r: Tensor, weight: Tensor, bias: Tensor, eps: float, *, tile: int = 4096,
                   num_warps: int = 4) -> tuple[Tensor, Tensor]:
    """(x + r, LayerNorm(x + r)) over the last dimension, both [..., D] in x's dtype; `tile` is about the
    elements per program (whole rows)."""
    check_float("x", x)
    check_float("r", r)
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"r must match x: x {tuple(x.shape)} {x.dtype}, r {tuple(r.shape)} {r.dtype}")
    dim = x.shape[-1]
    if weight.shape != (dim,) or bias.shape != (dim,):
        raise ValueError(f"weight and bias must have shape ({dim},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    weight, bias = weight.contiguous(), bias.contiguous()  # read with unit stride (parameters already are)
    x2, r2 = (t.reshape(-1, dim) for t in (x, r))
    x2, r2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, r2))
    s, y = (torch.empty(x2.shape, device=x.device, dtype=x.dtype) for _ in range(2))
    block_d = next_pow2(dim)
    block_m = max(1, min(tile // block_d, next_pow2(x2.shape[0])))
    if x2.numel():
        _add_layer_norm[(-(-x2.shape[0] // block_m),)](x2, r2, weight, bias, s, y, x2.shape[0], float(eps),
                                                        x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
                                                        D=dim, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
                                                        **LAUNCH_OPTIONS)
    return s.view(x.shape), y.view(x.shape)
