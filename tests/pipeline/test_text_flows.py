"""image_to_text and text_variation on the tiny model, fp32 on CPU, against manual compositions of the text UNet,
the image UNet's time MLP, CLIP, DDIM and Optimus; their decoding options."""

import pytest
import torch

from flows import CPU, F32, FAST, LATENT, clip_image, clip_text
from helpers import random_image, seeded
from vd.conditioning import encode_image, uncond_pixel_values
from vd.nn import Context
from vd.optimus_tokenizers import remove_duplicate_word
from vd.sched import randn, sampler_from_config

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")


# ---- 6. the text flows against a manual composition

def _manual_text(pipe, contexts, total, steps, guidance, gens, latents=None, dedupe=True, **decoding):
    """DDIM over the text UNet (the image UNet's time MLP), CFG on [uncond, cond], then Optimus per latent, from
    the stream as the original leaves it: its DDIM draws every step's noise even at eta 0 (times 0)."""
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
    for _ in range(steps):
        randn((total, LATENT, 1, 1), gens, CPU, F32)
    per = gens if isinstance(gens, list) else [gens] * total
    texts = []
    for zi, g in zip(z, per):
        ids = c.optimus.generate(zi[None], tok.bos_id, tok.eos_id, generator=g, **decoding)[0]
        text = tok.decode(ids)
        texts.append(remove_duplicate_word(text) if dedupe else text)
    return texts, z


def _image_contexts(pipe, imgs, n):
    cond = clip_image(pipe, imgs, squash=True).repeat_interleave(n, dim=0)  # squashed via 512, as the app
    black = encode_image(pipe.components.image_encoder,
                         uncond_pixel_values(pipe.components.image_processor, "black")).expand(len(imgs), -1, -1)
    return [Context(pipe.components.image_unet.context_layers(), torch.cat([black.repeat_interleave(n, dim=0), cond]))]


def _text_contexts(pipe, texts, negatives, n, guidance=7.5):
    cond = clip_text(pipe, texts).repeat_interleave(n, dim=0)
    if guidance > 1:
        # "no text" is encoded once and shared, as the facade does: a batch of copies may round otherwise
        uncond = clip_text(pipe, negatives) if negatives else clip_text(pipe, [""]).expand(len(texts), -1, -1)
        uncond = uncond.repeat_interleave(n, dim=0)
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


def test_return_dict_false_gives_the_fields_as_a_tuple(pipe):
    """Every flow takes diffusers' return_dict: False gives the output's fields in order, the same values."""
    img = random_image(60)
    calls = {
        "image_to_text": lambda **kw: pipe.image_to_text(img, **kw),
        "text_variation": lambda **kw: pipe.text_variation("the cat", **kw),
        "blend": lambda **kw: pipe.blend([img, random_image(61)], output_type="pt", **kw),
        "fidelity 1": lambda **kw: pipe.image_variation(img, fidelity=1.0, output_type="pt", **kw),
    }
    for name, call in calls.items():
        out = call(generator=seeded(4), **FAST)
        got = call(generator=seeded(4), return_dict=False, **FAST)
        fields = (out.texts, out.latents) if hasattr(out, "texts") else (out.images,)
        assert type(got) is tuple and len(got) == len(fields), name
        for a, b in zip(got, fields):
            assert a == b if isinstance(a, list) else torch.equal(a, b), name
        assert all(out[i] is field for i, field in enumerate(fields)), name  # and out[i] is field i
