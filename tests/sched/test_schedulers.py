"""Parity of vd.sched (DDIM, PNDM, LMS, randn) with diffusers 0.42.1 schedulers, the reference oracle.

Whole sampling loops run against diffusers' own scale_model_input/step loop on a deterministic fake
model; every intermediate x (via our callback) must match to 1e-6 in float32.
"""

import dataclasses
import json
import math
import reprlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
integrate = pytest.importorskip("scipy.integrate")
from diffusers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from vd.sched import DDIM, LMS, PNDM, randn, sampler_from_config  # noqa: E402
from vd.sched.lms import lms_coefficients  # noqa: E402
from helpers import DATA
from sampler_table import fake_eps  # noqa: E402

FIRST_THREE = {"ddim": DDIM, "pndm": PNDM, "lms": LMS}  # checked here; tests/sched/test_samplers.py checks the rest

VD = json.loads((DATA / "scheduler_config.json").read_text())
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers
REF = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "lms": LMSDiscreteScheduler}

# raw scheduler_config.json dicts: VD's shipped one plus variants covering the other code paths
CONFIGS = {
    "vd": VD,
    # linear betas, final alpha 1, no offset, trailing spacing, x0 clipping at a range that bites
    "linear_trailing": {"beta_schedule": "linear", "set_alpha_to_one": True, "steps_offset": 0,
                        "timestep_spacing": "trailing", "clip_sample": True, "clip_sample_range": 1.5},
    # cosine betas, linspace spacing; for PNDM this is the Runge-Kutta warm-up (class default)
    "cosine_linspace": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace",
                        "clip_sample": False},
    # diffusers' class defaults (DDIM clips to [-1, 1]; PNDM uses PRK with leading spacing; LMS linspace)
    "defaults": {},
    # VD with an explicit "leading" (LMS then uses leading and sqrt(sigma_max^2 + 1) as init sigma)
    "vd_leading": {**VD, "timestep_spacing": "leading"},
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def reference_loop(sched, x, n, eps_fn, **step_kwargs):
    """diffusers' pipeline loop; returns every x after each step and the (t, model input) of each call."""
    sched.set_timesteps(n)
    x = x * sched.init_noise_sigma
    xs, calls = [], []
    noises = step_kwargs.pop("variance_noise", None)
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        calls.append((t, inp))
        kw = dict(step_kwargs, variance_noise=noises[i]) if noises is not None else step_kwargs
        x = sched.step(eps_fn(inp, t), t, x, **kw).prev_sample
        xs.append(x)
    return xs, calls


def our_loop(sampler, x, n, eps_fn, **kwargs):
    """Our sample(); records x from the callback and (t, input) of each eps_fn call like reference_loop."""
    xs, calls, cb_ts = [], [], []

    def recording_eps(inp, t):
        calls.append((t, inp))
        return eps_fn(inp, t)

    def callback(i, t, x_i):
        assert i == len(xs)
        cb_ts.append(t)
        xs.append(x_i)

    out = sampler.sample(recording_eps, x, n, callback=callback, **kwargs)
    assert out is xs[-1]
    assert all(a is b for a, b in zip(cb_ts, (t for t, _ in calls)))
    return xs, calls


def assert_same_run(ours, ref, atol):
    (xs, calls), (xs_ref, calls_ref) = ours, ref
    assert len(calls) == len(calls_ref) and len(xs) == len(xs_ref)
    for (t, inp), (t_ref, inp_ref) in zip(calls, calls_ref):
        assert t.dtype == t_ref.dtype and t.dim() == 0 and t.item() == t_ref.item()
        d = max_diff(inp, inp_ref)
        assert d <= atol, f"model input differs at t={t.item()}: max abs diff {d:.3g}"
    for i, (x, x_ref) in enumerate(zip(xs, xs_ref)):
        assert x.dtype == x_ref.dtype
        d = max_diff(x, x_ref)
        assert d <= atol, f"x after step {i} differs: max abs diff {d:.3g} > {atol}"


def start_noise(dtype=torch.float32):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------ timesteps


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(FIRST_THREE))
@pytest.mark.parametrize("n", [1, 7, 25, 50, 999])
def test_timesteps_match(name, cfg_name, n):
    cfg = CONFIGS[cfg_name]
    ours = sampler_from_config(name, cfg)
    ref = REF[name].from_config(cfg)
    if name == "pndm" and not ours.skip_prk_steps and n < 4:  # diffusers fails on a numpy broadcast
        with pytest.raises(ValueError):
            ref.set_timesteps(n)
        with pytest.raises(ValueError, match="num_inference_steps"):
            ours.timesteps(n)
        return
    ref.set_timesteps(n)
    ts = ours.timesteps(n)
    assert ts.dtype == ref.timesteps.dtype
    assert torch.equal(ts, ref.timesteps)
    if name == "lms":
        assert torch.equal(ours.sigmas(n), ref.sigmas)
        assert ours.init_noise_sigma(n) == float(ref.init_noise_sigma)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_sweep_all_n(spacing):
    """Every N in 1..1000: catches rounding / numpy.arange-length corner cases of the spacing rules."""
    cfg = {**VD, "timestep_spacing": spacing}
    for name in FIRST_THREE:
        ours, ref = sampler_from_config(name, cfg), REF[name].from_config(cfg)
        for n in range(1, 1000):
            ref.set_timesteps(n)
            assert torch.equal(ours.timesteps(n), ref.timesteps), (name, n)
    prk = PNDM.from_config({**cfg, "skip_prk_steps": False})
    ref = PNDMScheduler.from_config({**cfg, "skip_prk_steps": False})
    for n in range(4, 1000):
        ref.set_timesteps(n)
        assert torch.equal(prk.timesteps(n), ref.timesteps), n


def test_vd_known_values():
    """Spot values from the reference spec (section E), independent of diffusers."""
    assert DDIM.from_config(VD).timesteps(50)[[0, 1, -1]].tolist() == [981, 961, 1]
    assert PNDM.from_config(VD).timesteps(8).tolist() == [876, 751, 751, 626, 501, 376, 251, 126, 1]
    lms = LMS.from_config(VD)
    assert lms.timestep_spacing == "linspace"
    assert lms.timesteps(8)[0].item() == 999.0 and lms.timesteps(8)[-1].item() == 0.0
    assert math.isclose(lms.init_noise_sigma(50), 14.6146, abs_tol=1e-4)
    assert math.isclose(LMS.from_config(CONFIGS["vd_leading"]).init_noise_sigma(50), 13.1585, abs_tol=1e-4)


# ------------------------------------------------------------------------------------------ loops

DDIM_CASES = [("vd", 50), ("linear_trailing", 25), ("cosine_linspace", 7), ("defaults", 10)]


@pytest.mark.parametrize("cfg_name,n", DDIM_CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_deterministic(cfg_name, n, prediction_type):
    cfg = {**CONFIGS[cfg_name], "prediction_type": prediction_type}
    x = start_noise()
    ref = reference_loop(DDIMScheduler.from_config(cfg), x, n, fake_eps)
    assert_same_run(our_loop(DDIM.from_config(cfg), x, n, fake_eps), ref, atol=1e-6)


@pytest.mark.parametrize("cfg_name,n", DDIM_CASES)
def test_ddim_eta_injected_noise(cfg_name, n):
    cfg, x = CONFIGS[cfg_name], start_noise()
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i), dtype=x.dtype)
             for i in range(n)]
    ref = reference_loop(DDIMScheduler.from_config(cfg), x, n, fake_eps, eta=0.7, variance_noise=noise)
    assert_same_run(our_loop(DDIM.from_config(cfg), x, n, fake_eps, eta=0.7, noise=noise), ref, atol=1e-6)


@pytest.mark.parametrize("cfg_name,n", DDIM_CASES)
@pytest.mark.parametrize("per_item", [False, True])
def test_ddim_eta_generator(cfg_name, n, per_item):
    """Same seed(s) on both sides; per_item: one generator per batch item (diffusers' list form)."""
    cfg, x = CONFIGS[cfg_name], start_noise()

    def gen():
        return [torch.Generator().manual_seed(7 + b) for b in range(len(x))] if per_item else \
            torch.Generator().manual_seed(7)

    ref = reference_loop(DDIMScheduler.from_config(cfg), x, n, fake_eps, eta=0.7, generator=gen())
    ours = our_loop(DDIM.from_config(cfg), x, n, fake_eps, eta=0.7, generator=gen())
    assert_same_run(ours, ref, atol=1e-6)


@pytest.mark.parametrize("cfg_name,n,skip", [("vd", 50, 10), ("vd", 50, 49), ("vd", 7, 3), ("defaults", 10, 1)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_skip_img2img(cfg_name, n, skip, eta):
    """Starting part-way (fidelity/img2img) equals diffusers' img2img loop: add_noise at timesteps[skip],
    then step through timesteps[skip:], with the same injected per-step noise."""
    cfg, x0 = CONFIGS[cfg_name], start_noise()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    step_noise = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(n)
    x_ref = sched.add_noise(x0, z, sched.timesteps[skip:skip + 1])
    for i, t in enumerate(sched.timesteps[skip:], start=skip):
        x_ref = sched.step(fake_eps(x_ref, t), t, x_ref, eta=eta, variance_noise=step_noise[i]).prev_sample

    ours = DDIM.from_config(cfg)
    start = ours.noised(x0, int(ours.timesteps(n)[skip]), z)
    x = ours.sample(fake_eps, start, n, eta=eta, noise=step_noise, skip=skip)
    assert max_diff(x, x_ref) <= 1e-6
    assert torch.equal(ours.sample(fake_eps, x0, n, skip=len(ours.timesteps(n))), x0)  # nothing left to denoise
    with pytest.raises(ValueError, match="skip"):
        ours.sample(fake_eps, start, n, skip=len(ours.timesteps(n)) + 1)


@pytest.mark.parametrize("cfg_name,n", [("vd", 50), ("vd", 1), ("vd", 2), ("defaults", 25), ("defaults", 4),
                                        ("cosine_linspace", 7), ("linear_trailing", 10)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm(cfg_name, n, prediction_type):
    cfg = {**CONFIGS[cfg_name], "prediction_type": prediction_type}
    x = start_noise()
    ref = reference_loop(PNDMScheduler.from_config(cfg), x, n, fake_eps)
    assert_same_run(our_loop(PNDM.from_config(cfg), x, n, fake_eps), ref, atol=1e-6)


@pytest.mark.parametrize("cfg_name,n", [("vd", 50), ("vd", 1), ("vd_leading", 25), ("linear_trailing", 10)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lms(cfg_name, n, prediction_type):
    cfg = {**CONFIGS[cfg_name], "prediction_type": prediction_type}
    x = start_noise()
    ref = reference_loop(LMSDiscreteScheduler.from_config(cfg), x, n, fake_eps)
    assert_same_run(our_loop(LMS.from_config(cfg), x, n, fake_eps), ref, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FIRST_THREE))
def test_float64_runs(name):
    """In float64 diffusers keeps float32 schedule scalars (and LMS coefficients); so do we."""
    x = start_noise(torch.float64)

    def kw():
        return {"eta": 0.7, "generator": torch.Generator().manual_seed(3)} if name == "ddim" else {}

    ref = reference_loop(REF[name].from_config(VD), x, 25, fake_eps, **kw())
    assert_same_run(our_loop(FIRST_THREE[name].from_config(VD), x, 25, fake_eps, **kw()), ref, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noised_is_add_noise(dtype):
    """The init path's forward diffusion equals diffusers' add_noise, in float64 too (no float32 detour)."""
    x0, z = start_noise(dtype), start_noise(dtype).flip(0)
    ref = DDIMScheduler.from_config(VD).add_noise(x0, z, torch.tensor([741]))
    got = DDIM.from_config(VD).noised(x0, 741, z)
    assert got.dtype == dtype and (got - ref).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-15)


def test_lms_coefficients_against_quad():
    """float64: the exact integral (scipy quad on a float64 integrand) to 1e-10."""
    def quad_coeff(sig, i, order, j):
        def basis(tau):
            return math.prod((tau - sig[i - m]) / (sig[i - j] - sig[i - m]) for m in range(order) if m != j)
        return integrate.quad(basis, sig[i], sig[i + 1], epsabs=1e-14, epsrel=1e-12)[0]

    g = torch.Generator().manual_seed(0)
    lists = [LMS.from_config(VD).sigmas(n).double() for n in (4, 50)]
    lists += [LMS.from_config(CONFIGS["vd_leading"]).sigmas(13).double()]
    lists += [torch.cat([torch.rand(12, generator=g, dtype=torch.float64).mul(20).sort(descending=True).values,
                         torch.zeros(1, dtype=torch.float64)])]
    worst = 0.0
    for sig in lists:
        for i in range(len(sig) - 1):
            order = min(i + 1, 4)
            got = lms_coefficients(sig, i, order)
            want = [quad_coeff(sig.tolist(), i, order, j) for j in range(order)]
            assert all(math.isfinite(a) for a in got)  # (Python's max would pass over a NaN)
            worst = max(worst, *(abs(a - b) for a, b in zip(got, want)))
    assert worst <= 1e-10, f"max abs diff to scipy quad {worst:.3g}"


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_lms_coefficients_float32_match_diffusers(spacing):
    """float32: bit for bit what diffusers' get_lms_coefficient returns (float32 integrand in quad)."""
    cfg = {**VD, "timestep_spacing": spacing}
    for n in (7, 50):
        ref = LMSDiscreteScheduler.from_config(cfg)
        ref.set_timesteps(n)
        for i in range(n):
            order = min(i + 1, 4)
            got = lms_coefficients(ref.sigmas, i, order, dtype=torch.float32)
            assert got == [ref.get_lms_coefficient(order, i, j) for j in range(order)], (n, i)


# ------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randn_matches_randn_tensor(dtype):
    shape = (3, 4, 5, 6)
    one = [torch.Generator().manual_seed(s) for s in (1, 1)]
    cpu = torch.device("cpu")
    assert torch.equal(randn(shape, one[0], "cpu", dtype), randn_tensor(shape, one[1], cpu, dtype))
    lists = [[torch.Generator().manual_seed(s) for s in (5, 6, 7)] for _ in range(2)]
    a, b = randn(shape, lists[0], "cpu", dtype), randn_tensor(shape, lists[1], torch.device("cpu"), dtype)
    assert torch.equal(a, b) and a.dtype == dtype
    singles = [[torch.Generator().manual_seed(9)] for _ in range(2)]  # a 1-list acts as one generator
    assert torch.equal(randn(shape, singles[0], "cpu", dtype), randn_tensor(shape, singles[1], None, dtype))
    torch.manual_seed(11)
    a = randn(shape, None, None, dtype)
    torch.manual_seed(11)
    assert torch.equal(a, randn_tensor(shape, None, None, dtype))


def test_randn_generator_list_length():
    with pytest.raises(ValueError, match="generator"):
        randn((3, 2), [torch.Generator(), torch.Generator()])


# ------------------------------------------------------------------------------------------ config, errors


def test_config_defaults_follow_diffusers_from_config():
    """A key the file lacks takes each class's own default, also through diffusers' _use_default_values."""
    loaded = DDIMScheduler.from_config(VD).config  # what pipe.scheduler.config holds (a FrozenDict)
    assert "timestep_spacing" in loaded["_use_default_values"]
    for name in FIRST_THREE:
        for cfg in [*CONFIGS.values(), loaded]:
            ours, ref = sampler_from_config(name, cfg), REF[name].from_config(cfg).config
            for f in dataclasses.fields(ours):
                assert getattr(ours, f.name) == ref.get(f.name), (name, f.name)
    assert LMS.from_config(loaded).timestep_spacing == "linspace"
    assert LMS.from_config(CONFIGS["vd_leading"]).timestep_spacing == "leading"
    assert PNDM.from_config(VD).skip_prk_steps and not PNDM.from_config({}).skip_prk_steps


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match=r"scheduler.*ddim.*'k_euler'"):
        sampler_from_config("k_euler", VD)


@pytest.mark.parametrize("name,key,value", [
    ("ddim", "beta_schedule", "sigmoid"),
    ("lms", "timestep_spacing", "uniform"),
    ("pndm", "prediction_type", "sample"),
    ("ddim", "prediction_type", "flow"),
])
def test_unsupported_config(name, key, value):
    with pytest.raises(ValueError, match=key) as err:
        sampler_from_config(name, {**VD, key: value})
    assert reprlib.repr(value) in str(err.value)


def test_ddim_noise_and_generator_exclusive():
    x = start_noise()
    with pytest.raises(ValueError, match="noise"):
        DDIM.from_config(VD).sample(fake_eps, x, 2, eta=1.0, noise=[x, x], generator=torch.Generator())
