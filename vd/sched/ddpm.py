"""DDPM ancestral sampler (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models",
arXiv:2006.11239), matching diffusers' `DDPMScheduler` (v0.42.1) on a spaced schedule:
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddpm.py

Each step samples the posterior q(x_prev | x_t, x0) of eq. 6-7 with x0 predicted by the model, where x_prev
is at the next timestep of the (spaced) schedule, and alpha_t = a / a_prev, beta_t = 1 − alpha_t are the
spaced step's (as in Nichol & Dhariwal 2021, eq. 19). Notation: a, a_prev = alpha_bar at t and at the
next timestep (1 after the last); the fresh noise z is drawn at every t > 0 (also at VD's last t = 1).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .common import Callback, ClippedX0, EpsFn, Schedule
from .noise import step_noises
from .sigmas import vp_x0

VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
# why diffusers' other variance types are refused
REFUSED_VARIANCES = {"fixed_large_log": " (diffusers' DDPM takes the square root of log(beta) < 0 there: NaN)",
                     **dict.fromkeys(("learned", "learned_range"), " (for a model that predicts its variance, not VD)")}


@dataclass(frozen=True, kw_only=True)
class DDPM(ClippedX0, Schedule):
    """DDPM with diffusers' DDPMScheduler defaults ("leading" spacing, x0 clipped to [-1, 1])."""

    variance_type: str = "fixed_small"
    rescale_betas_zero_snr: bool = False

    ZERO_SNR_FLOOR: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        if self.variance_type is None:  # as a DPM-Solver config saves it; diffusers' DDPM runs it as fixed_small
            object.__setattr__(self, "variance_type", "fixed_small")
        super().__post_init__()
        if self.variance_type not in VARIANCES:
            raise ValueError(f"variance_type must be one of {VARIANCES} for DDPM, got {self.variance_type!r}"
                             + REFUSED_VARIANCES.get(self.variance_type, ""))

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. The fresh noise of step i is `noise[i]` or drawn from
        `generator` as diffusers does. eta is ignored (DDPM is DDIM's eta = 1 up to the variance choice).
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts = self.timesteps(num_steps)
        z = step_noises(noise, generator, len(ts))
        a_bar, one = self.alpha_bars(), torch.tensor(1.0)
        t_list, ts_dev = ts.tolist(), ts.to(x.device).unbind()
        x, begin = self.start(x, num_steps, skip, len(t_list))
        for i, t in enumerate(t_list[begin:], start=begin):
            out = eps_fn(x, ts_dev[i])
            a = a_bar[t]
            t_prev = t_list[i + 1] if i + 1 < len(t_list) else -1
            a_prev = a_bar[t_prev] if t_prev >= 0 else one
            b, b_prev = 1 - a, 1 - a_prev
            alpha = a / a_prev
            beta = 1 - alpha
            x0 = vp_x0(out, x, a**0.5, b**0.5, self.prediction_type)
            x0 = self.limit_x0(x0)
            # posterior mean, eq. 7: mu = sqrt(a_prev)·beta/b · x0 + sqrt(alpha)·b_prev/b · x_t
            x = a_prev**0.5 * beta / b * x0 + alpha**0.5 * b_prev / b * x
            if t > 0:
                var = torch.clamp((1 - a_prev) / (1 - a) * (1 - a / a_prev), min=1e-20)  # beta-tilde, eq. 7
                if self.variance_type == "fixed_small":
                    std = var**0.5
                elif self.variance_type == "fixed_small_log":
                    std = torch.exp(0.5 * torch.log(var))
                else:  # "fixed_large": sigma² = beta_t
                    std = beta**0.5
                x = x + std * z(i, out, out.dtype)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x
