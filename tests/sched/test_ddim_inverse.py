"""DDIM inversion (`ddim_inverse`): what it is for, that DDIM brings its noise back to the start, and the settings
diffusers' DDIMInverseScheduler reads that the shared trajectory tests (test_samplers.py) do not cover."""

import json

import pytest
import torch

from helpers import DATA
from vd.sched import sampler_from_config

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMInverseScheduler  # noqa: E402

from sampler_table import fake_eps, reference_run  # noqa: E402

VD = json.loads((DATA / "scheduler_config.json").read_text())
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def t_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model output that depends on the timestep alone (varying over the latents' entries)."""
    return torch.sin(torch.arange(x[0].numel(), dtype=x.dtype).reshape(x.shape[1:]) + t.to(x.dtype) / 50).expand_as(x)


@pytest.mark.parametrize("cfg,n", [(VD, 50), (VD, 7), ({**VD, "timestep_spacing": "trailing"}, 20),
                                   ({**VD, "set_alpha_to_one": True, "beta_schedule": "linear"}, 13)])
def test_ddim_brings_the_inverted_noise_back(cfg, n):
    """Each inverted step is a DDIM step run backwards on the same grid (from t − T // N to t, the model at t, as
    DDIM's step from t evaluates it): for a model output that depends on t alone, DDIM over the same steps returns
    the start exactly but for float32 rounding, which the steps' division by sqrt(alpha_bar) (down to 0.07 at
    t = 981) amplifies: measured 9.4e-7 of the scale at most. A model output that depends on x breaks that
    symmetry, and the round trip then differs by 2.4e-3 to 9.6e-3 of the scale: the test can fail."""
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inverse, ddim = sampler_from_config("ddim_inverse", cfg), sampler_from_config("ddim", cfg)
    assert torch.equal(inverse.timesteps(n), ddim.timesteps(n).flip(0))
    noise = inverse.sample(t_only, x0, n)
    assert (noise - x0).abs().max() > 0.5  # it moved: x_T is mostly noise
    assert ((ddim.sample(t_only, noise, n) - x0).abs().max() / x0.abs().max()).item() < 1e-5
    back = ddim.sample(fake_eps, inverse.sample(fake_eps, x0, n), n)
    assert ((back - x0).abs().max() / x0.abs().max()).item() > 1e-4


@pytest.mark.parametrize("old", [True, False])
def test_the_old_name_of_set_alpha_to_one(old):
    """A config saved by an older diffusers names set_alpha_to_one "set_alpha_to_zero"; diffusers still reads it
    (as set_alpha_to_one, its value unchanged, over the new key), and so do we."""
    cfg = {**VD, "set_alpha_to_zero": old, "set_alpha_to_one": not old}
    ours, ref = sampler_from_config("ddim_inverse", cfg), DDIMInverseScheduler.from_config(cfg)
    assert ours.set_alpha_to_one is old
    assert float(ref.initial_alpha_cumprod) == (1.0 if old else float(ref.alphas_cumprod[0]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.sample(fake_eps, x, 4), reference_run(ref, x, 4)[1][-1])


def test_linspace_spacing_is_refused_by_name():
    """diffusers' DDIMInverseScheduler places "leading" and "trailing" timesteps only (it fails at set_timesteps);
    we refuse the config when the sampler is built, before any model runs."""
    with pytest.raises(ValueError, match=r"^timestep_spacing must be one of \('leading', 'trailing'\) for "
                                         r"DDIMInverse, got 'linspace'"):
        sampler_from_config("ddim_inverse", {**VD, "timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="linspace"):
        DDIMInverseScheduler.from_config({**VD, "timestep_spacing": "linspace"}).set_timesteps(4)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sample_prediction_from_alpha_bar_1_is_refused_by_name(spacing):
    """The first inverted step starts below t = 0, at alpha_bar 1 with set_alpha_to_one (diffusers' default for this
    class): a model predicting the sample leaves no noise there to read, and diffusers' every step count ends in inf
    or NaN. We refuse that config by name; with alpha_bar at t = 0 instead (VD's setting) it runs as diffusers."""
    cfg = {**VD, "timestep_spacing": spacing, "prediction_type": "sample"}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for n in (1, 4, 25):
        ref = reference_run(DDIMInverseScheduler.from_config({**cfg, "set_alpha_to_one": True}), x, n)[1][-1]
        assert not torch.isfinite(ref).all(), n
    with pytest.raises(ValueError, match=r"^prediction_type 'sample' needs set_alpha_to_one=False for DDIMInverse"):
        sampler_from_config("ddim_inverse", {**cfg, "set_alpha_to_one": True})
    ours = sampler_from_config("ddim_inverse", {**cfg, "set_alpha_to_one": False}).sample(fake_eps, x, 4)
    ref = reference_run(DDIMInverseScheduler.from_config({**cfg, "set_alpha_to_one": False}), x, 4)[1][-1]
    assert torch.isfinite(ours).all() and torch.equal(ours, ref)
