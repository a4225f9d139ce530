"""Samplers started part-way, as diffusers' img2img pipelines start them (StableDiffusionImg2ImgPipeline, and the
loops of brain-decoding work such as MindEye's reconstruction): with N steps and strength s, the last
int(s·N) timesteps run, from init latents noised by the scheduler's `add_noise` to the first of them, with
`set_begin_index` where the scheduler has it.

Ours: `noised_to_step(x0, noise, N, k)` then `sample(..., skip=k)`, k = N − int(s·N). Whole trajectories on the
stand-in model in float32, each against the diffusers class the name equals: the start, every model input and
every x after a step within 1e-6 of the reference's largest value. PNDM (whose warm-up diffusers' img2img runs
out of step) and DDIM inversion do not start part-way, and say so.
"""

import pytest
import torch

pytest.importorskip("diffusers")
from sampler_table import EVERY, STOCHASTIC, fake_eps  # noqa: E402
from test_samplers import CONFIGS, relative_diff, start_noise  # noqa: E402
from vd.sched import SCHEDULERS, sampler_from_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PART_WAY = sorted(name for name, cls in SCHEDULERS.items() if cls.starts_part_way)
# (steps, strength): MindEye's 20 steps at 0.85, Brain-Diffuser's 50 at 0.75, strength 1 (every step, from init
# latents noised to the first), the last step alone, and short runs where the multistep orders ramp up again (and
# DPM-Solver++(2S)'s groups are cut: 12 steps at 0.5 and 0.75 start at the first and the second step of a group)
RUNS = [(20, 0.85), (50, 0.75), (7, 1.0), (5, 0.2), (12, 0.5), (12, 0.75)]
CFGS = {name: CONFIGS[name] for name in ("vd", "vd_leading", "linear_trailing")}
CFGS["v_prediction"] = {**CONFIGS["vd"], "prediction_type": "v_prediction"}
CFGS["third_order"] = {**CONFIGS["vd"], "solver_order": 3}  # (a key of the multistep samplers; the others ignore it)


def reference(name: str, cfg: dict, x0: torch.Tensor, noise: torch.Tensor, n: int, strength: float, generator):
    """diffusers' img2img start and loop over `fake_eps`: the noised start, every (t, model input) and every x."""
    cls, override = EVERY[name]
    sched = cls.from_config(cfg, **override)
    sched.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    x = start = sched.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
    calls, xs = [], []
    kw = {"generator": generator} if generator is not None else {}
    for t in timesteps:
        inp = sched.scale_model_input(x, t)
        calls.append((t, inp))
        x = sched.step(fake_eps(inp, t), t, x, **kw).prev_sample
        xs.append(x)
    return start, (calls, xs)


def ours(name: str, cfg: dict, x0: torch.Tensor, noise: torch.Tensor, n: int, strength: float, generator):
    sampler = sampler_from_config(name, cfg)
    skip = n - int(n * strength)
    start = sampler.noised_to_step(x0, noise, n, skip)
    calls, xs = [], []

    def eps(inp, t):
        calls.append((t, inp))
        return fake_eps(inp, t)

    def callback(i, t, x):  # i: the evaluation's index in the whole schedule
        assert i == sampler.evals_per_step * skip + len(xs) and t is calls[-1][0]
        xs.append(x)

    out = sampler.sample(eps, start, n, generator=generator, callback=callback, skip=skip)
    assert out is xs[-1]
    return start, (calls, xs)


def test_which_samplers_start_part_way():
    assert sorted(set(SCHEDULERS) - set(PART_WAY)) == ["ddim_inverse", "pndm"]


@pytest.mark.parametrize("n,strength", RUNS)
@pytest.mark.parametrize("cfg_name", sorted(CFGS))
@pytest.mark.parametrize("name", PART_WAY)
def test_trajectory_from_part_way(name, cfg_name, n, strength, check):
    cfg = CFGS[cfg_name]
    x0 = start_noise() * 0.5 + 0.3  # init latents
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    gen = (lambda: torch.Generator().manual_seed(7)) if name in STOCHASTIC else (lambda: None)
    start_ref, run_ref = reference(name, cfg, x0, noise, n, strength, gen())
    start, run = ours(name, cfg, x0, noise, n, strength, gen())
    assert start.dtype == start_ref.dtype
    check(float((start - start_ref).abs().max() / start_ref.abs().max()), 1e-6, "the noised start")
    check(relative_diff(run, run_ref), 1e-6)


@pytest.mark.parametrize("name", ["unipc", "unipc_karras"])
def test_unipc_without_lower_order_final_runs_one_step_part_way(name, check):
    """UniPC with lower_order_final=False into sigma 0 is refused from 2 steps run on (test_samplers.py), counted in
    the run, not the schedule: a part-way run of 1 step is first order and runs as diffusers' img2img runs it."""
    cfg = {**CONFIGS["vd"], "lower_order_final": False}
    x0 = start_noise() * 0.5 + 0.3
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    start_ref, run_ref = reference(name, cfg, x0, noise, 10, 0.1, None)
    start, run = ours(name, cfg, x0, noise, 10, 0.1, None)
    check(float((start - start_ref).abs().max() / start_ref.abs().max()), 1e-6, "the noised start")
    check(relative_diff(run, run_ref), 1e-6)
    with pytest.raises(ValueError, match="lower_order_final=False with solver_order 2 needs final_sigmas_type"):
        ours(name, cfg, x0, noise, 10, 0.2, None)


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(PART_WAY)))
def test_the_others_refuse_skip(name):
    sampler = sampler_from_config(name, CONFIGS["vd"])
    with pytest.raises(TypeError, match="skip"):
        sampler.sample(fake_eps, start_noise(), 4, skip=1)


@pytest.mark.parametrize("skip", [-1, 5, 1.0, True])
def test_bad_skip(skip):
    with pytest.raises(ValueError, match=r"skip: expected an int in \[0, 4\]"):
        sampler_from_config("unipc", CONFIGS["vd"]).sample(fake_eps, start_noise(), 4, skip=skip)
