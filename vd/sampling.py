"""The functional core: every VD flow in a few lines over tensors.

A flow runs the *data* layers of the output's UNet (its noise predictor, eps) with the *context* layers of each
condition's UNet (a `Context` stream: layers, tokens, weight), inside a sampler loop with classifier-free guidance:

    text_to_image    image eps + [text context]
    image_variation  image eps + [image context]
    dual_guided      image eps + [text context (weight s), image context (weight 1 - s)]
    blend            image variation (or dual guidance) on several images' weighted tokens side by side
    image_to_text    text eps  + [image context]
    text_variation   text eps  + [text context]

Conventions. A guided run's tokens are [uncond; cond] along the batch axis (`guided_tokens`), and the sample
runs through the noise predictor twice in one batch. Image latents are the VAE's latents times its scaling factor;
text latents are Optimus latents [N, 768], which the text UNet sees as [N, 768, 1, 1].

Nothing here checks arguments beyond what torch does, touches PIL or strings, or turns off autograd: a caller
may differentiate through sampling. `vd.pipeline.VersatileDiffusion` is the checked, convenient front end.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vd.nn import AutoencoderKL, Context
from vd.sched import DDIM, randn

EpsModel = Callable[[Tensor, Tensor, Sequence[Context]], Tensor]  # (x, t, streams) -> predicted noise
EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> guided model output
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, t, x) after each step
Generator = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class Nets:
    """What the flows run. `image` and `text` predict the noise of image and text latents (the data layers of that
    UNet, both with the image UNet's timestep MLP, as VD shares it); `image_context` and `text_context` are the context
    layers that attend to image and text tokens. A part the loaded tasks do not need is None."""

    image: EpsModel | None
    text: EpsModel | None
    image_context: Sequence[nn.Module] | None
    text_context: Sequence[nn.Module] | None


STRENGTH_RULES = ("original", "diffusers")  # where init latents are noised to: see `noised_start`
DEFAULT_STRENGTH = 0.75  # Brain-Diffuser's, and close to img2img's usual 0.8


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """One sampler loop: `sampler` (a vd.sched sampler) run for `num_steps`, classifier-free guidance above a
    `guidance_scale` of 1, DDIM's `eta`, the noise `generator` (one, or one per sample), and `t_enc`: None to
    start from noise, or the number of steps left when starting from init latents noised by `noised_start` under
    `strength_rule`; `callback` runs after each step."""

    sampler: object
    num_steps: int
    guidance_scale: float = 7.5
    eta: float = 0.0
    generator: Generator = None
    t_enc: int | None = None
    strength_rule: str = "original"
    callback: Callback | None = None

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scale)


# ---- the flows

def text_to_image(nets: Nets, text: Tensor, x: Tensor, s: Sampling) -> Tensor:
    """Image latents from text tokens [B, 77, D] ([uncond; cond] when guided)."""
    return denoise(nets.image, [Context(nets.text_context, text)], x, s)


def image_variation(nets: Nets, image: Tensor, x: Tensor, s: Sampling) -> Tensor:
    """Image latents from image tokens [B, 257, D] (or several images' tokens side by side, `blend_tokens`)."""
    return denoise(nets.image, [Context(nets.image_context, image)], x, s)


def dual_guided(nets: Nets, text: Tensor, image: Tensor, text_weight: float, x: Tensor, s: Sampling) -> Tensor:
    """Image latents from a text and an image: at every context layer the text stream weighs `text_weight` and
    the image stream the rest (the original's `mixed_ratio` is the image's weight)."""
    streams = [Context(nets.text_context, text, text_weight), Context(nets.image_context, image, 1.0 - text_weight)]
    return denoise(nets.image, streams, x, s)


def image_to_text(nets: Nets, image: Tensor, x: Tensor, s: Sampling) -> Tensor:
    """Text latents [N, 768, 1, 1] from image tokens."""
    return denoise(nets.text, [Context(nets.image_context, image)], x, s)


def text_variation(nets: Nets, text: Tensor, x: Tensor, s: Sampling) -> Tensor:
    """Text latents [N, 768, 1, 1] from text tokens."""
    return denoise(nets.text, [Context(nets.text_context, text)], x, s)


def blend_tokens(tokens: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Several images' tokens [B, 257, D], each scaled by its weight, side by side [B, 257 k, D]: the context
    layers attend over all of them at once (the original app's multi-image context)."""
    return torch.cat([t * w for t, w in zip(tokens, weights)], dim=1)


# ---- the loop

def denoise(model: EpsModel, streams: Sequence[Context], x: Tensor, s: Sampling) -> Tensor:
    """Run `s`'s sampler from x (unit noise, or noised init latents when s.t_enc is set) with guidance. The
    streams' keys and values are computed here, once, rather than at every step."""
    eps = guided(model, [c.with_keys_values() for c in streams], s.guidance_scale)
    return sample(s.sampler, eps, x, s.num_steps, t_enc=s.t_enc, generator=s.generator, eta=s.eta,
                  callback=s.callback)


def guided(model: EpsModel, streams: Sequence[Context], guidance_scale: float) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps = u + g (c - u), u and c from one batch [x; x]."""
    if not is_guided(guidance_scale):
        return lambda x, t: model(x, t, streams)

    def eps(x: Tensor, t: Tensor) -> Tensor:
        uncond, cond = model(torch.cat([x, x]), t, streams).chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return eps


def is_guided(guidance_scale: float) -> bool:
    """As the reference: a scale of 1 or less runs the conditional half alone, without guidance."""
    return guidance_scale > 1.0


def guided_tokens(cond: Tensor, uncond: Tensor | None, guidance_scale: float) -> Tensor:
    """[uncond; cond] for a guided run, else cond alone."""
    return torch.cat([uncond, cond]) if is_guided(guidance_scale) else cond


def sample(sampler, eps_fn: EpsFn, x: Tensor, num_steps: int, *, t_enc: int | None = None,
           generator: Generator = None, eta: float = 0.0, callback: Callback | None = None) -> Tensor:
    """The sampler's loop from x. With `t_enc`, x is init latents noised by `noised_start(..., t_enc, ...)` and
    only the t_enc least noisy steps run (none for t_enc = 0): the original's `decode_dc(t_start=t_enc)`, or the
    last t_enc steps of diffusers' img2img pipelines."""
    extra = {} if t_enc is None else {"skip": max(num_steps - t_enc, 0)}
    return sampler.sample(eps_fn, x, num_steps, generator=generator, eta=eta, callback=callback, **extra)


def start_step(strength: float, num_steps: int) -> int:
    """t_enc, the steps left to run for an init image at `strength` in [0, 1]: int(strength * num_steps), as the
    original (0.75 x 50 gives 37)."""
    return int(strength * num_steps)


def noised_start(sampler, x0: Tensor, num_steps: int, t_enc: int, generator: Generator = None,
                 rule: str = "original") -> Tensor:
    """Init latents x0 noised for `sample(..., t_enc=t_enc)`, with one draw z from `generator` (one per sample
    with a list).

    rule "original" (DDIM only): sqrt(a) x0 + sqrt(1 - a) z with a = alpha_bar at the ascending timestep grid's
    entry t_enc (the original's `stochastic_encode`). That level is one grid step noisier than the first step
    then denoised, as in the original. For t_enc = num_steps (strength 1) it is the grid's next entry,
    num_steps * (T // num_steps) + offset for VD's "leading" grid, which the original's grid has when T (1000) is
    not a multiple of num_steps; where that is not below T (the original fails there), the last trained timestep
    T - 1.

    rule "diffusers" (every sampler that starts part-way): the level of the first step then run, by the sampler's
    own `noised_to_step` (diffusers' `add_noise`), as diffusers' img2img pipelines and loops built on them (e.g.
    MindEye's) start."""
    if rule not in STRENGTH_RULES or (rule == "original" and not isinstance(sampler, DDIM)):
        raise ValueError(f"rule: expected one of {STRENGTH_RULES} ('original' with DDIM only), got {rule!r} for "
                         f"{type(sampler).__name__}")
    z = randn(x0.shape, generator, x0.device, x0.dtype)
    if rule == "diffusers":
        return sampler.noised_to_step(x0, z, num_steps, max(num_steps - t_enc, 0))
    grid = sampler.timesteps(num_steps).flip(0).tolist()  # ascending
    t_max = sampler.num_train_timesteps - 1
    t = grid[t_enc] if t_enc < len(grid) else min(grid[-1] + sampler.num_train_timesteps // num_steps, t_max)
    return sampler.noised(x0, int(t), z)


# ---- the VAE

def encode_latents(vae: AutoencoderKL, images: Tensor, generator: Generator = None, sample: bool = True) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] -> scaled latents, in the VAE's dtype: one posterior sample per image (drawn
    from `generator`), or with `sample=False` the posterior mean."""
    return encode_pixels(vae, 2 * images - 1, generator, sample)


def encode_pixels(vae: AutoencoderKL, pixels: Tensor, generator: Generator = None, sample: bool = True) -> Tensor:
    """`encode_latents` of pixels as the VAE takes them (images mapped to [-1, 1]), for loops that feed it
    something else: MindEye encodes its blurry pictures normalised with CLIP's mean and std."""
    post = vae.encode(pixels.to(_dtype(vae)))
    if not sample:
        return vae.config.scaling_factor * post.mean
    z = randn(post.mean.shape, generator, post.mean.device, post.mean.dtype)
    return vae.config.scaling_factor * (post.mean + post.std * z)


def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Scaled latents -> images [N, 3, H, W], roughly in [0, 1] (clamp them to show them), in the VAE's dtype:
    diffusers maps them to [0, 1] in that dtype too, so an fp16 pipeline's pictures round as the reference's."""
    images = vae.decode((latents / vae.config.scaling_factor).to(_dtype(vae)))
    return images * 0.5 + 0.5


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
