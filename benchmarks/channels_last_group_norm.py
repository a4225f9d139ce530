"""A GroupNorm that keeps channels-last tensors channels-last: a fast-path candidate that bench.py (variant
graphs+nhwc_norm) and step_breakdown.py measure. On an H100 it was slower than CUDA's GroupNorm with its two
layout copies (RESULTS.md, run 5): its per-channel Welford reduction and the small kernels that turn channel
statistics into group ones cost more than the copies they save. Kept here, out of vd, as the measured baseline
for the next attempt (a fused kernel).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vd.nn.fusable import GroupNorm


class ChannelsLastGroupNorm(GroupNorm):
    """GroupNorm that leaves a channels-last input channels-last.

    CUDA's GroupNorm kernel reads NCHW, so in a channels-last UNet every GroupNorm costs two layout copies (into
    NCHW, and back for the convolution after it), and its statistics kernel runs one block per (sample, group).
    Here the NHWC memory is read as rows of pixels: one column reduction gives each channel's mean and variance,
    the law of total variance turns them into the group's, and one multiply-add applies them. Other inputs take
    the plain kernel. The parameters are the same; the time-embedding shift and the SiLU of vd's GroupNorm are
    applied in plain torch around it.
    """

    def forward(self, x: Tensor, shift: Tensor | None = None, silu: bool = False) -> Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x, shift, silu)
        if shift is not None:
            x = x + shift[:, :, None, None]
        b, c, h, w = x.shape
        g = self.num_groups
        y = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of the NHWC memory
        # Each reduction accumulates in float32; only the [B, C] and [B, G] statistics are rounded to x's dtype.
        # Few small kernels: in a CUDA graph each costs about as much as its launch.
        var_c, mean_c = torch.var_mean(y, dim=1, correction=0)
        within = var_c.view(b, g, c // g).mean(-1, dtype=torch.promote_types(x.dtype, torch.float32))
        between, mean = torch.var_mean(mean_c.view(b, g, c // g), dim=-1, correction=0, keepdim=True)
        rstd = torch.rsqrt(within.add_(between.squeeze(-1)).add_(self.eps)).to(x.dtype)[..., None]  # [B, G, 1]
        if self.affine:
            scale = rstd * self.weight.view(g, c // g)
            offset = torch.addcmul(self.bias.view(g, c // g), mean, scale, value=-1)
        else:
            scale = rstd.expand(b, g, c // g)
            offset = mean * -scale
        out = torch.addcmul(offset.reshape(b, 1, c), y, scale.reshape(b, 1, c)).view(b, h, w, c).permute(0, 3, 1, 2)
        return F.silu(out) if silu else out


def channels_last_group_norms_(module: nn.Module) -> list[tuple[nn.Module, str, nn.GroupNorm]]:
    """Replace every GroupNorm in `module` (torch's or vd's) with a ChannelsLastGroupNorm on the same parameters.
    Returns (parent, name, replaced GroupNorm) for each, so a caller can put them back."""
    replaced = []
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) in (nn.GroupNorm, GroupNorm):
                norm = ChannelsLastGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine,
                                             device="meta")
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
                replaced.append((parent, name, child))
    return replaced
