"""image_variation's options on the tiny model, fp32 on CPU: focus (tokens and images), fidelity (the original's
img2img: start level, steps run, nothing left to denoise, refusals) and colour matching."""

import numpy as np
import PIL.Image
import pytest
import torch

from flows import CPU, FAST, Counting, clip_image
from helpers import random_image, seeded
from vd.colors import match_colors
from vd.conditioning import encode_image, uncond_pixel_values
from vd.focus import adjust_focus
from vd.nn import Context
from vd.sched import randn, sampler_from_config

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")


# ---- 3. image variation's focus

def test_image_variation_focus_tokens(pipe, captured):
    imgs = [random_image(30), random_image(31, (48, 48))]
    gens = [seeded(s) for s in (1, 2, 3, 4)]  # 2 images x 2 samples; image i uses the generator of its first sample
    pipe.image_variation(imgs, focus=0.2, num_images_per_prompt=2, generator=gens, output_type="latent", **FAST)
    pipe.image_variation(imgs[0], focus=0.8, generator=seeded(5), output_type="latent", **FAST)
    pipe.image_variation(imgs[0], focus=0.5, generator=seeded(5), output_type="latent", **FAST)
    plain = clip_image(pipe, imgs)
    grey = encode_image(pipe.components.image_encoder, uncond_pixel_values(pipe.components.image_processor, "grey"))

    tokens = captured[0].streams[0].tokens
    want = torch.cat([adjust_focus(plain[:1], 0.2, generator=seeded(1)),
                      adjust_focus(plain[1:], 0.2, generator=seeded(3))])
    assert torch.equal(tokens[4:], want.repeat_interleave(2, dim=0))
    assert torch.equal(tokens[:4], grey.expand(4, -1, -1))  # "no image" is not focus-adjusted
    assert not torch.allclose(tokens[4:], plain.repeat_interleave(2, dim=0), atol=1e-3)

    one = clip_image(pipe, imgs[:1])  # encoded alone, as the call does (a batch may round differently)
    assert torch.equal(captured[1].streams[0].tokens[1:], adjust_focus(one, 0.8, generator=seeded(5)))
    assert torch.equal(captured[2].streams[0].tokens[1:], one)  # 0.5: untouched


def test_image_variation_focus_changes_the_image_deterministically(pipe):
    img = random_image(32)

    def run(focus, seed=0):
        return pipe.image_variation(img, focus=focus, generator=seeded(seed), output_type="np", **FAST).images

    out = {f: run(f) for f in (0.1, 0.5, 0.9)}
    for a, b in [(0.1, 0.5), (0.5, 0.9), (0.1, 0.9)]:
        assert np.abs(out[a] - out[b]).max() > 1e-3, (a, b)
    assert np.array_equal(run(0.1), out[0.1])
    assert np.array_equal(run(0.9), out[0.9])


# ---- 4. fidelity

def _resized_np(img: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    a = np.asarray(img.convert("RGB").resize((width, height), PIL.Image.Resampling.BICUBIC))
    return a.astype(np.float32) / np.float32(255)


def _encoded(pipe, ref: np.ndarray, g, per_prompt: int = 1) -> torch.Tensor:
    """The input's latents: VAE posterior mean + std * noise from the generator, scaled, repeated per sample.
    (Compared within 1e-5: the encoder's convolutions may round differently for another memory layout of the
    same pixels; a wrong draw or scale would be off by O(1).)"""
    vae = pipe.components.vae
    x = torch.from_numpy(ref).permute(2, 0, 1)[None]
    with torch.no_grad():
        post = vae.encode(2 * x - 1)
    x0 = post.mean + post.std * randn(post.mean.shape, g, CPU, post.mean.dtype)
    return (vae.config.scaling_factor * x0).repeat_interleave(per_prompt, dim=0)


def _grey_streams(pipe, img) -> list[Context]:
    grey = encode_image(pipe.components.image_encoder, uncond_pixel_values(pipe.components.image_processor, "grey"))
    return [Context(pipe.components.image_unet.context_layers(), torch.cat([grey, clip_image(pipe, [img])]))]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_fidelity_one_returns_the_input(pipe, monkeypatch, check):
    img = random_image(40, (40, 56))
    counter = Counting(pipe.image_eps)
    monkeypatch.setattr(pipe, "image_eps", counter)
    out = pipe.image_variation(img, fidelity=1.0, height=64, width=48, num_images_per_prompt=2, generator=seeded(0),
                               output_type="np", **FAST).images
    ref = _resized_np(img, 64, 48)
    assert out.shape == (2, 64, 48, 3)
    assert np.array_equal(out[0], ref) and np.array_equal(out[1], ref)
    latents = pipe.image_variation(img, fidelity=1.0, height=64, width=48, num_images_per_prompt=2,
                                   generator=seeded(1), output_type="latent", **FAST).images
    check(_max_diff(latents, _encoded(pipe, ref, seeded(1), per_prompt=2)), 1e-5, "encoded latents")
    assert torch.equal(latents[0], latents[1])  # one posterior draw per image, repeated for its samples
    assert counter.ts == []


@pytest.mark.parametrize("steps,fidelity,keep", [(4, 0.5, 2), (4, 0.6, 1), (3, 0.2, 2), (5, 0.3, 3)])
def test_fidelity_starts_part_way(steps, fidelity, keep, pipe, captured, monkeypatch, check):
    """Fidelity f is the original's img2img: t_enc = int(steps * (1 - f)) steps left; the input's latent is noised
    to the ascending grid's entry t_enc, one grid step above the first step denoised; output at the input's size."""
    img = random_image(41)  # 40 x 56
    counter = Counting(pipe.image_eps)
    monkeypatch.setattr(pipe, "image_eps", counter)
    seen = []
    got = pipe.image_variation(img, fidelity=fidelity, num_inference_steps=steps, generator=seeded(2),
                               output_type="latent", callback=lambda i, t, x: seen.append(i), progress=False).images
    sampler = sampler_from_config("ddim", pipe.components.scheduler_config)
    ts = sampler.timesteps(steps)
    skip = steps - keep
    assert keep == int(steps * (1 - fidelity))
    assert counter.ts == ts[skip:].tolist() and seen == list(range(keep))  # steps run, counted from 0

    g = seeded(2)
    x0 = _encoded(pipe, _resized_np(img, 40, 56), g)
    z = randn(x0.shape, g, CPU, x0.dtype)  # the forward noise continues the same generator
    start = sampler.noised(x0, int(ts.flip(0)[keep]), z)
    (call,) = captured
    assert call.skip == skip and int(ts.flip(0)[keep]) == int(ts[skip - 1])
    check(_max_diff(call.start, start), 1e-5, "start")

    streams = _grey_streams(pipe, img)

    def eps(x, t):
        u, c = pipe.components.image_unet(torch.cat([x, x]), t, streams).chunk(2)
        return u + 7.5 * (c - u)

    with torch.no_grad():  # from the start the call used: exactly the remaining DDIM steps
        want = sampler.sample(eps, call.start, steps, skip=skip)
    assert torch.equal(got, want)


def test_fidelity_with_nothing_left_to_denoise(pipe, monkeypatch, check):
    """int(10 * (1 - 0.99)) == 0: the input's latent, noised to the grid's first entry, is decoded as it is."""
    img = random_image(42)
    counter = Counting(pipe.image_eps)
    monkeypatch.setattr(pipe, "image_eps", counter)
    kw = dict(fidelity=0.99, num_inference_steps=10, progress=False)
    latents = pipe.image_variation(img, generator=seeded(3), output_type="latent", **kw).images
    g = seeded(3)
    x0 = _encoded(pipe, _resized_np(img, 40, 56), g)
    sampler = sampler_from_config("ddim", pipe.components.scheduler_config)
    noised = sampler.noised(x0, int(sampler.timesteps(10)[-1]), randn(x0.shape, g, CPU, x0.dtype))
    check(_max_diff(latents, noised), 1e-5, "noised latents")
    images = pipe.image_variation(img, generator=seeded(3), output_type="pt", **kw).images
    with torch.no_grad():
        want = (pipe.components.vae.decode(latents / pipe.components.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(images, want)
    assert counter.ts == []


@pytest.mark.parametrize("kw,name", [(dict(scheduler="pndm"), "fidelity"), (dict(scheduler="lms"), "fidelity"),
                                     (dict(latents=torch.zeros(1, 4, 8, 8)), "latents")])
def test_fidelity_refusals(kw, name, pipe, captured):
    with pytest.raises(ValueError, match=name):
        pipe.image_variation(random_image(43), fidelity=0.5, **kw, **FAST)
    assert captured == []


# ---- 5. colour matching

def _flat_image(seed: int, means, size=(48, 48), spread=0.04) -> PIL.Image.Image:
    """Low-contrast image around per-channel means: colour matching to it needs no clamping."""
    rng = np.random.RandomState(seed)
    a = np.asarray(means)[None, None] + spread * rng.randn(*size, 3)
    return PIL.Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8))


def test_color_adjust(pipe, check):
    imgs = [_flat_image(50, (0.3, 0.5, 0.7)), _flat_image(51, (0.6, 0.4, 0.45), (40, 56))]
    kw = dict(num_images_per_prompt=2, output_type="pt", **FAST)
    plain = pipe.image_variation(imgs, generator=seeded(4), **kw).images
    got = pipe.image_variation(imgs, color_adjust=True, generator=seeded(4), **kw).images
    refs = torch.stack([torch.from_numpy(_resized_np(im, 64, 64)).permute(2, 0, 1) for im in imgs])
    refs = refs.repeat_interleave(2, dim=0)
    assert torch.equal(got, match_colors(plain, refs))  # the relation, on the generated images
    assert 0 < got.min() and got.max() < 1  # no clamping here, so the statistics are the reference's
    mean_err = (got.flatten(2).mean(-1) - refs.flatten(2).mean(-1)).abs().max().item()
    std_err = (got.flatten(2).std(-1) - refs.flatten(2).std(-1)).abs().max().item()
    check(mean_err, 1e-5, "channel mean")
    check(std_err, 1e-5, "channel std")
    assert (plain.flatten(2).mean(-1) - refs.flatten(2).mean(-1)).abs().max() > 0.05  # it did change something
