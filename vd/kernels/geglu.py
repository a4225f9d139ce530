"""GEGLU in one pass: the feed-forward's projection output [..., 2I] (bias added by the matmul) -> a * GELU(gate)
[..., I], with a the first half and the exact (erf) GELU of the second, as vd.nn.layers.GEGLU. torch reads the
projection, writes GELU(gate), reads both and writes the product; here it is one read and one write."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from vd.kernels.common import check_float, next_pow2


@triton.jit(do_not_specialize=["inner"])
def _geglu(h, y, inner, sh, sy, BLOCK: tl.constexpr):
    row, col = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < inner
    a = tl.load(h + row * sh + col, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(h + row * sh + inner + col, mask=ok, other=0.0).to(tl.float32)
    out = a * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(y + row * sy + col, out.to(y.dtype.element_ty), mask=ok)


def geglu(h: Tensor, *, block: int = 1024, num_warps: int = 4) -> Tensor:
    """h [..., 2I] -> h[..., :I] * gelu(h[..., I:]) [..., I], computed in float32, stored in h's dtype."""
    check_float("h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension, got shape {tuple(h.shape)}")
    inner = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * inner)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    y = torch.empty(h2.shape[0], inner, device=h.device, dtype=h.dtype)
    block = min(block, next_pow2(inner))
    if y.numel():
        _geglu[(h2.shape[0], -(-inner // block))](h2, y, inner, h2.stride(0), y.stride(0), BLOCK=block,
                                                  num_warps=num_warps)
    return y.view(*h.shape[:-1], inner)
