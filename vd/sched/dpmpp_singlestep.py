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
from .noise import step_noises
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
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. SDE form: the fresh noise of step i is `noise[i]` or drawn
        from `generator` (one draw per step, as diffusers). eta is ignored (as diffusers).
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img); a
        group cut by the start runs at the order its steps run so far allow (as diffusers)."""
        ts, sig = self.schedule(num_steps)
        z = step_noises(noise, generator, len(ts)) if self.sde else None
        lam = [log_snr(s) for s in sig]  # lambda at each sigma (inf at a final 0)
        ts_dev = ts.to(x.device).unbind()
        orders = self.orders(num_steps)
        x, begin = self.start(x, num_steps, skip, len(orders))
        ms: list[Tensor] = []  # the model's x0 at past steps, newest last
        anchor = x  # x where the current group started
        for i in range(begin, len(orders)):
            order = min(orders[i], i - begin + 1)
            out = eps_fn(x, ts_dev[i])
            ms = (ms + [self.threshold(vp_x0(out, x, *vp(sig[i]), self.prediction_type))])[-3:]
            if order == 1:
                anchor = x
            x = self.update(anchor, ms, sig, lam, i, order, None if z is None else z(i, out, out.dtype))
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def update(self, anchor: Tensor, ms: list[Tensor], sig: Tensor, lam: list[Tensor], i: int, order: int,
               z: Tensor | None = None) -> Tensor:
        """x at step i + 1 from the group's anchor (at step i + 1 − order) and the group's x0s ms[-order:] (and
        the SDE form's fresh noise z): x = c·anchor + w0·D0 + w1·D1 + w2·D2 (+ noise)."""
        alpha_t, sigma_t = vp(sig[i + 1])
        s = i + 1 - order  # the anchor's step
        sigma_s = vp(sig[s])[1]
        h = lam[i + 1] - lam[s]
        if not self.sde:
            e = torch.exp(-h) - 1.0
            c, w0 = sigma_t / sigma_s, -(alpha_t * e)
            w1, w2 = alpha_t * (e / h + 1.0), -(alpha_t * ((e + h) / h**2 - 0.5))
        else:  # e^−h damping, 2h in the weights
            e = 1.0 - torch.exp(-2.0 * h)
            c, w0 = sigma_t / sigma_s * torch.exp(-h), alpha_t * e
            w1, w2 = alpha_t * (e / (-2.0 * h) + 1.0), alpha_t * ((e + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)
        x = c * anchor + w0 * ms[-order]
        if order == 2:  # D1 = (m0 − m1)/r0, r0 = (lambda_s0 − lambda_s1)/h
            r0 = (lam[i] - lam[s]) / h
            D1 = (1.0 / r0) * (ms[-1] - ms[-2])
            x = x + (0.5 * w0 if self.solver_type == "midpoint" else w1) * D1
        elif order == 3:  # D1 and D2 of the quadratic through the group's three x0s
            r0, r1 = (lam[i] - lam[s]) / h, (lam[i - 1] - lam[s]) / h
            D1_0, D1_1 = (1.0 / r1) * (ms[-2] - ms[-3]), (1.0 / r0) * (ms[-1] - ms[-3])
            if self.solver_type == "midpoint":  # (diffusers' midpoint form keeps only D1_1's term)
                x = x + w1 * D1_1
            else:
                D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
                D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
                x = x + w1 * D1 + w2 * D2
        return x if z is None else x + sigma_t * torch.sqrt(e) * z


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSinglestepKarras(DPMSolverPPSinglestep):
    """DPM-Solver++(2S) on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSinglestepSDE(DPMSolverPPSinglestep):
    """SDE-DPM-Solver++(2S) (diffusers: algorithm_type="sde-dpmsolver++")."""

    algorithm_type: str = "sde-dpmsolver++"
    sde: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSinglestepSDEKarras(DPMSolverPPSinglestepSDE):
    """SDE-DPM-Solver++(2S) on Karras et al.'s sigmas."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {**DPMSolverPPSinglestepSDE.OVERRIDES, "use_karras_sigmas": True}
