"""DPM-Solver-2 in sigma space (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps", arXiv:2206.00927, Algorithm 1 with k = 2, in Karras et al.'s sigma view as
k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`), matching diffusers' `KDPM2DiscreteScheduler` and
`KDPM2AncestralDiscreteScheduler` (v0.42.1):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_k_dpm_2_discrete.py

Each interval sigma_i -> sigma_{i+1} takes an Euler step to the midpoint sigma_mid = sqrt(sigma_i·sigma_{i+1})
(halfway in log sigma), evaluates the model there and steps from x_i over the whole interval with that slope; the
last interval (to sigma = 0) is Euler only. The ancestral form ends each interval at sigma_down and adds fresh noise
of std sigma_up (as Euler ancestral), its midpoint halfway between sigma_i and sigma_down. N steps are 2N − 1 model
evaluations, the midpoints at their own fractional timesteps: `timesteps(N)` lists them, the callback runs after
each (after the half step, then after the whole one), as in diffusers' pipelines.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .noise import step_noises
from .sigma_space import SigmaSchedule
from .sigmas import ancestral_split, denoised, sigma_to_t, train_sigmas


def log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(a·b) as diffusers computes it (float32, torch.lerp of the logs at 0.5): 0 where either is 0."""
    return a.log().lerp(b.log(), 0.5).exp()


@dataclass(frozen=True, kw_only=True)
class DPM2(SigmaSchedule):
    """DPM-Solver-2 with diffusers' KDPM2DiscreteScheduler defaults (note: its own betas, 0.00085 to 0.012,
    linear; VD's config sets its own)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented
    evals_per_step: ClassVar[int] = 2
    ancestral: ClassVar[bool] = False

    def spread_timesteps(self, sig: Tensor, train: Tensor) -> Tensor:
        """float64, rounded for Karras sigmas (diffusers' KDPM2 keeps these in float64)."""
        t = sigma_to_t(sig, train)
        return t.round() if self.karras else t

    def intervals(self, num_steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per step i: (t_i, sigma_i, sigma_mid_i, the midpoint's timestep, where the step ends, sigma_up_i), with
        sigma_mid = 0 on the last step (Euler only) and sigma_up = 0 unless ancestral."""
        ts, sig = self.schedule(num_steps)
        n = len(ts)
        if self.ancestral:
            nxt = torch.cat([sig[1:], sig.new_zeros(1)])
            end, up = ancestral_split(sig, nxt)
            # a sigma_down cancelled to exactly 0 would put the log midpoint at 0, a 0/0 slope (NaN in diffusers)
            end = torch.where((end == 0) & (nxt > 0), nxt**2 / sig, end)
            mid = log_midpoint(sig, end)[:n]
        else:
            end, up = sig[1:], sig.new_zeros(n)
            mid = log_midpoint(sig[1:], sig[:-1])
        mid[-1] = 0.0
        t_mid = sigma_to_t(mid, train_sigmas(self.alpha_bars()), float32=True).to(ts.dtype)
        return ts, sig[:n], mid, t_mid, end[:n], up[:n]

    def timesteps(self, num_steps: int) -> Tensor:
        """The timesteps of the 2N − 1 evaluations: t_0, then the midpoint of each interval before the next t."""
        ts, _, _, t_mid, _, _ = self.intervals(num_steps)
        return torch.cat([ts[:1], torch.stack([t_mid[:-1], ts[1:]], dim=1).flatten()])

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Ancestral: the fresh noise of step i is `noise[i]` or drawn
        from `generator` (one draw per step but the last, as diffusers). eta is ignored (as diffusers).
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig, mid, t_mid, end, up = self.intervals(num_steps)
        z = step_noises(noise, generator, len(ts) - 1) if self.ancestral else None
        ts_dev, t_mid_dev = ts.to(x.device).unbind(), t_mid.to(x.device).unbind()

        def slope(x_s: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            """(d = (x − x0)/sigma, the model output), one model evaluation at noise level s."""
            out = eps_fn(x_s / (s**2 + 1) ** 0.5, t)
            return (x_s - denoised(out, x_s, s, self.prediction_type)) / s, out

        x, begin = self.start(x, num_steps, skip, len(ts))
        k = 2 * begin  # evaluation counter, as the callback's index (step i starts at evaluation 2i)
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            d, _ = slope(x, sig[i], ts_dev[i])
            x_mid = x + d * (mid[i] - sig[i])
            if callback is not None:
                callback(k, ts_dev[i], x_mid)
            k += 1
            if i == len(ts) - 1:  # into sigma = 0: the half step is the whole one
                return x_mid
            d_mid, out = slope(x_mid, mid[i], t_mid_dev[i])
            x = x + d_mid * (end[i] - sig[i])
            if z is not None:
                x = x + z(i, out, out.dtype) * up[i]
            if callback is not None:
                callback(k, t_mid_dev[i], x)
            k += 1
        return x


@dataclass(frozen=True, kw_only=True)
class DPM2Karras(DPM2):
    """DPM-Solver-2 on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}


@dataclass(frozen=True, kw_only=True)
class DPM2Ancestral(DPM2):
    """DPM-Solver-2 ancestral with diffusers' KDPM2AncestralDiscreteScheduler defaults."""

    ancestral: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class DPM2AncestralKarras(DPM2Ancestral):
    """DPM-Solver-2 ancestral on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
