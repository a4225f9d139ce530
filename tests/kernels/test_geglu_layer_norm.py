"""The GEGLU and residual add + LayerNorm kernels against torch's ops (in float64) in Triton's CPU interpreter:
fp32 and fp16, rows and widths that fill no block, strided inputs."""

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  (no triton is a failure here, not a skip)

from helpers import rel_err
from vd.kernels.geglu import geglu
from vd.kernels.layer_norm import add_layer_norm

# fp16: the output's rounding (2^-11 relative); bf16: one unit in the last place (2^-7), as Triton's interpreter
# truncates to bf16 where a GPU rounds to nearest
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_geglu(check, dtype):
    h = _randn(2, 7, 2 * 40, dtype=dtype, scale=3.0)  # I = 40: blocks of 16 leave the last one part-empty
    y = geglu(h, tile=64, block=16)  # 4 rows x 16 columns per program
    a, gate = h.double().chunk(2, dim=-1)
    assert y.shape == (2, 7, 40) and y.dtype == dtype
    check(rel_err(y.double(), a * F.gelu(gate)), TOL[dtype])


def test_geglu_strided_input(check):
    h = _randn(9, 2 * 12, seed=1).t().contiguous().t()  # last dim not contiguous
    a, gate = h.double().chunk(2, dim=-1)
    check(rel_err(geglu(h).double(), a * F.gelu(gate)), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_add_layer_norm(check, dtype):
    # 26 rows of D = 40, 3 rows per program (tile 128 / 64): the last program is part-empty; x far from zero
    x, r = _randn(2, 13, 40, dtype=dtype, offset=300.0), _randn(2, 13, 40, dtype=dtype, seed=1)
    weight, bias = (1 + 0.2 * _randn(40, seed=2)).to(dtype), (0.1 * _randn(40, seed=3)).to(dtype)
    s, y = add_layer_norm(x, r, weight, bias, 1e-5, tile=128)
    if dtype == torch.bfloat16:  # the interpreter truncates
        check(rel_err(s.double(), (x.double() + r.double())), TOL[dtype], "x + r")
    else:
        assert torch.equal(s, x + r)  # the residual stream, rounded as torch rounds it
    ref = F.layer_norm(s.double(), (40,), weight.double(), bias.double(), 1e-5)  # the norm of what it returns
    check(rel_err(y.double(), ref), {**TOL, torch.float32: 5e-5}[dtype])  # fp32: ulp(300) = 3e-5


def test_add_layer_norm_strided_input(check):
    """The transformer's tokens of an NCHW activation: `b c h w -> b (h w) c` is a view with strided channels."""
    x = _randn(2, 24, 3, 3).flatten(2).transpose(1, 2)  # (2, 9, 24), channel stride 9
    r, weight, bias = _randn(2, 9, 24, seed=1), 1 + 0.2 * _randn(24, seed=2), 0.1 * _randn(24, seed=3)
    s, y = add_layer_norm(x, r, weight, bias, 1e-5)
    assert torch.equal(s, x + r)
    check(rel_err(y.double(), F.layer_norm((x + r).double(), (24,), weight.double(), bias.double(), 1e-5)),
          TOL[torch.float32])


def test_bad_input():
    x = _randn(2, 3, 8)
    with pytest.raises(ValueError, match="h must have an even last dimension"):
        geglu(x[..., :7])
    with pytest.raises(TypeError, match="h must be float16, bfloat16 or float32"):
        geglu(x.double())
    with pytest.raises(ValueError, match="r must match x"):
        add_layer_norm(x, x[:1], torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(8,\)"):
        add_layer_norm(x, x, torch.ones(4), torch.zeros(8), 1e-5)
