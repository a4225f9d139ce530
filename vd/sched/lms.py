"""Linear multistep (LMS) sampler of order 4 in sigma space (Karras et al. 2022 notation; k-diffusion's
`sample_lms`), matching diffusers' `LMSDiscreteScheduler` (v0.42.1) without scipy, also with Karras sigmas
(`lms_karras`; the schedule is in sigma_space.py):
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_lms_discrete.py

x lives at noise level sigma = sqrt((1 − alpha_bar)/alpha_bar) (x_sigma = x0 + sigma·eps, the
variance-exploding view of the same diffusion). The ODE dx/dsigma = d = (x − x0)/sigma is stepped with
Adams–Bashforth-like weights c_j = ∫ L_j(τ) dτ over [sigma_i, sigma_{i+1}], L_j the Lagrange basis on
the last `order` sigmas. Precision follows diffusers: float32 sigmas and schedule scalars; the
coefficients come from a float32 evaluation of the integrand summed in float64 (see lms_coefficients).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn
from .sigma_space import SigmaSchedule
from .sigmas import denoised

ORDER = 4  # diffusers' default `order` of LMSDiscreteScheduler.step


# 21-point Gauss–Kronrod rule on [-1, 1] (QUADPACK's QK21, the first rule scipy.integrate.quad applies):
# nodes x_k >= 0 (used as ±x_k) and weights, listed in QUADPACK's summation order: centre, the
# 10-point Gauss nodes, then the Kronrod-only nodes. Exact for polynomials of degree <= 31.
_QK21 = (
    (0.0, 0.149445554002916905664936468389821),
    (0.973906528517171720077964012084452, 0.032558162307964727478818972459390),
    (0.865063366688984510732096688423493, 0.075039674810919952767043140916190),
    (0.679409568299024406234327365114874, 0.109387158802297641899210590325805),
    (0.433395394129247190799265943165784, 0.134709217311473325928054001771707),
    (0.148874338981631210884826001129720, 0.147739104901338491374841515972068),
    (0.995657163025808080735527280689003, 0.011694638867371874278064396062192),
    (0.930157491355708226001207180059508, 0.054755896574351996031381300244580),
    (0.780817726586416897063717578345042, 0.093125454583697605535065465083366),
    (0.562757134668604683339000099272694, 0.123491976262065851077958109831074),
    (0.294392862701460198131126603103866, 0.142775938577060080797094273138717),
)


def lms_coefficients(sigmas: Tensor, i: int, order: int, dtype: torch.dtype = torch.float64) -> list[float]:
    """LMS weights c_j, j < order, for the step sigma_i -> sigma_{i+1}:
    c_j = ∫ prod_{m != j} (τ − sigma_{i−m})/(sigma_{i−j} − sigma_{i−m}) dτ over [sigma_i, sigma_{i+1}].

    The integrand is a polynomial of degree <= 3, so QK21 is exact; in float64 this is the exact
    coefficient. parity: diffusers evaluates the integrand on float32 sigma tensors (float32
    arithmetic, float64 sum) inside scipy's quad; with dtype=float32 we redo exactly that and get
    its coefficients bit for bit (they differ from the exact ones by up to ~5e-7 relative).
    """
    s = sigmas.to(dtype)
    a, b = float(s[i]), float(s[i + 1])  # b < a: sigmas decrease
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    x = torch.tensor([k for k, _ in _QK21[1:]], dtype=torch.float64)
    taus = torch.cat([x.new_tensor([mid]), mid - half * x, mid + half * x]).to(dtype)  # (21,)
    coeffs = []
    for j in range(order):
        basis = torch.ones_like(taus)
        for m in range(order):
            if m != j:
                basis = basis * ((taus - s[i - m]) / (s[i - j] - s[i - m]))
        f = basis.tolist()  # f[0] at mid; f[k], f[10 + k] at mid ∓ half·x_k
        acc = _QK21[0][1] * f[0]
        for k, (_, w) in enumerate(_QK21[1:], start=1):
            acc += w * (f[k] + f[10 + k])
        coeffs.append(acc * half)
    return coeffs


@dataclass(frozen=True, kw_only=True)
class LMS(SigmaSchedule):
    """LMS with diffusers' LMSDiscreteScheduler defaults (note: "linspace" spacing, float timesteps)."""

    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def karras_range(self, low: float, high: float) -> tuple[float, float]:
        """The schedule's own ends: diffusers' LMS ignores a config's sigma_min and sigma_max."""
        return low, high

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None, skip: int | None = None,
    ) -> Tensor:
        """Run the LMS loop from unit-variance noise `x` (B, ...). Deterministic: eta, generator, noise
        are accepted for a uniform call and ignored.
        skip: start at step `skip` from x noised to that step's level (`noised_to_step`: diffusers' img2img)."""
        ts, sig = self.schedule(num_steps)  # (N,), (N+1,) float32
        ts_dev = ts.to(x.device).unbind()  # 0-d timesteps passed to eps_fn and callback
        x, begin = self.start(x, num_steps, skip, len(ts))
        ds: list[Tensor] = []  # last ORDER derivatives d = dx/dsigma, oldest first
        for i in range(begin, len(ts)):  # (N + 1 for some "trailing" counts: see common.timestep_points)
            s = sig[i]  # 0-d float32
            # the model sees x = x0 + sigma·eps scaled back to the variance-preserving x_t
            out = eps_fn(x / (s**2 + 1) ** 0.5, ts_dev[i])
            x0 = denoised(out, x, s, self.prediction_type)
            ds = (ds + [(x - x0) / s])[-ORDER:]
            # parity: the order counts from the schedule's start even after a part-way start, where fewer
            # derivatives are at hand: the sum below then uses the first weights only (as diffusers)
            coeffs = lms_coefficients(sig, i, min(i + 1, ORDER), dtype=torch.float32)
            # x_{i+1} = x_i + sum_j c_j·d_{i−j} (newest d first), in diffusers' summation order
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x


@dataclass(frozen=True, kw_only=True)
class LMSKarras(LMS):
    """LMS on Karras et al.'s sigmas (eq. 5, rho = 7; diffusers: use_karras_sigmas=True)."""

    karras: ClassVar[bool] = True
    OVERRIDES: ClassVar[dict[str, Any]] = {"use_karras_sigmas": True}
