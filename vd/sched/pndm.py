"""PNDM sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
arXiv:2202.09778).

Both variants of diffusers' `PNDMScheduler` (v0.42.1), step for step:
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_pndm.py
- PLMS (skip_prk_steps=True, VD's config): Adams–Bashforth on past eps, warmed up by one Heun-like
  step (the first interval is taken twice, the second time with the mean of both eps).
- PRK (skip_prk_steps=False, the class default): three classical RK4 steps (4 evaluations each, at
  the start, twice at the midpoint, at the end) fill the eps history, then PLMS of order 4.
Both move x along eps with PNDM's transfer function phi (eq. 9), not with a plain Euler step.
Notation: a, a_prev = alpha_bar at the interval's start and end; ets = past model outputs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn, Schedule, spaced_timesteps


def transfer(x: Tensor, eps: Tensor, a: Tensor, a_prev: Tensor, prediction_type: str = "epsilon") -> Tensor:
    """phi(x_t, eps, t, t-delta) of eq. 9: x_{t-delta} from x_t along eps (a, a_prev 0-d float32)."""
    b, b_prev = 1 - a, 1 - a_prev
    if prediction_type == "v_prediction":  # parity: converts the already-combined output with this x
        eps = a**0.5 * eps + b**0.5 * x
    # x_prev = sqrt(a_prev/a)·x − (a_prev − a)·eps / (a·sqrt(b_prev) + sqrt(a·b·a_prev))
    denom = a * b_prev**0.5 + (a * b * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def plms_eps(ets: list[Tensor]) -> Tensor:
    """Adams–Bashforth mix of past eps (oldest first, up to 4), in diffusers' operation order."""
    e = ets[::-1]  # newest first
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


@dataclass(frozen=True, kw_only=True)
class PNDM(Schedule):
    """PNDM with diffusers' PNDMScheduler defaults (note: PRK warm-up unless skip_prk_steps)."""

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    starts_part_way: ClassVar[bool] = False  # diffusers' img2img runs its PLMS warm-up out of step

    def timesteps(self, num_steps: int) -> Tensor:
        """int64 timesteps of every model evaluation, as `PNDMScheduler.set_timesteps(num_steps)`."""
        T = self.num_train_timesteps
        base = spaced_timesteps(self.timestep_spacing, num_steps, T, self.steps_offset).round().long().flip(0)
        if self.skip_prk_steps:  # N+1 entries: t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0
            return torch.cat([base[:-1], base[-2:-1], base[-1:]]).flip(0)
        if num_steps < 4:
            raise ValueError(f"num_inference_steps must be >= 4 with skip_prk_steps=False, got {num_steps}")
        # PRK: for each of the top 4 base timesteps t and its midpoint t + r//2 (ascending), build
        # b0, m0, m0, b1, b1, m1, m1, b2, b2, m2, m2, b3 and reverse: 12 evaluations
        top = base[-4:]
        with_mid = torch.stack([top, top + T // num_steps // 2], dim=1).flatten()[:-1]  # (7,)
        prk = with_mid.repeat_interleave(2)[1:-1].flip(0)  # (12,)
        return torch.cat([prk, base[:-3].flip(0)])

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Sequence[Tensor] | None = None, callback: Callback | None = None,
    ) -> Tensor:
        """Run the PNDM loop from noise `x` (B, ...). Deterministic: eta, generator and noise are ignored."""
        ts = self.timesteps(num_steps)
        a_bar = self.alpha_bars()  # (T,) float32
        a_last = torch.tensor(1.0, dtype=torch.float32) if self.set_alpha_to_one else a_bar[0]
        alpha = lambda t: a_bar[t] if t >= 0 else a_last  # noqa: E731
        r = self.num_train_timesteps // num_steps  # parity: used as the stride whatever the spacing
        n_prk = 0 if self.skip_prk_steps else 12
        t_list, ts_dev = ts.tolist(), ts.to(x.device).unbind()  # ints to index; 0-d tensors for eps_fn
        x = x * self.init_noise_sigma(num_steps)
        ets: list[Tensor] = []  # past model outputs, oldest first (PLMS keeps 4)
        x_start, acc = x, None  # x at the start of the current RK / Heun step; RK4 running sum
        for i, t in enumerate(t_list):
            out = eps_fn(x, ts_dev[i])
            if i < n_prk:  # RK4 from x_start at t_list[i//4*4]; slopes weighted 1/6, 1/3, 1/3, 1/6
                k = i % 4
                if k == 0:
                    x_start, acc = x, 1 / 6 * out
                    ets.append(out)
                elif k < 3:
                    acc = acc + 1 / 3 * out
                else:
                    out = acc + 1 / 6 * out
                # even k: to the midpoint (k=0) or the end (k=2); odd k: target is t itself
                t_to = t - (r // 2 if k % 2 == 0 else 0)
                x = transfer(x_start, out, alpha(t_list[i // 4 * 4]), alpha(t_to), self.prediction_type)
            elif i == 1:  # PLMS warm-up: redo the first interval with the mean eps (Heun-like)
                x = transfer(x_start, (out + ets[-1]) / 2, alpha(t + r), alpha(t), self.prediction_type)
            else:
                ets = ets[-3:] + [out]
                if i == 0:
                    x_start = x
                # parity: the current timestep indexes the schedule as is (t = -1: its last entry), as DDIM
                x = transfer(x, plms_eps(ets), a_bar[t], alpha(t - r), self.prediction_type)
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x
