"""DPM-Solver++(2M) and its SDE form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095, Algorithm 2), matching diffusers'
`DPMSolverMultistepScheduler` (v0.42.1) with algorithm_type "dpmsolver++" (`dpmpp_2m`) or
"sde-dpmsolver++" (`dpmpp_2m_sde`):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py

Notation (paper): x_t = alpha_t·x0 + sigma_t·eps, lambda_t = log(alpha_t/sigma_t), h = lambda_t − lambda_s for
a step s -> t; D0 = the model's x0 at s, D1 its divided difference with the previous step's x0 (r0 = h_prev/h).
The first step and the last (into sigma = 0) are first order (DPM-Solver++(1) = DDIM), the others second order;
with solver_order 3 (3M) D2, the second divided difference over three steps, adds a third-order term.
The SDE form adds exp(−h) damping and fresh noise of std sigma_t·sqrt(1 − exp(−2h)), drawn in float32 every
step. diffusers steps in float32 whatever the model's dtype; so do we.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .multistep import MultistepSchedule
from .noise import step_noises
from .sigmas import log_snr, vp, vp_x0


@dataclass(frozen=True, kw_only=True)
class DPMSolverPP(MultistepSchedule):
    """DPM-Solver++(2M) with diffusers' DPMSolverMultistepScheduler defaults."""

    solver_type: str = "midpoint"
    algorithm_type: str = "dpmsolver++"  # (its noise-prediction forms, "dpmsolver" and "sde-dpmsolver", not built)
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    lambda_min_clipped: float = -math.inf
    sde: ClassVar[bool] = False  # the SDE form: diffusers' algorithm_type="sde-dpmsolver++"

    ORDERS: ClassVar[tuple[int, ...]] = (1, 2, 3)
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        **MultistepSchedule.UNSUPPORTED,
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),  # not learned
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_type in ("logrho", "bh1", "bh2"):  # other solvers' names: diffusers runs midpoint
            object.__setattr__(self, "solver_type", "midpoint")
        self.check_choice("solver_type", ("midpoint", "heun"))
        self.check_choice("algorithm_type", ("sde-dpmsolver++",) if self.sde else ("dpmsolver++", "deis"))
        if self.algorithm_type == "deis":  # DEIS's name, read as "dpmsolver++" (diffusers), but not into sigma 0
            if self.final_sigmas_type == "zero":
                raise ValueError(f"algorithm_type='deis' needs final_sigmas_type 'sigma_min' for {type(self).__name__}"
                                 " (diffusers refuses 'zero' with it)")
            object.__setattr__(self, "algorithm_type", "dpmsolver++")

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. SDE form: the fresh noise of step i is `noise[i]` or drawn
        from `generator` as diffusers does. eta is ignored (as diffusers).
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        z = step_noises(noise, generator, len(ts)) if self.sde else None
        lam = [log_snr(s) for s in sig]  # lambda at each sigma (inf at the final 0)
        ts_dev = ts.to(x.device).unbind()
        x, begin = self.start(x, num_steps, skip, len(ts))
        ms: list[Tensor] = []  # the model's x0 at past steps, newest last
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            out = eps_fn(x, ts_dev[i])
            ms = (ms + [self.threshold(vp_x0(out, x, *vp(sig[i]), self.prediction_type))])[-3:]
            zi = z(i, out, torch.float32) if self.sde else None  # (drawn at every step, as diffusers draws it)
            x = self.update(x.float(), ms, lam, sig, i, self.step_order(i, len(ts), begin), zi).to(out.dtype)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def update(self, x: Tensor, ms: list[Tensor], lam: list[Tensor], sig: Tensor, i: int, order: int,
               zi: Tensor | None) -> Tensor:
        """x (float32) at step i + 1 from x at step i, the x0 history ms (ms[-1] at step i) and, in the SDE form,
        the step's noise zi."""
        h = lam[i + 1] - lam[i]
        if h == 0:  # onto the same sigma (Karras, exponential and beta sigmas end at sigma_min, which
            # final_sigmas_type "sigma_min" appends again): the identity. diffusers computes the step, and its
            # third-order and Heun-form terms divide 0 by 0 there (NaN); its other forms give x bit for bit.
            return x
        alpha_s, sigma_s = vp(sig[i])
        alpha_t, sigma_t = vp(sig[i + 1])
        D0, D1, D2 = ms[-1], None, None
        if order >= 2:  # D1 = (m0 − m1)/r0
            D1 = 1.0 / ((lam[i] - lam[i - 1]) / h) * (ms[-1] - ms[-2])
        if order == 3:  # with r1 and the step before: D1 and D2 of the quadratic through three x0s
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            D1_1 = 1.0 / r1 * (ms[-2] - ms[-3])
            D1, D2 = D1 + r0 / (r0 + r1) * (D1 - D1_1), 1.0 / (r0 + r1) * (D1 - D1_1)
        heun = self.solver_type == "heun" or order == 3  # the form of the D1 term (third order: Heun's)
        if not self.sde:  # x_t = sigma_t/sigma_s·x − alpha_t·(e^−h − 1)·D0 + (…)·D1 − (…)·D2
            x = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * D0
            if D1 is not None and not heun:
                x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            elif D1 is not None:
                x = x + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1
            if D2 is not None:
                x = x - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * D2
            return x
        x = sigma_t / sigma_s * torch.exp(-h) * x + alpha_t * (1 - torch.exp(-2.0 * h)) * D0
        if D1 is not None and not heun:
            x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
        elif D1 is not None:
            x = x + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
        if D2 is not None:
            x = x + alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2
        return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * zi


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPKarras(DPMSolverPP):
    """DPM-Solver++(2M) on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSDE(DPMSolverPP):
    """SDE-DPM-Solver++(2M) (diffusers: algorithm_type="sde-dpmsolver++")."""

    algorithm_type: str = "sde-dpmsolver++"
    sde: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True, kw_only=True)
class DPMSolverPPSDEKarras(DPMSolverPPSDE):
    """SDE-DPM-Solver++(2M) on Karras et al.'s sigmas."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {**DPMSolverPPSDE.OVERRIDES, "use_karras_sigmas": True}
