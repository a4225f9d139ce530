"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv:2302.04867): the UniP-p predictor with the UniC corrector, in data prediction (x0) form (with
predict_x0=False in noise prediction form: m_k the model's eps, hh = h, the roles of alpha and sigma swapped),
matching diffusers' `UniPCMultistepScheduler` (v0.42.1) defaults (order 2, B(h) = e^h − 1 "bh2"):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_unipc_multistep.py

Notation (paper): x_t = alpha_t·x0 + sigma_t·eps, lambda = log(alpha_t/sigma_t), h = lambda_t − lambda_s0;
m_k the model's x0 at past steps, r_k = (lambda_{s_k} − lambda_s0)/h, D_k = (m_k − m0)/r_k; the weights rho
solve R·rho = b with R_ij = r_j^i and b_i = i!·phi_{i+1}(hh)/B(h) (eq. 7-8; rho = 1/2 at order 2/1).
Step i evaluates the model at the predicted x_i, corrects x_i with that evaluation (UniC, free: no extra call),
then predicts x_{i+1} (UniP); the order ramps up from 1 and back down to 1 at the last step.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .multistep import MultistepSchedule
from .sigmas import log_snr, vp, vp_eps, vp_x0


@dataclass(frozen=True, kw_only=True)
class UniPC(MultistepSchedule):
    """UniPC (bh2, data prediction) with diffusers' UniPCMultistepScheduler defaults."""

    solver_type: str = "bh2"
    lower_order_final: bool = True
    predict_x0: bool = True  # False: the noise prediction form (eps in place of x0, h in place of −h)
    disable_corrector: tuple[int, ...] = ()  # steps i whose UniC correction (made at step i + 1) is skipped

    ORDERS: ClassVar[tuple[int, ...]] = (1, 2, 3)
    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        **MultistepSchedule.UNSUPPORTED, "solver_p": None,
        "shift_terminal": None,
    }

    round_cosine: ClassVar[bool] = True
    spread_ends_at_own_last: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # (a list, as JSON gives it, kept as a tuple: the dataclass stays immutable)
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        if self.solver_type in ("midpoint", "heun", "logrho"):  # DPM-Solver's names: diffusers runs bh2
            object.__setattr__(self, "solver_type", "bh2")
        self.check_choice("solver_type", ("bh1", "bh2"))
        if not self.predict_x0 and self.final_sigmas_type == "zero":
            raise ValueError("predict_x0=False needs final_sigmas_type 'sigma_min' for UniPC: ending at sigma 0, its "
                             "last step multiplies 0 by an infinite h and gives NaN (as in diffusers)")

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the loop from unit-variance noise `x`. Deterministic: eta, generator, noise are ignored.
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)
        lam = [log_snr(s) for s in sig]  # lambda at each sigma (inf at the final 0)
        ts_dev = ts.to(x.device).unbind()
        x, begin = self.start(x, num_steps, skip, len(ts))
        if not self.lower_order_final and self.solver_order > 1 and len(ts) - begin > 1 and sig[-1] == 0:
            # the last step, onto sigma 0, keeps the run's order: its h is infinite and every r_k 0, so an order
            # above 1 divides by r_k (inf latents) or solves a singular system, as diffusers does
            raise ValueError(f"lower_order_final=False with solver_order {self.solver_order} needs final_sigmas_type "
                             "'sigma_min' for UniPC (or a run of 1 step): ending at sigma 0, its last step has an "
                             "infinite h and gives inf or a singular system (as in diffusers)")
        ms: list[Tensor] = []  # past x0 predictions, newest last
        x_last, order = x, 1  # x and the predictor's order of the previous step
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            out = eps_fn(x, ts_dev[i])
            if self.predict_x0:
                m = self.threshold(vp_x0(out, x, *vp(sig[i]), self.prediction_type))
            else:  # (diffusers thresholds only in the x0 form)
                m = vp_eps(out, x, *vp(sig[i]), self.prediction_type)
            # UniC: redo step i − 1 -> i with m as an extra point (not at the first step run: no step to redo)
            if i > begin and i - 1 not in self.disable_corrector:
                x = self.update(x_last, ms, lam, sig, i - 1, order, m_t=m)
            ms = (ms + [m])[-self.solver_order:]
            left = len(ts) - i if self.lower_order_final else self.solver_order
            order = min(self.solver_order, left, i - begin + 1)
            x_last = x
            x = self.update(x, ms, lam, sig, i, order)  # UniP: i -> i + 1
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x

    def update(self, x: Tensor, ms: list[Tensor], lam: list[Tensor], sig: Tensor, s: int, order: int,
               m_t: Tensor | None = None) -> Tensor:
        """x at step s + 1 from x at step s and the x0 (or eps) history ms (ms[-1] at s): the predictor UniP-order,
        or with m_t (the x0 or eps at s + 1) the corrector UniC-order."""
        h = lam[s + 1] - lam[s]
        if h == 0:  # onto the same sigma (Karras, exponential and beta sigmas end at sigma_min, which
            # final_sigmas_type "sigma_min" appends again): the identity. diffusers computes the step, and at order
            # 3 solves a singular system there (NaN); at orders 1 and 2 it gives x bit for bit.
            return x
        alpha_t, sigma_t = vp(sig[s + 1])
        alpha_s0, sigma_s0 = vp(sig[s])
        m0 = ms[-1]
        rks = [(lam[s - k] - lam[s]) / h for k in range(1, order)]  # r_k of the earlier points
        D1s = [(ms[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # e^hh − 1
        B_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        # b_k = k!·phi_{k+1}(hh)/B(h) with phi_{k+1} from h_phi_k = h_phi_{k−1}/hh − 1/k!
        r = torch.stack([*rks, torch.ones(())])
        R, b, h_phi_k, fact = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            R.append(torch.pow(r, k - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.stack(R), torch.stack(b)
        if self.predict_x0:
            x_t, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
        else:
            x_t, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t
        if m_t is None:  # predictor: uses the order − 1 earlier points
            if order == 1:
                return x_t.to(x.dtype)
            rho = torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            res = sum(p * d for p, d in zip(rho.to(x.dtype), D1s))
            return (x_t - scale * B_h * res).to(x.dtype)
        # corrector: the earlier points and the new one, D1_t = m_t − m0
        rho = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(R, b)
        rho = rho.to(x.dtype)
        res = sum(p * d for p, d in zip(rho[:-1], D1s))
        return (x_t - scale * B_h * (res + rho[-1] * (m_t - m0))).to(x.dtype)


@dataclass(frozen=True, kw_only=True)
class UniPCKarras(UniPC):
    """UniPC on Karras et al.'s sigmas (diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
