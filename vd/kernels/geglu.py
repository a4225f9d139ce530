"""GEGLU in one pass: the feed-forward's projection output [..., 2I] (bias added by the matmul) -> a * GELU(gate)
[..., I], with a the first half and the exact (erf) GELU of the second, as vd.nn.layers.GEGLU. torch reads the
projection, writes GELU(gate), reads both and writes the product; here it is one read and one write."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from vd.kernels.common import LAUNCH_OPTIONS, check_float, next_pow2


@triton.jit(do_not_specialize=["rows"])  # inner % 16 == 0 is specialised: it lets the loads vectorise
def _geglu(h, y, rows, inner, sh, sy, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (m < rows)[:, None] & (i < inner)[None, :]
    src = h + m[:, None] * sh + i[None, :]
    a = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(src + inner, mask=ok, other=0.0).to(tl.float32)
    out = a * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(y + m[:, None] * sy + i[None, :], out.to(y.dtype.element_ty), mask=ok)


@torch.compiler.disable  # torch.compile runs it as it is, outside its graphs
def geglu(h: Tensor, *, tile: int = 4096, block: int = 1024, num_warps: int = 4) -> Tensor:
    """h [..., 2I] -> h[..., :I] * gelu(h[..., I:]) [..., I], computed in float32, stored in h's dtype. A program
    takes about `tile` outputs: `block` (or fewer) columns of as many rows as fit."""
    check_float("h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension, got shape {tuple(h.shape)}")
    inner = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * inner)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    rows = h2.shape[0]
    y = torch.empty(rows, inner, device=h.device, dtype=h.dtype)
    block_i = min(next_pow2(block), next_pow2(inner))
    block_m = max(1, min(tile // block_i, next_pow2(rows)))
    if y.numel():
        _geglu[(-(-rows // block_m), -(-inner // block_i))](h2, y, rows, inner, h2.stride(0), y.stride(0),
                                                            BLOCK_M=block_m, BLOCK_I=block_i, num_warps=num_warps,
                                                            **LAUNCH_OPTIONS)
    return y.view(*h.shape[:-1], inner)
