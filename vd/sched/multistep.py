"""The schedule of the multistep solvers in lambda = log(alpha_t/sigma_t) (DPM-Solver++, UniPC), as diffusers'
DPMSolverMultistepScheduler and UniPCMultistepScheduler (v0.42.1) compute it.

x stays the variance-preserving x_t (start noise std 1, the model sees x as is). Their default spacing is
"linspace", not VD's "leading" (VD's config has no timestep_spacing, so each class keeps its own), and unlike
the other samplers "linspace" and "leading" place N + 1 points and drop the last (t = 0 for "linspace"):
with 20 steps "linspace" runs t = 999, 949, ..., 50 and VD's "leading" 941, 894, ..., 48 (with its steps_offset
1). Timesteps are integers; the sigmas after them end in 0 (or, with final_sigmas_type "sigma_min", in the first
training sigma). With Karras sigmas the N levels span the whole training range (t = 999 down to t = 0) and each
timestep is its sigma's, rounded (DPM-Solver++ truncates for cosine betas).
"""

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .common import Schedule, Thresholding, check_leading, check_one_spacing, most_steps, timestep_points
from .sigmas import beta_spaced, exponential, interp, karras, sigma_to_t, train_sigmas, vp


@dataclass(frozen=True, kw_only=True)
class MultistepSchedule(Thresholding, Schedule):
    """Timesteps and sigmas of the multistep solvers; the "Karras" subclasses set `karras`."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    final_sigmas_type: str = "zero"  # "sigma_min": the last step ends at the first training sigma, not 0
    use_exponential_sigmas: bool = False  # N sigmas evenly spaced in log sigma over the training range
    use_beta_sigmas: bool = False  # N sigmas at quantiles of Beta(0.6, 0.6) over the training range
    rescale_betas_zero_snr: bool = False
    karras: ClassVar[bool] = False  # Karras et al.'s sigmas: diffusers' use_karras_sigmas=True
    # DPM-Solver++'s options (fields there; UniPC's diffusers class lacks them and ignores the keys)
    use_lu_lambdas: ClassVar[bool] = False  # N log sigmas evenly over the training range, timesteps rounded
    lambda_min_clipped: ClassVar[float] = -math.inf  # the spacings end where lambda_t falls below it
    round_cosine: ClassVar[bool] = False  # Karras timesteps of cosine betas rounded (UniPC), not truncated (DPM)
    euler_at_final: ClassVar[bool] = False  # (a field of DPM-Solver++: see step_order)
    # "sigma_min" on Karras, exponential or beta sigmas ends at their own last one (UniPC, DEIS), not the first
    # training sigma (DPM-Solver++)
    spread_ends_at_own_last: ClassVar[bool] = False

    ORDERS: ClassVar[tuple[int, ...]] = (1, 2)
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("final_sigmas_type", ("zero", "sigma_min"))
        check_one_spacing(self)
        self.check_choice("solver_order", self.ORDERS)

    def schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """(timesteps int64 (N,), sigmas float32 (N+1,) ending in 0), as `set_timesteps(num_steps)`."""
        T, N = self.num_train_timesteps, num_steps
        a_bar = self.alpha_bars()
        train = train_sigmas(a_bar)
        if not 1 <= N <= self.max_steps():
            raise ValueError(f"num_inference_steps must be in [1, {self.max_steps()}], got {N}")
        truncate = self.beta_schedule == "squaredcos_cap_v2" and not self.round_cosine  # (cosine betas: DPM-Solver++)
        if self.karras:
            sig = karras(*self.karras_range(train[0].item(), train[-1].item()), N)
            ts = sigma_to_t(sig, train)
            ts = ts if truncate else ts.round()
        elif self.use_lu_lambdas:  # (Lu et al. 2022's lambdas, linear in lambda = −log sigma; Karras sigmas win)
            log_train = np.log(train.numpy())  # float32, as diffusers
            hi, lo = float(log_train[-1]), float(log_train[0])
            sig = torch.from_numpy(np.exp(hi + np.linspace(0, 1, N) * (lo - hi)))
            ts = sigma_to_t(sig, train)
            ts = ts if truncate else ts.round()
        elif self.use_exponential_sigmas or self.use_beta_sigmas:  # (timesteps truncated, never rounded)
            spread = exponential if self.use_exponential_sigmas else beta_spaced
            sig = spread(*self.sigma_range(train[0].item(), train[-1].item()), N)
            ts = sigma_to_t(sig, train)
        else:
            end = self.last_timestep(a_bar)
            if self.timestep_spacing == "trailing":
                ts = timestep_points("trailing", N, T, self.steps_offset, end).round()
            else:  # N + 1 points, the last dropped
                if self.timestep_spacing == "leading":
                    check_leading(N + 1, T, self.steps_offset, N, end)
                ts = timestep_points(self.timestep_spacing, N + 1, T, self.steps_offset, end).round()[:-1]
            sig = interp(train, ts)
        return ts.long(), torch.cat([sig, self.last_sigma(train, sig).double().reshape(1)]).float()

    def last_timestep(self, a_bar: Tensor) -> int:
        """Where the spacings end: T, less the timesteps whose lambda_t = log(alpha_t/sigma_t) is below
        lambda_min_clipped (DPM-Solver++'s guard for cosine betas, whose last lambdas plunge)."""
        if self.lambda_min_clipped == -math.inf:
            return self.num_train_timesteps
        lam = torch.log(a_bar.sqrt()) - torch.log((1 - a_bar).sqrt())  # float32, as diffusers
        return self.num_train_timesteps - int(torch.searchsorted(lam.flip(0), float(self.lambda_min_clipped)))

    def last_sigma(self, train: Tensor, sig: Tensor) -> Tensor:
        """Where the last step ends: 0, or with final_sigmas_type "sigma_min" the first training sigma (or the
        spread sigmas' own last, see spread_ends_at_own_last)."""
        if self.final_sigmas_type != "sigma_min":
            return train.new_zeros(())
        spread = self.karras or self.use_exponential_sigmas or self.use_beta_sigmas
        return sig[-1] if spread and self.spread_ends_at_own_last else train[0]

    def max_steps(self) -> int:
        """T, but with "leading" spacing the N + 1 points placed must fit (VD: 998 steps)."""
        spread = self.karras or self.use_lu_lambdas or self.use_exponential_sigmas or self.use_beta_sigmas
        if spread or self.timestep_spacing != "leading":
            return self.num_train_timesteps
        return most_steps("leading", self.num_train_timesteps, self.steps_offset) - 1

    def step_order(self, i: int, num_steps: int, begin: int = 0) -> int:
        """The order of step i of DPM-Solver++ or DEIS: it ramps up from 1 with the outputs at hand (those of the
        steps run since `begin`); the last step is first order when it goes into sigma 0 (or `euler_at_final`),
        and with `lower_order_final` (their field) and fewer than 15 steps the last is first order and the one
        before it at most second."""
        short = self.lower_order_final and num_steps < 15
        at_hand = i - begin + 1
        if i == num_steps - 1 and (self.final_sigmas_type == "zero" or self.euler_at_final or short):
            return 1
        if i == num_steps - 2 and short:
            return min(self.solver_order, at_hand, 2)
        return min(self.solver_order, at_hand)

    def noised_to_step(self, x0: Tensor, noise: Tensor, num_steps: int, step: int) -> Tensor:
        """alpha·x0 + sigma·noise at step `step`'s sigma: diffusers' `add_noise` for these samplers, in x0's
        dtype."""
        alpha, sigma = vp(self.schedule(num_steps)[1][step].to(x0.device, x0.dtype))
        return alpha * x0 + sigma * noise.to(x0.dtype)

    def timesteps(self, num_steps: int) -> Tensor:
        """Descending int64 timesteps of the model evaluations."""
        return self.schedule(num_steps)[0]
