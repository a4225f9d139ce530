"""Parity of the samplers added for issue 17 (DDPM, Euler, Euler ancestral, Heun, DPM-Solver++(2M) and its SDE
form, UniPC, and the "_karras" variants) with diffusers 0.42.1, each built as a user builds it:
`XScheduler.from_config(<VD's scheduler config>, <the one override of the name>)`.

Whole trajectories on a deterministic fake model, float32: every model input and every x after a step (via our
callback) within 1e-6 of the reference's largest value (measured differences: the table at the end of a run);
the stochastic ones with the same generator (or one per batch item) on both sides.
"""

import dataclasses
import json
import math
import re
import reprlib

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler,  # noqa: E402
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, UniPCMultistepScheduler)

from sampler_table import EVERY, NEW, REF, STOCHASTIC, fake_eps, reference_run  # noqa: E402
from vd.sched import SCHEDULERS, sampler_from_config  # noqa: E402
from vd.sched.beta_quantile import beta_quantiles  # noqa: E402
from vd.sched.common import dynamic_threshold  # noqa: E402
from vd.sched.sigmas import ancestral_split, vp, vp_x0  # noqa: E402
from helpers import DATA

VD = json.loads((DATA / "scheduler_config.json").read_text())
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
CONFIGS = {
    "vd": VD,
    # what pipe.scheduler.config holds after loading VD's file (keys the file lacks in _use_default_values)
    "vd_loaded": DDIMScheduler.from_config(VD).config,
    "vd_leading": {**VD, "timestep_spacing": "leading"},
    "linear_trailing": {**VD, "beta_schedule": "linear", "timestep_spacing": "trailing", "steps_offset": 0},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}


def reference(name: str, cfg) -> object:
    cls, override = EVERY[name]
    return cls.from_config(cfg, **override)


def start_noise(batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()


def gens(per_item: bool, batch: int = 2):
    return [torch.Generator().manual_seed(7 + b) for b in range(batch)] if per_item else torch.Generator().manual_seed(7)


def our_run(sampler, x, n, **kw):
    calls, xs = [], []

    def eps(inp, t):
        calls.append((t, inp))
        return fake_eps(inp, t)

    def callback(i, t, x_i):
        assert i == len(xs) and t is calls[-1][0]
        xs.append(x_i)

    out = sampler.sample(eps, x, n, callback=callback, **kw)
    assert out is xs[-1]
    return calls, xs


def assert_timesteps_equal(ts: torch.Tensor, ref: torch.Tensor, beta_sigmas: bool = False) -> None:
    """Equal in dtype and value, the fractional Karras ones too. DPM2 keeps the timesteps of exponential and beta
    sigmas in float64: for beta sigmas these differ from diffusers' by up to 1e-12 relative (our Beta quantiles
    against scipy's: 7e-15 relative at most, test_beta_quantiles_match_scipy), and are equal in float32, the
    model's timestep dtype."""
    assert ts.dtype == ref.dtype and ts.shape == ref.shape
    if beta_sigmas and ts.dtype == torch.float64:
        torch.testing.assert_close(ts, ref, rtol=1e-12, atol=0)
        ts, ref = ts.float(), ref.float()
    assert torch.equal(ts, ref)


def step_sigmas(name: str, ref) -> torch.Tensor:
    """The reference's sigmas one per step, as our schedule lists them: Heun and DPM2 interleave their second
    evaluations (2N − 1 entries), the others already have one per step."""
    kind = name.split("_")[0]
    if kind == "heun":
        return torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
    if kind == "dpm2":
        return torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2]])
    return ref.sigmas


def as_field(value):
    """A diffusers config value as our frozen samplers hold it (a list as a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def relative_diff(ours, ref, beta_sigmas: bool = False) -> float:
    """Max over the run of max|a − b| / max|b| (model inputs and x after each step); timesteps equal
    (assert_timesteps_equal). Every value must be finite in both: NaN would compare as no difference."""
    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values in the run"
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    (calls, xs), (calls_ref, xs_ref) = ours, ref
    assert len(calls) == len(calls_ref) and len(xs) == len(xs_ref)
    worst = 0.0
    for (t, a), (t_ref, b) in zip(calls, calls_ref):
        assert t.dim() == 0
        assert_timesteps_equal(t, t_ref, beta_sigmas)
        worst = max(worst, relative(a, b))
    for a, b in zip(xs, xs_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        worst = max(worst, relative(a, b))
    return worst


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", NEW)
def test_timesteps_and_sigmas(name, cfg_name):
    """Timesteps (dtype and values), sigmas and the start-noise std, for step counts from 1 to 1000 (up to the
    sampler's `max_steps`; beyond it refused), all equal, the fractional Karras timesteps too."""
    cfg = CONFIGS[cfg_name]
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)  # (set_timesteps starts afresh each time)
    for n in (1, 2, 3, 7, 20, 25, 50, 100, 998, 999, 1000):
        if n > ours.max_steps():  # "leading" with steps_offset 1 would reach t = 1000: diffusers reads past the end
            assert ours.timestep_spacing == "leading" and ours.max_steps() in (998, 999)
            with pytest.raises(ValueError, match=rf"num_inference_steps must be in \[1, {ours.max_steps()}\]"):
                ours.timesteps(n)
            continue
        ref.set_timesteps(n)
        ts = ours.timesteps(n)
        assert ts.dtype == ref.timesteps.dtype and ts.shape == ref.timesteps.shape, n
        # diffusers' NaN midpoints: DPM2 ancestral on a few steps of cosine betas cancels sigma_down² to <= 0 in
        # float32; ours takes the exact sigma_down there (test_ancestral_step_far_below_sigma)
        nan = ref.timesteps.isnan()
        assert not nan.any() or (name.startswith("dpm2_a") and cfg_name == "cosine"), n
        assert ts.isfinite().all(), n
        torch.testing.assert_close(ts[~nan], ref.timesteps[~nan], rtol=0, atol=0, msg=str(n))
        if hasattr(ours, "schedule"):
            assert torch.equal(ours.schedule(n)[1], step_sigmas(name, ref)), n
        assert ours.init_noise_sigma(n) == float(ref.init_noise_sigma), n


@pytest.mark.parametrize("beta_schedule,train", [("squaredcos_cap_v2", 37), ("scaled_linear", 500)])
def test_karras_timesteps_to_the_last_bit(beta_schedule, train):
    """Karras timesteps are computed with numpy's float32 log, as diffusers': a last bit of difference moves a
    rounded one (scaled_linear, 500 steps of training, 200 of sampling: 480, not 479) or a truncated one (cosine,
    37: 35, not 36) by a whole step."""
    cfg = {**VD, "beta_schedule": beta_schedule, "num_train_timesteps": train}
    for name in ("dpmpp_2m_karras", "euler_karras", "heun_karras", "lms_karras", "unipc_karras"):
        for n in (2, 20, 200)[:2 if train < 200 else 3]:
            ref = reference(name, cfg)
            ref.set_timesteps(n)
            assert torch.equal(sampler_from_config(name, cfg).timesteps(n), ref.timesteps), (name, n)


def test_vd_known_values():
    """Spot values, independent of diffusers: the default spacings of the new classes on VD's config."""
    assert sampler_from_config("dpmpp_2m", VD).timesteps(20)[[0, 1, -1]].tolist() == [999, 949, 50]
    assert sampler_from_config("dpmpp_2m", CONFIGS["vd_leading"]).timesteps(20)[[0, 1, -1]].tolist() == [941, 894, 48]
    assert sampler_from_config("ddpm", VD).timesteps(50)[[0, -1]].tolist() == [981, 1]
    euler = sampler_from_config("euler", VD)
    assert euler.timesteps(25)[[0, -1]].tolist() == [999.0, 0.0]
    karras = sampler_from_config("dpmpp_2m_karras", VD).schedule(20)[1]
    assert abs(karras[0].item() - 14.6146) < 1e-4 and abs(karras[-2].item() - 0.0292) < 1e-4 and karras[-1] == 0
    assert len(sampler_from_config("heun", VD).timesteps(10)) == 19


@pytest.mark.parametrize("name,spacing,n", [
    ("euler_a", "trailing", 3), ("dpm2_a", "trailing", 2), ("dpm2_a", "trailing", 3), ("dpm2_a", "linspace", 10),
    ("dpm2_a_karras", "trailing", 2)])
def test_ancestral_step_far_below_sigma(name, spacing, n):
    """Cosine betas start at sigma ≈ 2e4. A first step to a sigma far below it splits sigma_next² into sigma_down²
    + sigma_up² in float32, which cancels sigma_down² to <= 0: diffusers samples NaN there; ours takes the exact
    sigma_down = sigma_next²/sigma and samples a finite picture."""
    cfg, x = {**VD, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": spacing}, start_noise()
    ref = reference_run(reference(name, cfg), x, n, generator=gens(False))
    assert ref[1][-1].isnan().all()
    calls, xs = our_run(sampler_from_config(name, cfg), x, n, generator=gens(False))
    assert all(a.isfinite().all() for _, a in calls) and all(a.isfinite().all() for a in xs)


def test_ancestral_split():
    """sigma_down = sigma_next²/sigma and sigma_up = sigma_next·sqrt(1 − (sigma_next/sigma)²) (float64 here) to
    float32 rounding, where float32 cancels (the first pair: diffusers' formula gives NaN) and where it does not;
    both 0 at sigma_next = 0. (That it keeps diffusers' bits elsewhere: test_timesteps_and_sigmas, test_trajectory.)"""
    sigma, sigma_next = torch.tensor([20291.0, 14.6146, 3.0]), torch.tensor([1.7507, 12.0, 0.0])
    down, up = ancestral_split(sigma, sigma_next)
    s, s_next = sigma.double(), sigma_next.double()
    torch.testing.assert_close(down.double(), s_next**2 / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(up.double(), s_next * (1 - (s_next / s) ** 2) ** 0.5, rtol=1e-6, atol=0)
    assert down[2] == up[2] == 0


# ------------------------------------------------------------------------------------------ trajectories

RUNS = [("vd", 25), ("vd", 20), ("vd", 2), ("vd_loaded", 7), ("vd_leading", 10), ("linear_trailing", 12),
        ("cosine", 16)]


@pytest.mark.parametrize("cfg_name,n", RUNS)
@pytest.mark.parametrize("name", NEW)
def test_trajectory(name, cfg_name, n, check):
    cfg, x = CONFIGS[cfg_name], start_noise()
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    ts = sampler_from_config(name, cfg).timesteps(n)
    if (ts == ts[0]).sum() > 1:
        # cosine betas end at huge sigmas: the first rounded Karras timesteps are equal. diffusers then starts at
        # the second timestep equal to the first (its image-to-image rule) and steps past its sigmas (DPM-Solver++:
        # and DEIS: IndexError; UniPC: its order check fails; DPM2: it skips the first interval). We run all of them.
        assert name.endswith("karras") and cfg_name == "cosine"
        if name.startswith("dpm2"):
            ref = reference(name, cfg)
            ref.set_timesteps(n)
            assert ref.index_for_timestep(ts[0]) > 0
        else:
            with pytest.raises(IndexError if name.startswith(("dpmpp", "deis")) else AssertionError):
                reference_run(reference(name, cfg), x, n, **kw)
        calls, xs = our_run(sampler_from_config(name, cfg), x, n, **kw)
        assert len(calls) == len(xs) == len(ts) and torch.isfinite(xs[-1]).all()
        return
    ref = reference_run(reference(name, cfg), x, n, **kw)
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    ours = our_run(sampler_from_config(name, cfg), x, n, **kw)
    check(relative_diff(ours, ref), 1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("name", NEW)
def test_trajectory_prediction_types(name, prediction_type, check):
    cfg, x = {**VD, "prediction_type": prediction_type}, start_noise()
    if name.startswith(("euler_a", "dpm2")) and prediction_type == "sample":  # diffusers: NotImplementedError
        with pytest.raises(ValueError, match="prediction_type"):
            sampler_from_config(name, cfg)
        return
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    ref = reference_run(reference(name, cfg), x, 10, **kw)
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    ours = our_run(sampler_from_config(name, cfg), x, 10, **kw)
    check(relative_diff(ours, ref), 1e-6)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_generator_list_and_injected_noise(name, check):
    """One generator per batch item (diffusers' list form); and `noise=` (one tensor per step) is the same as
    drawing those tensors from the generator."""
    x = start_noise(3)
    ref = reference_run(reference(name, VD), x, 8, generator=gens(True, 3))
    ours = our_run(sampler_from_config(name, VD), x, 8, generator=gens(True, 3))
    check(relative_diff(ours, ref), 1e-6, "generator list")
    g, dtype = torch.Generator().manual_seed(5), torch.float32
    noise = [torch.randn(x.shape, generator=g, dtype=dtype) for _ in range(8)]
    sampler = sampler_from_config(name, VD)
    a = sampler.sample(fake_eps, x, 8, noise=noise)
    b = sampler.sample(fake_eps, x, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise"):
        sampler.sample(fake_eps, x, 8, noise=noise[:3])
    with pytest.raises(ValueError, match="noise"):
        sampler.sample(fake_eps, x, 8, noise=noise, generator=torch.Generator())


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "heun"])
@pytest.mark.parametrize("order_or_type", ["solver_order=1", "solver_type"])
def test_config_variants(name, order_or_type, check):
    """The other config values we accept: first-order DPM-Solver++/UniPC, DPM-Solver++'s Heun form, UniPC's
    bh1; Heun with x0 clipping."""
    variant = {"dpmpp_2m": {"solver_order": 1} if order_or_type == "solver_order=1" else {"solver_type": "heun"},
               "unipc": {"solver_order": 1} if order_or_type == "solver_order=1" else
               {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},  # (ending at 0: test_unipc_bh1_into_sigma_0)
               "heun": {"clip_sample": True, "clip_sample_range": 0.5 if order_or_type == "solver_type" else 2.0}}
    cfg, x = {**VD, **variant[name]}, start_noise()
    ref = reference_run(reference(name, cfg), x, 9)
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, 9), ref), 1e-6)


@pytest.mark.parametrize("name", ["unipc", "unipc_karras"])
def test_unipc_bh1_into_sigma_0(name, check):
    """UniPC's bh1 ending at sigma 0: diffusers' last (first-order) step multiplies its B(h) = −inf by a zero sum and
    ends in NaN; ours leaves that zero term out. Every step before the last equals diffusers'; the last lands on the
    x0 predicted there, as a first-order step into sigma 0 does (bh2's too)."""
    cfg, x = {**VD, "solver_type": "bh1"}, start_noise()
    ours, ref = our_run(sampler_from_config(name, cfg), x, 9), reference_run(reference(name, cfg), x, 9)
    assert not torch.isfinite(ref[1][-1]).all()
    check(relative_diff((ours[0], ours[1][:-1]), (ref[0], ref[1][:-1])), 1e-6, "all but the last step")
    t, inp = ours[0][-1]
    sig = sampler_from_config(name, cfg).schedule(9)[1]
    x0 = vp_x0(fake_eps(inp, t), inp, *vp(sig[-2]), "epsilon")
    check(((ours[1][-1] - x0).abs().max() / x0.abs().max()).item(), 1e-6, "the last step lands on x0")


@pytest.mark.parametrize("name", [n for n in NEW if n.endswith("karras")] + ["euler", "unipc"])
def test_sigma_range_from_the_config(name, check):
    """A config's sigma_min/sigma_max are the ends of the Karras sigmas of Euler, Heun and DPM-Solver++ (diffusers
    reads them from any config, e.g. one saved from an Euler pipeline); LMS and the samplers without Karras sigmas
    run as without them."""
    cfg, x = {**VD, "sigma_min": 0.1, "sigma_max": 5.0}, start_noise()
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    ref = reference_run(reference(name, cfg), x, 9, **kw)
    kw = {"generator": gens(False)} if name in STOCHASTIC else {}
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, 9, **kw), ref), 1e-6)


@pytest.mark.parametrize("name,solver_type", [("dpmpp_2m", "logrho"), ("dpmpp_2m", "bh2"), ("unipc", "midpoint"),
                                              ("unipc", "heun"), ("deis", "midpoint"), ("deis", "bh2"),
                                              ("dpmpp_2s", "logrho")])
def test_other_solvers_names_run_as_diffusers_runs_them(name, solver_type, check):
    """A solver_type of another multistep solver (one config shared by all) is DPM-Solver++'s midpoint, UniPC's
    bh2 or DEIS's logrho, as diffusers maps it."""
    cfg, x = {**VD, "solver_type": solver_type}, start_noise()
    ref = reference_run(reference(name, cfg), x, 9)
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, 9), ref), 1e-6)
    assert sampler_from_config(name, cfg) == sampler_from_config(name, VD)


@pytest.mark.parametrize("name,n", [("unipc", 12), ("deis", 12), ("deis", 20), ("deis_karras", 20)])
def test_third_order(name, n, check):
    """solver_order 3: UniPC, and DEIS's quadratic in log rho (from the third step; with fewer than 15 steps the
    second-to-last is second order)."""
    cfg, x = {**VD, "solver_order": 3}, start_noise()
    ref = reference_run(reference(name, cfg), x, n)
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, n), ref), 1e-6)
    second_order = relative_diff(our_run(sampler_from_config(name, {**cfg, "solver_order": 2}), x, n), ref)
    assert second_order > 1e-4


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"])
@pytest.mark.parametrize("n,lower_order_final", [(12, True), (12, False), (20, True), (3, True)])
def test_dpmpp_third_order(name, n, lower_order_final, check):
    """solver_order 3 (DPM-Solver++(3M), "3M SDE" with the SDE form): third-order steps from the third on; with
    fewer than 15 steps and lower_order_final the second-to-last is second order."""
    cfg, x = {**VD, "solver_order": 3, "lower_order_final": lower_order_final}, start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ref = reference_run(reference(name, cfg), x, n, **kw())
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, n, **kw()), ref), 1e-6)
    second_order = relative_diff(our_run(sampler_from_config(name, {**cfg, "solver_order": 2}), x, n, **kw()), ref)
    assert second_order == 0 if n == 3 else second_order > 1e-4  # 3 steps run orders 1, 2, 1


@pytest.mark.parametrize("name", ["dpmpp_2s", "dpmpp_2s_karras", "dpmpp_2s_sde", "dpmpp_2s_sde_karras"])
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "heun"), (3, "midpoint"), (3, "heun")])
@pytest.mark.parametrize("final,lower_order_final", [("zero", False), ("sigma_min", False), ("sigma_min", True)])
def test_dpmpp_singlestep_groups(name, order, solver_type, final, lower_order_final, check):
    """DPM-Solver++(2S): steps in groups of orders 1, 2(, 3), each group from its anchor; 1 to 9 steps, so that the
    groups fill the steps or not (diffusers then switches lower_order_final on), into sigma 0 or not; the SDE form
    with one fresh noise per step."""
    cfg, x = {**VD, "solver_order": order, "solver_type": solver_type, "final_sigmas_type": final,
              "lower_order_final": lower_order_final}, start_noise()

    def kw():
        return {"generator": gens(True)} if name in STOCHASTIC else {}
    for n in range(1, 10):
        ref = reference_run(reference(name, cfg), x, n, **kw())
        check(relative_diff(our_run(sampler_from_config(name, cfg), x, n, **kw()), ref), 1e-6, f"{n} steps")


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_trailing_counts_with_one_more_timestep(name, check):
    """"trailing" spacing places its points with numpy's arange, which for some counts (61, 103, 121, ... of
    1000) rounds to one point more, t = -1: diffusers then evaluates the model N + 1 times, and so do we. (The
    sigma samplers' extra step is what brings them to sigma 0; DDIM, DDPM, PNDM and DDIM inversion read the
    schedule's last entry at t = -1, as diffusers does. DPM-Solver++(2S) has no spacing key: it stays on "linspace".)"""
    cfg, x, n = {**VD, "timestep_spacing": "trailing"}, start_noise(), 61

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ref = reference_run(reference(name, cfg), x, n, **kw())
    ours = our_run(sampler_from_config(name, cfg), x, n, **kw())
    if "karras" not in name and not name.startswith("dpmpp_2s"):  # (Karras sigmas are placed without arange)
        # the last evaluation (the inversion's first: it runs the timesteps ascending); relative_diff asserts the
        # counts equal
        assert ours[0][0 if name == "ddim_inverse" else -1][0].item() == -1
    check(relative_diff(ours, ref), 1e-6)


@pytest.mark.parametrize("name", [n for n in NEW if n.startswith(("euler", "dpmpp", "unipc", "heun", "lms"))])
@pytest.mark.parametrize("n,euler_at_final", [(7, False), (20, False), (20, True)])
def test_final_sigma_min(name, n, euler_at_final, check):
    """final_sigmas_type "sigma_min": Euler, DPM-Solver++ and UniPC end at the first training sigma (UniPC on
    Karras sigmas: at their last), and DPM-Solver++ keeps its order there from 15 steps on unless
    euler_at_final; Heun, LMS and Euler ancestral ignore the key, as diffusers' classes do."""
    cfg, x = {**VD, "final_sigmas_type": "sigma_min", "euler_at_final": euler_at_final}, start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ref = reference_run(reference(name, cfg), x, n, **kw())
    ours = sampler_from_config(name, cfg)
    check(relative_diff(our_run(ours, x, n, **kw()), ref), 1e-6)
    if hasattr(ours, "final_sigmas_type"):
        assert ours.schedule(n)[1][-1] > 0
    else:
        assert ours == sampler_from_config(name, VD)


@pytest.mark.parametrize("name", ["euler", "euler_karras"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_euler_continuous_timesteps(name, prediction_type, check):
    """timestep_type "continuous": with v_prediction the model sees t = log(sigma) / 4 (EDM's c_noise), else the
    usual timesteps, as diffusers' EulerDiscreteScheduler."""
    cfg, x = {**VD, "timestep_type": "continuous", "prediction_type": prediction_type}, start_noise()
    ours = sampler_from_config(name, cfg)
    check(relative_diff(our_run(ours, x, 9), reference_run(reference(name, cfg), x, 9)), 1e-6)
    discrete = sampler_from_config(name, {**cfg, "timestep_type": "discrete"})
    assert torch.equal(ours.timesteps(9), discrete.timesteps(9)) == (prediction_type == "epsilon")


EXPONENTIAL = {"vd": VD, "cosine_leading_ends": {**VD, "beta_schedule": "squaredcos_cap_v2", "sigma_min": 0.05,
                                                   "sigma_max": 10.0, "timestep_spacing": "leading"},
               "sigma_min_final": {**VD, "final_sigmas_type": "sigma_min"}}


@pytest.mark.parametrize("extra", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                   {"timestep_spacing": "trailing"}, {"final_sigmas_type": "sigma_min"},
                                   {"timestep_type": "continuous", "prediction_type": "v_prediction"}])
def test_euler_log_linear_sigmas(extra, check):
    """interpolation_type "log_linear": N + 1 sigmas evenly in log sigma over the training range, the timesteps
    still the spaced ones, so N steps end at the smallest training sigma (Karras/exponential: only their range
    changes; continuous timesteps: N + 1 steps, to the last sigma), as diffusers' EulerDiscreteScheduler."""
    cfg, x = {**VD, "interpolation_type": "log_linear", **extra}, start_noise()
    name = "euler_karras" if "use_karras_sigmas" in extra else "euler"
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    for n in (1, 9, 61):
        ref.set_timesteps(n)
        assert torch.equal(ours.sigmas(n), ref.sigmas) and torch.equal(ours.timesteps(n), ref.timesteps), n
        check(relative_diff(our_run(ours, x, n), reference_run(reference(name, cfg), x, n)), 1e-6, f"{n} steps")
    assert not torch.equal(ours.sigmas(9), sampler_from_config(name, {**cfg, "interpolation_type": "linear"}).sigmas(9))


@pytest.mark.parametrize("key", ["use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("cfg_name", sorted(EXPONENTIAL))
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde",
                                  "unipc", "deis", "dpmpp_2s"])
def test_exponential_and_beta_sigmas(name, cfg_name, key, check):
    """use_exponential_sigmas: N sigmas evenly spaced in log sigma between the schedule's ends (or the config's
    sigma_min/sigma_max); use_beta_sigmas: N sigmas at the quantiles 1 − k/(N − 1) of Beta(0.6, 0.6) between them.
    Timesteps mapped back from them (truncated to integers by the multistep solvers), as diffusers; its
    EulerAncestral has neither option and ignores the keys."""
    cfg, x = {**EXPONENTIAL[cfg_name], key: True}, start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    beta = key == "use_beta_sigmas"
    for n in (1, 2, 7, 20):
        ref.set_timesteps(n)
        assert_timesteps_equal(ours.timesteps(n), ref.timesteps, beta)
    got, want = our_run(ours, x, 9, **kw()), reference_run(reference(name, cfg), x, 9, **kw())
    check(relative_diff(got, want, beta), 1e-6)
    plain = sampler_from_config(name, EXPONENTIAL[cfg_name])
    assert torch.equal(ours.timesteps(9), plain.timesteps(9)) == (name == "euler_a")


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m", "unipc", "deis"])
def test_beta_sigmas_median_to_the_last_bit(name, check):
    """An odd step count puts the middle beta sigma at sigma_min + 0.5 (sigma_max − sigma_min), which for float32
    ends can lie exactly halfway between two float32 values: VD's betas, "leading" from t = 0, 3 steps (sigma_max
    2.918 at t = 666, sigma_min 0.0292 at t = 0). scipy, which diffusers asks, puts the median of Beta(0.6, 0.6) one
    float64 step above 0.5, so the float32 sigma rounds up, not to even; so must ours (and DPM2's midpoint
    timesteps, taken from the float32 sigmas)."""
    cfg, x = {**VD, "use_beta_sigmas": True, "timestep_spacing": "leading", "steps_offset": 0}, start_noise()
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    ref.set_timesteps(3)
    assert_timesteps_equal(ours.timesteps(3), ref.timesteps, True)
    if hasattr(ours, "schedule"):
        assert torch.equal(ours.schedule(3)[1], step_sigmas(name, ref))

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    check(relative_diff(our_run(ours, x, 3, **kw()), reference_run(reference(name, cfg), x, 3, **kw()), True), 1e-6)


DPM_ONLY = ("use_lu_lambdas", "lambda_min_clipped")


@pytest.mark.parametrize("extra", [
    {"use_lu_lambdas": True}, {"use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"},
    {"use_lu_lambdas": True, "use_exponential_sigmas": True},  # (Lu's lambdas win, as in diffusers)
    {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}, {"lambda_min_clipped": -2.0},
    {"lambda_min_clipped": -2.0, "timestep_spacing": "trailing"},
    {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"},
])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_dpmpp_lu_lambdas_and_clipped_lambdas(name, extra, check):
    """DPM-Solver++'s use_lu_lambdas (N log sigmas evenly over the training range, timesteps rounded but for cosine
    betas) and lambda_min_clipped (the spacings end where lambda_t = log(alpha_t/sigma_t) falls below it), as
    diffusers; UniPC's diffusers class lacks both keys and ignores them."""
    cfg, x = {**VD, **extra}, start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    for n in (1, 2, 7, 20, 50):
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps(n), ref.timesteps), n
    check(relative_diff(our_run(ours, x, 9, **kw()), reference_run(reference(name, cfg), x, 9, **kw())), 1e-6)
    plain = sampler_from_config(name, {k: v for k, v in cfg.items() if k not in DPM_ONLY})
    same = all(torch.equal(ours.timesteps(n), plain.timesteps(n)) for n in (7, 20, 50))
    assert same == (name == "unipc")


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (2.0, 5.0), (0.3, 1.7)])
def test_beta_quantiles_match_scipy(a, b):
    """Our Beta(a, b) quantile function (vd has no scipy) against scipy.stats.beta.ppf, which diffusers calls: within
    1e-14 relative over diffusers' 1 − k/(N − 1), exactly 0 and 1 at the ends, and exactly scipy's median of
    Beta(0.6, 0.6), diffusers' parameters (test_beta_sigmas_median_to_the_last_bit)."""
    from scipy import stats as scipy_stats  # (in the test extra: diffusers' LMS needs it)
    for n in (1, 2, 10, 1000):
        qs = (1 - np.linspace(0, 1, n)).tolist()
        ours = np.array(beta_quantiles(tuple(qs), a, b))
        ref = scipy_stats.beta.ppf(qs, a, b)
        assert ours[0] == 1.0 and (n == 1 or ours[-1] == 0.0)
        assert np.all(np.abs(ours - ref) <= 1e-14 * np.abs(ref)), n
    if a == b == 0.6:
        assert beta_quantiles((0.5,), a, b) == (float(scipy_stats.beta.ppf(0.5, a, b)),)


@pytest.mark.parametrize("name,extra", [
    *[(name, extra) for name in ("unipc", "unipc_karras") for extra in (
        {}, {"solver_type": "bh1"}, {"solver_order": 3}, {"prediction_type": "sample"},
        {"prediction_type": "v_prediction"}, {"thresholding": True})],
    ("unipc", {"solver_order": 3, "lower_order_final": False}),
    ("unipc", {"use_beta_sigmas": True}),
])
def test_unipc_noise_prediction(name, extra, check):
    """predict_x0=False: UniPC in noise prediction form (the model's eps in place of x0, h for −h), which
    diffusers runs to a finite end only with final_sigmas_type "sigma_min"; it thresholds nothing in this form.
    (With Karras sigmas, order 3 and no lower_order_final it ends in NaN: test_last_step_onto_the_same_sigma.)"""
    cfg, x = {**VD, "predict_x0": False, "final_sigmas_type": "sigma_min", **extra}, start_noise()
    for n in (1, 2, 12):
        ours = our_run(sampler_from_config(name, cfg), x, n)
        check(relative_diff(ours, reference_run(reference(name, cfg), x, n)), 1e-6, f"{n} steps")
    data_form = our_run(sampler_from_config(name, {**cfg, "predict_x0": True}), x, 12)
    assert not torch.allclose(ours[1][-1], data_form[1][-1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["unipc", "unipc_karras"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_last_step_onto_sigma_0_without_lower_order_final(name, order, check):
    """lower_order_final=False keeps the last step's order; onto sigma 0 its h is infinite and every r_k 0, so from
    2 steps on diffusers' last step gives inf (order 2, or 3 at 2 steps) or fails in torch.linalg.solve (order 3).
    Ours refuses those runs by name, before any model call, and runs what diffusers can: 1 step, first order, or an
    end at sigma_min (test_unipc_noise_prediction); a part-way run of 1 step: test_part_way.py."""
    cfg, x = {**VD, "solver_order": order, "lower_order_final": False}, start_noise()
    for n in (2, 3, 12):
        try:
            finite = bool(torch.isfinite(reference_run(reference(name, cfg), x, n)[1][-1]).all())
        except torch.linalg.LinAlgError:
            finite = False
        assert not finite, f"{n} steps"
        sampler, calls = sampler_from_config(name, cfg), []
        refusal = f"lower_order_final=False with solver_order {order} needs final_sigmas_type 'sigma_min'"
        with pytest.raises(ValueError, match=refusal):
            sampler.sample(lambda inp, t: calls.append(t) or fake_eps(inp, t), x, n)
        assert not calls
    one_step = our_run(sampler_from_config(name, cfg), x, 1)
    check(relative_diff(one_step, reference_run(reference(name, cfg), x, 1)), 1e-6, "1 step")
    first = {**cfg, "solver_order": 1}
    check(relative_diff(our_run(sampler_from_config(name, first), x, 12), reference_run(reference(name, first), x, 12)),
          1e-6, "first order")


@pytest.mark.parametrize("name,extra,diffusers_finite", [
    ("dpmpp_2m_karras", {}, True),
    ("dpmpp_2m_sde", {"use_exponential_sigmas": True}, True),
    ("unipc_karras", {"lower_order_final": False}, True),
    ("dpmpp_2m_karras", {"solver_order": 3}, False),
    ("dpmpp_2m_sde_karras", {"solver_type": "heun"}, False),
    ("dpmpp_2m", {"use_exponential_sigmas": True, "solver_order": 3, "lower_order_final": False}, False),
    ("dpmpp_2m_sde", {"use_beta_sigmas": True, "solver_order": 3}, False),
    ("unipc_karras", {"solver_order": 3, "lower_order_final": False}, False),
    ("unipc", {"use_beta_sigmas": True, "solver_order": 3, "lower_order_final": False}, False),
    ("unipc_karras", {"solver_order": 3, "lower_order_final": False, "predict_x0": False}, False),
])
def test_last_step_onto_the_same_sigma(name, extra, diffusers_finite, check):
    """Karras, exponential and beta sigmas end at sigma_min, and final_sigmas_type "sigma_min" appends it again: the
    last step has h = 0 and is the identity. diffusers computes it; in the forms it keeps finite it gives x again bit
    for bit, and its third-order and Heun-form terms divide 0 by 0 (NaN) once the last step keeps its order (from
    15 steps with DPM-Solver++'s lower_order_final, from 3 without). Ours returns x as it is: equal to diffusers'
    whole run where that is finite, and to every step before the last where it is not. (UniPC's last x differs from
    the one before by the corrector of the step before, applied at the last step.)"""
    cfg, x = {**VD, "final_sigmas_type": "sigma_min", **extra}, start_noise()
    kw = lambda: {"generator": gens(False)} if name in STOCHASTIC else {}  # noqa: E731
    ours = our_run(sampler_from_config(name, cfg), x, 20, **kw())
    ref = reference_run(reference(name, cfg), x, 20, **kw())
    assert bool(torch.isfinite(ref[1][-1]).all()) is diffusers_finite
    assert torch.isfinite(ours[1][-1]).all()
    if "unipc" not in name:
        assert torch.equal(ours[1][-1], ours[1][-2])
    if diffusers_finite:
        check(relative_diff(ours, ref), 1e-6)
    else:
        check(relative_diff((ours[0], ours[1][:-1]), (ref[0], ref[1][:-1])), 1e-6, "all but the last step")


@pytest.mark.parametrize("name,disabled", [("unipc", [0, 3, 4]), ("unipc_karras", [1]), ("unipc", list(range(12)))])
def test_unipc_disable_corrector(name, disabled, check):
    """disable_corrector: the steps i whose UniC correction (made when step i + 1 evaluates the model) is skipped,
    as diffusers' UniPC; all of them leaves the predictor alone."""
    cfg, x = {**VD, "disable_corrector": disabled}, start_noise()
    ours = our_run(sampler_from_config(name, cfg), x, 12)
    check(relative_diff(ours, reference_run(reference(name, cfg), x, 12)), 1e-6)
    corrected = our_run(sampler_from_config(name, VD), x, 12)
    assert not torch.allclose(ours[1][-1], corrected[1][-1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large"])
def test_ddpm_variance_types(variance_type, check):
    cfg, x = {**VD, "variance_type": variance_type, "timestep_spacing": "linspace"}, start_noise()
    ref = reference_run(reference("ddpm", cfg), x, 10, generator=gens(False))
    check(relative_diff(our_run(sampler_from_config("ddpm", cfg), x, 10, generator=gens(False)), ref), 1e-6)


ZERO_SNR = {**VD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
IGNORE_ZERO_SNR = {"pndm", "lms", "lms_karras", "heun", "heun_karras", "dpm2", "dpm2_karras", "dpm2_a",
                   "dpm2_a_karras", "deis", "deis_karras", "dpmpp_2s", "dpmpp_2s_karras", "dpmpp_2s_sde",
                   "dpmpp_2s_sde_karras"}  # their diffusers classes lack the key


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_zero_terminal_snr(name, check):
    """rescale_betas_zero_snr (Lin et al. 2023), with the trailing spacing and v-prediction it is meant for:
    alpha_bar ends at 0 (DDIM, DDPM, DDIM inversion), raised to 2**-24 by the samplers that take a sigma from it,
    as diffusers; PNDM, LMS, Heun, DPM2, DEIS and DPM-Solver++(2S) ignore the key, as their diffusers classes do."""
    x = start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ours = sampler_from_config(name, ZERO_SNR)
    ref = reference(name, ZERO_SNR)
    assert torch.equal(ours.alpha_bars(), ref.alphas_cumprod)
    check(relative_diff(our_run(ours, x, 9, **kw()), reference_run(ref, x, 9, **kw())), 1e-6)
    last = ours.alpha_bars()[-1].item()
    if name in IGNORE_ZERO_SNR:
        assert last == sampler_from_config(name, VD).alpha_bars()[-1].item()
    else:
        assert last == (0.0 if name in ("ddim", "ddpm", "ddim_inverse") else 2.0**-24)


@pytest.mark.parametrize("tail,spacing", [(1, "trailing"), (12, "leading")])
@pytest.mark.parametrize("name", ["euler_karras", "dpmpp_2m_karras", "unipc_karras", "euler", "unipc"])
def test_zero_snr_sigmas_not_ascending(name, tail, spacing, check):
    """Zero terminal SNR with tiny last betas: alpha_bar before t = T − 1 falls below the 2**-24 floor there (to 0
    in float32 with one beta of 1e-7: an infinite sigma), so the training sigmas are no longer ascending. The
    Karras and exponential timesteps then come from the last training sigma at or below theirs, with np.interp's
    rules at an infinite one, as diffusers computes them. 100 "leading" steps start where sigma > sigma(T − 1)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    betas[-tail:] = 1e-7 if tail == 1 else 1e-4
    cfg = {**ZERO_SNR, "trained_betas": betas.tolist(), "timestep_spacing": spacing}
    cfg.update({} if name.endswith("karras") else {"use_exponential_sigmas": True})
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    train = ((1 - ours.alpha_bars()) / ours.alpha_bars()) ** 0.5
    assert train[-2] > train[-1] and torch.isinf(train).any() == (tail == 1)
    ref.set_timesteps(100)
    assert torch.equal(ours.timesteps(100), ref.timesteps)
    x = start_noise()
    if len(set(ref.timesteps.tolist())) == 100:
        check(relative_diff(our_run(ours, x, 100), reference_run(reference(name, cfg), x, 100)), 1e-6)
    else:  # repeated timesteps: diffusers steps past its sigmas (see test_trajectory)
        with pytest.raises((IndexError, AssertionError)):
            reference_run(reference(name, cfg), x, 100)
        assert torch.isfinite(ours.sample(fake_eps, x, 100)).all()


THRESHOLDS = [(0.995, 1.0), (0.9, 1.5), (0.6, 20.0), (0.995, 0.5)]


@pytest.mark.parametrize("ratio,max_value", THRESHOLDS)
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde_karras", "unipc", "unipc_karras", "deis",
                                  "dpmpp_2s"])
def test_dynamic_thresholding(name, ratio, max_value, check):
    """thresholding=True: each predicted x0 is clipped to [-s, s] and divided by s, s its `ratio` quantile of |x0|
    kept within [1, sample_max_value] (sample_max_value < 1 wins over 1, as torch.clamp). DDIM and DDPM threshold
    instead of clipping. The runs differ from those without thresholding."""
    cfg = {**VD, "thresholding": True, "dynamic_thresholding_ratio": ratio, "sample_max_value": max_value}
    x = start_noise() * 3

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ours = our_run(sampler_from_config(name, cfg), x, 9, **kw())
    check(relative_diff(ours, reference_run(reference(name, cfg), x, 9, **kw())), 1e-6)
    plain = our_run(sampler_from_config(name, {**VD, "clip_sample": False}), x, 9, **kw())
    assert not torch.allclose(ours[1][-1], plain[1][-1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dynamic_threshold_dtypes(dtype):
    """Half-precision x0 is thresholded in float32 and returned in its own dtype, as diffusers does."""
    x0 = (torch.randn((3, 4, 5, 6), generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    ref = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)._threshold_sample(x0)
    ours = dynamic_threshold(x0, 0.9, 1.7)
    assert ours.dtype == dtype and torch.equal(ours, ref)


@pytest.mark.parametrize("train", [1000, 200])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_trained_betas(name, train, check):
    """trained_betas: the config's own betas, one per training timestep, in place of the named schedule (whose
    name is then not read, as diffusers)."""
    betas = (torch.rand(train, generator=torch.Generator().manual_seed(train), dtype=torch.float64) * 0.03 + 1e-4)
    cfg = {**VD, "num_train_timesteps": train, "trained_betas": betas.tolist(), "beta_schedule": "sigmoid"}
    x = start_noise()

    def kw():
        return {"generator": gens(False)} if name in STOCHASTIC else {}
    ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
    assert torch.equal(ours.alpha_bars(), ref.alphas_cumprod)
    check(relative_diff(our_run(ours, x, 9, **kw()), reference_run(ref, x, 9, **kw())), 1e-6)
    for array in (betas.numpy(), betas):  # as diffusers' own constructor takes them too
        assert sampler_from_config(name, {**cfg, "trained_betas": array}) == ours


@pytest.mark.parametrize("name,key,value,expected", [
    ("euler", "rescale_betas_zero_snr", "true", "true or false"),
    ("ddim", "clip_sample", "false", "true or false"),
    ("ddim", "trained_betas", 0.1, "a list of numbers or null"),
    ("lms", "trained_betas", ["0.1"] * 1000, "a list of numbers or null"),
    ("unipc", "solver_order", 2.0, "an integer"),
    ("dpmpp_2m", "steps_offset", None, "an integer"),
    ("ddpm", "beta_start", "0.1", "a number"),
    ("euler_karras", "sigma_max", False, "a number or null"),
    ("heun", "prediction_type", 1, "a string"),
    ("unipc", "disable_corrector", [1.0], "a list of integers"),
    ("unipc_karras", "disable_corrector", 3, "a list of integers"),
])
def test_config_value_types(name, key, value, expected):
    """A config value of the wrong type is refused by name, before any sampling (a JSON "false" string would be
    true in diffusers)."""
    with pytest.raises(TypeError, match=rf"^{key}: expected {expected} for \w+, got ") as err:
        sampler_from_config(name, {**VD, key: value})
    assert str(err.value).endswith(reprlib.repr(value))


def test_trained_betas_count():
    with pytest.raises(ValueError, match=r"trained_betas must hold num_train_timesteps=1000 betas, got 999"):
        sampler_from_config("euler", {**VD, "trained_betas": [0.01] * 999})


@pytest.mark.parametrize("name,key,value,expected", [
    ("ddim", "beta_start", -0.1, "in [0.0, 1.0]"),  # (scaled_linear: the square root of a negative beta)
    ("euler", "beta_end", 2.0, "in [0.0, 1.0]"),
    ("dpmpp_2m", "beta_start", math.nan, "in [0.0, 1.0]"),
    ("unipc", "num_train_timesteps", 0, "in [1, 1000000]"),
    ("lms", "num_train_timesteps", 10**20, "in [1, 1000000]"),
    ("euler_karras", "sigma_min", -1.0, ">= 0.0"),
    ("dpm2_karras", "sigma_max", math.inf, ">= 0.0"),
])
def test_config_values_out_of_range(name, key, value, expected):
    """A config value that makes every schedule NaN (or cannot be laid out) is refused by name, before any
    sampling; diffusers samples NaN with it or fails inside torch."""
    with pytest.raises(ValueError, match=rf"^{key} must be a finite number {re.escape(expected)} for \w+, got "):
        sampler_from_config(name, {**VD, key: value})


@pytest.mark.parametrize("bad", [math.nan, -0.01, 1.5])
def test_trained_betas_out_of_range(bad):
    betas = [0.01] * 999 + [bad]
    with pytest.raises(ValueError, match=rf"^trained_betas must lie in \[0, 1\] for Euler, got {bad!r}$"):
        sampler_from_config("euler", {**VD, "trained_betas": betas})
    last_one = sampler_from_config("euler", {**VD, "trained_betas": [0.01] * 999 + [1.0]})  # zero terminal SNR's
    assert last_one.alpha_bars()[-1] == 0


@pytest.mark.parametrize("name,key", [("deis", "algorithm_type"), ("unipc", "solver_p"),
                                      ("dpmpp_2m", "variance_type"), ("euler", "use_karras_sigmas")])
def test_config_values_that_are_arrays(name, key):
    """A Python dict may hold anything: an array where a name or flag belongs is refused by name."""
    with pytest.raises(ValueError, match=rf"^{key}=array\(\[0\., 0\.\]\) is not supported by "):
        sampler_from_config(name, {**VD, key: np.zeros(2)})


# ------------------------------------------------------------------------------------------ config, names, errors


def test_config_defaults_follow_diffusers_from_config():
    """A key the file lacks takes each class's own default, also through diffusers' _use_default_values."""
    for name in NEW:
        for cfg in CONFIGS.values():
            ours, ref = sampler_from_config(name, cfg), reference(name, cfg).config
            for f in dataclasses.fields(ours):  # (a key the class lacks reads as None, as diffusers' hasattr)
                assert getattr(ours, f.name) == as_field(ref.get(f.name)), (name, f.name)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_leading_counts_that_start_past_the_schedule(name):
    """With "leading" spacing and steps_offset 3 the first timestep does not grow with the count: 500 steps (DPM-
    Solver++, UniPC and DEIS place one more point: 499) would start at 1001 although 997 fit. Refused by name, as the
    facade refuses it before any model runs (diffusers' DDIM fails with an IndexError). DPM-Solver++(2S) has no
    spacing key and runs them."""
    sampler = sampler_from_config(name, {**VD, "timestep_spacing": "leading", "steps_offset": 3})
    multistep = name.startswith(("dpmpp", "unipc", "deis"))
    bad = 499 if multistep and "karras" not in name else 500
    if multistep and "karras" in name or name.startswith("dpmpp_2s"):  # Karras sigmas span the training range, unspaced
        assert len(sampler.timesteps(bad)) == bad
        return
    with pytest.raises(ValueError, match=rf"num_inference_steps={bad} .* starts at timestep 1001"):
        sampler.timesteps(bad)
    assert int(sampler.timesteps(bad - 1).max()) < 1000 and int(sampler.timesteps(sampler.max_steps()).max()) < 1000


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_max_steps_is_what_the_schedule_accepts(name):
    """`max_steps` (what the facade checks before any model runs) is exactly the most steps `timesteps` takes."""
    for cfg in CONFIGS.values():
        sampler = sampler_from_config(name, cfg)
        most = sampler.max_steps()
        assert len(sampler.timesteps(most)) >= most
        with pytest.raises(ValueError, match=rf"num_inference_steps must be in \[1, {most}\], got {most + 1}"):
            sampler.timesteps(most + 1)


@pytest.mark.parametrize("name", [n for n in NEW if REF[n][1]])
def test_the_names_override_wins_over_the_config(name):
    """A config that states the name's own setting (a checkpoint saved from a Karras pipeline), or its opposite,
    gives the sampler of the name, as diffusers' from_config(config, **override) does."""
    _, override = REF[name]
    opposite = {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}
    for stated in (override, {k: opposite[k] for k in override}):
        cfg = {**VD, **stated}
        ours, ref = sampler_from_config(name, cfg), reference(name, cfg)
        assert ours == sampler_from_config(name, VD)
        assert all(getattr(ours, f.name) == as_field(ref.config.get(f.name)) for f in dataclasses.fields(ours))
        ref.set_timesteps(20)
        assert torch.equal(ours.timesteps(20), ref.timesteps)


def test_registry():
    """Every name of the issue, the original three unchanged (which start part-way: test_part_way.py)."""
    assert sorted(SCHEDULERS) == sorted(["ddim", "pndm", "lms", *NEW])
    assert all(isinstance(cls.starts_part_way, bool) for cls in SCHEDULERS.values())
    two_evals = {n for n, cls in SCHEDULERS.items() if cls.evals_per_step != 1}
    assert two_evals == {"heun", "heun_karras", "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras"}
    assert HeunDiscreteScheduler.order == KDPM2DiscreteScheduler.order == KDPM2AncestralDiscreteScheduler.order == 2
    assert DPMSolverMultistepScheduler.order == UniPCMultistepScheduler.order == 1
    with pytest.raises(ValueError, match=r"scheduler must be one of \[.*'dpmpp_2m_karras'.*\], got 'dpm\+\+'"):
        sampler_from_config("dpm++", VD)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("n", [0, -1, 1001])
def test_bad_num_steps(name, n):
    sampler = sampler_from_config(name, VD)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.timesteps(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.sample(fake_eps, start_noise(), n)


@pytest.mark.parametrize("name,key,value", [
    ("unipc_karras", "use_exponential_sigmas", True),  # diffusers refuses both at once too
    ("unipc_karras", "use_beta_sigmas", True),  # (as diffusers: one of Karras, exponential, beta)
    ("dpmpp_2m", "algorithm_type", "dpmsolver"),
    ("dpmpp_2m", "solver_order", 4),
    ("dpmpp_2m", "final_sigmas_type", "last"),
    ("euler", "final_sigmas_type", "last"),
    ("euler", "timestep_type", "edm"),
    ("dpmpp_2m", "solver_type", "bh3"),
    ("dpmpp_2m", "variance_type", "learned_range"),  # other DDPM variance types are accepted (no effect)
    ("unipc", "predict_x0", False),  # with the final sigma 0 (the default) diffusers' last step is NaN
    ("unipc", "solver_p", {"_class_name": "DDIMScheduler"}),
    ("unipc", "solver_type", "bh3"),
    ("unipc", "solver_order", 4),
    ("ddpm", "variance_type", "learned_range"),
    ("heun", "beta_schedule", "exp"),
    ("euler", "interpolation_type", "cubic"),
    ("euler_a", "prediction_type", "sample"),
    ("dpm2", "prediction_type", "sample"),
    ("deis", "algorithm_type", "sde-dpmsolver++"),
    ("deis", "solver_type", "bh3"),
    ("deis", "solver_order", 4),
    ("dpmpp_2s", "algorithm_type", "dpmsolver"),
    ("dpmpp_2m", "algorithm_type", "deis"),  # (with final_sigmas_type "zero", as diffusers)
    ("dpmpp_2s", "solver_order", 4),
])
def test_unsupported_config(name, key, value):
    with pytest.raises(ValueError, match=key) as err:
        sampler_from_config(name, {**VD, key: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("name,stated", [
    ("euler", {"use_karras_sigmas": True}), ("heun", {"use_karras_sigmas": True}), ("lms", {"use_karras_sigmas": True}),
    ("dpmpp_2m", {"use_karras_sigmas": True}), ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_2s_karras", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_2m_karras", {"algorithm_type": "sde-dpmsolver++"}), ("dpmpp_2m_sde", {"use_karras_sigmas": True}),
    ("unipc", {"use_karras_sigmas": True}), ("deis", {"use_karras_sigmas": True}),
    ("deis", {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "rescale_betas_zero_snr": True}),
    ("dpmpp_2m", {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2s", {"algorithm_type": "deis", "final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}),
    ("ddpm", {"variance_type": None}), ("dpmpp_2m", {"variance_type": "fixed_small"}),
])
def test_configs_saved_from_other_samplers(name, stated, check):
    """A config saved from a Karras or SDE pipeline gives a name the form diffusers' class reads from it (euler on
    it runs as euler_karras); DPM-Solver's variance_type null and DDPM's fixed_small run as in diffusers; DEIS and
    DPM-Solver++ read each other's algorithm_type and solver_type as their own, and ignore the keys their class
    lacks."""
    cls, override = EVERY[name]
    cfg, x = {**VD, **stated}, start_noise()
    stochastic = "sde" in name or stated.get("algorithm_type") == "sde-dpmsolver++" or name == "ddpm"
    kw = lambda: {"generator": gens(False)} if stochastic else {}  # noqa: E731
    ref = reference_run(cls.from_config(cfg, **override), x, 9, **kw())
    check(relative_diff(our_run(sampler_from_config(name, cfg), x, 9, **kw()), ref), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_half_precision_trajectories(name, dtype, check):
    """x in float16 or bfloat16 (the model's dtype on a GPU): each sampler keeps diffusers' mix of float32 schedule
    scalars and half-precision arithmetic, so the trajectories are equal to the last bit."""
    x = start_noise().to(dtype)

    def kw():
        return {"generator": gens(True)} if name in STOCHASTIC else {}
    ours, ref = our_run(sampler_from_config(name, VD), x, 10, **kw()), reference_run(reference(name, VD), x, 10, **kw())
    assert ours[1][-1].dtype == ref[1][-1].dtype
    check(relative_diff(ours, ref), 0.0)
