"""Heun's second-order sampler in sigma space (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 1), matching diffusers'
`HeunDiscreteScheduler` (v0.42.1):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_heun_discrete.py

Each interval sigma_i -> sigma_{i+1} takes an Euler step, evaluates the model again at its end and steps again
from x_i with the mean slope; the last interval (to sigma = 0) is Euler only. N steps are 2N − 1 model
evaluations: `timesteps(N)` lists them, the callback runs after each (after the Euler step, then after the
correction), as in diffusers' pipelines.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .sigma_space import SigmaSchedule
from .sigmas import denoised


@dataclass(frozen=True, kw_only=True)
class Heun(SigmaSchedule):
    """Heun with diffusers' HeunDiscreteScheduler defaults (note: its own betas, 0.00085 to 0.012, linear)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    evals_per_step: ClassVar[int] = 2

    def timesteps(self, num_steps: int) -> Tensor:
        """float32 timesteps of the 2N − 1 evaluations: t_0, then t_i twice for i >= 1."""
        ts = self.schedule(num_steps)[0]
        return torch.cat([ts[:1], ts[1:].repeat_interleave(2)])

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Deterministic: eta, generator, noise are ignored.
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        ts_dev = ts.to(x.device).unbind()
        clip = self.clip_sample_range if self.clip_sample else None

        def slope(x_s: Tensor, s: Tensor, t: Tensor) -> Tensor:
            """d = (x − x0)/sigma, one model evaluation at noise level s."""
            x0 = denoised(eps_fn(x_s / (s**2 + 1) ** 0.5, t), x_s, s, self.prediction_type)
            return (x_s - (x0 if clip is None else x0.clamp(-clip, clip))) / s

        x, begin = self.start(x, num_steps, skip, len(ts))
        k = 2 * begin  # evaluation counter, as the callback's index (step i starts at evaluation 2i)
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            s, s_next = sig[i], sig[i + 1]
            dt = s_next - s
            d = slope(x, s, ts_dev[i])
            x_euler = x + d * dt
            if callback is not None:
                callback(k, ts_dev[i], x_euler)
            k += 1
            if i == len(ts) - 1:  # into sigma = 0: Euler only
                x = x_euler
                break
            d_next = slope(x_euler, s_next, ts_dev[i + 1])
            x = x + (d + d_next) / 2 * dt
            if callback is not None:
                callback(k, ts_dev[i + 1], x)
            k += 1
        return x


@dataclass(frozen=True, kw_only=True)
class HeunKarras(Heun):
    """Heun on Karras et al.'s sigmas (eq. 5, rho = 7; diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
