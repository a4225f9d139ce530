"""Colour matching of generated images to a reference, the original VD app's "Simple" colour adjustment
(app.py `inference_i2i` of SHI-Labs/Versatile-Diffusion at cf0f4a2)."""

import torch
from torch import Tensor


def match_colors(images: Tensor, reference: Tensor) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] whose every channel takes the mean and (unbiased) std of the same channel of
    the reference, [3, h, w] for all images or [N, 3, h, w] one each, then clamped to [0, 1].

    Computed in float32 at least and returned in the images' dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if reference.ndim == 3:
        reference = reference.unsqueeze(0)
    if reference.ndim != 4 or reference.shape[1] != 3 or reference.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"reference must be [3, h, w] or [{images.shape[0]}, 3, h, w], got {tuple(reference.shape)}")
    dtype = torch.promote_types(images.dtype, torch.float32)
    x = images.to(dtype).flatten(2)  # (N, 3, H*W)
    ref = reference.to(dtype).flatten(2)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    # divergence: the original divides by a zero std (a flat channel) and returns NaN; we keep the flat channel
    # flat, at the reference's mean
    standard = torch.where(std > 0, (x - mean) / std, 0.0)
    out = standard * ref.std(-1, keepdim=True) + ref.mean(-1, keepdim=True)
    return out.clamp(0, 1).view_as(images).to(images.dtype)
