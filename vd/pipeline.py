"""`VersatileDiffusion`: text-to-image, image variation and dual-guided generation with one set of weights.

Each task is: encode the condition(s) into context tokens -> pick the context streams -> sample latents with
classifier-free guidance -> decode. The UNet modules are never modified; a task only chooses which context
layers run (vd.nn.unet). Nothing is kept between calls, so any order of calls gives what a fresh pipeline gives.
"""

import copy
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vd import checks
from vd.conditioning import UNCOND_IMAGES, encode_image, encode_text, pixel_values, uncond_pixel_values
from vd.fast import Denoiser, speed_up_
from vd.loading import Components, load_components, resolve
from vd.nn import Context
from vd.sched import SAMPLERS, randn, sampler_from_config
from weights_convert import TASKS

DEFAULT_REPO = "shi-labs/versatile-diffusion"
Callback = Callable[[int, Tensor, Tensor], None]


@dataclass
class GenerationOutput:
    """`images`: list of PIL images ("pil"), float array [N, H, W, 3] in [0, 1] ("np"), tensor [N, 3, H, W] in
    [0, 1] ("pt"), or the final latents ("latent")."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor


class VersatileDiffusion:
    def __init__(self, components: Components, *, tasks: tuple[str, ...], device: torch.device, dtype: torch.dtype,
                 scheduler: str = "ddim", uncond_image: str = "grey", compile: bool = False,
                 cuda_graphs: bool = False):
        self.c, self.tasks, self.device, self.dtype = components, tuple(tasks), device, dtype
        self.scheduler = checks.choice("scheduler", scheduler, list(SAMPLERS))
        self.uncond_image = checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        if device.type == "cuda":  # the fast path: same math, GPU-friendly layouts
            speed_up_(components.image_unet, components.text_unet, components.vae)
        self.denoiser = Denoiser(components.image_unet, compile=compile, cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(cls, src: str | Path = DEFAULT_REPO, *, tasks: list[str] | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        scheduler: str = "ddim", uncond_image: str = "grey", revision: str | None = None,
                        kl_f8: str | Path | None = None, clip: str | Path | None = None, compile: bool = False,
                        cuda_graphs: bool = False) -> "VersatileDiffusion":
        """Load from a hub repo id, a diffusers-layout folder, an original .pth or a converted folder.

        tasks: the tasks to load weights for (default all three); only their parts are read.
        device: default CUDA if available, else CPU. dtype: default float16 on CUDA (the UNets and the VAE run
        in it, as the reference does; the CLIP encoders under autocast), float32 on CPU. scheduler: "ddim", "pndm" or "lms" (overridable per call). uncond_image: the image
        condition used for "no image" in classifier-free guidance: "grey" (a mid-grey image, what the reference
        intends), "zeros" (an all-zero embedding, as the original SHI-Labs app), or "diffusers" (what diffusers
        0.42.1 actually computes: CLIP of a near-black image). compile: torch.compile the denoising step.
        cuda_graphs: replay the denoising step from CUDA graphs (CUDA only; one capture per shape).
        """
        tasks = tuple(TASKS if tasks is None else [checks.choice("tasks", t, TASKS) for t in tasks])
        if not tasks:
            checks.fail("tasks", tasks, f"some of {list(TASKS)}")
        checks.choice("scheduler", scheduler, list(SAMPLERS))
        checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        ckpt = resolve(src, tasks, revision=revision, kl_f8=kl_f8, clip=clip)
        components = load_components(ckpt, tasks, device, dtype)
        return cls(components, tasks=tasks, device=device, dtype=dtype, scheduler=scheduler, uncond_image=uncond_image,
                   compile=compile, cuda_graphs=cuda_graphs)

    # ---- the three tasks

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, num_images_per_prompt: int = 1, eta: float = 0.0,
                      generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
                      output_type: str = "pil", callback: Callback | None = None, callback_steps: int = 1, *,
                      scheduler: str | None = None, progress: bool = True) -> GenerationOutput:
        """Generate images from text: image UNet data layers + text UNet context layers."""
        self._need("text_to_image")
        texts = checks.prompts("prompt", prompt)
        negatives = checks.negative("negative_prompt", negative_prompt, len(texts), "text")
        run = self._prepare(len(texts), height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                            eta, generator, latents, output_type, callback, callback_steps, scheduler)
        with self._autocast():
            tokens = self._text_tokens(texts, negatives, run)
        return self._generate(run, [Context(self.c.text_unet.context_layers(), tokens)], progress)

    def image_variation(self, image: PIL.Image.Image | list[PIL.Image.Image] | Tensor,
                        negative_prompt: PIL.Image.Image | list[PIL.Image.Image] | Tensor | None = None,
                        height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                        guidance_scale: float = 7.5, num_images_per_prompt: int = 1, eta: float = 0.0,
                        generator: torch.Generator | list[torch.Generator] | None = None,
                        latents: Tensor | None = None, output_type: str = "pil", callback: Callback | None = None,
                        callback_steps: int = 1, *, scheduler: str | None = None, uncond_image: str | None = None,
                        progress: bool = True) -> GenerationOutput:
        """Generate variations of images (a tensor is [B, 3, H, W] in [0, 1]); negative_prompt is an image."""
        self._need("image_variation")
        imgs = checks.images("image", image)
        negatives = checks.negative("negative_prompt", negative_prompt, len(imgs), "image")
        mode = self._uncond_mode(uncond_image)
        run = self._prepare(len(imgs), height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                            eta, generator, latents, output_type, callback, callback_steps, scheduler)
        with self._autocast():
            tokens = self._image_tokens(imgs, negatives, mode, run)
        return self._generate(run, [Context(self.c.image_unet.context_layers(), tokens)], progress)

    def dual_guided(self, prompt: str | list[str], image: PIL.Image.Image | list[PIL.Image.Image] | Tensor,
                    text_to_image_strength: float = 0.5, height: int | None = None, width: int | None = None,
                    num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                    eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                    latents: Tensor | None = None, output_type: str = "pil", callback: Callback | None = None,
                    callback_steps: int = 1, *, negative_prompt: str | list[str] | None = None,
                    scheduler: str | None = None, uncond_image: str | None = None,
                    progress: bool = True) -> GenerationOutput:
        """Generate from a text and an image together. At every context layer the text stream weighs
        text_to_image_strength and the image stream 1 - text_to_image_strength (1: pure text-to-image)."""
        self._need("dual_guided")
        texts = checks.prompts("prompt", prompt)
        imgs = checks.images("image", image)
        if len(imgs) != len(texts):
            checks.fail("image", f"{len(imgs)} image(s)", f"one image per prompt ({len(texts)})")
        s = checks.number("text_to_image_strength", text_to_image_strength, 0.0, 1.0)
        negatives = checks.negative("negative_prompt", negative_prompt, len(texts), "text")
        mode = self._uncond_mode(uncond_image)
        run = self._prepare(len(texts), height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                            eta, generator, latents, output_type, callback, callback_steps, scheduler)
        with self._autocast():
            text = self._text_tokens(texts, negatives, run)
            image_tokens = self._image_tokens(imgs, None, mode, run)
        streams = [Context(self.c.text_unet.context_layers(), text, s),
                   Context(self.c.image_unet.context_layers(), image_tokens, 1.0 - s)]
        return self._generate(run, streams, progress)

    # ---- shared steps

    def _need(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"this pipeline was loaded for tasks {list(self.tasks)}; load it with "
                             f"tasks=[..., {task!r}] to run {task}")

    def _uncond_mode(self, value: str | None) -> str:
        return self.uncond_image if value is None else checks.choice("uncond_image", value, UNCOND_IMAGES)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def _prepare(self, batch, height, width, steps, guidance, per_prompt, eta, generator, latents, output_type,
                 callback, callback_steps, scheduler) -> "_Run":
        """Check every generation argument before any model runs."""
        unet, factor = self.c.image_unet.config, self.c.vae.config.downscale
        default = (unet.sample_size or 64) * factor
        height = checks.size("height", default if height is None else height, factor)
        width = checks.size("width", default if width is None else width, factor)
        name = checks.choice("scheduler", self.scheduler if scheduler is None else scheduler, list(SAMPLERS))
        sampler = sampler_from_config(name, self.c.scheduler_config)
        steps = checks.integer("num_inference_steps", steps, 1, sampler.num_train_timesteps)
        guidance = checks.number("guidance_scale", guidance, 0.0)
        per_prompt = checks.integer("num_images_per_prompt", per_prompt, 1)
        eta = checks.number("eta", eta, 0.0)
        total = batch * per_prompt
        generator = checks.generator(generator, total)
        shape = (total, unet.in_channels, height // factor, width // factor)
        latents = checks.latents(latents, shape, self.device)
        checks.choice("output_type", output_type, checks.OUTPUT_TYPES)
        callback_steps = checks.callback(callback, callback_steps)
        return _Run(sampler, steps, guidance, per_prompt, eta, generator, latents, shape, output_type, callback,
                    callback_steps)

    def _text_tokens(self, texts: list[str], negatives: list[str] | None, run: "_Run") -> Tensor:
        enc, tok = self.c.text_encoder, self.c.tokenizer
        cond = encode_text(enc, tok, texts, self.device).repeat_interleave(run.per_prompt, dim=0)
        if not run.cfg:
            return cond
        uncond = encode_text(enc, tok, negatives or [""] * len(texts), self.device)
        return torch.cat([uncond.repeat_interleave(run.per_prompt, dim=0), cond])

    def _image_tokens(self, imgs, negatives, mode: str, run: "_Run") -> Tensor:
        proc, enc = self.c.image_processor, self.c.image_encoder

        def encode(pixels: Tensor) -> Tensor:
            return encode_image(enc, pixels.to(self.device, self.dtype)).repeat_interleave(run.per_prompt, dim=0)

        cond = encode(pixel_values(proc, imgs))
        if not run.cfg:
            return cond
        if negatives is not None:
            uncond = encode(pixel_values(proc, negatives))
        elif mode == "zeros":
            uncond = torch.zeros_like(cond)
        else:
            uncond = encode(uncond_pixel_values(proc, mode, len(imgs)))
        return torch.cat([uncond, cond])

    def _generate(self, run: "_Run", streams: list[Context], progress: bool) -> GenerationOutput:
        denoise = self.denoiser
        # parity: noise is drawn in the model's dtype, as the reference does (its embeddings' dtype); under
        # autocast our tokens may be float32, and fp16 and fp32 draws from one generator differ
        x = run.latents.to(self.device) if run.latents is not None else randn(run.shape, run.generator, self.device,
                                                                              self.dtype)

        def eps_fn(x_in: Tensor, t: Tensor) -> Tensor:
            if run.cfg:
                uncond, cond = denoise(torch.cat([x_in, x_in]), t, streams).chunk(2)
                return uncond + run.guidance * (cond - uncond)
            return denoise(x_in, t, streams)

        timesteps = run.sampler.timesteps(run.steps)
        bar = tqdm(total=len(timesteps), disable=not progress, desc="denoising")

        def on_step(i: int, t: Tensor, latents: Tensor) -> None:
            bar.update()
            if run.callback is not None and i % run.callback_steps == 0:
                run.callback(i, t, latents)

        try:
            with torch.no_grad():  # (the denoiser runs in the weights' dtype; the sampler's math is elementwise)
                x = run.sampler.sample(eps_fn, x, run.steps, generator=run.generator, eta=run.eta, callback=on_step)
        finally:
            bar.close()
        if not torch.isfinite(x).all():
            raise FloatingPointError("denoising produced NaN or inf latents; try float32 (dtype=torch.float32)")
        if run.output_type == "latent":
            return GenerationOutput(x)
        return GenerationOutput(to_output(self._decode(x), run.output_type))

    @torch.no_grad()
    def _decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [N, 3, H, W] in [0, 1]. A non-finite fp16 decode is retried in float32."""
        vae = self.c.vae
        z = latents / vae.config.scaling_factor
        with torch.autocast(self.device.type, enabled=False):  # in the weights' dtype, as the reference does
            images = vae.decode(z.to(next(vae.parameters()).dtype))
        if not torch.isfinite(images).all() and self.dtype != torch.float32:
            warnings.warn("the VAE decode gave NaN/inf in reduced precision; decoding again in float32", stacklevel=3)
            images = copy.deepcopy(vae).float().decode(z.float())
        if not torch.isfinite(images).all():
            raise FloatingPointError("the VAE decode produced NaN or inf values even in float32")
        return (images.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class _Run:
    """The checked arguments of one generation."""

    sampler: object
    steps: int
    guidance: float
    per_prompt: int
    eta: float
    generator: torch.Generator | list[torch.Generator] | None
    latents: Tensor | None
    shape: tuple[int, ...]
    output_type: str
    callback: Callback | None
    callback_steps: int

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0  # parity: guidance <= 1 means no classifier-free guidance


def to_output(images: Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | Tensor:
    """Images [N, 3, H, W] in [0, 1] as "pt" (as is), "np" (float32 [N, H, W, 3]) or "pil" (rounded to uint8)."""
    if output_type == "pt":
        return images
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    return [PIL.Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]
