"""The schedule of the samplers that step x_sigma = x0 + sigma·eps in sigma (Euler, Euler ancestral, Heun, LMS),
as diffusers' EulerDiscreteScheduler & co. (v0.42.1) compute it.

Their default spacing is "linspace" (N timesteps evenly over [0, T − 1], fractional, ending at t = 0), not
VD's "leading": VD's scheduler_config.json has no timestep_spacing, so each class keeps its own default
(diffusers does the same). With "leading" the start noise has std sqrt(sigma_max² + 1), else sigma_max.
With Karras sigmas the N noise levels are eq. 5 of Karras et al. 2022 between the spaced schedule's first
and last sigma, and each timestep is the (fractional) one of its sigma; exponential and beta sigmas (config keys)
are placed between the same ends, or the config's sigma_min/sigma_max.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Schedule, check_one_spacing, spaced_timesteps
from .sigmas import beta_spaced, exponential, interp, karras, sigma_to_t, train_sigmas


@dataclass(frozen=True, kw_only=True)
class SigmaSchedule(Schedule):
    """Timesteps and sigmas of the sigma-space samplers; the "_karras" subclasses set `karras`."""

    timestep_spacing: str = "linspace"
    karras: ClassVar[bool] = False  # Karras et al.'s sigmas: diffusers' use_karras_sigmas=True
    # N sigmas evenly spaced in log sigma between the schedule's ends: a field of the samplers whose diffusers
    # class has the option (Euler, Heun, LMS; not Euler ancestral)
    use_exponential_sigmas: ClassVar[bool] = False
    use_beta_sigmas: ClassVar[bool] = False  # sigmas at quantiles of Beta(0.6, 0.6): the same samplers

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_spacing(self)

    def schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """(timesteps float32 (N,), sigmas float32 (N+1,) ending in 0), as `set_timesteps(num_steps)`."""
        T = self.num_train_timesteps
        ts = spaced_timesteps(self.timestep_spacing, num_steps, T, self.steps_offset).float()
        train = train_sigmas(self.alpha_bars())
        sig = self.spaced_sigmas(train, ts, num_steps)  # float64
        if self.karras:
            sig = karras(*self.karras_range(sig[-1].item(), sig[0].item()), num_steps)
            ts = self.spread_timesteps(sig, train)
        elif self.use_exponential_sigmas or self.use_beta_sigmas:
            spread = exponential if self.use_exponential_sigmas else beta_spaced
            sig = spread(*self.sigma_range(sig[-1].item(), sig[0].item()), num_steps)
            ts = self.spread_timesteps(sig, train)
        return ts, torch.cat([sig, self.last_sigma(train, sig).double().reshape(1)]).float()

    def spread_timesteps(self, sig: Tensor, train: Tensor) -> Tensor:
        """The timesteps of Karras, exponential or beta sigmas: float32 (DPM2 overrides it)."""
        return sigma_to_t(sig, train).float()

    def spaced_sigmas(self, train: Tensor, ts: Tensor, num_steps: int) -> Tensor:
        """float64 sigmas of the spaced timesteps, linear in t between training ones (Euler overrides it)."""
        return interp(train, ts)

    def last_sigma(self, train: Tensor, sig: Tensor) -> Tensor:
        """Where the last step ends: 0 (Euler overrides it for its final_sigmas_type)."""
        return train.new_zeros(())

    def timesteps(self, num_steps: int) -> Tensor:
        """Descending float32 timesteps of the model evaluations (fractional for "linspace" and Karras)."""
        return self.schedule(num_steps)[0]

    def sigmas(self, num_steps: int) -> Tensor:
        """float32 (N+1,): sigma at each timestep, then a final 0."""
        return self.schedule(num_steps)[1]

    def init_noise_sigma(self, num_steps: int) -> float:
        """Std of the initial x: sigma_max, or sqrt(sigma_max² + 1) for "leading" (parity: diffusers)."""
        s_max = self.sigmas(num_steps).max()
        return float(s_max if self.timestep_spacing in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5)

    def noised_to_step(self, x0: Tensor, noise: Tensor, num_steps: int, step: int) -> Tensor:
        """x0 + sigma_step·noise: diffusers' `add_noise` for the sigma-space samplers, in x0's dtype."""
        return x0 + noise.to(x0.dtype) * self.sigmas(num_steps)[step].to(x0.device, x0.dtype)
