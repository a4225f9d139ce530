"""Research use on the tiny model, fp32 on CPU: conditions as tensors in and out, init images and latents at a
strength, text latents in and out, and gradients through the functional core (vd.sampling)."""

import inspect

import numpy as np
import pytest
import torch

import tiny_pipeline as tp
import vd.pipeline
from flows import LATENT
from helpers import random_image, seeded
from vd import VersatileDiffusion
from vd import sampling as core
from vd.conditioning import resized
from vd.sched import randn, sampler_from_config

FAST = dict(num_inference_steps=4, progress=False)


# ---- conditions as tensors: the tokens encode_* return give what the strings and images give

def test_text_to_image_from_prompt_embeds(pipe):
    kw = dict(num_images_per_prompt=2, output_type="latent", **FAST)
    want = pipe.text_to_image(["the cat", "a dog"], negative_prompt="blur", generator=seeded(1), **kw).images
    got = pipe.text_to_image(prompt_embeds=pipe.encode_prompt(["the cat", "a dog"]),
                             negative_prompt_embeds=pipe.encode_prompt("blur"), generator=seeded(1), **kw).images
    assert torch.equal(got, want)
    plain = pipe.text_to_image(prompt_embeds=pipe.encode_prompt(["the cat", "a dog"]), generator=seeded(1), **kw)
    empty = pipe.text_to_image(["the cat", "a dog"], generator=seeded(1), **kw)
    assert torch.equal(plain.images, empty.images)  # no negative: the empty prompt's tokens, as from strings


def test_image_variation_from_image_embeds(pipe):
    img, neg = random_image(1), random_image(2)
    kw = dict(output_type="latent", **FAST)
    want = pipe.image_variation(img, negative_prompt=neg, generator=seeded(2), **kw).images
    got = pipe.image_variation(image_embeds=pipe.encode_image(img), negative_image_embeds=pipe.encode_image(neg),
                               generator=seeded(2), **kw).images
    assert torch.equal(got, want)
    focused = pipe.image_variation(img, focus=0.2, generator=[seeded(3)], **kw).images
    tokens = pipe.encode_image(img, focus=0.2, generator=seeded(3))
    g = seeded(3)
    pipe.encode_image(img, focus=0.2, generator=g)  # the flow's focus draws from its generator before the noise
    assert torch.equal(pipe.image_variation(image_embeds=tokens, generator=[g], **kw).images, focused)


def test_dual_guided_from_embeds(pipe):
    img = random_image(4)
    kw = dict(text_to_image_strength=0.3, output_type="latent", **FAST)
    want = pipe.dual_guided("the cat", img, negative_prompt="blur", generator=seeded(4), **kw).images
    got = pipe.dual_guided(prompt_embeds=pipe.encode_prompt("the cat"), image_embeds=pipe.encode_image(img),
                           negative_prompt_embeds=pipe.encode_prompt("blur"), generator=seeded(4), **kw).images
    assert torch.equal(got, want)


def test_blend_text_from_prompt_embeds(pipe):
    imgs = [random_image(5, (40, 40)), random_image(6, (40, 40))]
    kw = dict(weights=[1.0, 0.5], text_strength=0.4, output_type="latent", **FAST)
    want = pipe.blend(imgs, prompt="the cat", negative_prompt="blur", generator=seeded(5), **kw).images
    got = pipe.blend(imgs, prompt_embeds=pipe.encode_prompt("the cat"),
                     negative_prompt_embeds=pipe.encode_prompt("blur"), generator=seeded(5), **kw).images
    assert torch.equal(got, want)


def test_text_flows_from_embeds(pipe):
    img = random_image(7)
    a = pipe.image_to_text(img, num_texts_per_prompt=2, generator=seeded(6), **FAST)
    b = pipe.image_to_text(image_embeds=pipe.encode_image(img, squash=True), num_texts_per_prompt=2,
                           generator=seeded(6), **FAST)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts
    c = pipe.text_variation("the cat", negative_prompt="a dog", generator=seeded(7), **FAST)
    d = pipe.text_variation(prompt_embeds=pipe.encode_prompt("the cat"),
                            negative_prompt_embeds=pipe.encode_prompt("a dog"), generator=seeded(7), **FAST)
    assert torch.equal(c.latents, d.latents) and c.texts == d.texts


def test_encoders_return_the_flows_shapes(pipe):
    assert pipe.encode_prompt(["a", "b", "c"]).shape == (3, 77, 16)
    assert pipe.encode_image([random_image(8), random_image(9)]).shape == (2, 257, 16)


# ---- init image or latents at a strength: the original's img2img

@pytest.mark.parametrize("steps,strength", [(4, 0.75), (5, 0.5), (10, 0.55), (4, 0.0), (4, 1.0), (7, 1.0),
                                            (49, 1.0), (7, 0.9)])
def test_text_to_image_from_init_latents(pipe, captured, steps, strength, check):
    """t_enc = int(strength * steps); the init latents are noised to the original's ascending grid
    (range(0, 1000, 1000 // steps) + 1, which has one more entry when 1000 % steps != 0) at entry t_enc, or to
    the last trained timestep where the grid ends (strength 1, 1000 % steps == 0), with one draw from the
    generator; then the t_enc least noisy steps of VD's DDIM grid run."""
    x0 = torch.randn(2, 4, 6, 5, generator=seeded(20))
    seen = []
    got = pipe.text_to_image("the cat", num_images_per_prompt=2, init_latents=x0, strength=strength,
                             num_inference_steps=steps, generator=seeded(21), output_type="latent",
                             callback=lambda i, t, x: seen.append(int(t)), progress=False).images
    sampler = sampler_from_config("ddim", pipe.components.scheduler_config)
    ts = sampler.timesteps(steps).tolist()
    t_enc = int(strength * steps)
    original_grid = [t + 1 for t in range(0, 1000, 1000 // steps)]
    level = original_grid[t_enc] if t_enc < len(original_grid) else 999
    (call,) = captured
    s, start = call.sampling, call.start
    assert s.t_enc == t_enc and seen == ts[steps - t_enc:]
    check((start - sampler.noised(x0, level, randn(x0.shape, seeded(21)))).abs().max().item(), 0.0, "start")
    assert got.shape == (2, 4, 6, 5)
    if t_enc == 0:
        assert torch.equal(got, start)


def diffusers_img2img(folder, name: str, image, x0: torch.Tensor, steps: int, strength: float, guidance: float,
                      seed: int, callback_steps: int = 1) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Image variation from init latents as diffusers' img2img pipelines start it, written out with the reference
    pipeline's own parts as MindEye's reconstruction loop does (its recipe: UniPC, 20 steps, strength 0.85): the
    last int(strength * steps) timesteps run, from x0 noised by the scheduler's add_noise to the first of them.
    Also returns the (step, t) pairs the pipelines' callback would see."""
    from diffusers.utils.torch_utils import randn_tensor  # (the oracle; test-only)
    from sampler_table import EVERY

    ref = tp.reference("image_variation", folder)
    cls, override = EVERY[name]
    sched = cls.from_config(ref.scheduler.config, **override)
    gen = seeded(seed)
    step_kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    with torch.no_grad():
        tokens = ref._encode_prompt(image, "cpu", 1, True, None)  # [uncond; cond]
        sched.set_timesteps(steps)
        t_start = steps - min(int(steps * strength), steps)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(x0, randn_tensor(x0.shape, generator=gen), timesteps[:1].repeat(len(x0)))
        seen = []
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = ref.image_unet(inp, t, encoder_hidden_states=tokens).sample.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x, **step_kw).prev_sample
            if i % callback_steps == 0:
                seen.append((i // sched.order, int(t)))
    return x, seen


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the oracle's schedulers, under numpy 2)
@pytest.mark.parametrize("name,steps,strength,rule", [
    ("unipc", 20, 0.85, None), ("dpmpp_2m_karras", 8, 0.5, None), ("euler_a", 6, 0.75, None),
    ("lms", 6, 1.0, None), ("deis", 5, 0.2, None), ("heun_karras", 6, 0.5, None), ("dpm2_a", 6, 0.75, None),
    ("dpmpp_2s_sde", 8, 0.625, None), ("ddim", 6, 0.5, "diffusers")])
def test_init_latents_under_diffusers_rule(ours, folder, name, steps, strength, rule, check):
    """Any sampler that starts part-way takes init latents as diffusers' img2img pipelines do (strength_rule
    "diffusers", the default for all but DDIM, which takes it when asked): the latents equal the reference's
    parts run that way, within 1e-5 of their scale (fp32)."""
    image, x0 = random_image(50, (40, 56)), torch.randn(1, 4, 8, 8, generator=seeded(51))
    want, want_seen = diffusers_img2img(folder, name, image, x0, steps, strength, 5.0, seed=52, callback_steps=2)
    seen = []
    got = ours.image_variation(image, init_latents=x0, strength=strength, strength_rule=rule, scheduler=name,
                               num_inference_steps=steps, guidance_scale=5.0, generator=seeded(52),
                               output_type="latent", progress=False, callback_steps=2,
                               callback=lambda i, t, x: seen.append((i, int(t)))).images
    check(((got - want).abs().max() / want.abs().max()).item(), 1e-5, name)
    assert seen == want_seen  # the callback counts the steps run from 0, as diffusers' img2img loops do


@pytest.mark.parametrize("scheduler,start", [("ddim", False), ("ddim", True), ("heun", True), ("dpm2_a", False),
                                             ("unipc", True)])
def test_the_progress_bar_counts_every_model_call(pipe, monkeypatch, scheduler, start):
    bars = []

    class Bar:
        def __init__(self, total, disable, desc):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass
    monkeypatch.setattr(vd.pipeline, "tqdm", Bar)
    kw = dict(init_latents=torch.zeros(1, 4, 6, 5), strength=0.5) if start else {}
    pipe.text_to_image("a", num_inference_steps=6, scheduler=scheduler, output_type="latent", **kw)
    (bar,) = bars
    assert bar.n == bar.total == {"ddim": 3 if start else 6, "heun": 5, "dpm2_a": 11, "unipc": 3}[scheduler]


def test_strength_rules_differ_by_one_step_of_noise(pipe, captured):
    """With DDIM both rules run the same timesteps; the original's starts one grid step noisier."""
    x0 = torch.randn(1, 4, 6, 5, generator=seeded(53))
    kw = dict(init_latents=x0, strength=0.5, num_inference_steps=6, output_type="latent", progress=False)
    pipe.text_to_image("the cat", generator=seeded(54), **kw)
    pipe.text_to_image("the cat", generator=seeded(54), strength_rule="diffusers", **kw)
    original, diffusers = captured
    sampler = sampler_from_config("ddim", pipe.components.scheduler_config)
    ts, z = sampler.timesteps(6).tolist(), randn(x0.shape, seeded(54))
    assert original.sampling.t_enc == diffusers.sampling.t_enc == 3
    assert torch.equal(original.start, sampler.noised(x0, ts[2], z))  # (ts[2] = ts[3] + 1000 // 6)
    assert torch.equal(diffusers.start, sampler.noised(x0, ts[3], z))


def test_core_noised_start_names_a_rule_its_sampler_lacks():
    """The functional core checks little, but a misspelt rule or the original's with another sampler is an error,
    not a silent fallback."""
    x0 = torch.zeros(1, 4, 2, 2)
    for name, rule in (("ddim", "diffuser"), ("euler", "original")):
        sampler = sampler_from_config(name, {})
        with pytest.raises(ValueError, match=f"rule: expected one of .*got '{rule}' for {type(sampler).__name__}"):
            core.noised_start(sampler, x0, 4, 2, seeded(0), rule)


def test_init_image_is_its_encoded_latents(pipe):
    """An init image is VAE-encoded (one posterior draw per image from the generator, repeated for its samples),
    resized to the output size, then noised as init latents: the same draws in the same order."""
    img = random_image(22, (48, 40))
    kw = dict(num_images_per_prompt=2, strength=0.5, output_type="latent", **FAST)
    got = pipe.dual_guided("the cat", img, init_image=img, generator=seeded(23), **kw).images
    g = seeded(23)
    with torch.no_grad():
        x0 = core.encode_latents(pipe.components.vae, resized([img], 48, 40), g)
    want = pipe.dual_guided("the cat", img, init_latents=x0, generator=g, **kw).images
    assert got.shape == (2, 4, 6, 5) and torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the oracle's schedulers, under numpy 2)
@pytest.mark.parametrize("name,strength", [("euler", 0.5), ("unipc", 0.75), ("ddim", 0.5)])
def test_init_image_with_generator_lists_draws_as_diffusers_img2img(ours, folder, captured, name, strength, check):
    """Under diffusers' rule a list of generators draws one posterior sample per output, each from its own
    generator, then that generator's noise, as diffusers' img2img pipelines prepare their latents (the image
    repeated per output, each row encoded with generator i; the scheduler's add_noise at the first step run)."""
    from diffusers.utils.torch_utils import randn_tensor  # (the oracle; test-only)
    from sampler_table import EVERY

    img, n, steps = random_image(60, (48, 40)), 2, 6
    ours.text_to_image("the cat", init_image=img, strength=strength, strength_rule="diffusers", scheduler=name,
                       num_images_per_prompt=n, num_inference_steps=steps, generator=[seeded(61), seeded(62)],
                       output_type="latent", progress=False)
    ref = tp.reference("text_to_image", folder)
    cls, override = EVERY[name]
    sched = cls.from_config(ref.scheduler.config, **override)
    sched.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    gens = [seeded(61), seeded(62)]
    pixels = (2 * resized([img], 48, 40) - 1).repeat(n, 1, 1, 1)
    with torch.no_grad():
        x0 = torch.cat([ref.vae.encode(pixels[i:i + 1]).latent_dist.sample(gens[i]) for i in range(n)])
    x0 = ref.vae.config.scaling_factor * x0
    want = sched.add_noise(x0, randn_tensor(x0.shape, generator=gens), sched.timesteps[t_start * sched.order:][:1])
    (call,) = captured
    check(((call.start - want).abs().max() / want.abs().max()).item(), 1e-5, name)


def test_one_init_latent_serves_every_prompt(pipe):
    """init_latents with one row are every prompt's start, as one init image is."""
    x0 = torch.randn(1, 4, 6, 5, generator=seeded(40))
    kw = dict(num_images_per_prompt=2, strength=0.5, output_type="latent", **FAST)
    one = pipe.text_to_image(["a", "b"], init_latents=x0, generator=seeded(41), **kw).images
    per_prompt = pipe.text_to_image(["a", "b"], init_latents=x0.expand(2, -1, -1, -1), generator=seeded(41), **kw)
    assert one.shape == (4, 4, 6, 5) and torch.equal(one, per_prompt.images)


def test_init_image_sizes_each_dimension_not_given(pipe):
    """A 48 x 40 init image gives the output dimension that height or width leaves open (as init latents do),
    and is resized to the output size."""
    img = random_image(29, (48, 40))
    kw = dict(strength=0.5, output_type="latent", **FAST)
    assert pipe.text_to_image("the cat", width=32, init_image=img, generator=seeded(31), **kw).images.shape == (
        1, 4, 6, 4)
    assert pipe.text_to_image("the cat", height=32, init_image=img, generator=seeded(31), **kw).images.shape == (
        1, 4, 4, 5)


def test_latents_size_each_dimension_not_given(pipe):
    """Start latents [N, 4, h, w] give each output dimension (8 h x 8 w) that height or width leaves open: the
    images of the same call with the size given. A size given that disagrees with them is refused."""
    x = torch.randn(1, 4, 6, 5, generator=seeded(32))
    kw = dict(output_type="np", **FAST)
    sized = pipe.text_to_image("the cat", height=48, width=40, latents=x, **kw).images
    assert sized.shape == (1, 48, 40, 3)
    assert np.array_equal(pipe.text_to_image("the cat", latents=x, **kw).images, sized)
    assert np.array_equal(pipe.text_to_image("the cat", width=40, latents=x, **kw).images, sized)
    variation = pipe.image_variation(random_image(33), latents=x.expand(2, -1, -1, -1), num_images_per_prompt=2, **kw)
    assert variation.images.shape == (2, 48, 40, 3)
    with pytest.raises(ValueError, match=r"latents: expected a tensor of shape \[1, 4, 4, 5\], got a tensor of shape "
                                         r"\[1, 4, 6, 5\]"):
        pipe.text_to_image("the cat", height=32, latents=x, **kw)


def test_fidelity_is_init_image_at_one_minus_strength(pipe):
    img = random_image(24)
    kw = dict(output_type="latent", generator=None, **FAST)
    a = pipe.image_variation(img, fidelity=0.3, **{**kw, "generator": seeded(25)}).images
    b = pipe.image_variation(img, init_image=img, strength=0.7, **{**kw, "generator": seeded(25)}).images
    assert torch.equal(a, b)


def test_init_image_on_every_image_flow(pipe):
    img = random_image(26, (40, 40))
    kw = dict(init_image=img, strength=0.5, output_type="np", generator=seeded(27), **FAST)
    outs = [pipe.text_to_image("the cat", **kw).images, pipe.image_variation(img, **kw).images,
            pipe.dual_guided("the cat", img, **kw).images, pipe.blend([img, img], **kw).images]
    assert all(o.shape == (1, 40, 40, 3) and np.isfinite(o).all() for o in outs)


def test_fidelity_one_returns_the_input_at_its_size(pipe):
    """A 64 x 32 input comes back as it is (no squash to the default square); height and width still resize."""
    img = random_image(28, (64, 32))
    out = pipe.image_variation(img, fidelity=1.0, output_type="pil", **FAST).images[0]
    assert out.size == (32, 64) and np.array_equal(np.asarray(out), np.asarray(img))
    assert pipe.image_variation(img, fidelity=1.0, height=32, width=32, output_type="np", **FAST).images.shape == (
        1, 32, 32, 3)


# ---- image latents in and out

def test_encode_latents_is_what_init_image_encodes(pipe):
    """encode_latents draws what an init image draws: passing the same generator on to the flow gives init_image's
    result bit for bit (at the image's own size and at a given one)."""
    img = random_image(32, (52, 41))  # rounds down to 48 x 40, as an init image does
    kw = dict(num_images_per_prompt=2, strength=0.5, output_type="latent", **FAST)
    for size in ({}, dict(height=32, width=56)):
        want = pipe.text_to_image("the cat", init_image=img, generator=seeded(33), **size, **kw).images
        g = seeded(33)
        x0 = pipe.encode_latents(img, generator=g, **size)
        got = pipe.text_to_image("the cat", init_latents=x0, generator=g, **kw).images
        assert x0.shape == (1, 4, size.get("height", 48) // 8, size.get("width", 40) // 8)
        assert torch.equal(got, want)


def test_encode_latents_against_the_reference_vae(pipe, folder, check):
    """The posterior mean, and one draw per image from a generator list, as diffusers' AutoencoderKL gives them
    (scaled by the VAE's scaling factor): within 1e-5 of the output scale, fp32."""
    from diffusers import AutoencoderKL  # (the oracle; test-only)
    ref = AutoencoderKL.from_pretrained(folder / "vae").eval()
    images = [random_image(34, (40, 48)), random_image(35, (40, 48))]
    x = 2 * resized(images, 40, 48) - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean = ref.config.scaling_factor * dist.mean
        drawn = torch.cat([ref.config.scaling_factor * dist.mean[i:i + 1] + ref.config.scaling_factor *
                           dist.std[i:i + 1] * torch.randn(dist.mean[i:i + 1].shape, generator=seeded(36 + i))
                           for i in range(2)])
    got_mean = pipe.encode_latents(images, sample=False)
    got_drawn = pipe.encode_latents(images, generator=[seeded(36), seeded(37)])
    check(((got_mean - mean).abs().max() / mean.abs().max()).item(), 1e-5, "mean")
    check(((got_drawn - drawn).abs().max() / drawn.abs().max()).item(), 1e-5, "drawn")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the oracle's schedulers, under numpy 2)
def test_mindeye_start_from_encode_pixels(ours, folder, captured, check):
    """MindEye's start, written with the reference's parts as its loop does: the VAE fed CLIP-normalised pixels,
    `latent_dist.sample(g)` scaled, noise from the same generator, UniPC's add_noise at the first step run. The
    flow given `encode_pixels` of the same pixels as init_latents, with the same generator, starts there (1e-5 of
    the scale, fp32), as README's exact MindEye example does."""
    from diffusers import AutoencoderKL, UniPCMultistepScheduler  # (the oracle; test-only)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (resized([random_image(63, (48, 40))], 48, 40) - mean) / std
    tokens, steps, strength = torch.randn(1, 257, 16, generator=seeded(64)) * 0.1, 5, 0.85

    g = seeded(65)
    with torch.no_grad():
        x0 = core.encode_pixels(ours.components.vae, pixels, g)
    ours.image_variation(image_embeds=tokens, init_latents=x0, strength=strength, scheduler="unipc",
                         num_inference_steps=steps, generator=g, output_type="latent", progress=False)

    ref_vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    sched = UniPCMultistepScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[steps - int(steps * strength):]
    g = seeded(65)
    with torch.no_grad():
        want = ref_vae.config.scaling_factor * ref_vae.encode(pixels).latent_dist.sample(g)
    want = sched.add_noise(want, torch.randn(want.shape, generator=g), timesteps[:1])
    (call,) = captured
    check(((call.start - want).abs().max() / want.abs().max()).item(), 1e-5, "start")


def test_decode_latents_is_the_flows_decode(pipe, folder, check):
    """A flow's latent output decoded by decode_latents is the flow's own image output, bit for bit; and it is
    the reference pipeline's decode_latents of the same latents within 1e-5 (fp32)."""
    kw = dict(generator=None, **FAST)
    latents = pipe.text_to_image("the cat", output_type="latent", **{**kw, "generator": seeded(38)}).images
    for output_type in ("np", "pt"):
        want = pipe.text_to_image("the cat", output_type=output_type, **{**kw, "generator": seeded(38)}).images
        got = pipe.decode_latents(latents, output_type=output_type)
        assert type(got) is type(want) and got.shape == want.shape and (got == want).all()
    pil = pipe.decode_latents(latents)
    assert [np.asarray(p).tolist() for p in pil] == [
        np.asarray(p).tolist() for p in pipe.text_to_image("the cat", **{**kw, "generator": seeded(38)}).images]
    ref = tp.reference("text_to_image", folder)
    with pytest.warns(FutureWarning), torch.no_grad():  # deprecated in diffusers, still the reference's decode
        want = ref.decode_latents(latents.clone())
    check(float(np.abs(pipe.decode_latents(latents, output_type="np") - want).max()), 1e-5)


@pytest.mark.parametrize("call,error,words", [
    (lambda p: p.decode_latents(torch.zeros(1, 3, 4, 4)), ValueError, ["latents", "[1, 3, 4, 4]", "[1, 4, 4, 4]"]),
    (lambda p: p.decode_latents(torch.zeros(4, 4, 4)), ValueError, ["latents", "4 dimensions"]),
    (lambda p: p.decode_latents(torch.zeros(1, 4, 4, 4), output_type="latent"), ValueError,
     ["output_type", "'latent'"]),
    (lambda p: p.decode_latents(torch.full((1, 4, 4, 4), float("nan"))), ValueError, ["latents", "finite"]),
    (lambda p: p.encode_latents(random_image(1), sample="yes"), TypeError, ["sample", "'yes'"]),
    (lambda p: p.encode_latents(random_image(1), height=30), ValueError, ["height", "30", "multiple of 8"]),
    (lambda p: p.encode_latents([random_image(1), random_image(2)], generator=[seeded()]), ValueError,
     ["generator", "1 generator"]),
    (lambda p: p.encode_latents("cat.png"), TypeError, ["images", "'cat.png'"]),
])
def test_image_latents_bad_arguments(pipe, call, error, words):
    with pytest.raises(error) as e:
        call(pipe)
    assert all(w in str(e.value) for w in words), str(e.value)


# ---- DDIM inversion: image latents to the noise that regenerates them

@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ddim_inversion_against_the_reference(pipe, folder, guidance, check):
    """An image's latents (the posterior mean) inverted by a flow with scheduler="ddim_inverse", given as `latents=`
    with output_type="latent", as diffusers users invert (the reference pipeline with DDIMInverseScheduler swapped
    in), without and with guidance; then DDIM from that noise. Both within 1e-5 of the latents' scale (fp32)."""
    from diffusers import DDIMInverseScheduler  # (the oracle; test-only)
    x0 = pipe.encode_latents(random_image(40, (40, 56)), sample=False)
    kw = dict(prompt="the cat", num_inference_steps=6, guidance_scale=guidance, height=40, width=56,
              output_type="latent")
    ref = tp.reference("text_to_image", folder)
    ref.scheduler = DDIMInverseScheduler.from_config(ref.scheduler.config)
    want = ref(**kw, latents=x0.clone(), generator=seeded(41)).images
    noise = pipe.text_to_image(**kw, latents=x0, scheduler="ddim_inverse", generator=seeded(41),
                               progress=False).images
    check(((noise - want).abs().max() / want.abs().max()).item(), 1e-5, "inverted")
    want_back = tp.reference("text_to_image", folder)(**kw, latents=want.clone(), generator=seeded(42)).images
    back = pipe.text_to_image(**kw, latents=noise, generator=seeded(42), progress=False).images
    check(((back - want_back).abs().max() / want_back.abs().max()).item(), 1e-5, "regenerated")


# ---- text latents in and out

def test_text_latents_in_and_out(pipe):
    out = pipe.image_to_text(random_image(30), num_texts_per_prompt=2, generator=seeded(31), greedy=True, **FAST)
    assert pipe.decode_text(out.latents, greedy=True) == out.texts
    # given start latents, the generator gives only the step noise the original's DDIM draws (even at eta 0)
    sampled = pipe.image_to_text(random_image(30), latents=out.latents, num_texts_per_prompt=2, generator=seeded(32),
                                 **FAST)
    g = seeded(32)
    for _ in range(FAST["num_inference_steps"]):
        torch.randn(2, LATENT, 1, 1, generator=g)
    assert pipe.decode_text(sampled.latents, generator=g) == sampled.texts
    start = torch.randn(2, LATENT, generator=seeded(33))
    again = pipe.image_to_text(random_image(30), num_texts_per_prompt=2, latents=start, **FAST)
    z = pipe.encode_text_latents(["the cat", "a dog on a sofa"])
    assert z.shape == (2, 24) and torch.isfinite(z).all() and not torch.equal(again.latents, out.latents)
    greedy = pipe.decode_text(z, greedy=True, dedupe=False)
    assert len(greedy) == 2 and greedy == pipe.decode_text(z, greedy=True, dedupe=False)
    with pytest.raises(ValueError, match=r"latents: expected a tensor \[N, 24\]"):
        pipe.decode_text(torch.zeros(2, 5))
    for bad in (torch.zeros(2, LATENT, dtype=torch.long), torch.zeros(0, LATENT)):
        with pytest.raises(ValueError, match="latents: expected a non-empty floating-point tensor with 2 dim"):
            pipe.decode_text(bad)


def test_text_latent_parts_are_asked_for(folder):
    images_only = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], device="cpu")
    with pytest.raises(ValueError, match=r"tasks=\[\.\.\., 'encode_text_latents'\]"):
        images_only.encode_text_latents("the cat")
    with pytest.raises(ValueError, match="image_to_text"):
        images_only.decode_text(torch.zeros(1, LATENT))
    with pytest.raises(ValueError, match=r"tasks=\[\.\.\., 'image_variation'\]"):
        images_only.encode_image(random_image(1))
    text_only = VersatileDiffusion.from_pretrained(folder, tasks=["text_variation"], device="cpu")
    with pytest.raises(ValueError, match=r"tasks=\[\.\.\., 'text_to_image'\] to run encode_latents"):
        text_only.encode_latents(random_image(1))
    with pytest.raises(ValueError, match=r"tasks=\[\.\.\., 'text_to_image'\] to run decode_latents"):
        text_only.decode_latents(torch.zeros(1, 4, 4, 4))


# ---- gradients flow through the core

def test_gradients_reach_prompt_embeds_through_two_steps(pipe):
    """No forced no_grad in vd.sampling: a loss on the latents after two guided DDIM steps backpropagates to the
    text tokens (optimisation-based reconstruction does this)."""
    tokens = pipe.encode_prompt("the cat").clone().requires_grad_(True)
    uncond = pipe.encode_prompt("")
    c = pipe.components
    nets = core.Nets(image=c.image_unet, text=None, image_context=c.image_unet.context_layers(),
                     text_context=c.text_unet.context_layers())
    s = core.Sampling(sampler=sampler_from_config("ddim", c.scheduler_config), num_steps=2, guidance_scale=3.0)
    x = torch.randn(1, 4, 8, 8, generator=seeded(40))
    latents = core.text_to_image(nets, core.guided_tokens(tokens, uncond, s.guidance_scale), x, s)
    latents.square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0 and torch.isfinite(tokens.grad).all()
