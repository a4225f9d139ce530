"""Small helpers the kernels' launchers share."""

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton's block sizes are powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_float(name: str, t: Tensor) -> None:
    """The kernels compute in float32 and store in the input's dtype: fp16, bf16 or fp32 only."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
