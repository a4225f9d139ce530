"""Small helpers the kernels' launchers share."""

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# Every launch passes these: fused multiply-adds on, as each Triton release before 3.10 defaults to (3.9 warns at
# compile time that 3.10 turns them off). Named, the kernels round and run alike under every release.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton's block sizes are powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_float(name: str, t: Tensor) -> None:
    """The kernels compute in float32 and store in the input's dtype: fp16, bf16 or fp32 only."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
