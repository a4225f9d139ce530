"""Layers whose plain math a fused kernel may replace on some devices: the GPU fast path's hook.

The plain-PyTorch forward is the reference and the CPU path. `vd.fast.use_triton_kernels_` fills a layer's
`kernel` slot and names the device types it runs on; an input elsewhere takes the plain math. The slot is
neither a parameter nor a buffer, so state_dict (and strict loading of the checkpoints) is unchanged.
"""

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class KernelHook:
    """The slot: `kernel` (None = plain math) and the device types (`"cuda"`, ...) it is used on."""

    kernel: Callable | None = None
    kernel_devices: tuple[str, ...] = ()

    def install_kernel(self, kernel: Callable | None, devices: Sequence[str] = ("cuda",)) -> None:
        self.kernel, self.kernel_devices = kernel, tuple(devices)

    def uses_kernel(self, x: Tensor) -> bool:
        return self.kernel is not None and x.device.type in self.kernel_devices


class GroupNorm(KernelHook, nn.GroupNorm):
    """nn.GroupNorm with what VD does around it: a per-(sample, channel) shift added to the input first (the
    ResnetBlock's time embedding) and a SiLU after. Fused, that is one read and one write of the activation."""

    def forward(self, x: Tensor, shift: Tensor | None = None, silu: bool = False) -> Tensor:
        """silu?(GroupNorm(x + shift)): x [N, C, *spatial], shift [N, C] or None."""
        if self.uses_kernel(x):
            return self.kernel(x, self.weight, self.bias, self.num_groups, self.eps, shift, silu)
        if shift is not None:
            x = x + shift.view(*shift.shape, *(1,) * (x.dim() - 2))
        x = super().forward(x)
        return F.silu(x) if silu else x


class LayerNorm(KernelHook, nn.LayerNorm):
    """nn.LayerNorm that can also take the residual add before it (`add_norm`)."""

    def add_norm(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """(x + r, LayerNorm(x + r)): the residual stream and its normalised copy."""
        if self.uses_kernel(x):
            return self.kernel(x, r, self.weight, self.bias, self.eps)
        x = x + r
        return x, self(x)
