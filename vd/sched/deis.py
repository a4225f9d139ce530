"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv:2204.13902), its
multistep "log-rho" form, matching diffusers' `DEISMultistepScheduler` (v0.42.1) defaults (order 2):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_deis_multistep.py

Notation: x_t = alpha_t·x0 + sigma_t·eps, rho_t = sigma_t/alpha_t, so x_t/alpha_t = x_s/alpha_s + ∫ eps d rho.
A step of order k integrates the polynomial through the last k eps in log rho (the Lagrange basis l_j), in closed
form: x_t = alpha_t·(x_s/alpha_s0 + sum_j c_j·eps_j), c_j = ∫_{rho_s0}^{rho_t} l_j(log rho) d rho. First order is
the exponential-integrator step x_t = (alpha_t/alpha_s)·x_s − sigma_t·(e^h − 1)·eps, h = lambda_t − lambda_s.
The schedule is DPM-Solver++'s (multistep.py); the last step ends at the smallest training sigma, not at 0.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .common import Callback, EpsFn
from .multistep import MultistepSchedule
from .sigmas import log_snr, vp, vp_x0


def np_log(x: Tensor) -> Tensor:
    """log of a float32 scalar by numpy, whose float32 log can differ from torch's in the last bit: diffusers' DEIS
    takes np.log of its tensors."""
    return torch.tensor(np.log(x.numpy()))


def second_order_weight(t: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """∫ (log r − log c)/(log b − log c) dr at r = t: the antiderivative of the linear basis polynomial in log rho
    that is 1 at b and 0 at c."""
    return t * (-np_log(c) + np_log(t) - 1) / (np_log(b) - np_log(c))


def third_order_weight(t: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """∫ (log r − log c)(log r − log d)/((log b − log c)(log b − log d)) dr at r = t: the quadratic basis
    polynomial in log rho that is 1 at b and 0 at c and d."""
    lt, lb, lc, ld = np_log(t), np_log(b), np_log(c), np_log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


@dataclass(frozen=True, kw_only=True)
class DEIS(MultistepSchedule):
    """DEIS-multistep (log-rho) with diffusers' DEISMultistepScheduler defaults."""

    solver_type: str = "logrho"
    lower_order_final: bool = True
    # diffusers' DEIS has neither key: it ends at the smallest training sigma (Karras, exponential or beta sigmas:
    # at their own last), and ignores zero terminal SNR
    final_sigmas_type: ClassVar[str] = "sigma_min"
    rescale_betas_zero_snr: ClassVar[bool] = False
    round_cosine: ClassVar[bool] = True
    spread_ends_at_own_last: ClassVar[bool] = True

    ORDERS: ClassVar[tuple[int, ...]] = (1, 2, 3)
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        # diffusers reads DPM-Solver's names as "deis" and refuses the others
        **MultistepSchedule.UNSUPPORTED, "algorithm_type": ("deis", "dpmsolver", "dpmsolver++"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):  # other solvers' names: diffusers runs logrho
            object.__setattr__(self, "solver_type", "logrho")
        self.check_choice("solver_type", ("logrho",))

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Deterministic: eta, generator, noise are ignored.
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        ts_dev = ts.to(x.device).unbind()
        x, begin = self.start(x, num_steps, skip, len(ts))
        eps: list[Tensor] = []  # the noise at past steps (from the thresholded x0 where thresholding), newest last
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            out = eps_fn(x, ts_dev[i])
            alpha_s, sigma_s = vp(sig[i])
            x0 = self.threshold(vp_x0(out, x, alpha_s, sigma_s, self.prediction_type))
            eps = (eps + [(x - alpha_s * x0) / sigma_s])[-3:]
            x = self.update(x, eps, sig, i, self.step_order(i, len(ts), begin))
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def update(self, x: Tensor, eps: list[Tensor], sig: Tensor, s: int, order: int) -> Tensor:
        """x at step s + 1 from x at step s and the eps history (eps[-1] at s), of the given order."""
        alpha_t, sigma_t = vp(sig[s + 1])
        alpha_s, sigma_s = vp(sig[s])
        if order == 1:
            h = log_snr(sig[s + 1]) - log_snr(sig[s])
            return (alpha_t / alpha_s) * x - (sigma_t * (torch.exp(h) - 1.0)) * eps[-1]
        rho_t = sigma_t / alpha_t
        rho = [sigma / alpha for alpha, sigma in (vp(sig[s - k]) for k in range(order))]  # at s, s − 1, ...
        if order == 2:
            r0, r1 = rho
            c0 = second_order_weight(rho_t, r0, r1) - second_order_weight(r0, r0, r1)
            c1 = second_order_weight(rho_t, r1, r0) - second_order_weight(r0, r1, r0)
            return alpha_t * (x / alpha_s + c0 * eps[-1] + c1 * eps[-2])
        r0, r1, r2 = rho
        c0 = third_order_weight(rho_t, r0, r1, r2) - third_order_weight(r0, r0, r1, r2)
        c1 = third_order_weight(rho_t, r1, r2, r0) - third_order_weight(r0, r1, r2, r0)
        c2 = third_order_weight(rho_t, r2, r0, r1) - third_order_weight(r0, r2, r0, r1)
        return alpha_t * (x / alpha_s + c0 * eps[-1] + c1 * eps[-2] + c2 * eps[-3])


@dataclass(frozen=True, kw_only=True)
class DEISKarras(DEIS):
    """DEIS on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
