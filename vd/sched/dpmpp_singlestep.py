"""DPM-Solver++ in its singlestep form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095, Algorithm 1 as "2S"; order 3 from "DPM-Solver", arXiv:2206.00927),
matching diffusers' `DPMSolverSinglestepScheduler` (v0.42.1) defaults (order 2, midpoint):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_singlestep.py

Unlike the multistep form (dpmpp.py), a step of order k does not reuse x0s from before its group: the orders run in
groups 1, 2(, 3). A group starts at an anchor x_s with a first-order step, each next step of the group starts again
from the anchor and uses the x0s the group has evaluated since (same notation: D0, D1, D2 and r_k of the lambdas).
The schedule is DPM-Solver++'s (multistep.py), always "linspace" (the class has no timestep_spacing).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .dpmpp import DPMSolverPP
from .sigmas import log_snr, vp, vp_x0


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSinglestep(DPMSolverPP):
    """DPM-Solver++(2S) with diffusers' DPMSolverSinglestepScheduler defaults (note: lower_order_final false). Its
    keys are DPM-Solver++(2M)'s but for these (the class lacks them, and ignores a config's):"""

    lower_order_final: bool = False
    timestep_spacing: ClassVar[str] = "linspace"
    steps_offset: ClassVar[int] = 0
    rescale_betas_zero_snr: ClassVar[bool] = False
    euler_at_final: ClassVar[bool] = False
    use_lu_lambdas: ClassVar[bool] = False
    round_cosine: ClassVar[bool] = True  # (Karras timesteps of cosine betas rounded, as UniPC's)

    def orders(self, num_steps: int) -> list[int]:
        """The order of each step, in groups 1, 2(, 3); the last step into sigma 0 is first order. Without
        lower_order_final the groups must fill the steps: diffusers switches it on otherwise (for good: a later
        call on the same diffusers scheduler keeps it on, where here each call reads the config afresh)."""
        n, k = num_steps, self.solver_order
        lower_final = self.lower_order_final or n % k != 0
        group = list(range(1, k + 1))
        if not lower_final:
            orders = group * (n // k)
        elif k == 3 and n % 3 == 0:
            orders = group * (n // 3 - 1) + [1, 2, 1]
        elif k == 2 and n % 2 == 0:
            orders = group * (n // 2 - 1) + [1, 1]
        else:  # a last, shorter group
            orders = group * (n // k) + group[:n % k]
        if self.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Deterministic: eta, generator, noise are ignored."""
        ts, sig = self.schedule(num_steps)
        lam = [log_snr(s) for s in sig]  # lambda at each sigma (inf at a final 0)
        ts_dev = ts.to(x.device).unbind()
        x = x * self.init_noise_sigma(num_steps)
        ms: list[Tensor] = []  # the model's x0 at past steps, newest last
        anchor = x  # x where the current group started
        for i, order in enumerate(self.orders(num_steps)):
            out = eps_fn(x, ts_dev[i])
            ms = (ms + [self.threshold(vp_x0(out, x, *vp(sig[i]), self.prediction_type))])[-3:]
            if order == 1:
                anchor = x
            x = self.update(anchor, ms, sig, lam, i, order)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def update(self, anchor: Tensor, ms: list[Tensor], sig: Tensor, lam: list[Tensor], i: int, order: int) -> Tensor:
        """x at step i + 1 from the group's anchor (at step i + 1 − order) and the group's x0s ms[-order:]."""
        alpha_t, sigma_t = vp(sig[i + 1])
        s = i + 1 - order  # the anchor's step
        sigma_s = vp(sig[s])[1]
        h = lam[i + 1] - lam[s]
        phi = alpha_t * (torch.exp(-h) - 1.0)  # (alpha_t·(e^−h − 1): the first-order weight, negated)
        x = (sigma_t / sigma_s) * anchor - phi * ms[-order]
        if order == 2:  # D1 = (m0 − m1)/r0, r0 = (lambda_s0 − lambda_s1)/h
            r0 = (lam[i] - lam[s]) / h
            D1 = (1.0 / r0) * (ms[-1] - ms[-2])
            if self.solver_type == "midpoint":
                return x - 0.5 * phi * D1
            return x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        if order == 3:  # D1 and D2 of the quadratic through the group's three x0s
            r0, r1 = (lam[i] - lam[s]) / h, (lam[i - 1] - lam[s]) / h
            D1_0, D1_1 = (1.0 / r1) * (ms[-2] - ms[-3]), (1.0 / r0) * (ms[-1] - ms[-3])
            if self.solver_type == "midpoint":  # (diffusers' midpoint form keeps only D1_1's term)
                return x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1_1
            D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
            D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
            x = x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            return x - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        return x


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSinglestepKarras(DPMSolverPPSinglestep):
    """DPM-Solver++(2S) on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
