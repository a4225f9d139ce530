"""Bad arguments: a ValueError or TypeError naming the argument, the value and what was expected, raised before
any model runs. Also the prompt-truncation warning."""

import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from helpers import rel_err
from vd import VersatileDiffusion

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")
    return VersatileDiffusion.from_pretrained(folder)


@pytest.fixture
def no_model_runs(pipe, monkeypatch):
    """Any model call fails the test: argument errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")
    c = pipe.components
    for m in (c.image_unet, c.text_unet, c.vae, c.text_encoder, c.image_encoder):
        monkeypatch.setattr(m, "forward", boom)
    return pipe


IMG = PIL.Image.new("RGB", (32, 32), (200, 30, 60))
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
    # arguments that make the result non-finite for sure are refused before sampling
    ("text_to_image", dict(prompt="a", guidance_scale=math.inf), ValueError, ["guidance_scale", "inf", "finite"]),
    ("text_to_image", dict(prompt="a", guidance_scale=1e30), ValueError, ["guidance_scale", "1e+30", "1000"]),
    ("text_to_image", dict(prompt="a", eta=1e6), ValueError, ["eta", "1000000.0", "[0.0, 1.0]"]),
    ("text_to_image", dict(prompt="a", eta=math.inf), ValueError, ["eta", "inf"]),
    ("blend", dict(images=[IMG], weights=[math.inf]), ValueError, ["weights[0]", "inf", "finite"]),
    ("blend", dict(images=[IMG], focus=[math.nan]), ValueError, ["focus[0]", "nan"]),
    # a per-call pixel budget instead of an allocator failure
    ("text_to_image", dict(prompt="a", height=1048576), ValueError,
     ["num_images_per_prompt x height x width", "16777216", "1048576"]),
    ("text_to_image", dict(prompt="a", num_images_per_prompt=10**12), ValueError, ["16777216", "1000000000000"]),
    ("image_variation", dict(image=torch.rand(1, 3, 0, 5)), ValueError, ["image", "(1, 3, 0, 5)", "1 pixel"]),
    ("image_variation", dict(image=torch.rand(2, 3, 4, 0)), ValueError, ["image", "(2, 3, 4, 0)", "1 pixel"]),
    ("image_variation", dict(image=PIL.Image.new("RGB", (0, 0))), ValueError, ["image", "1 pixel"]),
    ("image_variation", dict(image=PIL.Image.fromarray(np.full((8, 8), 2.0, np.float32))), ValueError,
     ["image", "mode F", "[0, 1]", "2"]),
    ("text_to_image", dict(prompt="a", guidance_scale=-1), ValueError, ["guidance_scale", "-1", "[0.0, 1000.0]"]),
    ("text_to_image", dict(prompt="a", guidance_scale="7"), TypeError, ["guidance_scale", "'7'", "number"]),
    ("text_to_image", dict(prompt="a", guidance_scale=math.nan), ValueError, ["guidance_scale", "nan"]),
    ("text_to_image", dict(prompt="a", num_images_per_prompt=0), ValueError, ["num_images_per_prompt", "0"]),
    ("text_to_image", dict(prompt="a", eta=-0.5), ValueError, ["eta", "-0.5"]),
    ("text_to_image", dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), ValueError,
     ["latents", "(1, 4, 4, 4)", "(1, 4, 8, 8)"]),
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
    ("image_variation", dict(image="cat.png"), TypeError, ["image", "'cat.png'", "PIL"]),
    ("image_variation", dict(image=[]), ValueError, ["image", "non-empty"]),
    ("image_variation", dict(image=np.zeros((32, 48, 3), np.uint8)), TypeError,
     ["image", "numpy array of shape [32, 48, 3]", "uint8", "PIL"]),
    ("image_variation", dict(image=[np.zeros((32, 48, 3), np.uint8)]), TypeError,
     ["image", "list of 1, the first a numpy array of shape [32, 48, 3]"]),
    ("image_variation", dict(image=torch.rand(3, 32, 32)), ValueError, ["image", "(3, 32, 32)", "[B, 3, H, W]"]),
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


def test_unknown_task_and_scheduler_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"tasks: expected one of .*got 'upscale'"):
        VersatileDiffusion.from_pretrained(tmp_path, tasks=["upscale"])
    with pytest.raises(ValueError, match=r"scheduler: expected one of .*got 'k_heun'"):
        VersatileDiffusion.from_pretrained(tmp_path, scheduler="k_heun")
    with pytest.raises(ValueError, match=r"uncond_image"):
        VersatileDiffusion.from_pretrained(tmp_path, uncond_image="white")


def test_task_not_loaded(tmp_path_factory):
    folder = tp.save(tp.build_components(seed=1), tmp_path_factory.mktemp("tiny") / "vd")
    only = VersatileDiffusion.from_pretrained(folder, tasks=["image_variation"])
    with pytest.raises(ValueError, match=r"loaded for tasks \['image_variation'\].*text_to_image"):
        only.text_to_image("a", **OK)


def test_long_prompt_warns_once_naming_the_dropped_part(pipe):
    prompt = "the cat " * 40 + "and the dog"  # about 100 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.text_to_image(prompt, output_type="latent", **OK)
    ours = [w for w in caught if "dropped" in str(w.message)]
    assert len(ours) == 1
    assert "the dog" in str(ours[0].message)
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


def test_errors_leave_no_trace(pipe):
    """A refused call changes nothing: the next call equals the same call on a fresh pipeline."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = pipe.text_to_image("the cat", generator=g(), output_type="np", **OK).images
    with pytest.raises(ValueError):
        pipe.text_to_image("the cat", height=7, **OK)
    after = pipe.text_to_image("the cat", generator=g(), output_type="np", **OK).images
    assert np.array_equal(before, after)
