"""DDIM inversion: the DDIM loop run backwards, from image latents to the noise that DDIM turns back into them
(Song, Meng & Ermon 2020, sec. 5.4 "Reconstruction from latent space"; the start of image-editing methods such as
Null-text inversion, Mokady et al. 2022).

Matches diffusers' `DDIMInverseScheduler` (v0.42.1) step for step, so a user swaps it in as diffusers users do:
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim_inverse.py
- The timesteps are DDIM's, ascending ("leading" or "trailing"; diffusers has no "linspace" here).
- A step goes from the noise level t − T // N to t, evaluating the model at the target timestep t (diffusers'
  choice; the paper's Euler step would use the source's). Below t = 0 the level is 1 (set_alpha_to_one) or
  alpha_bar at t = 0, as for DDIM's last step.
- Deterministic: eta and the generator are ignored, as the reference pipelines drop them for this class. Only
  `clip_sample` limits the predicted x0 (diffusers' class has no thresholding).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import Callback, EpsFn, Schedule, stated
from .ddim import x0_and_eps


@dataclass(frozen=True, kw_only=True)
class DDIMInverse(Schedule):
    """DDIM inversion with diffusers' DDIMInverseScheduler defaults; VD's with `DDIMInverse.from_config(config)`."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False

    ZERO_SNR_FLOOR: ClassVar[float | None] = None  # (alpha_bar keeps its 0 at t = T − 1, as diffusers')
    starts_part_way: ClassVar[bool] = False  # (it starts from an image's latents, not part-way)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("timestep_spacing", ("leading", "trailing"))
        if self.prediction_type == "sample" and self.set_alpha_to_one:
            raise ValueError("prediction_type 'sample' needs set_alpha_to_one=False for DDIMInverse: its first step "
                             "starts from alpha_bar 1 (no noise), where a predicted sample gives the noise as x/0 "
                             "(inf or NaN, as in diffusers)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDIMInverse":
        """As `Schedule.from_config`; a config saved by an older diffusers names set_alpha_to_one
        "set_alpha_to_zero", which diffusers still reads (as set_alpha_to_one, value unchanged)."""
        old = stated(config).get("set_alpha_to_zero")
        return super().from_config(config if old is None else {**config, "set_alpha_to_one": old})

    def timesteps(self, num_steps: int) -> Tensor:
        """DDIM's timesteps, ascending."""
        return super().timesteps(num_steps).flip(0)

    def sample(
        self, eps_fn: EpsFn, x: Tensor, num_steps: int, *, generator: Any = None, eta: float = 0.0,
        noise: Any = None, callback: Callback | None = None,
    ) -> Tensor:
        """Invert the clean latents `x` (B, ...) to the latents at the last timestep. eta, generator and noise
        are ignored (nothing is drawn)."""
        ts = self.timesteps(num_steps)
        a_bar = self.alpha_bars()  # (T,) float32
        a_first = torch.tensor(1.0, dtype=torch.float32) if self.set_alpha_to_one else a_bar[0]  # below t = 0
        stride = self.num_train_timesteps // num_steps
        ts_dev = ts.to(x.device).unbind()
        x = x * self.init_noise_sigma(num_steps)
        for i, t in enumerate(ts.tolist()):
            out = eps_fn(x, ts_dev[i])
            # from the level of s to that of t (t = −1, a "trailing" extra point, reads the last entry, as diffusers)
            s = min(t - stride, self.num_train_timesteps - 1)
            a, a_next = (a_bar[s] if s >= 0 else a_first), a_bar[t]
            x0, eps = x0_and_eps(out, x, a, self.prediction_type)
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            x = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps  # DDIM's eq. 12 at eta = 0, towards more noise
            if callback is not None:
                callback(i, ts_dev[i], x)
        return x
