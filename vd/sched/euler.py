"""Euler and Euler ancestral samplers in sigma space (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364; k-diffusion's `sample_euler`/`sample_euler_ancestral`),
matching diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` (v0.42.1):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_discrete.py

Notation: sigma_i the noise levels (sigma_space.py), x0 the denoised estimate D(x; sigma),
d = (x − x0)/sigma = dx/dsigma of the probability-flow ODE (eq. 4 with sigma(t) = t).
diffusers steps in float32 whatever the model's dtype and returns x in the model output's dtype; so do we.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .common import Callback, EpsFn
from .noise import step_noises
from .sigma_space import SigmaSchedule
from .sigmas import ancestral_split, denoised


@dataclass(frozen=True, kw_only=True)
class Euler(SigmaSchedule):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""

    final_sigmas_type: str = "zero"  # "sigma_min": the last step ends at the first training sigma, not 0
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    timestep_type: str = "discrete"  # "continuous" with v_prediction: the model sees t = log(sigma) / 4 (EDM)
    rescale_betas_zero_snr: bool = False
    interpolation_type: str = "linear"  # "log_linear": N + 1 sigmas evenly in log sigma over the training range

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("final_sigmas_type", ("zero", "sigma_min"))
        self.check_choice("timestep_type", ("discrete", "continuous"))
        self.check_choice("interpolation_type", ("linear", "log_linear"))

    def schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        ts, sig = super().schedule(num_steps)
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            ts = 0.25 * sig[:-1].log()
        return ts, sig

    def spaced_sigmas(self, train: Tensor, ts: Tensor, num_steps: int) -> Tensor:
        """With "log_linear", N + 1 sigmas from the largest training sigma down to the smallest, evenly in log sigma
        (float32, as diffusers). The timesteps stay the spaced ones, so the N steps end at the smallest training
        sigma, not at 0 (with Karras or exponential sigmas only their range changes)."""
        if self.interpolation_type == "linear":
            return super().spaced_sigmas(train, ts, num_steps)
        log_train = np.log(train.numpy())  # (numpy's float32 log, which can differ from torch's in the last bit)
        return torch.linspace(float(log_train[-1]), float(log_train[0]), num_steps + 1).exp().double()

    def last_sigma(self, train: Tensor, sig: Tensor) -> Tensor:
        return train[0] if self.final_sigmas_type == "sigma_min" else train.new_zeros(())

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Deterministic: eta, generator, noise are ignored.
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        ts_dev = ts.to(x.device).unbind()
        x, begin = self.start(x, num_steps, skip, len(ts))
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            s, s_next = sig[i], sig[i + 1]
            out = eps_fn(x / (s**2 + 1) ** 0.5, ts_dev[i])  # the model sees the variance-preserving x_t
            x32 = x.float()
            d = (x32 - denoised(out, x32, s, self.prediction_type)) / s
            x = (x32 + d * (s_next - s)).to(out.dtype)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x


@dataclass(frozen=True, kw_only=True)
class EulerAncestral(SigmaSchedule):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up back up to
    sigma_{i+1} (k-diffusion's `sample_euler_ancestral`, the ancestral step of Ho et al. 2020 in sigma space)."""

    rescale_betas_zero_snr: bool = False

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}  # diffusers' class has no use_karras_sigmas: it ignores the key

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. The fresh noise of step i is `noise[i]` or drawn from
        `generator` (one draw per step, the last included, as diffusers). eta is ignored (as diffusers).
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        z = step_noises(noise, generator, len(ts))
        ts_dev = ts.to(x.device).unbind()
        # each step splits sigma_{i+1}² into a deterministic part sigma_down² and fresh noise sigma_up²
        down, up = ancestral_split(sig[:-1], sig[1:])
        x, begin = self.start(x, num_steps, skip, len(ts))
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            s = sig[i]
            out = eps_fn(x / (s**2 + 1) ** 0.5, ts_dev[i])
            x32 = x.float()
            d = (x32 - denoised(out, x32, s, self.prediction_type)) / s
            x = x32 + d * (down[i] - s)
            x = (x + z(i, out, out.dtype) * up[i]).to(out.dtype)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x


@dataclass(frozen=True, kw_only=True)
class EulerKarras(Euler):
    """Euler on Karras et al.'s sigmas (eq. 5, rho = 7; diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
