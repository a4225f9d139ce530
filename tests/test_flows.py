"""The facade's newer flows on the tiny model, fp32 on CPU: blend, image variation with focus / fidelity / colour
matching, image-to-text and text variation, checked against manual compositions of the building blocks
(vd.conditioning, vd.focus, vd.colors, vd.sched, the UNets and Optimus). Also lean loading for the text flows,
the same text outputs from every checkpoint layout, and argument errors raised before any model runs."""

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tp
from helpers import random_image, seeded
from vd import VersatileDiffusion
from vd.colors import match_colors
from vd.conditioning import encode_image, encode_text, mask_token_weights, pixel_values, uncond_pixel_values
from vd.focus import adjust_focus
from vd.loading import load_components
from vd.nn import Context
from vd import sampling as core
from vd.pipeline import DEFAULT_TASKS
from vd.sched import randn, sampler_from_config
from vd.tasks import TASK_PARTS
from vd.optimus_tokenizers import remove_duplicate_word
from weights_convert import open_checkpoint
from weights_convert.convert import convert

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")
CPU, F32 = torch.device("cpu"), torch.float32
ALL_TASKS = ["text_to_image", "image_variation", "dual_guided", "blend", "image_to_text", "text_variation"]
TEXT_TASKS = ["image_to_text", "text_variation"]
LATENT = tp.OPTIMUS.latent_dim  # 24: the tiny text UNet's features
FAST = dict(num_inference_steps=2, progress=False)


# ---- fixtures and helpers

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")


@pytest.fixture(scope="module")
def pipe(folder):
    return VersatileDiffusion.from_pretrained(folder, tasks=ALL_TASKS, device="cpu")


def _same_layers(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.fixture
def captured(monkeypatch):
    """Every call of the core's loop (vd.sampling.denoise): its denoiser, streams, start and skip (it still runs)."""
    calls = []
    original = core.denoise

    def spy(denoiser, streams, x, s):
        skip = 0 if s.t_enc is None else s.num_steps - s.t_enc
        calls.append(SimpleNamespace(denoise=denoiser, streams=streams, start=x, skip=skip, sampling=s))
        return original(denoiser, streams, x, s)

    monkeypatch.setattr(core, "denoise", spy)
    return calls


class Counting:
    """Wraps a denoiser and records the timestep of every call."""

    def __init__(self, inner):
        self.inner, self.ts = inner, []

    def __call__(self, x, t, streams):
        self.ts.append(int(t))
        return self.inner(x, t, streams)


def _clip_image(pipe, imgs, *, square=False, keep=None) -> torch.Tensor:
    pixels = pixel_values(pipe.components.image_processor, imgs, square=square)
    tw = None
    if keep is not None:
        tw = mask_token_weights(keep, pipe.components.image_encoder.config.patch_size, pixels.shape[-1])
    return encode_image(pipe.components.image_encoder, pixels, token_weights=tw)


def _clip_text(pipe, texts) -> torch.Tensor:
    return encode_text(pipe.components.text_encoder, pipe.components.tokenizer, texts, CPU)


# ---- 1. blend of one image equals dual-guided / image variation with zero "no image"

@pytest.mark.parametrize("s", [0.3, 1.0])
def test_blend_one_image_with_text_is_dual_guided(pipe, s):
    img = random_image(1, (48, 48))  # square: the blend's squash and the crop agree
    got = pipe.blend([img], prompt="the cat", text_strength=s, generator=seeded(2), output_type="np", **FAST).images
    want = pipe.dual_guided("the cat", img, s, uncond_image="zeros", generator=seeded(2), output_type="np",
                            **FAST).images
    assert np.array_equal(got, want)


def test_blend_one_image_is_image_variation(pipe):
    img = random_image(2, (40, 40))
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
    """What a blend mask means: keep = 1 - mask, [1, 1, H, W]."""
    if mask is None:
        return None
    if isinstance(mask, PIL.Image.Image):
        m = torch.from_numpy(np.asarray(mask)[..., 0].copy()).float() / 255
    else:
        m = mask.float()
    return (1 - m).reshape(1, 1, *m.shape[-2:])


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
        tokens = _clip_image(pipe, [img], square=True, keep=_keep_of(masks[i] if masks else None))
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
    assert _same_layers(image.layers, pipe.components.image_unet.context_layers())
    assert torch.equal(image.tokens, image_want)
    s = cfg["text_strength"]
    assert image.weight == (1.0 - s if use_text else 1.0)
    if use_text:
        text = call.streams[0]
        assert _same_layers(text.layers, pipe.components.text_unet.context_layers())
        assert text.weight == s
        want = _clip_text(pipe, [cfg["prompt"]]).repeat_interleave(n, dim=0)
        if cfg_on:
            want = torch.cat([_clip_text(pipe, [""]).repeat_interleave(n, dim=0), want])
        assert torch.equal(text.tokens, want)
    if masks is not None:  # the masks really count: an unmasked encoding differs
        i = next(i for i, m in enumerate(masks) if m is not None)
        masked = _clip_image(pipe, [imgs[i]], square=True, keep=_keep_of(masks[i]))
        assert not torch.allclose(masked, _clip_image(pipe, [imgs[i]], square=True), atol=1e-3)


def test_blend_focus_with_a_generator_list(pipe, captured):
    """A list of generators (one per sample): every image's focus draws from the first sample's generator."""
    imgs = [random_image(20, (48, 48)), random_image(21, (40, 56))]
    pipe.blend(imgs, focus=[0.2, 0.8], num_images_per_prompt=2, generator=[seeded(6), seeded(7)], output_type="latent",
               **FAST)
    g = seeded(6)
    want = torch.cat([adjust_focus(_clip_image(pipe, [im], square=True), f, generator=g)
                      for im, f in zip(imgs, (0.2, 0.8))], dim=1).repeat_interleave(2, dim=0)
    assert torch.equal(captured[0].streams[0].tokens[2:], want)


# ---- 3. image variation's focus

def test_image_variation_focus_tokens(pipe, captured):
    imgs = [random_image(30), random_image(31, (48, 48))]
    gens = [seeded(s) for s in (1, 2, 3, 4)]  # 2 images x 2 samples; image i uses the generator of its first sample
    pipe.image_variation(imgs, focus=0.2, num_images_per_prompt=2, generator=gens, output_type="latent", **FAST)
    pipe.image_variation(imgs[0], focus=0.8, generator=seeded(5), output_type="latent", **FAST)
    pipe.image_variation(imgs[0], focus=0.5, generator=seeded(5), output_type="latent", **FAST)
    plain = _clip_image(pipe, imgs)
    grey = encode_image(pipe.components.image_encoder, uncond_pixel_values(pipe.components.image_processor, "grey", 2))

    tokens = captured[0].streams[0].tokens
    want = torch.cat([adjust_focus(plain[:1], 0.2, generator=seeded(1)),
                      adjust_focus(plain[1:], 0.2, generator=seeded(3))])
    assert torch.equal(tokens[4:], want.repeat_interleave(2, dim=0))
    assert torch.equal(tokens[:4], grey.repeat_interleave(2, dim=0))  # "no image" is not focus-adjusted
    assert not torch.allclose(tokens[4:], plain.repeat_interleave(2, dim=0), atol=1e-3)

    one = _clip_image(pipe, imgs[:1])  # encoded alone, as the call does (a batch may round differently)
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
    grey = encode_image(pipe.components.image_encoder, uncond_pixel_values(pipe.components.image_processor, "grey", 1))
    return [Context(pipe.components.image_unet.context_layers(), torch.cat([grey, _clip_image(pipe, [img])]))]


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
    assert counter.ts == ts[skip:].tolist() and seen == list(range(skip, steps))

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


# ---- 6. the text flows against a manual composition

def _manual_text(pipe, contexts, total, steps, guidance, gens, latents=None, dedupe=True, **decoding):
    """DDIM over the text UNet (the image UNet's time MLP), CFG on [uncond, cond], then Optimus per latent."""
    c, tok = pipe.components, pipe.components.optimus_tokenizer
    sampler = sampler_from_config("ddim", c.scheduler_config)
    if latents is None:
        x = randn((total, LATENT, 1, 1), gens, CPU, F32)
    else:
        x = latents.reshape(total, LATENT, 1, 1)

    def eps(x, t):
        if guidance <= 1:
            return c.text_unet(x, t, contexts, time_embedding=c.image_unet.time_embedding)
        u, v = c.text_unet(torch.cat([x, x]), t, contexts, time_embedding=c.image_unet.time_embedding).chunk(2)
        return u + guidance * (v - u)

    with torch.no_grad():
        z = sampler.sample(eps, x, steps, generator=gens).flatten(1)
    per = gens if isinstance(gens, list) else [gens] * total
    texts = []
    for zi, g in zip(z, per):
        ids = c.optimus.generate(zi[None], tok.bos_id, tok.eos_id, generator=g, **decoding)[0]
        text = tok.decode(ids)
        texts.append(remove_duplicate_word(text) if dedupe else text)
    return texts, z


def _image_contexts(pipe, imgs, n):
    cond = _clip_image(pipe, imgs).repeat_interleave(n, dim=0)
    black = encode_image(pipe.components.image_encoder,
                         uncond_pixel_values(pipe.components.image_processor, "black", len(imgs)))
    return [Context(pipe.components.image_unet.context_layers(), torch.cat([black.repeat_interleave(n, dim=0), cond]))]


def _text_contexts(pipe, texts, negatives, n, guidance=7.5):
    cond = _clip_text(pipe, texts).repeat_interleave(n, dim=0)
    if guidance > 1:
        uncond = _clip_text(pipe, negatives or [""] * len(texts)).repeat_interleave(n, dim=0)
        cond = torch.cat([uncond, cond])
    return [Context(pipe.components.text_unet.context_layers(), cond)]


I2T_CASES = {
    "default": dict(imgs=[random_image(60)], n=1, steps=2),
    "two_images_x2": dict(imgs=[random_image(61), random_image(62, (48, 48))], n=2, steps=3),
    "no_dedupe": dict(imgs=[random_image(60)], n=1, steps=2, decoding=dict(dedupe=False)),
    "greedy": dict(imgs=[random_image(60)], n=2, steps=2, decoding=dict(greedy=True)),
    "greedy_repeats": dict(imgs=[random_image(60)], n=1, steps=2, seed=2, decoding=dict(greedy=True)),  # "re re ..."
    "greedy_repeats_raw": dict(imgs=[random_image(60)], n=1, steps=2, seed=2, decoding=dict(greedy=True, dedupe=False)),
    "filtered": dict(imgs=[random_image(63)], n=1, steps=2, decoding=dict(temperature=0.7, top_k=20, top_p=0.9,
                                                                     max_length=12)),
    "generator_list": dict(imgs=[random_image(61), random_image(62)], n=1, steps=2, gens=[9, 10]),
    "given_latents": dict(imgs=[random_image(60)], n=2, steps=2, latents=True),
}


@pytest.mark.parametrize("case", list(I2T_CASES))
def test_image_to_text_is_the_manual_composition(case, pipe):
    cfg = I2T_CASES[case]
    imgs, n, steps, decoding = cfg["imgs"], cfg["n"], cfg["steps"], cfg.get("decoding", {})
    total = len(imgs) * n
    gens = (lambda: [seeded(s) for s in cfg["gens"]]) if "gens" in cfg else (lambda: seeded(cfg.get("seed", 7)))
    latents = torch.randn(total, LATENT, generator=seeded(99)) if cfg.get("latents") else None
    out = pipe.image_to_text(imgs if len(imgs) > 1 else imgs[0], num_inference_steps=steps,
                             num_texts_per_prompt=n, generator=gens(), latents=latents, progress=False, **decoding)
    texts, z = _manual_text(pipe, _image_contexts(pipe, imgs, n), total, steps, 7.5, gens(), latents, **decoding)
    assert out.latents.shape == (total, LATENT) and len(out.texts) == total
    assert torch.equal(out.latents, z)
    assert out.texts == texts
    assert all(isinstance(t, str) and "\n" not in t for t in out.texts)


def test_text_options_make_a_difference(pipe):
    """dedupe, greedy and the given latents each change what comes out (so the cases above can fail)."""
    img = random_image(60)

    def run(seed=7, **kw):
        return pipe.image_to_text(img, generator=seeded(seed), **FAST, **kw)

    base, raw, greedy = run(), run(dedupe=False), run(greedy=True)
    tok = pipe.components.optimus_tokenizer
    assert torch.equal(base.latents, raw.latents) and torch.equal(base.latents, greedy.latents)
    assert base.texts == [remove_duplicate_word(t) for t in raw.texts]
    looping, looping_raw = run(seed=2, greedy=True), run(seed=2, greedy=True, dedupe=False)
    # greedy decoding of the tiny model loops ("re re re ..."): dedupe collapses the repeats
    assert looping.texts == [remove_duplicate_word(looping_raw.texts[0])] and looping.texts != looping_raw.texts
    ids = pipe.components.optimus.generate(base.latents, tok.bos_id, tok.eos_id, greedy=True)
    assert greedy.texts == [remove_duplicate_word(tok.decode(i)) for i in ids]
    assert greedy.texts != base.texts
    assert run(seed=8, greedy=True).latents.ne(greedy.latents).any()


T2T_CASES = {
    "default": dict(prompt="the cat", negative=None, n=1, steps=2),
    "batch_negative_x2": dict(prompt=["the cat", "a dog running"], negative=["rain", "the"], n=2, steps=2),
    "no_cfg": dict(prompt="the cat", negative=None, n=1, steps=2, guidance=1.0),
    "greedy_no_dedupe": dict(prompt="a red house", negative="the", n=2, steps=3,
                             decoding=dict(greedy=True, dedupe=False)),
    "generator_list_latents": dict(prompt=["the cat", "on"], negative=None, n=1, steps=2, gens=[3, 4],
                                   latents=True),
}


@pytest.mark.parametrize("case", list(T2T_CASES))
def test_text_variation_is_the_manual_composition(case, pipe):
    cfg = T2T_CASES[case]
    texts_in = [cfg["prompt"]] if isinstance(cfg["prompt"], str) else cfg["prompt"]
    negatives = None if cfg["negative"] is None else (
        [cfg["negative"]] if isinstance(cfg["negative"], str) else cfg["negative"])
    n, steps, guidance, decoding = cfg["n"], cfg["steps"], cfg.get("guidance", 7.5), cfg.get("decoding", {})
    total = len(texts_in) * n
    gens = (lambda: [seeded(s) for s in cfg["gens"]]) if "gens" in cfg else (lambda: seeded(11))
    latents = torch.randn(total, LATENT, generator=seeded(98)) if cfg.get("latents") else None
    out = pipe.text_variation(cfg["prompt"], negative_prompt=cfg["negative"], num_inference_steps=steps,
                              guidance_scale=guidance, num_texts_per_prompt=n, generator=gens(), latents=latents,
                              progress=False, **decoding)
    contexts = _text_contexts(pipe, texts_in, negatives, n, guidance)
    texts, z = _manual_text(pipe, contexts, total, steps, guidance, gens(), latents, **decoding)
    assert out.latents.shape == (total, LATENT)
    assert torch.equal(out.latents, z)
    assert out.texts == texts


def test_text_variation_negative_prompt_counts(pipe):
    a = pipe.text_variation("the cat", generator=seeded(0), **FAST)
    b = pipe.text_variation("the cat", negative_prompt="rain", generator=seeded(0), **FAST)
    assert not torch.equal(a.latents, b.latents)


# ---- 7. lean loading for the text flows

def test_image_to_text_loads_only_its_parts(folder, pipe, loaded_parts):
    lean = VersatileDiffusion.from_pretrained(folder, tasks=["image_to_text"], device="cpu")
    assert sorted(loaded_parts) == sorted(TASK_PARTS["image_to_text"])
    c = lean.components
    assert c.vae is None and c.text_encoder is None and c.tokenizer is None
    text_unet = dict(c.text_unet.named_parameters())
    assert "conv_in.weight" in text_unet and not any(".attentions." in k for k in text_unet)
    assert not hasattr(c.text_unet, "time_embedding")
    image_unet = dict(c.image_unet.named_parameters())
    assert all(k.startswith("time_embedding.") or ".attentions." in k for k in image_unet)
    assert any(".attentions." in k for k in image_unet) and "conv_in.weight" not in image_unet
    assert c.optimus.parts == {"decoder"} and not hasattr(c.optimus, "encoder")
    assert c.optimus_tokenizer is not None and c.image_encoder is not None
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'text_to_image'\]"):
        lean.text_to_image("the cat", **FAST)
    with pytest.raises(ValueError, match="text_variation"):
        lean.text_variation("the cat", **FAST)
    img = random_image(70)
    a = lean.image_to_text(img, generator=seeded(0), **FAST)
    b = pipe.image_to_text(img, generator=seeded(0), **FAST)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts


def test_text_variation_loads_only_its_parts(folder, pipe, loaded_parts):
    lean = VersatileDiffusion.from_pretrained(folder, tasks=["text_variation"], device="cpu")
    assert sorted(loaded_parts) == sorted(TASK_PARTS["text_variation"])
    c = lean.components
    assert c.vae is None and c.image_encoder is None and c.image_processor is None
    assert set(dict(c.image_unet.named_parameters())) == {k for k, _ in pipe.components.image_unet.named_parameters()
                                                          if k.startswith("time_embedding.")}
    assert c.optimus.parts == {"decoder"}
    a = lean.text_variation("the cat", generator=seeded(0), **FAST)
    b = pipe.text_variation("the cat", generator=seeded(0), **FAST)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts


def test_default_tasks_leave_the_text_flows_out(folder, loaded_parts):
    plain = VersatileDiffusion.from_pretrained(folder, device="cpu")
    assert plain.tasks == DEFAULT_TASKS and not set(TEXT_TASKS) & set(plain.tasks)
    assert not any(p.startswith("optimus") or p == "text_unet.data" for p in loaded_parts)
    assert plain.components.optimus is None and plain.text_eps is None
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'image_to_text'\]"):
        plain.image_to_text(random_image(71), **FAST)
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'text_variation'\]"):
        plain.text_variation("the cat", **FAST)


# ---- 8. every checkpoint layout gives the same text outputs

@pytest.fixture(scope="module")
def layouts(folder, tmp_path_factory):
    """The tiny model as a .bin diffusers folder and in both original layouts (configs for the originals)."""
    from diffusers import VersatileDiffusionPipeline
    root = tmp_path_factory.mktemp("layouts")
    binary = root / "bin"
    VersatileDiffusionPipeline(**copy.deepcopy(tp.build_components(seed=0))).save_pretrained(
        binary, safe_serialization=False)
    tp.write_optimus(binary / "pretrained_pth", 4)  # the same Optimus as tp.save's
    tp.write_optimus_tokenizer(binary / "optimus_tokenizer")
    for c in ("text_encoder", "image_encoder"):  # transformers may write safetensors regardless
        f = binary / c / "model.safetensors"
        if f.is_file():
            torch.save(load_file(f), binary / c / "pytorch_model.bin")
            f.unlink()
    assert not list(binary.rglob("*.safetensors"))
    (root / "deprecated").mkdir()
    originals = tp.write_originals(folder, root / "hub_repo" / "vd", root / "deprecated")
    return {"bin": binary, **originals}


def _text_outputs(p: VersatileDiffusion):
    # Weights read from different files sit at different memory alignments (a memory-mapped safetensors tensor
    # starts wherever its offset falls), and CPU matmul kernels round differently for different alignments. Copy
    # every weight into a fresh allocation first, so bit-equal outputs mean bit-equal weights.
    c = p.components
    for part in (c.image_unet, c.text_unet, c.text_encoder, c.image_encoder, c.optimus):
        for w in part.parameters():
            w.data = w.data.clone()
    a = p.image_to_text(random_image(80), generator=seeded(0), **FAST)
    b = p.text_variation("the cat", num_texts_per_prompt=2, generator=seeded(1), **FAST)
    return a.latents, a.texts, b.latents, b.texts


@pytest.fixture(scope="module")
def expected_text(pipe):
    return _text_outputs(pipe)


def _same(got, want):
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert torch.equal(got[2], want[2]) and got[3] == want[3]


def _from_checkpoint(ckpt) -> VersatileDiffusion:
    return VersatileDiffusion(load_components(ckpt, TEXT_TASKS, CPU, F32), tasks=tuple(TEXT_TASKS), device=CPU,
                              dtype=F32)


def test_bin_folder(layouts, expected_text):
    bin_pipe = VersatileDiffusion.from_pretrained(layouts["bin"], tasks=TEXT_TASKS, device="cpu")
    _same(_text_outputs(bin_pipe), expected_text)


def test_current_original_layout(layouts, expected_text):
    """vd-four-flow-v1-0.pth with optimus-vae.pth beside it in pretrained_pth/, the tokenizer folder in the repo."""
    ckpt = open_checkpoint(layouts["current"], configs=layouts["configs"])
    assert {s.file.path.name for s in ckpt.sources["optimus.decoder"].values()} == {"optimus-vae.pth"}
    assert ckpt.optimus_tokenizer.name == "optimus_tokenizer"
    _same(_text_outputs(_from_checkpoint(ckpt)), expected_text)


def test_deprecated_original_layout(layouts, folder, expected_text):
    """vd-four-flow-v1-0-deprecated.pth holds Optimus under optimus.*; the tokenizers come from elsewhere."""
    ckpt = open_checkpoint(layouts["deprecated"], configs=layouts["configs"], clip=folder,
                           optimus_tokenizer=folder / "optimus_tokenizer")
    assert {s.file.path for s in ckpt.sources["optimus.decoder"].values()} == {layouts["deprecated"]}
    _same(_text_outputs(_from_checkpoint(ckpt)), expected_text)


@pytest.mark.parametrize("layout", ["current", "deprecated", "safetensors"])
def test_converted_folder(layout, layouts, folder, expected_text, tmp_path):
    src = folder if layout == "safetensors" else layouts[layout]
    kw = {} if layout == "safetensors" else dict(configs=layouts["configs"], clip=folder)
    if layout == "deprecated":
        kw["optimus_tokenizer"] = folder / "optimus_tokenizer"
    out = convert(src, tmp_path / "out", **kw)
    for name in ("vocab.txt", "vocab.json", "merges.txt"):  # the converted folder carries the tokenizer files
        assert (out / "optimus_tokenizer" / name).read_bytes() == (folder / "optimus_tokenizer" / name).read_bytes()
    moved = tmp_path / "moved"  # self-contained: nothing points back at the source
    shutil.move(out, moved)
    _same(_text_outputs(VersatileDiffusion.from_pretrained(moved, tasks=TEXT_TASKS, device="cpu")), expected_text)


# ---- 9. argument errors, before any model runs

@pytest.fixture
def no_model_runs(pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")
    c = pipe.components
    for m in (c.image_unet, c.text_unet, c.vae, c.text_encoder, c.image_encoder, c.optimus,
              c.image_encoder.vision_model.embeddings):
        monkeypatch.setattr(m, "forward", boom)
    monkeypatch.setattr(c.optimus, "generate", boom)
    for name in ("encode_image", "encode_text", "adjust_focus"):
        monkeypatch.setattr(f"vd.pipeline.{name}", boom)
    return pipe


IMG = random_image(90, (32, 32))
TWO = [IMG, random_image(91, (32, 48))]
ERRORS = [
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
    ("blend", dict(images=TWO, masks=[None, torch.zeros(2, 8, 8)]), ValueError, ["masks[1]", "(2, 8, 8)"]),
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
    ("image_to_text", dict(image=IMG, temperature=-1.0), ValueError, ["temperature", "-1.0"]),
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
]


@pytest.mark.parametrize("task,kwargs,error,words", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_argument(no_model_runs, task, kwargs, error, words):
    with pytest.raises(error) as info:
        getattr(no_model_runs, task)(**{**FAST, **kwargs})
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
