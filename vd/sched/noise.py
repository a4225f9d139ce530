"""Gaussian noise with diffusers' RNG conventions, so a seed gives the same image as diffusers.

Mirrors `diffusers.utils.torch_utils.randn_tensor` (v0.42.1):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/utils/torch_utils.py
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def randn(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of `shape` on `device`.

    A list of generators seeds each batch item on its own: one draw of shape (1, *shape[1:]) per
    generator, concatenated. A CPU generator with a non-CPU target draws on the CPU and then moves,
    which is what makes CPU-seeded results identical across GPUs.
    """
    shape = tuple(shape)
    target = torch.device(device) if device is not None else torch.device("cpu")
    draw_on = device  # None -> torch's default device, as diffusers does
    gens = list(generator) if isinstance(generator, Sequence) else None
    if gens is not None and len(gens) == 1:
        generator, gens = gens[0], None
    if gens is not None and len(gens) != shape[0]:
        raise ValueError(f"generator: got a list of {len(gens)} generators for batch size {shape[0]}")
    if generator is not None:
        gen_type = (gens[0] if gens else generator).device.type
        if gen_type == "cpu" and target.type != "cpu":
            draw_on = "cpu"
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"generator is on {gen_type} but device is {target}; cannot draw there")
    if gens is None:
        return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(target)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in gens]).to(target)


def step_noises(
    noise: Sequence[Tensor] | None, generator: torch.Generator | Sequence[torch.Generator] | None, num: int,
) -> Callable[[int, Tensor, torch.dtype], Tensor]:
    """The fresh noise of a stochastic sampler's step i: `noise[i]` when given (one tensor per step), else a draw
    from `generator` of `like`'s shape, in the order diffusers' step functions draw (one randn_tensor per step)."""
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    if noise is not None and len(noise) < num:
        raise ValueError(f"noise: need {num} tensors, got {len(noise)}")

    def z(i: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        if noise is not None:
            return noise[i].to(like.device, dtype)
        return randn(like.shape, generator, like.device, dtype)
    return z
