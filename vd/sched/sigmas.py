"""Noise levels sigma = sqrt((1 − alpha_bar)/alpha_bar): the variance-exploding view of VD's diffusion,
x_sigma = x0 + sigma·eps (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv:2206.00364), shared by the samplers that step in sigma (Euler, Heun, LMS) or in
lambda = −log sigma (DPM-Solver++, UniPC).

Numbers follow diffusers 0.42.1: float32 training sigmas, float64 schedule arithmetic, float32 at the end.
The Karras sigmas and their timesteps are computed in numpy, as diffusers computes them: numpy's float32 log
and float64 power can differ from torch's in the last bit, and a timestep that is rounded (DPM-Solver++, UniPC)
or truncated (cosine betas) turns that bit into a whole step.
"""

import math

import numpy as np
import torch
from torch import Tensor

from .beta_quantile import beta_quantiles


def train_sigmas(alpha_bar: Tensor) -> Tensor:
    """sigma_t for t = 0..T−1, float32 (ascending in t, but for zero terminal SNR's last ones: see sigma_to_t)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def interp(train: Tensor, t: Tensor) -> Tensor:
    """float64 sigma at (fractional) timesteps t, linear between the training timesteps and constant beyond the
    ends, as np.interp (a "trailing" schedule of 998 steps ends at t = -1)."""
    train, t = train.double(), t.double()
    lo = t.floor().long().clamp(0, len(train) - 2)
    left, right, slope = train[lo], train[lo + 1], train[lo + 1] - train[lo]
    out = slope * (t - lo) + left
    # np.interp's rules, which matter for an infinite training sigma (alpha_bar 0 in float32, zero terminal SNR):
    # a training timestep gives its own value; a NaN is retried from the right point, then equal neighbours give
    # their value; and the ends are returned as they are
    out = torch.where(t == lo, left, out)
    out = torch.where(out.isnan(), slope * (t - lo - 1) + right, out)
    out = torch.where(out.isnan() & (left == right), left, out)
    return torch.where(t >= len(train) - 1, train[-1], torch.where(t < 0, train[0], out))


def ancestral_split(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up), sigma_down² + sigma_up² = sigma_next²: an ancestral step (eta 1) as diffusers computes
    it, in float32. Where sigma_next is far below sigma (cosine betas start at sigma ≈ 2e4) the subtraction cancels
    to a negative and diffusers' step is NaN; there sigma_down takes its exact value sigma_next²/sigma."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    down_sq = sigma_next**2 - up**2
    return torch.where(down_sq < 0, sigma_next**2 / sigma, down_sq.clamp(min=0) ** 0.5), up


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: n float64 sigmas evenly spaced in sigma^(1/rho), from sigma_max down to
    sigma_min."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.from_numpy((hi + np.linspace(0, 1, n) * (lo - hi)) ** rho)


def exponential(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """n float64 sigmas evenly spaced in log sigma, from sigma_max down to sigma_min (diffusers'
    use_exponential_sigmas)."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def beta_spaced(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """n float64 sigmas from sigma_max down to sigma_min at the quantiles 1 − k/(n − 1) of Beta(alpha, beta)
    (diffusers' use_beta_sigmas, after Lee et al. 2024: denser at both ends than in the middle)."""
    ppf = np.array(beta_quantiles(tuple((1 - np.linspace(0, 1, n)).tolist()), alpha, beta))
    return torch.from_numpy(sigma_min + ppf * (sigma_max - sigma_min))


def sigma_to_t(sigmas: Tensor, train: Tensor, float32: bool = False) -> Tensor:
    """(Fractional) timestep of each sigma: linear interpolation in log sigma between the two training timesteps
    around it, clamped to [0, T − 1]. Computed in float64, or with float32=True wholly in float32 (diffusers' KDPM2
    maps its float32 midpoint sigmas so); the dtype of the result says which."""
    log_train = np.log(train.numpy())  # float32
    s = sigmas.float().numpy() if float32 else sigmas.double().numpy()
    log_s = np.log(np.maximum(s, s.dtype.type(1e-10)))
    # index of the last training sigma <= sigma (0 if none), at most T − 2; "last", not "how many − 1": with zero
    # terminal SNR the training sigmas can fall again at t = T − 1 (alpha_bar floored to 2**-24 there)
    below = log_s[:, None] - log_train[None, :] >= 0
    last = len(train) - 1 - below[:, ::-1].argmax(1)
    low = np.clip(np.where(below.any(1), last, 0), 0, len(train) - 2)
    lo, hi = log_train[low], log_train[low + 1]
    w = np.clip((lo - log_s) / (lo - hi), 0, 1)  # parity: lo − hi in float32, as diffusers
    low = low.astype(w.dtype)
    return torch.from_numpy((1 - w) * low + w * (low + 1))


def denoised(out: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x0 from the model output at noise level sigma (x in the sigma view; v as Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out  # "sample"


def vp_x0(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x0 from the model output for the variance-preserving x_t = alpha·x0 + sigma·eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    return out  # "sample"


def vp_eps(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """eps from the model output for the variance-preserving x_t = alpha·x0 + sigma·eps."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha * out + sigma * x
    return (x - alpha * out) / sigma  # "sample"


def vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of the variance-preserving x_t = alpha_t·x0 + sigma_t·eps at noise level sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def log_snr(sigma: Tensor) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) (= −log sigma), computed as diffusers does (inf at sigma = 0)."""
    alpha, s = vp(sigma)
    return torch.log(alpha) - torch.log(s)
