"""Folders diffusers writes for one VD pipeline (`remove_unused_weights()`, then `save_pretrained`, as its docs
do): no text_unet/, the text context layers inside image_unet/. They load, and give the pictures of the full
folder and of the reference loading them."""

import numpy as np
import pytest
import torch

import tiny_pipeline as tp
from flows import max_abs_diff
from helpers import random_image, seeded

pytest.importorskip("diffusers")
from vd import VersatileDiffusion  # noqa: E402
from weights_convert import CheckpointError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
KW = dict(num_inference_steps=3, output_type="np", progress=False)


def _saved(folder, task: str, out):
    pipe = tp.reference(task, folder)
    pipe.remove_unused_weights()
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def full(folder):
    return VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image", "image_variation", "dual_guided"])


def test_saved_text_to_image_pipeline(folder, full, tmp_path):
    from diffusers import VersatileDiffusionTextToImagePipeline
    saved = _saved(folder, "text_to_image", tmp_path / "t2i")
    ours = VersatileDiffusion.from_pretrained(saved, tasks=["text_to_image"])
    got = ours.text_to_image("the cat", generator=seeded(3), **KW).images
    assert np.array_equal(got, full.text_to_image("the cat", generator=seeded(3), **KW).images)
    ref = VersatileDiffusionTextToImagePipeline.from_pretrained(saved)
    ref.set_progress_bar_config(disable=True)
    want = ref("the cat", generator=seeded(3), num_inference_steps=3, output_type="np").images
    assert max_abs_diff(got, want) <= 1e-3
    with pytest.raises(CheckpointError, match=r"has no image_unet\.context, image_encoder, needed for tasks"):
        VersatileDiffusion.from_pretrained(saved, tasks=["image_variation"])


def test_saved_dual_guided_pipeline(folder, tmp_path, patched_dual):
    from diffusers import VersatileDiffusionDualGuidedPipeline
    saved = _saved(folder, "dual_guided", tmp_path / "dual")
    ours = VersatileDiffusion.from_pretrained(saved, tasks=["text_to_image", "image_variation", "dual_guided"],
                                              uncond_image="diffusers")
    img = random_image(3)
    ref = VersatileDiffusionDualGuidedPipeline.from_pretrained(saved)
    ref.set_progress_bar_config(disable=True)
    want = ref("the cat", img, text_to_image_strength=0.3, generator=seeded(4), num_inference_steps=3,
               output_type="np").images
    got = ours.dual_guided("the cat", img, text_to_image_strength=0.3, generator=seeded(4), **KW).images
    assert max_abs_diff(got, want) <= 1e-3
    full = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image", "image_variation", "dual_guided"],
                                              uncond_image="diffusers")
    for task, args in [("dual_guided", dict(prompt="the cat", image=img, text_to_image_strength=0.3)),
                       ("image_variation", dict(image=img)), ("text_to_image", dict(prompt="a dog"))]:
        got = getattr(ours, task)(**args, generator=seeded(4), **KW).images
        assert np.array_equal(got, getattr(full, task)(**args, generator=seeded(4), **KW).images), task
    assert torch.equal(ours.components.text_unet.context_layers()[0].proj_in.weight,
                       full.components.text_unet.context_layers()[0].proj_in.weight)
