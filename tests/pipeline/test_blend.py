"""blend on the tiny model, fp32 on CPU: one image equals dual guidance / image variation with a zero "no image";
the tokens, weights, masks and focus of several images, checked against a manual composition."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from flows import FAST, clip_image, clip_text, same_layers
from helpers import random_image, seeded
from vd import checks
from vd.focus import adjust_focus

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")


# ---- 1. blend of one image equals dual-guided / image variation with zero "no image"

@pytest.mark.parametrize("s", [0.3, 1.0])
def test_blend_one_image_with_text_is_dual_guided(pipe, s):
    img = random_image(1, (512, 512))  # the blend's squash via 512 x 512 and the crop agree on it
    got = pipe.blend([img], prompt="the cat", text_strength=s, generator=seeded(2), output_type="np", **FAST).images
    want = pipe.dual_guided("the cat", img, s, uncond_image="zeros", generator=seeded(2), output_type="np",
                            **FAST).images
    assert np.array_equal(got, want)


def test_blend_one_image_is_image_variation(pipe):
    img = random_image(2, (512, 512))
    got = pipe.blend([img], generator=seeded(3), output_type="np", **FAST).images
    want = pipe.image_variation(img, uncond_image="zeros", generator=seeded(3), output_type="np", **FAST).images
    assert np.array_equal(got, want)
    other = pipe.image_variation(img, generator=seeded(3), output_type="np", **FAST).images  # grey "no image"
    assert not np.array_equal(got, other)


# ---- 2. blend's token wiring

def _mask_pil(size) -> PIL.Image.Image:
    """RGB mask (height, width): the red channel is white on the left third and grey (128) on the bottom rows;
    green and blue are noise, which must be ignored (the original reads the first channel)."""
    h, w = size
    rng = np.random.RandomState(9)
    a = (rng.rand(h, w, 3) * 255).astype(np.uint8)
    a[..., 0] = 0
    a[:, : w // 3, 0] = 255
    a[-h // 4:, w // 3:, 0] = 128
    return PIL.Image.fromarray(a)


def _keep_of(mask) -> torch.Tensor | None:
    """What a blend mask means: keep = 1 - mask, [1, 1, 512, 512]: the original app resizes a mask picture to
    512 x 512 (bilinear) and reads its first channel; a tensor is resized alike."""
    if mask is None:
        return None
    if isinstance(mask, PIL.Image.Image):
        m = np.asarray(mask.resize((512, 512), PIL.Image.Resampling.BILINEAR))[..., 0]
        m = torch.from_numpy(m.copy()).float().reshape(1, 1, 512, 512) / 255
    else:
        m = F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=(512, 512), mode="bilinear",
                          antialias=True)
    return 1 - m


BLEND_CASES = {
    "three_images_text": dict(sizes=[(40, 56), (48, 48), (32, 64)], weights=[1.0, 0.5, 2.0],
                              masks=["pil", None, "tensor"], focus=[0.2, 0.5, 0.9], prompt="the cat",
                              text_strength=0.3, per_prompt=2, guidance=7.5),
    "scalar_weight_focus_no_text": dict(sizes=[(40, 56), (56, 40)], weights=0.7, masks=None, focus=0.8,
                                        prompt=None, text_strength=0.5, per_prompt=1, guidance=7.5),
    "empty_prompt_ignored": dict(sizes=[(48, 48)], weights=None, masks=["tensor3"], focus=None, prompt="",
                                 text_strength=0.5, per_prompt=1, guidance=7.5),
    "zero_strength_ignored_no_cfg": dict(sizes=[(48, 48), (40, 56)], weights=[0.5, 1.5], masks=None, focus=0.1,
                                         prompt="the cat", text_strength=0.0, per_prompt=2, guidance=1.0),
}


@pytest.mark.parametrize("case", list(BLEND_CASES))
def test_blend_streams(case, pipe, captured):
    cfg = BLEND_CASES[case]
    imgs = [random_image(10 + i, size) for i, size in enumerate(cfg["sizes"])]
    k, n = len(imgs), cfg["per_prompt"]
    masks = None
    if cfg["masks"] is not None:
        masks = []
        for kind, size in zip(cfg["masks"], cfg["sizes"]):
            h, w = size
            if kind == "pil":
                masks.append(_mask_pil(size))
            elif kind == "tensor":
                masks.append(torch.linspace(0, 1, h * w).reshape(h, w))
            elif kind == "tensor3":
                masks.append((torch.arange(w) < w // 2).float().expand(1, h, w))
            else:
                masks.append(None)
    pipe.blend(imgs, weights=cfg["weights"], masks=masks, focus=cfg["focus"], prompt=cfg["prompt"],
               text_strength=cfg["text_strength"], num_images_per_prompt=n, guidance_scale=cfg["guidance"],
               generator=seeded(5), output_type="latent", **FAST)
    (call,) = captured

    weights = cfg["weights"] if isinstance(cfg["weights"], list) else [cfg["weights"] or 1.0] * k
    focus = cfg["focus"] if isinstance(cfg["focus"], list) else [cfg["focus"] or 0.5] * k
    g = seeded(5)  # one generator: every image's focus draws from it, in order, before the noise
    per_image = []
    for i, img in enumerate(imgs):
        tokens = clip_image(pipe, [img], squash=True, keep=_keep_of(masks[i] if masks else None))
        if focus[i] != 0.5:
            tokens = adjust_focus(tokens, focus[i], generator=g)
        per_image.append(tokens * weights[i])
    cond = torch.cat(per_image, dim=1).repeat_interleave(n, dim=0)
    assert cond.shape == (n, 257 * k, 16)
    cfg_on = cfg["guidance"] > 1
    image_want = torch.cat([torch.zeros_like(cond), cond]) if cfg_on else cond

    use_text = bool(cfg["prompt"]) and cfg["text_strength"] > 0
    assert len(call.streams) == (2 if use_text else 1)
    image = call.streams[-1]
    assert same_layers(image.layers, pipe.components.image_unet.context_layers())
    assert torch.equal(image.tokens, image_want)
    s = cfg["text_strength"]
    assert image.weight == (1.0 - s if use_text else 1.0)
    if use_text:
        text = call.streams[0]
        assert same_layers(text.layers, pipe.components.text_unet.context_layers())
        assert text.weight == s
        want = clip_text(pipe, [cfg["prompt"]]).repeat_interleave(n, dim=0)
        if cfg_on:
            want = torch.cat([clip_text(pipe, [""]).repeat_interleave(n, dim=0), want])
        assert torch.equal(text.tokens, want)
    if masks is not None:  # the masks really count: an unmasked encoding differs
        i = next(i for i, m in enumerate(masks) if m is not None)
        masked = clip_image(pipe, [imgs[i]], squash=True, keep=_keep_of(masks[i]))
        assert not torch.allclose(masked, clip_image(pipe, [imgs[i]], squash=True), atol=1e-3)


def test_blend_focus_with_a_generator_list(pipe, captured):
    """A list of generators (one per sample): every image's focus draws from the first sample's generator."""
    imgs = [random_image(20, (48, 48)), random_image(21, (40, 56))]
    pipe.blend(imgs, focus=[0.2, 0.8], num_images_per_prompt=2, generator=[seeded(6), seeded(7)], output_type="latent",
               **FAST)
    g = seeded(6)
    want = torch.cat([adjust_focus(clip_image(pipe, [im], squash=True), f, generator=g)
                      for im, f in zip(imgs, (0.2, 0.8))], dim=1).repeat_interleave(2, dim=0)
    assert torch.equal(captured[0].streams[0].tokens[2:], want)


def test_a_mask_reads_its_first_channel_not_its_transparency():
    """White on the left, transparent black elsewhere (RGBA): the original reads the first channel after its
    512 x 512 resize, so the right part is kept; seen over white, the whole image would be left out."""
    a = np.zeros((40, 56, 4), np.uint8)
    a[:, :20] = 255
    (keep,) = checks.keep_masks([PIL.Image.fromarray(a, "RGBA")], 1)
    assert torch.equal(keep, _keep_of(PIL.Image.fromarray(a, "RGBA"))) and 0.6 < keep.mean() < 0.7


def test_mask_modes_mean_the_same_picture():
    """The same half-white mask as L, palette (with and without alpha), RGBA, 16-bit and 1-bit pictures, or a
    tensor: the same keep-weights (1-bit: PIL resizes it nearest-neighbour, as in the original)."""
    a = np.zeros((40, 56), np.uint8)
    a[:, :20] = 255
    grey = PIL.Image.fromarray(a)
    masks = [grey, grey.convert("P"), grey.convert("PA"), grey.convert("RGBA"),
             PIL.Image.fromarray(a.astype(np.uint16) * 257), torch.from_numpy(a).float() / 255]
    (want,), got = checks.keep_masks([grey], 1), checks.keep_masks(masks, len(masks))
    for m, keep in zip(masks, got):
        assert keep.shape == (1, 1, 512, 512) and (keep - want).abs().max() <= 1 / 255 + 1e-6, m
    (one_bit,) = checks.keep_masks([grey.convert("1")], 1)
    assert abs(one_bit.mean() - want.mean()) < 1e-3


def test_a_tensor_picture_blends_as_the_same_pil_picture(pipe):
    img = random_image(40, (40, 56))
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    a = pipe.blend([img], generator=seeded(1), output_type="latent", **FAST).images
    b = pipe.blend(tensor, generator=seeded(1), output_type="latent", **FAST).images
    assert torch.equal(a, b)
