"""DDIM sampler (Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", arXiv:2010.02502).

Matches diffusers' `DDIMScheduler` (v0.42.1) step for step, in its float32 arithmetic:
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim.py

Notation (code -> paper):
    a, a_prev   alpha_t, alpha_{t-1}: cumulative alpha products (diffusers' alphas_cumprod) at this
                timestep and at the next, less noisy one
    b, b_prev   1 - alpha_t, 1 - alpha_{t-1}
    eps         epsilon_theta^(t)(x_t), the predicted noise
    x0          "predicted x_0" of eq. 12
    sigma       sigma_t(eta) of eq. 16; eta = 0 is DDIM, eta = 1 is DDPM
    z           epsilon_t ~ N(0, I), the fresh noise of eq. 12
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .common import Callback, ClippedX0, EpsFn, Schedule
from .noise import step_noises


def x0_and_eps(out: Tensor, x: Tensor, a: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """The predicted x_0 and eps of x at level `a` from the model output (v = sqrt(a)·eps − sqrt(b)·x0, Salimans &
    Ho 2022), in diffusers' order of operations."""
    b = 1 - a
    if prediction_type == "epsilon":
        return (x - b**0.5 * out) / a**0.5, out
    if prediction_type == "v_prediction":
        return a**0.5 * x - b**0.5 * out, a**0.5 * out + b**0.5 * x
    return out, (x - a**0.5 * out) / b**0.5  # "sample"


def ddim_step(
    out: Tensor, x: Tensor, a: Tensor, a_prev: Tensor, eta: float, z: Tensor | None,
    prediction_type: str = "epsilon", limit: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_{t-1} (eq. 12). `a`, `a_prev` are 0-d float32 tensors."""
    b = 1 - a
    # 1. predicted x_0 and eps from the model output
    x0, eps = x0_and_eps(out, x, a, prediction_type)
    # 2. optional clipping or thresholding of x_0; eps stays the unclipped one (parity: diffusers' default)
    if limit is not None:
        x0 = limit(x0)
    # 3. sigma_t(eta), eq. 16: eta · sqrt((1 − a_prev)/(1 − a) · (1 − a/a_prev))
    sigma = eta * ((1 - a_prev) / b * (1 - a / a_prev)) ** 0.5
    # 4. "direction pointing to x_t", eq. 12
    dir_xt = (1 - a_prev - sigma**2) ** 0.5 * eps
    # 5. x_{t-1} = sqrt(a_prev)·x0 + direction (+ sigma·z), eq. 12
    x_prev = a_prev**0.5 * x0 + dir_xt
    return x_prev + sigma * z if z is not None else x_prev


@dataclass(frozen=True, kw_only=True)
class DDIM(ClippedX0, Schedule):
    """DDIM with diffusers' DDIMScheduler defaults; build VD's with `DDIM.from_config(config)`."""

    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False

    ZERO_SNR_FLOOR: ClassVar[float | None] = None

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the DDIM loop from unit-variance noise `x` (B, ...). For eta > 0 the fresh noise z of each
        step comes from `noise` (one tensor per step) or is drawn from `generator` in diffusers' order.

        skip: leave out the first `skip` timesteps; x is then a sample noised for timesteps(num_steps)[skip]
        (init images and fidelity: `noised` at the original's level, or `noised_to_step` at diffusers'), or x0
        itself when skip = num_steps (nothing left to denoise). `noise` and callback indices still count every
        step."""
        if noise is not None and generator is not None:
            raise ValueError("pass either noise or generator, not both")
        ts = self.timesteps(num_steps)
        x, begin = self.start(x, num_steps, skip, len(ts))  # (DDIM's start noise has std 1)
        a_bar = self.alpha_bars()  # (T,) float32
        a_last = torch.tensor(1.0, dtype=torch.float32) if self.set_alpha_to_one else a_bar[0]  # "alpha_{-1}"
        # parity: diffusers steps back by T // N even for "linspace"/"trailing" (diffusers issue #12633)
        stride = self.num_train_timesteps // num_steps
        ts_dev = ts.to(x.device).unbind()  # 0-d timesteps passed to eps_fn and callback
        # fresh noise only when eta > 0, so the generator advances exactly as in diffusers
        draw = step_noises(noise, generator, len(ts)) if eta > 0 else None
        for i, t in enumerate(ts.tolist()[begin:], start=begin):
            out = eps_fn(x, ts_dev[i])
            z = draw(i, out, out.dtype) if draw is not None else None
            a_prev = a_bar[t - stride] if t - stride >= 0 else a_last
            x = ddim_step(out, x, a_bar[t], a_prev, eta, z, self.prediction_type, self.limit_x0)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def max_eta(self, num_steps: int) -> float:
        """The largest eta whose every step stays real: eq. 12's direction term needs 1 - alpha_{t-1} - sigma_t^2
        >= 0, with sigma_t = eta * sqrt((1 - alpha_{t-1}) / (1 - alpha_t) * (1 - alpha_t / alpha_{t-1})) (eq. 16).
        eta = 1 always passes; beyond the bound the result is NaN for sure."""
        a_bar = self.alpha_bars().double()
        a_last = 1.0 if self.set_alpha_to_one else float(a_bar[0])
        stride = self.num_train_timesteps // num_steps
        bound = math.inf
        for t in self.timesteps(num_steps).tolist():
            a, a_prev = float(a_bar[t]), float(a_bar[t - stride]) if t - stride >= 0 else a_last
            if a < a_prev:  # sigma_t^2 <= 1 - alpha_{t-1}  <=>  eta^2 <= (1 - alpha_t) / (1 - alpha_t / alpha_{t-1})
                bound = min(bound, ((1 - a) / (1 - a / a_prev)) ** 0.5)
        return bound
