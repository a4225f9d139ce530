"""Triton kernels for the memory-bound tail of the UNet and the VAE decoder: the optional CUDA fast path.

`vd.fast.use_triton_kernels_` installs them on the layers of vd.nn that have a kernel hook; the plain-PyTorch
layers stay the reference and the CPU path. Importing a submodule imports triton; importing this package does
not. With TRITON_INTERPRET=1 set before triton is imported, the kernels run on CPU tensors (the tests do that).
"""

import functools

import torch


def available() -> bool:
    """Whether triton can be imported here (it says nothing about a GPU). Never raises."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported),
    so that they take CPU tensors. Imports triton."""
    from triton.runtime.interpreter import InterpretedFunction

    from vd.kernels.group_norm import _normalize
    return isinstance(_normalize, InterpretedFunction)


@functools.cache
def runs_on(device: torch.device) -> bool:
    """Whether Triton builds and runs a kernel on `device` here (a GroupNorm of 1x32x4x4, checked against torch's),
    once per device per process. False, never an error, where it cannot: no CUDA driver library, no compiler for
    this GPU, an interpreter-only build. What the default fast path asks before it turns the kernels on."""
    try:
        from vd.kernels.group_norm import group_norm
        x = torch.randn(1, 32, 4, 4, device=device)
        w, b = torch.ones(32, device=device), torch.zeros(32, device=device)
        return torch.allclose(group_norm(x, w, b, 8, 1e-5), torch.nn.functional.group_norm(x, 8, w, b), atol=1e-4)
    except Exception:
        return False
