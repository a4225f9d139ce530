"""Triton kernels for the memory-bound tail of the UNet and the VAE decoder: the optional CUDA fast path.

`vd.fast.use_triton_kernels_` installs them on the layers of vd.nn that have a kernel hook; the plain-PyTorch
layers stay the reference and the CPU path. Importing a submodule imports triton; importing this package does
not. With TRITON_INTERPRET=1 set before triton is imported, the kernels run on CPU tensors (the tests do that).
"""


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
