"""The quantile function (inverse CDF) of the Beta(a, b) distribution, in float64 numpy, for diffusers'
`use_beta_sigmas` (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173) without depending on scipy,
whose `scipy.stats.beta.ppf` diffusers calls. Accurate to a few units in the last place of float64: the sampler
tests compare it with scipy.

The CDF is the regularized incomplete beta function I_x(a, b), evaluated by its continued fraction (Abramowitz &
Stegun 26.5.8) with the modified Lentz method, on the side of x where the fraction converges fast (x below the
mean-like point (a + 1)/(a + b + 2), else through I_x(a, b) = 1 − I_{1−x}(b, a)). The quantile is found by
bisection, which cannot fail on a monotone CDF.

One value is scipy's rather than the exact one: scipy puts the median of Beta(0.6, 0.6) (diffusers' parameters) one
float64 step above 0.5. An odd step count's middle sigma, sigma_min + 0.5 (sigma_max − sigma_min), can fall exactly
halfway between two float32 values, where that last bit decides which one diffusers' float32 sigma rounds to.
"""

import math
from functools import lru_cache

import numpy as np

TINY = 1e-300  # Lentz's guard against a zero denominator
SCIPY_MEDIANS = {(0.6, 0.6): float(np.nextafter(0.5, 1.0))}  # (a, b): scipy.stats.beta.ppf(0.5, a, b), see above


def continued_fraction(x: np.ndarray, a: float, b: float, max_terms: int = 500) -> np.ndarray:
    """The continued fraction of I_x(a, b) (A&S 26.5.8): 1/(1 + d1/(1 + d2/(1 + ...))), modified Lentz."""

    def guard(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < TINY, TINY, v)

    c = np.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    out = d.copy()
    for m in range(1, max_terms + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))  # d_{2m}
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))  # d_{2m+1}
        for coef in (even, odd):
            d = 1 / guard(1 + coef * d)
            c = guard(1 + coef / c)
            out = out * (c * d)
        if np.all(np.abs(c * d - 1) < 4e-16):
            break
    return out


def regularized_incomplete_beta(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the CDF of Beta(a, b) at x in [0, 1], float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x >= 1, 1.0, 0.0)
    inner = (x > 0) & (x < 1)
    xi = x[inner]
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    low = xi < (a + 1) / (a + b + 2)
    # x^a (1 − x)^b / B(a, b), the common factor of both sides
    front = np.exp(a * np.log(xi) + b * np.log1p(-xi) - log_beta)
    values = np.empty_like(xi)
    values[low] = front[low] * continued_fraction(xi[low], a, b) / a
    values[~low] = 1 - front[~low] * continued_fraction(1 - xi[~low], b, a) / b
    out[inner] = values
    return out


@lru_cache(maxsize=64)
def beta_quantiles(qs: tuple[float, ...], a: float, b: float) -> tuple[float, ...]:
    """x with I_x(a, b) = q for each q in [0, 1]; q = 0 and q = 1 give exactly 0 and 1 (and q = 0.5 scipy's value
    where SCIPY_MEDIANS has it). Cached: a schedule asks for the same quantiles on every call."""
    q = np.asarray(qs, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(80):  # each halving fixes one bit; 80 reach the float64 spacing even for x near 1e-6
        mid = (lo + hi) / 2
        below = regularized_incomplete_beta(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    x = np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))
    if (a, b) in SCIPY_MEDIANS:
        x[q == 0.5] = SCIPY_MEDIANS[a, b]
    return tuple(x.tolist())
