"""Pieces shared by the samplers: beta schedules, timestep spacing, and reading scheduler_config.json.

Numbers follow diffusers 0.42.1 exactly (the parity oracle), including where it computes in float32
and where in float64: https://github.com/huggingface/diffusers/tree/v0.42.1/src/diffusers/schedulers
Notation: `alpha_bar` is the cumulative product of (1 - beta), called `alphas_cumprod` in diffusers
and alpha_t in the DDIM paper.
"""

import math
import numbers
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (model_input, t) -> model output
Callback = Callable[[int, Tensor, Tensor], None]  # (i, t, x) after each update

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")
MAX_TRAIN_TIMESTEPS = 10**6  # VD's is 1000; the bound keeps the per-timestep tables small

S = TypeVar("S", bound="Schedule")


def cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Betas discretising alpha_bar(t) = cos²((t + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # float64 arithmetic per step, one cast to float32 at the end (as diffusers)
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose alpha_bar ends at exactly 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    Are Flawed", Algorithm 1): sqrt(alpha_bar) is shifted down by its last value, then scaled back to its first.
    Float32, in diffusers' order of operations (the last beta becomes 1)."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()  # 0-d float32, as diffusers (python floats round otherwise)
    root = (root - last) * (first / (first - last))
    a_bar = root**2
    return 1 - torch.cat([a_bar[:1], a_bar[1:] / a_bar[:-1]])


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile of |x0|
    kept within [1, max_value]; x0 is clipped to [−s, s] and divided by s. Meant for pixel-space models; in
    float32 at least (as diffusers)."""
    flat = x0.flatten(1) if x0.dtype in (torch.float32, torch.float64) else x0.float().flatten(1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def arange_like_numpy(start: float, stop: float, step: float) -> Tensor:
    """float64 `np.arange(start, stop, step)`, reproducing numpy's length and fill rule bit for bit."""
    n = max(math.ceil((stop - start) / step), 0)
    # numpy stores start and start + step, then fills x_i = start + i·(x_1 − start) for i >= 2
    delta = (start + step) - start
    return start + torch.arange(n, dtype=torch.float64) * delta


def linspace(start: float, stop: float, n: int) -> Tensor:
    """float64 `np.linspace(start, stop, n)`: start + i·step, the last point set to stop exactly."""
    out = start + torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1) if n > 1 else 0.0)
    out[-1] = stop if n > 1 else start
    return out


def most_steps(spacing: str, num_train: int, steps_offset: int) -> int:
    """The most timesteps `spaced_timesteps` places: num_train, except that "leading" with a steps_offset must keep
    its first timestep below T (VD: 999 of 1000; diffusers' DDIM fails later with an IndexError)."""
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    most = num_train
    if spacing == "leading":
        while most > 1 and leading_top(most, num_train, steps_offset) >= num_train:
            most -= 1
    return most


def leading_top(n: int, num_train: int, steps_offset: int, end: int | None = None) -> int:
    """The first (largest) of n "leading" points, (n − 1)·(end // n) + steps_offset (end: T, or DPM-Solver's
    clipped end). It does not grow with n (T = 1000, offset 3: 1001 at n = 500, 999 at n = 997), so each n is
    checked, not only the largest."""
    return (n - 1) * ((num_train if end is None else end) // n) + steps_offset


def check_leading(n: int, num_train: int, steps_offset: int, num_steps: int, end: int | None = None) -> None:
    """Refuse num_steps whose n "leading" points would start at or past T (diffusers' DDIM: an IndexError)."""
    top = leading_top(n, num_train, steps_offset, end)
    if top >= num_train:
        raise ValueError(f"num_inference_steps={num_steps} with 'leading' spacing and steps_offset {steps_offset} "
                         f"starts at timestep {top}, past the last trained one ({num_train - 1}); choose another")


def timestep_points(
    spacing: str, n: int, num_train: int, steps_offset: int, end: int | None = None,
) -> Tensor:
    """`n` descending float64 timesteps of the spacing, unchecked (not yet rounded for "linspace").

    "leading": t_k = k·(T // n) + steps_offset; "trailing": round(T − k·T/n) − 1; "linspace": n points
    evenly over [0, T − 1]. `end` replaces T there (the trailing stride stays T/n) where DPM-Solver's
    lambda_min_clipped cuts off the noisiest timesteps. We keep diffusers' choice that `steps_offset` only shifts
    "leading". "trailing" places its points with numpy's arange, which for some n (61, 103, 121, ... of T = 1000)
    rounds to one point more, t = −1; diffusers then runs n + 1 steps, and so do our samplers.
    Stable Diffusion and VD ship "leading" with steps_offset=1, so sampling ends at t = 1 and never
    visits t = 0 (and leading, unlike trailing, never starts at t = T − 1); see diffusers issue #2585
    and Lin et al. 2023, table 2. We reproduce that for pixel parity rather than "fixing" it.
    """
    T, end = num_train, num_train if end is None else end
    if spacing == "leading":
        return (torch.arange(n, dtype=torch.float64) * (end // n) + steps_offset).flip(0)
    if spacing == "trailing":
        return arange_like_numpy(end, 0, -T / n).round() - 1
    return linspace(0, end - 1, n).flip(0)


def spaced_timesteps(spacing: str, num_steps: int, num_train: int, steps_offset: int) -> Tensor:
    """`timestep_points` for `num_steps` sampling steps, refused beyond `most_steps`."""
    most = most_steps(spacing, num_train, steps_offset)
    if not 1 <= num_steps <= most:
        raise ValueError(f"num_inference_steps must be in [1, {most}], got {num_steps}")
    if spacing == "leading":
        check_leading(num_steps, num_train, steps_offset, num_steps)
    return timestep_points(spacing, num_steps, num_train, steps_offset)


def check_one_spacing(schedule: "Schedule") -> None:
    """Karras, exponential and beta sigmas exclude each other (diffusers refuses two at once too)."""
    chosen = [name for name, on in [("Karras sigmas", schedule.karras),
                                    ("use_exponential_sigmas=True", schedule.use_exponential_sigmas),
                                    ("use_beta_sigmas=True", schedule.use_beta_sigmas)] if on]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} cannot be combined ({type(schedule).__name__}); pick one")


def stated(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a scheduler_config.json states: not its "_"-prefixed metadata, nor the keys it lists in
    "_use_default_values" (diffusers filled those with the defaults of the class that saved it)."""
    absent = set(config.get("_use_default_values", ()))
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in absent}


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Config fields shared by the samplers; defaults are those of the diffusers scheduler classes."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    sigma_min: float | None = None  # the ends of Karras, exponential or beta sigmas (sigma_range), if a config has them
    sigma_max: float | None = None
    trained_betas: tuple[float, ...] | None = field(default=None, repr=False)  # one beta per training timestep
    # Lin et al.'s zero terminal SNR: a field of the samplers whose diffusers class reads the key (DDIM, DDPM, Euler,
    # Euler ancestral, DPM-Solver++, UniPC); the others ignore it, as their diffusers classes do
    rescale_betas_zero_snr: ClassVar[bool] = False

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    # config keys we accept only at the given value, or at one of a tuple of values (the others change
    # diffusers' result in ways not implemented here)
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}
    # what this sampler's name sets whatever the config says (diffusers: `from_config(config, **overrides)`)
    OVERRIDES: ClassVar[dict[str, Any]] = {}
    # whether sample(..., skip=k) starts from a sample noised part-way (init images, fidelity), made by
    # `noised_to_step` (diffusers' img2img rule) or, for DDIM, by vd.sampling.noised_start (the original's); all
    # but PNDM and DDIM inversion do
    starts_part_way: ClassVar[bool] = True
    # model evaluations per step (diffusers' `scheduler.order`): the callback's index i counts evaluations; the
    # reference pipelines report step i // evals_per_step to the user (after filtering i by callback_steps)
    evals_per_step: ClassVar[int] = 1
    # with zero terminal SNR, alpha_bar at t = T − 1 is raised from 0 to this, so that its sigma is finite (DDIM and
    # DDPM keep the 0, as diffusers' do: v-prediction, the kind zero SNR is for, never divides by it there)
    ZERO_SNR_FLOOR: ClassVar[float | None] = 2.0**-24

    def __post_init__(self) -> None:
        if hasattr(self.trained_betas, "tolist"):  # a numpy array or a tensor
            object.__setattr__(self, "trained_betas", self.trained_betas.tolist())
        self.check_types()
        self.check_range("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
        for key in ("sigma_min", "sigma_max"):
            self.check_range(key, 0.0)
        if self.trained_betas is None:  # (trained betas make diffusers skip the schedule's name)
            self.check_choice("beta_schedule", BETA_SCHEDULES)
            for key in ("beta_start", "beta_end"):  # (a beta outside [0, 1] makes every alpha_bar after it NaN)
                self.check_range(key, 0.0, 1.0)
        else:
            betas = tuple(float(b) for b in self.trained_betas)  # (a tuple keeps the frozen dataclass hashable)
            if len(betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas must hold num_train_timesteps={self.num_train_timesteps} betas, "
                                 f"got {len(betas)}")
            bad = next((b for b in betas if not 0.0 <= b <= 1.0), None)  # (NaN is never in range)
            if bad is not None:
                raise ValueError(f"trained_betas must lie in [0, 1] for {type(self).__name__}, got {bad!r}")
            object.__setattr__(self, "trained_betas", betas)
        self.check_choice("timestep_spacing", SPACINGS)
        self.check_choice("prediction_type", self.PREDICTION_TYPES)

    def check_types(self) -> None:
        """A TypeError naming the first field whose value has the wrong type (a JSON "false" string is truthy)."""
        for f in fields(self):
            value = getattr(self, f.name)
            is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if f.type is bool:
                ok, want = isinstance(value, bool), "true or false"
            elif f.type is int:
                ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
            elif f.type is float:
                ok, want = is_real, "a number"
            elif f.type is str:
                ok, want = isinstance(value, str), "a string"
            elif f.type == float | None:
                ok, want = value is None or is_real, "a number or null"
            elif f.type == tuple[int, ...]:  # (UniPC's disable_corrector)
                ok = isinstance(value, Sequence) and not isinstance(value, str) and all(
                    isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in value)
                want = "a list of integers"
            else:  # trained_betas
                ok = value is None or (isinstance(value, Sequence) and not isinstance(value, str) and all(
                    isinstance(b, numbers.Real) and not isinstance(b, bool) for b in value))
                want = "a list of numbers or null"
            if not ok:
                raise TypeError(f"{f.name}: expected {want} for {type(self).__name__}, got {reprlib.repr(value)}")

    def check_range(self, key: str, low: float, high: float | None = None) -> None:
        """A ValueError naming the field unless its value (if not None) is a finite number in [low, high]."""
        value = getattr(self, key)
        if value is None:
            return
        try:
            real = float(value)
        except OverflowError:  # an integer beyond float's range
            real = math.inf
        if not (math.isfinite(real) and low <= real and (high is None or real <= high)):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{key} must be a finite number {bounds} for {type(self).__name__}, got {value!r}")

    def check_choice(self, key: str, allowed: tuple) -> None:
        """A ValueError naming the field unless its value is one of `allowed`."""
        if getattr(self, key) not in allowed:
            name, value = type(self).__name__, getattr(self, key)
            raise ValueError(f"{key} must be one of {allowed} for {name}, got {value!r}")

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """Build from a raw scheduler_config.json dict, as diffusers' `XScheduler.from_config(config)` would.

        Keys in the dict win, but for the sampler's own OVERRIDES (a "_karras" name's use_karras_sigmas=True);
        "_"-prefixed keys are metadata; a key listed in "_use_default_values" counts as absent, so it takes this
        sampler's own default (e.g. LMS keeps "linspace" spacing when built from the hub VD config, which has no
        timestep_spacing); keys this sampler lacks are ignored.
        """
        given = {k: v for k, v in stated(config).items() if k not in cls.OVERRIDES}
        for key, only in cls.UNSUPPORTED.items():
            options = only if isinstance(only, tuple) else (only,)
            scalar = isinstance(given.get(key), (str, numbers.Number, type(None)))  # (`in` on an array is ambiguous)
            if key in given and not (scalar and given[key] in options):
                value = reprlib.repr(given[key])
                allowed = f"one of {only!r}" if isinstance(only, tuple) else repr(only)
                raise ValueError(f"{key}={value} is not supported by {cls.__name__} (only {allowed} is)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names})

    def betas(self) -> Tensor:
        """beta_t for t = 0..T-1, float32 (T,): the trained ones where the config gives them, else the schedule's."""
        T, b0, b1 = self.num_train_timesteps, self.beta_start, self.beta_end
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(b0, b1, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":  # linear in sqrt(beta); the LDM/SD/VD schedule
            betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
        else:
            betas = cosine_betas(T)
        return zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alpha_bars(self) -> Tensor:
        """alpha_bar_t for t = 0..T-1, float32 (T,)."""
        a_bar = torch.cumprod(1.0 - self.betas(), dim=0)
        if self.rescale_betas_zero_snr and self.ZERO_SNR_FLOOR is not None:
            a_bar[-1] = self.ZERO_SNR_FLOOR
        return a_bar

    def max_steps(self) -> int:
        """The most sampling steps this schedule places (what `timesteps` accepts)."""
        return most_steps(self.timestep_spacing, self.num_train_timesteps, self.steps_offset)

    def timesteps(self, num_steps: int) -> Tensor:
        """Descending int64 timesteps of the spacing, as `set_timesteps(num_steps)` of diffusers' DDIM and DDPM."""
        T = self.num_train_timesteps
        return spaced_timesteps(self.timestep_spacing, num_steps, T, self.steps_offset).round().long()

    def init_noise_sigma(self, num_steps: int) -> float:
        """Std of the start noise: 1 for the variance-preserving samplers (the sigma-space ones override it)."""
        return 1.0

    def start(self, x: Tensor, num_steps: int, skip: int | None, num: int) -> tuple[Tensor, int]:
        """(x, the first step) of a loop of `num` steps: from unit noise x scaled to the start noise's std (skip
        None), or at step `skip` in [0, num] from x as given, already noised to that step's level
        (`noised_to_step`)."""
        if skip is None:
            return x * self.init_noise_sigma(num_steps), 0
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= num:
            raise ValueError(f"skip: expected an int in [0, {num}], got {skip!r}")
        return x, skip

    def noised(self, x0: Tensor, t: int, noise: Tensor) -> Tensor:
        """x0 diffused to timestep t: sqrt(alpha_t) x0 + sqrt(1 - alpha_t) noise (the forward process, DDIM eq. 4),
        in float32 at least (float64 stays float64, as diffusers' add_noise), returned in x0's dtype."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        a = self.alpha_bars()[t].to(x0.device, dtype)
        return (a**0.5 * x0.to(dtype) + (1 - a) ** 0.5 * noise.to(dtype)).to(x0.dtype)

    def noised_to_step(self, x0: Tensor, noise: Tensor, num_steps: int, step: int) -> Tensor:
        """x0 noised to the level of step `step` of `num_steps`, where `sample(..., skip=step)` starts: diffusers'
        `add_noise` at the first timestep its img2img pipelines run, `noised` at t = timesteps[step] (the
        sigma-space and multistep samplers override it)."""
        return self.noised(x0, int(self.timesteps(num_steps)[step]), noise)

    def sigma_range(self, low: float, high: float) -> tuple[float, float]:
        """(sigma_min, sigma_max) of Karras, exponential or beta sigmas: the config's where given, else the schedule's
        `low`, `high`. diffusers reads these keys from any config (one saved from an Euler pipeline has them)."""
        return (low if self.sigma_min is None else self.sigma_min, high if self.sigma_max is None else self.sigma_max)

    def karras_range(self, low: float, high: float) -> tuple[float, float]:
        """`sigma_range` for Karras sigmas (diffusers' LMS ignores the config's ends there: LMS overrides this)."""
        return self.sigma_range(low, high)


@dataclass(frozen=True, kw_only=True)
class Thresholding:
    """The config keys of dynamic thresholding, read by diffusers' DDIM, DDPM, DPM-Solver++ and UniPC."""

    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()  # (the Schedule's checks; this class comes first in the samplers' bases)
        if self.thresholding and not 0 <= self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio: expected a quantile in [0, 1] with thresholding, got "
                             f"{self.dynamic_thresholding_ratio!r}")

    def threshold(self, x0: Tensor) -> Tensor:
        """x0 dynamically thresholded where `thresholding` is set, else as is."""
        if not self.thresholding:
            return x0
        return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)


@dataclass(frozen=True, kw_only=True)
class ClippedX0(Thresholding):
    """DDIM's and DDPM's limit on the predicted x0: dynamic thresholding if set, else clipping if clip_sample."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def limit_x0(self, x0: Tensor) -> Tensor:
        """x0 thresholded, else clipped to [−clip_sample_range, clip_sample_range], else as is (diffusers' order)."""
        if self.thresholding:
            return self.threshold(x0)
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0
