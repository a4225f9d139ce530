"""Same weights, same seed, same picture: our facade against diffusers 0.42.1's VD pipelines, fp32 on CPU.

The tiny pipeline is written by diffusers' save_pretrained and loaded by our from_pretrained; the reference
side loads the same files. Tolerance: max abs diff of the "np" output <= 1e-3 (measured: see the table at the
end of a pytest run).
"""

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from flows import max_abs_diff
from helpers import random_image, seeded

diffusers = pytest.importorskip("diffusers")

from vd import VersatileDiffusion  # noqa: E402

TOL = 1e-3
STEPS = 3
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*")


TEXT_CASES = {
    "default": dict(prompt="the cat"),
    "batch2x2_negative": dict(prompt=["the cat", "a dog running"], negative_prompt=["the", "rain"],
                              num_images_per_prompt=2),
    "no_cfg": dict(prompt="the cat", guidance_scale=1.0),
    "non_square_odd_latent": dict(prompt="the cat", height=72, width=40),
    "eta_0.7_generator": dict(prompt="the cat", eta=0.7),
    "eta_above_1": dict(prompt="the cat", eta=1.0008),  # within DDIM's bound for 3 steps (1.00098)
    "pndm": dict(prompt="the cat", scheduler="pndm"),
    "lms": dict(prompt="the cat", scheduler="lms"),
    "generator_list": dict(prompt=["the cat", "a dog"], generator=[seeded(3), seeded(4)]),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_to_image(case, ours, folder, check):
    kw = dict(TEXT_CASES[case])
    scheduler = kw.pop("scheduler", "ddim")
    gens = kw.pop("generator", None)
    ref = tp.reference("text_to_image", folder, scheduler)
    want = ref(**kw, num_inference_steps=STEPS, generator=gens or seeded(), output_type="np").images
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)] if gens else seeded()
    got = ours.text_to_image(**kw, num_inference_steps=STEPS, generator=gens, output_type="np", scheduler=scheduler,
                             progress=False).images
    check(max_abs_diff(got, want), TOL)


def test_text_to_image_given_latents(ours, folder, check):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(5))
    ref = tp.reference("text_to_image", folder, "lms")  # LMS also scales given latents by its init sigma
    want = ref(["the cat", "on"], num_inference_steps=STEPS, latents=latents.clone(), output_type="np").images
    got = ours.text_to_image(["the cat", "on"], num_inference_steps=STEPS, latents=latents.clone(), output_type="np",
                             scheduler="lms", progress=False).images
    check(max_abs_diff(got, want), TOL)


def _with_alpha(img, seed: int):
    """`img` with random transparency (RGBA)."""
    alpha = PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, img.size[::-1]).astype(np.uint8))
    rgba = img.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


IMAGE_CASES = {
    "default": dict(image=random_image(0)),
    "batch2x2_negative": dict(image=[random_image(1), random_image(2, (64, 32))],
                              negative_prompt=[random_image(3), random_image(4)],
                              num_images_per_prompt=2),
    "one_negative": dict(image=random_image(5), negative_prompt=random_image(6)),
    "no_cfg_non_square": dict(image=random_image(7), guidance_scale=1.0, height=48, width=24),
    "pndm_eta_ignored": dict(image=random_image(8), scheduler="pndm", eta=0.7),
    "lms": dict(image=random_image(9), scheduler="lms"),
    "ddim_eta": dict(image=random_image(10), eta=0.7),
    # half-transparent pictures: seen over white, as the reference's CLIP preprocessing shows them
    "transparent": dict(image=[_with_alpha(random_image(17), 18), _with_alpha(random_image(19), 20).convert("LA")],
                        negative_prompt=[_with_alpha(random_image(21), 22).convert("PA"), random_image(23)]),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_variation(case, ours, folder, check):
    kw = dict(IMAGE_CASES[case])
    scheduler = kw.pop("scheduler", "ddim")
    ref = tp.reference("image_variation", folder, scheduler)
    want = ref(**kw, num_inference_steps=STEPS, generator=seeded(1), output_type="np").images
    got = ours.image_variation(**kw, num_inference_steps=STEPS, generator=seeded(1), output_type="np",
                               scheduler=scheduler, progress=False).images
    check(max_abs_diff(got, want), TOL)


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 1.0])
def test_dual_guided(strength, ours, folder, patched_dual, check):
    ref = tp.reference("dual_guided", folder)
    kw = dict(prompt=["the cat", "a dog"], image=[random_image(11), random_image(12)], text_to_image_strength=strength,
              num_inference_steps=STEPS, output_type="np", num_images_per_prompt=2)
    want = ref(**kw, generator=seeded(2)).images
    got = ours.dual_guided(**kw, generator=seeded(2), progress=False).images
    check(max_abs_diff(got, want), TOL)


def test_dual_guided_lms_no_cfg(ours, folder, patched_dual, check):
    ref = tp.reference("dual_guided", folder, "lms")
    kw = dict(prompt="the cat", image=random_image(13), text_to_image_strength=0.7, num_inference_steps=STEPS,
              output_type="np", guidance_scale=1.0, height=40, width=56)
    check(max_abs_diff(ours.dual_guided(**kw, scheduler="lms", generator=seeded(), progress=False).images,
                ref(**kw, generator=seeded()).images), TOL)


def test_output_types_and_callback(ours, folder):
    """pil/pt/latent outputs and the callback's (step, timestep, latents) agree with the reference."""
    ref = tp.reference("text_to_image", folder)
    seen_ref, seen_ours = [], []
    kw = dict(num_inference_steps=4, callback_steps=2)
    want = ref("the cat", generator=seeded(), callback=lambda i, t, x: seen_ref.append((i, int(t), x.clone())), **kw)
    got = ours.text_to_image("the cat", generator=seeded(), progress=False,
                             callback=lambda i, t, x: seen_ours.append((i, int(t), x.clone())), **kw)
    assert [(i, t) for i, t, _ in seen_ours] == [(i, t) for i, t, _ in seen_ref] == [(0, 751), (2, 251)]
    for (_, _, a), (_, _, b) in zip(seen_ours, seen_ref):
        assert (a - b).abs().max() <= 1e-5
    assert [np.asarray(i) for i in got.images][0].tolist() == np.asarray(want.images[0]).tolist()
    for output_type in ("pt", "latent"):
        a = ours.text_to_image("the cat", generator=seeded(), output_type=output_type, progress=False, **kw).images
        b = ref("the cat", generator=seeded(), output_type=output_type, **kw).images
        assert a.shape == b.shape and (a - b).abs().max() <= TOL
    kw["callback_steps"] = None  # taken without a callback, as the reference takes it
    a = ours.text_to_image("the cat", generator=seeded(), output_type="pt", progress=False, **kw).images
    b = ref("the cat", generator=seeded(), output_type="pt", **kw).images
    assert a.shape == b.shape and (a - b).abs().max() <= TOL


PROCESSOR_CASES = {
    "no_rescale": dict(do_rescale=False),  # the "no image" input then goes in unscaled, in the reference too
    "no_rescale_no_normalize": dict(do_rescale=False, do_normalize=False),
    "rescale_by_half": dict(rescale_factor=0.5),
    "other_mean_std": dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.2, 0.3, 0.4]),
    "resize_to_square": dict(size={"height": 224, "width": 224}),
    "bilinear": dict(resample=2),
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_image_processor_settings_are_the_references(case, tmp_path, check):
    """The CLIP image processor's saved settings act on the images and on the "no image" input as in the reference."""
    from transformers import CLIPImageProcessor
    components = tp.build_components(seed=0)
    components["image_feature_extractor"] = CLIPImageProcessor(**{**tp.IMAGE_PROCESSOR, **PROCESSOR_CASES[case]})
    folder = tp.save(components, tmp_path / "vd")
    ours = VersatileDiffusion.from_pretrained(folder, tasks=["image_variation"], uncond_image="diffusers")
    kw = dict(image=random_image(5, (50, 40)), num_inference_steps=2, output_type="np")
    want = tp.reference("image_variation", folder)(**kw, generator=seeded()).images
    check(max_abs_diff(ours.image_variation(**kw, generator=seeded(), progress=False).images, want), TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 0.02)])
def test_pt_images_come_in_the_pipelines_dtype(dtype, tol, folder, check):
    """diffusers maps the VAE's output to [0, 1] in the pipeline's dtype and returns "pt" images in it: so do we
    (the "np" ones are float32 in both). Tolerance: float64 rounding; in float16 the fp16 bound of
    benchmarks/fp16_check.py (measured: 2e-3, a few fp16 steps: the reference's VAE attention hands a
    channels-last tensor to the next GroupNorm, whose fp16 CPU kernel then rounds otherwise than for ours)."""
    ours = VersatileDiffusion.from_pretrained(folder, uncond_image="diffusers", dtype=dtype)
    ref = tp.reference("text_to_image", folder).to(dtype)
    kw = dict(num_inference_steps=STEPS, output_type="pt")
    want = ref(["the cat", "a dog"], generator=seeded(), **kw).images
    got = ours.text_to_image(["the cat", "a dog"], generator=seeded(), progress=False, **kw).images
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    check(float((got.double() - want.double()).abs().max()), tol)
    np_images = ours.decode_latents(torch.zeros(1, 4, 4, 4, dtype=dtype), output_type="np")
    assert np_images.dtype == np.float32


POSITIONAL_CASES = {  # diffusers' positional order, up to generator, latents, output_type and return_dict
    "text_to_image": ("the cat", 40, 56, STEPS, 3.0, "rain", 2, 0.5),
    "image_variation": (random_image(24), 40, 56, STEPS, 3.0, random_image(25), 2, 0.5),
    "dual_guided": ("the cat", random_image(26), 0.3, 40, 56, STEPS, 3.0, 2, 0.5),
}


@pytest.mark.parametrize("task", list(POSITIONAL_CASES))
def test_positional_arguments_mean_what_they_mean_to_the_reference(task, ours, folder, patched_dual, check):
    """The same positional call to ours and to diffusers' pipeline: the same images, as the same tuple."""
    args = POSITIONAL_CASES[task]
    want = tp.reference(task, folder)(*args, seeded(5), None, "np", False)
    got = getattr(ours, task)(*args, seeded(5), None, "np", False, progress=False)
    assert type(got) is type(want) is tuple and got[0].shape == want[0].shape == (2, 40, 56, 3)
    check(max_abs_diff(got[0], want[0]), TOL)


def test_diffusers_docstring_examples_run_with_the_class_swapped(folder, tmp_path, monkeypatch):
    """The three examples of diffusers' VersatileDiffusionPipeline docstrings (torch_dtype=torch.float16, pipe.to,
    a device generator, the methods' arguments) run on ours with only the import changed: on the CPU, the tiny
    model for the hub repo and a local picture for the download."""
    import inspect
    import re

    from diffusers.pipelines.deprecated.versatile_diffusion import pipeline_versatile_diffusion as module
    monkeypatch.chdir(tmp_path)
    random_image(3, (60, 50)).save("benz.jpg")
    examples = re.findall(r"Examples:\n\n\s*```py\n(.*?)```", inspect.getsource(module), flags=re.S)
    assert len(examples) == 3
    for example in examples:
        code = "\n".join(line.strip()[4:] for line in example.splitlines() if line.strip().startswith((">>>", "...")))
        for old, new in (("from diffusers import", "from vd import VersatileDiffusion as"),
                         ('"shi-labs/versatile-diffusion"', repr(str(folder))), ('"cuda"', '"cpu"'),
                         ("response = requests.get(url)", ""),
                         ("Image.open(BytesIO(response.content))", 'Image.open("benz.jpg")')):
            code = code.replace(old, new)
        assert "from diffusers" not in code and "cuda" not in code and "requests.get" not in code, code
        names = {}
        exec(code, names)
        assert names["pipe"].dtype == torch.float16 and isinstance(names["image"], PIL.Image.Image)
        assert names["image"].size == (64, 64)


RETURN_DICT_CASES = {
    "text_to_image": dict(prompt="the cat", output_type="np"),
    "image_variation": dict(image=random_image(14), output_type="pt"),
    "dual_guided": dict(prompt="the cat", image=random_image(15), output_type="np"),
}


@pytest.mark.parametrize("task", list(RETURN_DICT_CASES))
def test_return_dict_false_gives_the_references_tuple(task, ours, folder, patched_dual, check):
    """diffusers' `return_dict=False` returns `(images,)`: the same tuple, holding the same images."""
    kw = dict(RETURN_DICT_CASES[task], num_inference_steps=STEPS, return_dict=False)
    want = tp.reference(task, folder)(**kw, generator=seeded(3))
    got = getattr(ours, task)(**kw, generator=seeded(3), progress=False)
    assert type(got) is type(want) is tuple and len(got) == len(want) == 1
    assert type(got[0]) is type(want[0])
    check(max_abs_diff(np.asarray(got[0]), np.asarray(want[0])), TOL)


def test_outputs_index_as_the_references(ours, folder):
    """diffusers' outputs also index: out[0], out[:1] and out["images"]; an unknown name is a KeyError."""
    kw = dict(num_inference_steps=STEPS, output_type="pt")
    want = tp.reference("text_to_image", folder)("the cat", generator=seeded(), **kw)
    got = ours.text_to_image("the cat", generator=seeded(), progress=False, **kw)
    for out in (want, got):
        assert out[0] is out["images"] is out.images and out[:1] == (out.images,)
        with pytest.raises(KeyError):
            out["latents"]
    assert torch.equal(got[0], want[0])


# ---- deliberate divergences

def _grey_fixed(processor):
    """The reference's processor with its double rescale of float inputs fixed (what the reference meant)."""
    original = processor.__class__.__call__

    def call(self, images, **kw):
        if isinstance(images, list) and images and isinstance(images[0], np.ndarray):
            kw["do_rescale"] = False
        return original(self, images, **kw)
    return call


@pytest.mark.parametrize("task", ["image_variation", "dual_guided"])
def test_uncond_image_default_is_grey(task, ours, folder, patched_dual, monkeypatch, check):
    """Default: the 'no image' condition is a mid-grey image. It equals the reference once the reference's
    double rescale is fixed, and differs from the reference as it ships."""
    grey = VersatileDiffusion.from_pretrained(folder, tasks=[task])  # default uncond_image="grey"
    kw = dict(num_inference_steps=STEPS, output_type="np")
    args = dict(image=random_image(14)) if task == "image_variation" else dict(prompt="the cat", image=random_image(14))
    ref = tp.reference(task, folder)
    as_shipped = ref(**args, **kw, generator=seeded()).images
    got = getattr(grey, task)(**args, **kw, generator=seeded(), progress=False).images
    assert max_abs_diff(got, as_shipped) > 1e-3  # it really is a different condition
    # per call, the reference's behaviour is one argument away
    again = getattr(grey, task)(**args, **kw, generator=seeded(), progress=False, uncond_image="diffusers").images
    check(max_abs_diff(again, as_shipped), TOL, "uncond_image='diffusers'")
    # (this patches the processor class, which our pipeline shares: so it comes last)
    processor = ref.image_feature_extractor
    monkeypatch.setattr(processor.__class__, "__call__", _grey_fixed(processor))
    fixed = ref(**args, **kw, generator=seeded()).images
    check(max_abs_diff(got, fixed), TOL, "vs fixed reference")


def test_uncond_image_zeros_is_a_zero_embedding(ours):
    """uncond_image='zeros' (the original SHI-Labs app): the unconditional tokens are all zero."""
    img = random_image(15)
    tokens = ours.encode_image(img)
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, output_type="latent", progress=False)
    got = ours.image_variation(img, uncond_image="zeros", generator=seeded(), **kw).images
    want = ours.image_variation(image_embeds=tokens, negative_image_embeds=torch.zeros_like(tokens),
                                generator=seeded(), **kw).images
    grey = ours.image_variation(img, generator=seeded(), **kw).images
    assert torch.equal(got, want) and not torch.equal(got, grey)


def test_tensor_image_equals_the_same_pil_image(ours, check):
    """A [B, 3, H, W] tensor in [0, 1] is the image it depicts (the reference would rescale it by 1/255 again)."""
    pil = random_image(16)
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    kw = dict(num_inference_steps=STEPS, output_type="np", progress=False)
    a = ours.image_variation(pil, generator=seeded(), **kw).images
    b = ours.image_variation(tensor, generator=seeded(), **kw).images
    check(max_abs_diff(a, b), 0.0)
