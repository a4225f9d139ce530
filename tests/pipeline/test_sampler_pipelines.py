"""Every new sampler in the flows: our facade against diffusers 0.42.1's VD pipelines with the scheduler swapped as a
user swaps it (`pipe.scheduler = XScheduler.from_config(pipe.scheduler.config, <override>)`), on the tiny random
pipeline of test_pipeline_parity.py, fp32 on CPU. Tolerance: max abs diff of the "np" output <= 1e-3, as there
(measured: the table at the end of a run). Few steps, tiny sizes: each case is a second or two.
"""

import numpy as np
import pytest
import torch

import tiny_pipeline as tp
import vd.pipeline
from vd import VersatileDiffusion
from flows import max_abs_diff
from helpers import random_image, seeded

diffusers = pytest.importorskip("diffusers")

from sampler_table import NEW, REF, STOCHASTIC  # noqa: E402

TOL = 1e-3
STEPS = 3
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*")


def reference(task: str, folder, name: str):
    pipe = tp.reference(task, folder)
    cls, override = REF[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **override)
    return pipe


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("name", NEW)
def test_text_to_image(name, ours, folder, check):
    """Two prompts with a negative each, guidance, one generator per image (stochastic samplers draw from them)."""
    kw = dict(prompt=["the cat", "a dog running"], negative_prompt=["the", "rain"], num_inference_steps=STEPS,
              output_type="np", height=40, width=56)
    want = reference("text_to_image", folder, name)(**kw, generator=_gens([3, 4])).images
    got = ours.text_to_image(**kw, generator=_gens([3, 4]), scheduler=name, progress=False).images
    check(max_abs_diff(got, want), TOL)


@pytest.mark.parametrize("name", NEW)
def test_image_variation(name, ours, folder, check):
    """Two images per input, one generator, eta given (ignored by all of these, as by diffusers)."""
    kw = dict(image=random_image(9), num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np", eta=0.5)
    want = reference("image_variation", folder, name)(**kw, generator=seeded(1)).images
    got = ours.image_variation(**kw, generator=seeded(1), scheduler=name, progress=False).images
    check(max_abs_diff(got, want), TOL)


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler_a", "unipc"])
def test_dual_guided(name, ours, folder, patched_dual, check):
    kw = dict(prompt="the cat", image=random_image(11), text_to_image_strength=0.6, num_inference_steps=STEPS,
              output_type="np")
    want = reference("dual_guided", folder, name)(**kw, generator=seeded(2)).images
    got = ours.dual_guided(**kw, generator=seeded(2), scheduler=name, progress=False).images
    check(max_abs_diff(got, want), TOL)


@pytest.mark.parametrize("name", ["euler_karras", "dpmpp_2m_sde", "heun", "dpm2_a", "deis"])
def test_given_latents_no_guidance(name, ours, folder, check):
    """Given latents (scaled by the sampler's own start-noise std), guidance off."""
    latents = torch.randn(1, 4, 8, 8, generator=seeded(5))
    kw = dict(prompt="the cat", num_inference_steps=STEPS, output_type="np", guidance_scale=1.0)
    want = reference("text_to_image", folder, name)(**kw, latents=latents.clone(), generator=seeded(6)).images
    got = ours.text_to_image(**kw, latents=latents.clone(), generator=seeded(6), scheduler=name,
                             progress=False).images
    check(max_abs_diff(got, want), TOL)


@pytest.mark.parametrize("name", ["heun", "dpm2", "dpm2_a_karras"])
def test_callback_counts_evaluations(name, ours, folder):
    """The callback of Heun and DPM2 follows the reference's: every callback_steps-th of their 2N − 1 evaluations,
    reporting the step (evaluation // 2) and the evaluation's timestep (DPM2: the midpoints' own)."""
    seen_ref, seen_ours = [], []
    kw = dict(num_inference_steps=3, callback_steps=2, output_type="latent")
    ref = reference("text_to_image", folder, name)
    ref("the cat", generator=seeded(), callback=lambda i, t, x: seen_ref.append((i, float(t), x.clone())), **kw)
    ours.text_to_image("the cat", generator=seeded(), scheduler=name, progress=False,
                       callback=lambda i, t, x: seen_ours.append((i, float(t), x.clone())), **kw)
    assert [(i, t) for i, t, _ in seen_ours] == [(i, t) for i, t, _ in seen_ref]
    assert [i for i, _, _ in seen_ours] == [0, 1, 2]
    for (_, _, a), (_, _, b) in zip(seen_ours, seen_ref):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NEW)
def test_fidelity_needs_a_sampler_that_starts_part_way(name, ours):
    """Starting part-way (image variation's fidelity) is DDIM's only; the others are refused by name."""
    with pytest.raises(ValueError, match="fidelity.*ddim"):
        ours.image_variation(random_image(1), fidelity=0.5, num_inference_steps=STEPS, scheduler=name,
                             progress=False)


def test_stochastic_samplers_follow_the_generator(ours):
    """A stochastic sampler's picture depends on the seed even for the same start latents; a deterministic one's not."""
    latents = torch.randn(1, 4, 8, 8, generator=seeded(5))
    for name, differs in (("euler_a", True), ("dpmpp_2m", False)):
        a, b = (ours.text_to_image("the cat", latents=latents.clone(), generator=seeded(s), scheduler=name,
                                   num_inference_steps=STEPS, output_type="np", progress=False).images for s in (1, 2))
        assert (np.abs(a - b).max() > 1e-4) == differs == (name in STOCHASTIC), name


@pytest.mark.parametrize("name,settings", [
    ("dpmpp_2m", {"timestep_spacing": "trailing", "use_lu_lambdas": True, "thresholding": True}),
    ("euler_a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min", "use_beta_sigmas": True}),
])
def test_scheduler_config_assignment(name, settings, folder, check):
    """`pipe.scheduler_config = {...}` changes what the samplers read, as diffusers users rebuild the scheduler with
    `XScheduler.from_config(pipe.scheduler.config, **settings)`."""
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], uncond_image="diffusers")
    pipe.scheduler_config = {**pipe.scheduler_config, **settings}
    ref = tp.reference("text_to_image", folder)
    cls, override = REF[name]
    ref.scheduler = cls.from_config(ref.scheduler.config, **override, **settings)
    kw = dict(prompt="the cat", num_inference_steps=4, output_type="np", height=32, width=32)
    want = ref(**kw, generator=seeded(3)).images
    got = pipe.text_to_image(**kw, generator=seeded(3), scheduler=name, progress=False).images
    check(max_abs_diff(got, want), TOL)
    plain = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], uncond_image="diffusers")
    unchanged = plain.text_to_image(**kw, generator=seeded(3), scheduler=name, progress=False).images
    assert max_abs_diff(unchanged, got) > TOL


def test_scheduler_config_refused_at_assignment(folder):
    """A value the pipeline's sampler refuses (a wrong type, an option not built) or not a dict: refused when
    assigned, the settings unchanged; other samplers check it when a call names them."""
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])
    before = pipe.scheduler_config
    with pytest.raises(TypeError, match=r"^clip_sample: expected true or false for DDIM, got 'no'"):
        pipe.scheduler_config = {**before, "clip_sample": "no"}
    with pytest.raises(TypeError, match=r"^scheduler_config: expected a dict of scheduler_config.json keys"):
        pipe.scheduler_config = [("timestep_spacing", "trailing")]
    assert pipe.scheduler_config == before
    pipe.scheduler_config = {**before, "use_flow_sigmas": True}  # DDIM has no such key; UniPC refuses it per call
    with pytest.raises(ValueError, match=r"use_flow_sigmas=True is not supported by UniPC"):
        pipe.text_to_image("the cat", num_inference_steps=2, scheduler="unipc", progress=False)
    unipc = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], scheduler="unipc")
    with pytest.raises(ValueError, match=r"use_flow_sigmas=True is not supported by UniPC"):
        unipc.scheduler_config = {**before, "use_flow_sigmas": True}
    copy = unipc.scheduler_config
    copy["timestep_spacing"] = "trailing"
    assert unipc.scheduler_config == before


@pytest.mark.parametrize("cls_name,override,name", [
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m"),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler_a"),
    ("UniPCMultistepScheduler", {"solver_order": 3}, "unipc"),
    ("PNDMScheduler", {}, "pndm"),
])
def test_a_diffusers_scheduler_assigned_as_diffusers_users_do(cls_name, override, name, folder, check):
    """`pipe.scheduler = XScheduler.from_config(pipe.scheduler_config, ...)`: the object's class and config become
    the sampler and its settings, and the pictures are those of the reference with that scheduler swapped in; an
    object given to from_pretrained(scheduler=...), as diffusers' loader takes one, does the same."""
    cls = getattr(diffusers, cls_name)
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], uncond_image="diffusers")
    pipe.scheduler = cls.from_config(pipe.scheduler_config, **override)
    assert pipe.scheduler == name
    ref = tp.reference("text_to_image", folder)
    ref.scheduler = cls.from_config(ref.scheduler.config, **override)
    kw = dict(prompt=["the cat", "a dog"], num_inference_steps=4, output_type="np", height=32, width=32)
    got = pipe.text_to_image(**kw, generator=_gens([3, 4]), progress=False).images
    check(max_abs_diff(got, ref(**kw, generator=_gens([3, 4])).images), TOL)
    loaded = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], uncond_image="diffusers",
                                                scheduler=cls.from_config(ref.scheduler.config))
    assert loaded.scheduler == name and loaded.scheduler_config == pipe.scheduler_config
    assert np.array_equal(loaded.text_to_image(**kw, generator=_gens([3, 4]), progress=False).images, got)


def test_scheduler_assignment_refusals(folder):
    """A name vd lacks, a class it lacks or a setting it refuses: refused when assigned, nothing changed."""
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])
    before = (pipe.scheduler, pipe.scheduler_config)
    with pytest.raises(ValueError, match=r"^scheduler: expected one of .*'unipc'.*, got 'dpm\+\+'"):
        pipe.scheduler = "dpm++"
    with pytest.raises(TypeError, match=r"^scheduler: expected a sampler name .* or a diffusers scheduler of one of "
                                        r"the classes \[.*'UniPCMultistepScheduler'\], got an object of type "
                                        r"IPNDMScheduler$"):
        pipe.scheduler = diffusers.IPNDMScheduler()
    with pytest.raises(ValueError, match=r"^scheduler: algorithm_type must be one of .*, got 'dpmsolver'"):
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver",
                                                               final_sigmas_type="sigma_min")
    assert (pipe.scheduler, pipe.scheduler_config) == before


@pytest.mark.parametrize("cls_name,override,name", [
    ("EulerDiscreteScheduler", {}, "euler"),
    ("KDPM2AncestralDiscreteScheduler", {}, "dpm2_a"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m"),
    ("DEISMultistepScheduler", {"solver_order": 3}, "deis"),
    ("DDIMInverseScheduler", {}, "ddim_inverse"),
])
def test_a_folder_saved_with_another_scheduler_runs_it(cls_name, override, name, tmp_path, check):
    """A diffusers folder saved after swapping the pipeline's scheduler: diffusers' loader builds the class its
    model_index.json names, and our default is that sampler (from the config's class name), with the config's
    settings (Karras sigmas, the SDE form, the order)."""
    components = tp.build_components(seed=0)
    components["scheduler"] = getattr(diffusers, cls_name).from_config(components["scheduler"].config, **override)
    folder = tp.save(components, tmp_path / "vd")
    ours = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])
    assert ours.scheduler == name
    kw = dict(prompt=["the cat", "a dog"], num_inference_steps=4, output_type="np", height=32, width=40)
    want = tp.reference("text_to_image", folder, scheduler=None)(**kw, generator=_gens([5, 6])).images
    got = ours.text_to_image(**kw, generator=_gens([5, 6]), progress=False).images
    check(max_abs_diff(got, want), TOL)


def test_a_scheduler_vd_lacks_is_named(tmp_path, monkeypatch):
    """A folder saved with a scheduler we do not have fails at loading, before any weight is read, naming it; an
    explicit scheduler= loads it."""
    components = tp.build_components(seed=0)
    components["scheduler"] = diffusers.LCMScheduler.from_config(components["scheduler"].config)
    folder = tp.save(components, tmp_path / "vd")
    with monkeypatch.context() as m:
        m.setattr(vd.pipeline, "load_components", lambda *a, **k: pytest.fail("weights read"))
        with pytest.raises(ValueError, match="'LCMScheduler', which vd does not have; pass scheduler="):
            VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"])
    assert VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], scheduler="unipc").scheduler == "unipc"
