"""Bad arguments: a ValueError or TypeError naming the argument, the value and what was expected, raised before
any model runs. Also the prompt-truncation warning."""

import logging
import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from flows import LATENT
from helpers import random_image, rel_err, seeded
from vd import VersatileDiffusion

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture
def no_model_runs(pipe, monkeypatch):
    """Any model call fails the test: argument errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")
    c = pipe.components
    for m in (c.image_unet, c.text_unet, c.vae, c.text_encoder, c.image_encoder, c.optimus,
              c.image_encoder.vision_model.embeddings):
        monkeypatch.setattr(m, "forward", boom)
    monkeypatch.setattr(c.optimus, "generate", boom)
    for name in ("encode_image", "encode_text", "adjust_focus"):
        monkeypatch.setattr(f"vd.conditions.{name}", boom)
    monkeypatch.setattr("vd.sampling.denoise", boom)
    return pipe


def T(batch: int = 1, length: int = 77, width: int = 16, **kw) -> torch.Tensor:  # text tokens
    return torch.zeros(batch, length, width, **kw)


def V(batch: int = 1) -> torch.Tensor:  # image tokens
    return torch.zeros(batch, 257, 16)


IMG = PIL.Image.new("RGB", (32, 32), (200, 30, 60))
TWO = [IMG, random_image(91, (32, 48))]
OK = dict(num_inference_steps=2, progress=False)

CASES = [
    # (task, kwargs, error type, words the message must contain)
    ("text_to_image", dict(prompt=123), TypeError, ["prompt", "123", "string"]),
    ("text_to_image", dict(prompt=[]), ValueError, ["prompt", "[]", "non-empty"]),
    ("text_to_image", dict(prompt=["a", 1]), TypeError, ["prompt", "string"]),
    ("text_to_image", dict(prompt="a", height=30), ValueError, ["height", "30", "multiple of 8"]),
    ("text_to_image", dict(prompt="a", width=-8), ValueError, ["width", "-8", "positive"]),
    ("text_to_image", dict(prompt="a", height=64.0), TypeError, ["height", "64.0"]),
    ("text_to_image", dict(prompt="a", num_inference_steps=0), ValueError, ["num_inference_steps", "0", ">= 1"]),
    ("text_to_image", dict(prompt="a", num_inference_steps=2.5), TypeError, ["num_inference_steps", "2.5"]),
    ("text_to_image", dict(prompt="a", num_inference_steps=1001), ValueError, ["num_inference_steps", "1001"]),
    # the real bound: VD's "leading" schedule with steps_offset 1 reaches timestep 1000 with 1000 steps
    ("text_to_image", dict(prompt="a", num_inference_steps=1000), ValueError,
     ["num_inference_steps", "<= 999", "1000"]),
    # the multistep solvers place N + 1 "leading" points: one step fewer; their Karras sigmas have no such bound
    ("text_to_image", dict(prompt="a", num_inference_steps=999, scheduler="dpmpp_2m"), ValueError,
     ["num_inference_steps", "<= 998", "999"]),
    ("text_to_image", dict(prompt="a", num_inference_steps=1001, scheduler="dpmpp_2m_karras"), ValueError,
     ["num_inference_steps", "<= 1000", "1001"]),
    # arguments that make the result non-finite for sure are refused before sampling
    ("text_to_image", dict(prompt="a", guidance_scale=math.inf), ValueError, ["guidance_scale", "inf", "finite"]),
    ("text_to_image", dict(prompt="a", guidance_scale=1e30), ValueError, ["guidance_scale", "1e+30", "1000"]),
    ("text_to_image", dict(prompt="a", eta=1e6), ValueError, ["eta", "1000000.0", "at most 1.0003 with 2 DDIM"]),
    ("text_to_image", dict(prompt="a", eta=1.01), ValueError, ["eta", "1.01", "at most 1.0003 with 2 DDIM"]),
    ("text_to_image", dict(prompt="a", eta=math.inf), ValueError, ["eta", "inf"]),
    ("blend", dict(images=[IMG], weights=[math.inf]), ValueError, ["weights[0]", "inf", "finite"]),
    ("blend", dict(images=[IMG], focus=[math.nan]), ValueError, ["focus[0]", "nan"]),
    # a per-call pixel budget instead of an allocator failure
    ("text_to_image", dict(prompt="a", height=1048576), ValueError,
     ["num_images_per_prompt x height x width", "16777216", "1048576"]),
    ("text_to_image", dict(prompt="a", num_images_per_prompt=10**12), ValueError, ["16777216", "1000000000000"]),
    # and a per-call text budget: prompts x num_texts_per_prompt
    ("image_to_text", dict(image=IMG, num_texts_per_prompt=10**12), ValueError,
     ["num_texts_per_prompt", "1024", "1000000000000"]),
    ("text_variation", dict(prompt=["a"] * 3, num_texts_per_prompt=342), ValueError,
     ["num_texts_per_prompt x inputs", "1024", "1026"]),
    # a name given as something other than a string
    ("text_to_image", dict(prompt="a", scheduler=np.zeros((2, 2))), ValueError, ["scheduler", "numpy array"]),
    ("image_variation", dict(image=IMG, uncond_image=np.zeros(3)), ValueError, ["uncond_image", "numpy array"]),
    ("text_to_image", dict(prompt="a", output_type=np.zeros(2)), ValueError, ["output_type", "numpy array"]),
    ("image_variation", dict(image=torch.rand(1, 3, 0, 5)), ValueError, ["image", "[1, 3, 0, 5]", "1 pixel"]),
    ("image_variation", dict(image=torch.rand(2, 3, 4, 0)), ValueError, ["image", "[2, 3, 4, 0]", "1 pixel"]),
    ("image_variation", dict(image=PIL.Image.new("RGB", (0, 0))), ValueError, ["image", "1 pixel"]),
    ("image_variation", dict(image=PIL.Image.fromarray(np.full((8, 8), 2.0, np.float32))), ValueError,
     ["image", "mode F", "[0, 1]", "2"]),
    ("text_to_image", dict(prompt="a", guidance_scale=-1), ValueError, ["guidance_scale", "-1", "[0.0, 1000.0]"]),
    ("text_to_image", dict(prompt="a", guidance_scale=10**400), ValueError, ["guidance_scale", "[0.0, 1000.0]"]),
    ("text_to_image", dict(prompt="a", guidance_scale="7"), TypeError, ["guidance_scale", "'7'", "number"]),
    ("text_to_image", dict(prompt="a", guidance_scale=math.nan), ValueError, ["guidance_scale", "nan"]),
    ("text_to_image", dict(prompt="a", num_images_per_prompt=0), ValueError, ["num_images_per_prompt", "0"]),
    ("text_to_image", dict(prompt="a", eta=-0.5), ValueError, ["eta", "-0.5"]),
    ("text_to_image", dict(prompt="a", latents=torch.zeros(1, 4, 4, 4), height=64), ValueError,
     ["latents", "[1, 4, 4, 4]", "[1, 4, 8, 4]"]),
    ("text_to_image", dict(prompt="a", latents=torch.zeros(1, 3, 8, 8)), ValueError,
     ["latents", "[1, 3, 8, 8]", "[1, 4, 8, 8]"]),
    ("text_to_image", dict(prompt="a", latents=torch.zeros(2, 4, 8, 8)), ValueError,
     ["latents", "[2, 4, 8, 8]", "[1, 4, 8, 8]"]),
    ("text_to_image", dict(prompt="a", latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), ValueError,
     ["latents", "int64", "floating"]),
    ("text_to_image", dict(prompt="a", latents=[0.0]), TypeError, ["latents", "Tensor"]),
    ("text_to_image", dict(prompt="a", latents=torch.full((1, 4, 8, 8), math.nan)), ValueError, ["latents", "NaN"]),
    ("text_to_image", dict(prompt=["a", "b"], generator=[torch.Generator()]), ValueError,
     ["generator", "1 generators", "2"]),
    ("text_to_image", dict(prompt="a", generator=7), TypeError, ["generator", "7"]),
    ("text_to_image", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError,
     ["negative_prompt", "3", "2"]),
    ("text_to_image", dict(prompt="a", negative_prompt=5), TypeError, ["negative_prompt", "5"]),
    ("text_to_image", dict(prompt="a", scheduler="k_euler"), ValueError, ["scheduler", "'k_euler'", "ddim"]),
    ("text_to_image", dict(prompt="a", output_type="jpg"), ValueError, ["output_type", "'jpg'", "pil"]),
    ("text_to_image", dict(prompt="a", callback=3), TypeError, ["callback", "3", "callable"]),
    ("text_to_image", dict(prompt="a", callback_steps=0), ValueError, ["callback_steps", "0"]),
    ("text_to_image", dict(prompt="a", callback=print, callback_steps=None), TypeError, ["callback_steps", "None"]),
    ("image_variation", dict(image="cat.png"), TypeError, ["image", "'cat.png'", "PIL"]),
    ("image_variation", dict(image=[]), ValueError, ["image", "non-empty"]),
    ("image_variation", dict(image=np.zeros((32, 48, 3), np.uint8)), TypeError,
     ["image", "numpy array of shape [32, 48, 3]", "uint8", "PIL"]),
    ("image_variation", dict(image=[np.zeros((32, 48, 3), np.uint8)]), TypeError,
     ["image", "list of 1, the first a numpy array of shape [32, 48, 3]"]),
    ("image_variation", dict(image=torch.rand(3, 32, 32)), ValueError, ["image", "[3, 32, 32]", "[B, 3, H, W]"]),
    ("image_variation", dict(image=torch.rand(1, 3, 32, 32) * 255), ValueError, ["image", "[0, 1]"]),
    ("image_variation", dict(image=torch.ones(1, 3, 8, 8, dtype=torch.uint8)), ValueError, ["image", "uint8"]),
    ("image_variation", dict(image=IMG, negative_prompt="grey"), TypeError, ["negative_prompt", "'grey'"]),
    ("image_variation", dict(image=IMG, uncond_image="black"), ValueError, ["uncond_image", "'black'", "grey"]),
    ("dual_guided", dict(prompt=["a", "b"], image=IMG), ValueError, ["image", "1 image", "2"]),
    ("dual_guided", dict(prompt="a", image=IMG, text_to_image_strength=1.5), ValueError,
     ["text_to_image_strength", "1.5", "[0.0, 1.0]"]),
    ("dual_guided", dict(prompt="a", image=IMG, text_to_image_strength=-0.1), ValueError,
     ["text_to_image_strength", "-0.1"]),
    ("dual_guided", dict(prompt=None, image=IMG), TypeError, ["prompt", "None"]),
    # the text flows and blend
    ("blend", dict(images=[IMG] * 5), ValueError, ["images", "5 images", "1 to 4"]),
    ("blend", dict(images=[]), ValueError, ["images", "non-empty"]),
    ("blend", dict(images=TWO, weights=[1.0]), ValueError, ["weights", "one number per image (2)"]),
    ("blend", dict(images=TWO, weights=[1.0, -0.5]), ValueError, ["weights[1]", "-0.5"]),
    ("blend", dict(images=TWO, weights=-1), ValueError, ["weights", "-1"]),
    ("blend", dict(images=TWO, focus=[0.5, 0.5, 0.5]), ValueError, ["focus", "(2)"]),
    ("blend", dict(images=TWO, focus=1.2), ValueError, ["focus", "1.2"]),
    ("blend", dict(images=TWO, focus=[0.2, "a"]), TypeError, ["focus[1]", "'a'"]),
    ("blend", dict(images=TWO, masks=[None]), ValueError, ["masks", "a list of 2 masks"]),
    ("blend", dict(images=TWO, masks=torch.zeros(2, 8, 8)), ValueError, ["masks", "a list of 2 masks"]),
    ("blend", dict(images=TWO, masks=[None, torch.zeros(2, 8, 8)]), ValueError, ["masks[1]", "[2, 8, 8]"]),
    ("blend", dict(images=TWO, masks=[torch.zeros(8, 8, dtype=torch.uint8), None]), ValueError,
     ["masks[0]", "uint8"]),
    ("blend", dict(images=TWO, masks=[torch.full((8, 8), 1.5), None]), ValueError, ["masks[0]", "[0, 1]"]),
    ("blend", dict(images=TWO, masks=[torch.full((8, 8), -0.1), None]), ValueError, ["masks[0]", "[0, 1]"]),
    ("blend", dict(images=TWO, masks=["mask.png", None]), TypeError, ["masks[0]", "'mask.png'"]),
    ("blend", dict(images=TWO, prompt="a", text_strength=1.5), ValueError, ["text_strength", "1.5"]),
    ("blend", dict(images=TWO, prompt=["a"]), TypeError, ["prompt", "['a']"]),
    ("blend", dict(images=TWO, negative_prompt=3), TypeError, ["negative_prompt", "3"]),
    ("blend", dict(images=TWO, num_images_per_prompt=0), ValueError, ["num_images_per_prompt", "0"]),
    ("blend", dict(images=TWO, generator=[seeded(), seeded()]), ValueError, ["generator", "2 generators"]),
    ("image_variation", dict(image=IMG, focus=1.2), ValueError, ["focus", "1.2"]),
    ("image_variation", dict(image=IMG, fidelity=-0.1), ValueError, ["fidelity", "-0.1"]),
    ("image_variation", dict(image=IMG, fidelity=1.5), ValueError, ["fidelity", "1.5"]),
    ("image_variation", dict(image=IMG, color_adjust="yes"), TypeError, ["color_adjust", "'yes'"]),
    ("image_variation", dict(image=IMG, fidelity=0.5, scheduler="pndm"), ValueError, ["fidelity", "ddim"]),
    ("image_to_text", dict(image=IMG, temperature=0), ValueError, ["temperature", "0"]),
    ("image_to_text", dict(image=IMG, temperature=-1.0), ValueError, ["temperature", "-1.0", "> 0", "greedy=True"]),
    ("image_to_text", dict(image=IMG, top_p=2), ValueError, ["top_p", "2"]),
    ("image_to_text", dict(image=IMG, top_k=-1), ValueError, ["top_k", "-1"]),
    ("image_to_text", dict(image=IMG, max_length=1), ValueError, ["max_length", "1"]),
    ("image_to_text", dict(image=IMG, max_length=tp.OPTIMUS.dec_positions + 1), ValueError,
     ["max_length", str(tp.OPTIMUS.dec_positions + 1)]),
    ("image_to_text", dict(image=IMG, greedy="yes"), TypeError, ["greedy", "'yes'"]),
    ("image_to_text", dict(image=IMG, dedupe=1), TypeError, ["dedupe", "1"]),
    ("image_to_text", dict(image=IMG, num_texts_per_prompt=0), ValueError, ["num_texts_per_prompt", "0"]),
    ("image_to_text", dict(image=IMG, latents=torch.zeros(1, LATENT + 1)), ValueError, ["latents"]),
    ("image_to_text", dict(image="cat.png"), TypeError, ["image", "'cat.png'"]),
    ("text_variation", dict(prompt="a", temperature=0), ValueError, ["temperature", "0"]),
    ("text_variation", dict(prompt="a", top_p=2), ValueError, ["top_p", "2"]),
    ("text_variation", dict(prompt="a", max_length=1), ValueError, ["max_length", "1"]),
    ("text_variation", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError,
     ["negative_prompt", "3 texts", "2"]),
    ("text_variation", dict(prompt=5), TypeError, ["prompt", "5"]),
    # conditions as tensors (research use)
    ("text_to_image", dict(prompt="a", prompt_embeds=T()), ValueError, ["prompt_embeds", "None when prompt"]),
    ("text_to_image", dict(prompt_embeds=T(width=8)), ValueError, ["prompt_embeds", "[B, 77, 16]"]),
    ("text_to_image", dict(prompt_embeds=T(length=76)), ValueError, ["prompt_embeds", "[B, 77, 16]"]),
    ("text_to_image", dict(prompt_embeds=T(dtype=torch.int64)), ValueError, ["prompt_embeds", "floating-point"]),
    ("text_to_image", dict(prompt_embeds=T() / 0), ValueError, ["prompt_embeds", "finite"]),
    ("text_to_image", dict(prompt_embeds=[[0.0]]), TypeError, ["prompt_embeds", "torch.Tensor"]),
    ("text_to_image", dict(prompt_embeds=T(2), negative_prompt_embeds=T(3)), ValueError,
     ["negative_prompt_embeds", "1 or 2"]),
    ("text_to_image", dict(prompt_embeds=T(), negative_prompt="x", negative_prompt_embeds=T()), ValueError,
     ["negative_prompt_embeds", "None when negative_prompt"]),
    ("text_to_image", dict(), TypeError, ["prompt", "prompt_embeds"]),
    ("image_variation", dict(image_embeds=T()), ValueError, ["image_embeds", "[B, 257, 16]"]),
    ("image_variation", dict(image=IMG, image_embeds=V()), ValueError, ["image_embeds", "None when"]),
    ("image_variation", dict(image_embeds=V(), fidelity=0.5), ValueError, ["fidelity", "image_embeds"]),
    ("image_variation", dict(image=IMG, fidelity=0.5, strength=0.3), ValueError, ["fidelity", "strength"]),
    ("image_variation", dict(image_embeds=V(), color_adjust=True), ValueError, ["color_adjust", "colours"]),
    ("image_variation", dict(image=IMG, color_adjust=True, output_type="latent"), ValueError,
     ["color_adjust", 'output_type="latent"', "decoded pictures"]),
    ("dual_guided", dict(prompt_embeds=T(2), image_embeds=V()), ValueError, ["image_embeds", "one image per"]),
    ("image_to_text", dict(image_embeds=V(), negative_image_embeds=V(2)), ValueError,
     ["negative_image_embeds", "1"]),
    ("text_variation", dict(prompt_embeds=V()), ValueError, ["prompt_embeds", "[B, 77, 16]"]),
    ("blend", dict(images=[IMG], prompt_embeds=T(2)), ValueError, ["prompt_embeds", "batch of 1"]),
    # init images and latents at a strength
    ("text_to_image", dict(prompt="a", strength=0.5), ValueError, ["strength", "init_image"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(1, 4, 8, 8), strength=1.5), ValueError,
     ["strength", "[0.0, 1.0]"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(1, 4, 8, 8), latents=torch.zeros(1, 4, 8, 8)),
     ValueError, ["latents", "init_latents"]),
    ("text_to_image", dict(prompt="a", init_image=IMG, init_latents=torch.zeros(1, 4, 8, 8)), ValueError,
     ["init_latents", "init_image"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(1, 4, 8, 8), scheduler="pndm"), ValueError,
     ["init_latents: expected a scheduler that starts part-way (any but pndm and ddim_inverse), got 'pndm'"]),
    ("text_to_image", dict(prompt="a", init_image=IMG, scheduler="ddim_inverse"), ValueError,
     ["init_image: expected a scheduler that starts part-way", "got 'ddim_inverse'"]),
    ("text_to_image", dict(prompt="a", strength_rule="diffusers"), ValueError,
     ["strength_rule: expected None unless init_image or init_latents is given, got 'diffusers'"]),
    ("text_to_image", dict(prompt="a", init_image=IMG, strength_rule="img2img"), ValueError,
     ["strength_rule", "'original'", "'diffusers'", "'img2img'"]),
    ("text_to_image", dict(prompt="a", init_image=IMG, strength_rule="original", scheduler="euler"), ValueError,
     ["strength_rule: expected 'diffusers' with scheduler 'euler' (the original's rule is DDIM's)"]),
    ("text_to_image", dict(prompt="a", init_image=IMG, strength=0.2, scheduler="unipc", num_inference_steps=4),
     ValueError,
     ["strength: expected at least 1 / num_inference_steps = 0.25 with strength_rule 'diffusers'", "0.2"]),
    ("image_variation", dict(image=IMG, fidelity=0.5, strength_rule="diffusers"), ValueError,
     ["strength_rule: expected None or 'original' with fidelity"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(1, 3, 6, 6)), ValueError, ["init_latents", "shape"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(3, 4, 8, 8)), ValueError,
     ["init_latents: expected 1 row (one prompt, one image)"]),
    ("text_to_image", dict(prompt=["a", "b"], num_images_per_prompt=2, init_latents=torch.zeros(3, 4, 8, 8)),
     ValueError, ["init_latents", "1, 2 or 4 rows"]),
    ("text_to_image", dict(prompt="a", init_latents=torch.zeros(1, 4, 8)), ValueError,
     ["init_latents", "4 dimensions"]),
    ("text_to_image", dict(prompt=["a", "b"], init_image=[random_image(1, (40, 40)), random_image(2, (48, 40))]),
     ValueError, ["init_image", "one size"]),
    ("text_to_image", dict(prompt="a", init_image=TWO), ValueError, ["init_image", "one image or 1"]),
    # diffusers' return_dict
    ("text_to_image", dict(prompt="a", return_dict="no"), TypeError, ["return_dict", "'no'", "True or False"]),
    ("image_variation", dict(image=IMG, fidelity=1.0, return_dict=0), TypeError, ["return_dict", "0"]),
    ("blend", dict(images=TWO, return_dict=None), TypeError, ["return_dict", "None"]),
    ("text_variation", dict(prompt="a", return_dict=1), TypeError, ["return_dict", "1"]),
    ("text_to_image", dict(prompt="a", progress="no"), TypeError, ["progress", "'no'", "True or False"]),
    ("blend", dict(images=TWO, progress=None), TypeError, ["progress", "None", "True or False"]),
    ("image_to_text", dict(image=IMG, progress=1), TypeError, ["progress", "1", "True or False"]),
]


@pytest.mark.parametrize("task,kwargs,error,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument(no_model_runs, task, kwargs, error, words):
    with pytest.raises(error) as info:
        getattr(no_model_runs, task)(**{**OK, **kwargs})
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_device_that_is_not_there(tmp_path):
    """An unknown device name, and CUDA on a machine without it, are one ValueError before anything is read."""
    with pytest.raises(ValueError, match=r"device: expected a device name .*got 'foo'"):
        VersatileDiffusion.from_pretrained(tmp_path, device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: expected a device this machine has \(CUDA is not available"):
            VersatileDiffusion.from_pretrained(tmp_path, device="cuda")
    with pytest.raises(ValueError, match=r"device: .*CUDA device index|device: .*CUDA is not available"):
        VersatileDiffusion.from_pretrained(tmp_path, device="cuda:99")


LOAD_CASES = [
    (dict(tasks=["upscale"]), ValueError, r"tasks: expected one of .*got 'upscale'"),
    (dict(tasks=5), TypeError, r"tasks: expected a list of task names, some of \['text_to_image', .*got 5"),
    (dict(scheduler="k_heun"), ValueError, r"scheduler: expected one of .*got 'k_heun'"),
    (dict(uncond_image="white"), ValueError, r"uncond_image"),
    (dict(cuda_graphs="yes"), TypeError, r"cuda_graphs: expected True, False or None, got 'yes'"),
    (dict(triton_kernels=1), TypeError, r"triton_kernels: expected True, False or None, got 1"),
    (dict(compile="yes"), TypeError, r"compile: expected True or False, got 'yes'"),
    (dict(dtype="float16"), TypeError, r"dtype: expected a torch.dtype: torch.float16, .*got 'float16'"),
    (dict(dtype=torch.int64), ValueError, r"dtype: expected torch.float16, .* or torch.float64, got torch.int64"),
    (dict(src=None), TypeError,
     r"src: expected a hub repo id, a diffusers-layout or converted folder, or an original .pth, got None"),
    *[({name: 3}, TypeError, rf"{name}: expected a file or folder path, or None, got 3")
      for name in ("kl_f8", "clip", "optimus", "optimus_tokenizer")],
    (dict(revision=5), TypeError, r"revision: expected a branch, tag or commit hash .*got 5"),
]


@pytest.mark.parametrize("kwargs,error,pattern", LOAD_CASES, ids=[next(iter(c[0])) for c in LOAD_CASES])
def test_bad_argument_at_load(tmp_path, kwargs, error, pattern):
    """Refused before anything is read (the folder is empty)."""
    with pytest.raises(error, match=pattern):
        VersatileDiffusion.from_pretrained(**{"src": tmp_path, **kwargs})


def test_task_not_loaded(tmp_path_factory):
    folder = tp.save(tp.build_components(seed=1), tmp_path_factory.mktemp("tiny") / "vd")
    assert VersatileDiffusion.from_pretrained(folder, tasks="text_to_image").tasks == ("text_to_image",)
    only = VersatileDiffusion.from_pretrained(folder, tasks=["image_variation", "image_variation"])
    assert only.tasks == ("image_variation",)
    with pytest.raises(ValueError, match=r"loaded for tasks \['image_variation'\].*text_to_image"):
        only.text_to_image("a", **OK)


def test_long_prompt_warns_once_naming_the_dropped_part(folder):
    prompt = "the cat " * 40 + "and the dog"  # about 100 tokens
    pipe = VersatileDiffusion.from_pretrained(folder, tasks="text_to_image")  # transformers warns once per tokenizer
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.text_to_image(prompt, output_type="latent", **OK)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    ours = [w for w in caught if "dropped" in str(w.message)]
    assert len(ours) == 1
    assert "the dog" in str(ours[0].message)
    assert [r.getMessage() for r in logged if r.levelno >= logging.WARNING] == []  # not a second one from transformers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.text_to_image("the cat", output_type="latent", **OK)
    assert not [w for w in caught if "dropped" in str(w.message)]


def test_long_prompt_in_a_batch_of_short_ones(pipe, check):
    """A batch may mix prompts over CLIP's 77 tokens with short ones; each is cut on its own. (Tolerance: relative
    to the latents' scale, as a batch of two and a batch of one sum in different orders: short prompts differ
    by as much, 3e-6.)"""
    long = "the cat " * 40 + "and the dog"
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = pipe.text_to_image(["a", long], generator=[g(0), g(1)], output_type="latent", **OK).images
    ours = [w for w in caught if "dropped" in str(w.message)]
    assert len(ours) == 1 and "the dog" in str(ours[0].message)
    with pytest.warns(UserWarning, match="the dog"):
        alone = pipe.text_to_image(long, generator=g(1), output_type="latent", **OK).images
    check(rel_err(both[1:], alone), 1e-5)


def test_numbers_as_0d_tensors_and_arrays(pipe):
    """A number may come as a 0-d tensor or array (a sweep over torch.linspace, as diffusers takes it): the same
    result as the Python number; a 0-d tensor of the wrong kind is refused as its value would be."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe.dual_guided("the cat", IMG, text_to_image_strength=0.3, guidance_scale=3.0, num_inference_steps=2,
                             generator=g(), output_type="latent", progress=False).images
    for wrap in (torch.tensor, np.array):
        given = pipe.dual_guided("the cat", IMG, text_to_image_strength=wrap(0.3), guidance_scale=wrap(3.0),
                                 num_inference_steps=wrap(2), generator=g(), output_type="latent",
                                 progress=False).images
        assert torch.equal(given, plain)
    with pytest.raises(TypeError, match=r"^num_inference_steps: expected an integer >= 1, got 2\.0$"):
        pipe.text_to_image("the cat", num_inference_steps=torch.tensor(2.0), progress=False)
    with pytest.raises(TypeError, match=r"^guidance_scale: expected a number, got True$"):
        pipe.text_to_image("the cat", guidance_scale=torch.tensor(True), progress=False)
    with pytest.raises(TypeError, match=r"^guidance_scale: expected a number, got a tensor of shape \[1\]"):
        pipe.text_to_image("the cat", guidance_scale=torch.tensor([7.5]), progress=False)


def test_errors_leave_no_trace(pipe):
    """A refused call changes nothing: the next call equals the same call on a fresh pipeline."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = pipe.text_to_image("the cat", generator=g(), output_type="np", **OK).images
    with pytest.raises(ValueError):
        pipe.text_to_image("the cat", height=7, **OK)
    after = pipe.text_to_image("the cat", generator=g(), output_type="np", **OK).images
    assert np.array_equal(before, after)
