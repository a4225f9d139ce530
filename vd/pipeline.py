"""`VersatileDiffusion`: every flow of the VD paper with one set of weights.

Images: text_to_image, image_variation (with focus, fidelity and colour matching), dual_guided, blend.
Text: image_to_text, text_variation (the text UNet's data layers, decoded by the Optimus text VAE).

Each task is: encode the condition(s) into context tokens -> pick the context streams -> sample latents with
classifier-free guidance -> decode. The UNet modules are never modified; a task only chooses which data and
context layers run (vd.nn.unet). Nothing is kept between calls, so any order of calls gives what a fresh
pipeline gives.
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
from vd.colors import match_colors
from vd.conditioning import (UNCOND_IMAGES, encode_image, encode_text, mask_token_weights, pixel_values, resized,
                             uncond_pixel_values)
from vd.fast import Denoiser, speed_up_
from vd.focus import adjust_focus
from vd.loading import Components, load_components, resolve
from vd.nn import Context
from vd.sched import DDIM, SAMPLERS, randn, sampler_from_config
from vd.tasks import TASK_PARTS, TASKS
from vd.text_vae import remove_duplicate_word

DEFAULT_REPO = "shi-labs/versatile-diffusion"
DEFAULT_TASKS = ("text_to_image", "image_variation", "dual_guided", "blend")  # the image flows; text needs asking
MAX_BLEND_IMAGES = 4
Callback = Callable[[int, Tensor, Tensor], None]


@dataclass
class GenerationOutput:
    """`images`: list of PIL images ("pil"), float array [N, H, W, 3] in [0, 1] ("np"), tensor [N, 3, H, W] in
    [0, 1] ("pt"), or the final latents ("latent")."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor


@dataclass
class TextOutput:
    """`texts`: one sentence per sample; `latents`: the sampled text latents [N, 768] they were decoded from."""

    texts: list[str]
    latents: Tensor


class VersatileDiffusion:
    def __init__(self, components: Components, *, tasks: tuple[str, ...], device: torch.device, dtype: torch.dtype,
                 scheduler: str = "ddim", uncond_image: str = "grey", compile: bool = False,
                 cuda_graphs: bool = False):
        self.c, self.tasks, self.device, self.dtype = components, tuple(tasks), device, dtype
        self.scheduler = checks.choice("scheduler", scheduler, list(SAMPLERS))
        self.uncond_image = checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        image_unet, text_unet = components.image_unet, components.text_unet
        if device.type == "cuda":  # the fast path: same math, GPU-friendly layouts (not for the VAE: vd/fast.py)
            speed_up_(image_unet, text_unet)
        self.denoiser = self.text_denoiser = None
        if image_unet is not None and "data" in image_unet.parts:
            self.denoiser = Denoiser(image_unet, compile=compile, cuda_graphs=cuda_graphs)
        if text_unet is not None and "data" in text_unet.parts:  # text flows: the image UNet's time MLP, as VD does
            self.text_denoiser = Denoiser(text_unet, time_embedding=image_unet.time_embedding, compile=compile,
                                          cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(cls, src: str | Path = DEFAULT_REPO, *, tasks: list[str] | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        scheduler: str = "ddim", uncond_image: str = "grey", revision: str | None = None,
                        kl_f8: str | Path | None = None, clip: str | Path | None = None,
                        optimus: str | Path | None = None, optimus_tokenizer: str | Path | None = None,
                        compile: bool = False, cuda_graphs: bool = False) -> "VersatileDiffusion":
        """Load from a hub repo id, a diffusers-layout folder, an original .pth or a converted folder.

        tasks: the tasks to load weights for (default: the four image tasks; image_to_text and text_variation
        must be asked for, as they need the text UNet's 1.44 B data parameters and the Optimus decoder); only
        their parts are read. device: default CUDA if available, else CPU. dtype: default float16 on CUDA (the
        UNets, the VAE and Optimus run in it, as the reference does; the CLIP encoders under autocast), float32
        on CPU. scheduler: "ddim", "pndm" or "lms" (overridable per call). uncond_image: the image condition
        used for "no image" in classifier-free guidance: "grey" (a mid-grey image, what the reference intends),
        "zeros" (an all-zero embedding, as the original SHI-Labs app), or "diffusers" (what diffusers 0.42.1
        actually computes: CLIP of a near-black image). kl_f8, clip: for an original .pth, the VAE file and a
        diffusers-layout folder with CLIP (default: found beside it). optimus: optimus-vae.pth (default: in
        pretrained_pth/ of the repo or folder). optimus_tokenizer: a folder with BERT's vocab.txt and GPT-2's
        vocab.json + merges.txt (default: the folder's optimus_tokenizer/, else bert-base-cased and gpt2 from
        the hub). compile: torch.compile the denoising step. cuda_graphs: replay the denoising step from CUDA
        graphs (CUDA only; one capture per shape).
        """
        tasks = tuple(DEFAULT_TASKS if tasks is None else [checks.choice("tasks", t, TASKS) for t in tasks])
        if not tasks:
            checks.fail("tasks", tasks, f"some of {list(TASKS)}")
        checks.choice("scheduler", scheduler, list(SAMPLERS))
        checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        device = checks.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        ckpt = resolve(src, tasks, revision=revision, kl_f8=kl_f8, clip=clip, optimus=optimus,
                       optimus_tokenizer=optimus_tokenizer)
        components = load_components(ckpt, tasks, device, dtype)
        return cls(components, tasks=tasks, device=device, dtype=dtype, scheduler=scheduler, uncond_image=uncond_image,
                   compile=compile, cuda_graphs=cuda_graphs)

    # ---- image flows

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
                        callback_steps: int = 1, *, focus: float = 0.5, fidelity: float = 0.0,
                        color_adjust: bool = False, scheduler: str | None = None, uncond_image: str | None = None,
                        progress: bool = True) -> GenerationOutput:
        """Generate variations of images (a tensor is [B, 3, H, W] in [0, 1]); negative_prompt is an image.

        focus: 0.5 = plain variation; towards 0 keeps the semantics and lets the style go (drops the top
          principal components of the local image tokens), towards 1 keeps the style (keeps only a few of them);
          the randomised PCA draws from `generator`, so a seeded call is deterministic (vd.focus).
        fidelity: 0 = start from noise; in (0, 1) start from the input's VAE latent noised part-way, denoising
          only the last int(steps * (1 - fidelity)) steps (DDIM only); 1 = return the input.
        color_adjust: match each output's per-channel mean and std to the input's.
        """
        self._need("image_variation")
        imgs = checks.images("image", image)
        negatives = checks.negative("negative_prompt", negative_prompt, len(imgs), "image")
        mode = self._uncond_mode(uncond_image)
        focus = checks.number("focus", focus, 0.0, 1.0)
        fidelity = checks.number("fidelity", fidelity, 0.0, 1.0)
        if not isinstance(color_adjust, bool):
            checks.fail("color_adjust", color_adjust, "True or False", TypeError)
        run = self._prepare(len(imgs), height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                            eta, generator, latents, output_type, callback, callback_steps, scheduler)
        if fidelity > 0 and not isinstance(run.sampler, DDIM):
            checks.fail("fidelity", fidelity, "0 unless scheduler='ddim' (only DDIM starts part-way here)")
        if fidelity > 0 and latents is not None:
            checks.fail("latents", "a tensor", "None when fidelity > 0 (the start comes from the input image)")
        height, width = (run.shape[2] * self._factor, run.shape[3] * self._factor)
        reference = resized(imgs, height, width).to(self.device)  # [B, 3, h, w] in [0, 1]
        if fidelity == 1:  # parity: the original returns the input itself
            if output_type == "latent":
                return GenerationOutput(self._encode_latents(reference, run))
            return GenerationOutput(to_output(reference.repeat_interleave(run.per_prompt, dim=0).float(), output_type))
        with self._autocast():
            tokens = self._image_tokens(imgs, negatives, mode, run, focus=focus)
        start, skip = None, 0
        if fidelity > 0:
            start, skip = self._fidelity_start(reference, fidelity, run)
        x = self._sample(run, [Context(self.c.image_unet.context_layers(), tokens)], self.denoiser, progress,
                         start=start, skip=skip)
        if run.output_type == "latent":
            return GenerationOutput(x)
        images = self._decode(x)
        if color_adjust:
            images = match_colors(images, reference.repeat_interleave(run.per_prompt, dim=0).float())
        return GenerationOutput(to_output(images, run.output_type))

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

    def blend(self, images: list[PIL.Image.Image] | Tensor, weights: list[float] | None = None,
              masks: list[PIL.Image.Image | Tensor | None] | None = None, focus: float | list[float] | None = None,
              prompt: str | None = None, text_strength: float = 0.0, height: int | None = None,
              width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
              num_images_per_prompt: int = 1, eta: float = 0.0,
              generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
              output_type: str = "pil", callback: Callback | None = None, callback_steps: int = 1, *,
              negative_prompt: str | None = None, scheduler: str | None = None,
              progress: bool = True) -> GenerationOutput:
        """One image from up to four images (and optionally a text), as the original's multi-context app.

        Each image's 257 CLIP tokens are focus-adjusted (see image_variation), scaled by its weight and
        concatenated along the token axis, so the image context layers attend over all of them at once. A mask
        (same aspect as its image; white = leave this region out, as the original app's painted mask) weights
        the image's patches inside CLIP. Images and masks are squashed to CLIP's square input, as the original
        does, so that patches and mask line up. With a prompt and text_strength s > 0, the text stream weighs
        s and the image stream 1 - s at every context layer. "No image" for guidance is an all-zero embedding.
        """
        self._need("blend")
        imgs = checks.images("images", images)
        k = len(imgs)
        if k > MAX_BLEND_IMAGES:
            checks.fail("images", f"{k} images", f"1 to {MAX_BLEND_IMAGES} images")
        weights = checks.per_image("weights", weights, k, 1.0, 0.0)
        focus = checks.per_image("focus", focus, k, 0.5, 0.0, 1.0)
        keep = checks.keep_masks(masks, k)
        s = checks.number("text_strength", text_strength, 0.0, 1.0)
        if prompt is not None and not isinstance(prompt, str):
            checks.fail("prompt", prompt, "a string or None", TypeError)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            checks.fail("negative_prompt", negative_prompt, "a string or None", TypeError)
        use_text = bool(prompt) and s > 0  # parity: the original ignores an empty text or a zero strength
        run = self._prepare(1, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta,
                            generator, latents, output_type, callback, callback_steps, scheduler)
        with self._autocast():
            per_image = []
            for i in range(k):
                one = imgs[i:i + 1]
                pixels = pixel_values(self.c.image_processor, one, square=True).to(self.device, self.dtype)
                tw = None
                if keep[i] is not None:
                    tw = mask_token_weights(keep[i].to(self.device), self._patch, pixels.shape[-1])
                tokens = encode_image(self.c.image_encoder, pixels, token_weights=tw)
                tokens = self._focus(tokens, focus[i], run, first=0)  # all images serve the one prompt
                per_image.append(tokens * weights[i])
            cond = torch.cat(per_image, dim=1).repeat_interleave(run.per_prompt, dim=0)
            image_tokens = torch.cat([torch.zeros_like(cond), cond]) if run.cfg else cond
            streams = [Context(self.c.image_unet.context_layers(), image_tokens, 1.0 - s if use_text else 1.0)]
            if use_text:
                text = self._text_tokens([prompt], None if negative_prompt is None else [negative_prompt], run)
                streams.insert(0, Context(self.c.text_unet.context_layers(), text, s))
        return self._generate(run, streams, progress)

    # ---- text flows

    def image_to_text(self, image: PIL.Image.Image | list[PIL.Image.Image] | Tensor, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, num_texts_per_prompt: int = 1, eta: float = 0.0,
                      generator: torch.Generator | list[torch.Generator] | None = None,
                      latents: Tensor | None = None, callback: Callback | None = None, callback_steps: int = 1, *,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                      max_length: int = 30, dedupe: bool = True, scheduler: str | None = None,
                      progress: bool = True) -> TextOutput:
        """Describe images: text UNet data layers + image UNet context layers, latents [N, 768] decoded by
        Optimus. "No image" for guidance is CLIP of an all-black image, as the original. Decoding samples with
        `temperature`, `top_k`, `top_p` (or `greedy`) up to `max_length` tokens; `dedupe` collapses repeated
        words as the original app does."""
        self._need("image_to_text")
        imgs = checks.images("image", image)
        run = self._prepare_text(len(imgs), num_inference_steps, guidance_scale, num_texts_per_prompt, eta,
                                 generator, latents, callback, callback_steps, scheduler)
        decoding = checks.decoding(temperature, top_k, top_p, greedy, max_length, dedupe,
                                   max_positions=self.c.optimus.config.dec_positions)
        with self._autocast():
            tokens = self._image_tokens(imgs, None, "black", run)
        return self._generate_text(run, [Context(self.c.image_unet.context_layers(), tokens)], decoding, progress)

    def text_variation(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, num_texts_per_prompt: int = 1,
                       eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                       latents: Tensor | None = None, callback: Callback | None = None, callback_steps: int = 1, *,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                       max_length: int = 30, dedupe: bool = True, scheduler: str | None = None,
                       progress: bool = True) -> TextOutput:
        """Rephrase texts: text UNet data + context layers, decoded by Optimus (see image_to_text)."""
        self._need("text_variation")
        texts = checks.prompts("prompt", prompt)
        negatives = checks.negative("negative_prompt", negative_prompt, len(texts), "text")
        run = self._prepare_text(len(texts), num_inference_steps, guidance_scale, num_texts_per_prompt, eta,
                                 generator, latents, callback, callback_steps, scheduler)
        decoding = checks.decoding(temperature, top_k, top_p, greedy, max_length, dedupe,
                                   max_positions=self.c.optimus.config.dec_positions)
        with self._autocast():
            tokens = self._text_tokens(texts, negatives, run)
        return self._generate_text(run, [Context(self.c.text_unet.context_layers(), tokens)], decoding, progress)

    # ---- shared steps

    def _need(self, task: str) -> None:
        have = {p for t in self.tasks for p in TASK_PARTS[t]}
        if not set(TASK_PARTS[task]) <= have:
            raise ValueError(f"this pipeline was loaded for tasks {list(self.tasks)}; load it with "
                             f"tasks=[..., {task!r}] to run {task}")

    @property
    def _factor(self) -> int:
        return self.c.vae.config.downscale

    @property
    def _patch(self) -> int:
        return self.c.image_encoder.config.patch_size

    def _uncond_mode(self, value: str | None) -> str:
        return self.uncond_image if value is None else checks.choice("uncond_image", value, UNCOND_IMAGES)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def _prepare(self, batch, height, width, steps, guidance, per_prompt, eta, generator, latents, output_type,
                 callback, callback_steps, scheduler) -> "_Run":
        """Check every generation argument before any model runs."""
        unet, factor = self.c.image_unet.config, self._factor
        default = (unet.sample_size or 64) * factor
        height = checks.size("height", default if height is None else height, factor)
        width = checks.size("width", default if width is None else width, factor)
        checks.choice("output_type", output_type, checks.OUTPUT_TYPES)
        run = self._run(batch, (unet.in_channels, height // factor, width // factor), steps, guidance, per_prompt,
                        "num_images_per_prompt", eta, generator, latents, output_type, callback, callback_steps,
                        scheduler)
        checks.pixel_budget(run.shape[0], height, width)
        return run

    def _prepare_text(self, batch, steps, guidance, per_prompt, eta, generator, latents, callback, callback_steps,
                      scheduler) -> "_Run":
        features = tuple(self.c.text_unet.config.in_channels)  # (768, 1, 1): text latents as the text UNet sees them
        return self._run(batch, features, steps, guidance, per_prompt, "num_texts_per_prompt", eta, generator,
                         latents, "text", callback, callback_steps, scheduler)

    def _run(self, batch, sample_shape, steps, guidance, per_prompt, per_prompt_name, eta, generator, latents,
             output_type, callback, callback_steps, scheduler) -> "_Run":
        name = checks.choice("scheduler", self.scheduler if scheduler is None else scheduler, list(SAMPLERS))
        sampler = sampler_from_config(name, self.c.scheduler_config)
        steps = checks.steps(steps, sampler)
        guidance = checks.guidance(guidance)
        per_prompt = checks.integer(per_prompt_name, per_prompt, 1)
        eta = checks.eta(eta)
        total = batch * per_prompt
        generator = checks.generator(generator, total)
        shape = (total, *sample_shape)
        if output_type == "text" and isinstance(latents, Tensor) and latents.dim() == 2:
            latents = latents.reshape(latents.shape[0], -1, *([1] * (len(sample_shape) - 1)))  # [N, 768] form
        latents = checks.latents(latents, shape, self.device)
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

    def _image_tokens(self, imgs, negatives, mode: str, run: "_Run", focus: float = 0.5) -> Tensor:
        proc, enc = self.c.image_processor, self.c.image_encoder

        def encode(pixels: Tensor) -> Tensor:
            return encode_image(enc, pixels.to(self.device, self.dtype))

        cond = encode(pixel_values(proc, imgs))
        if focus != 0.5:
            cond = torch.cat([self._focus(cond[i:i + 1], focus, run, first=i) for i in range(len(cond))])
        cond = cond.repeat_interleave(run.per_prompt, dim=0)
        if not run.cfg:
            return cond
        if negatives is not None:
            uncond = encode(pixel_values(proc, negatives))
        elif mode == "zeros":
            uncond = torch.zeros_like(cond[::run.per_prompt])
        else:
            uncond = encode(uncond_pixel_values(proc, mode, len(imgs)))
        return torch.cat([uncond.repeat_interleave(run.per_prompt, dim=0), cond])

    def _focus(self, tokens: Tensor, focus: float, run: "_Run", first: int) -> Tensor:
        """Focus-adjust one image's tokens [1, 257, D] with its generator (the first of its samples), on the
        generator's device so a CPU-seeded result is the same on every device."""
        if focus == 0.5:
            return tokens
        g = run.generator[first * run.per_prompt] if isinstance(run.generator, list) else run.generator
        where = g.device if g is not None else tokens.device
        return adjust_focus(tokens.to(where), focus, generator=g).to(tokens.device, tokens.dtype)

    @torch.no_grad()
    def _encode_latents(self, images: Tensor, run: "_Run") -> Tensor:
        """Images [B, 3, h, w] in [0, 1] -> scaled VAE latents, one posterior draw per image (repeated for its
        samples, as the original), drawn from the image's generator."""
        vae = self.c.vae
        with torch.autocast(self.device.type, enabled=False):
            post = vae.encode((2 * images - 1).to(next(vae.parameters()).dtype))
        gens = run.generator[::run.per_prompt] if isinstance(run.generator, list) else run.generator
        x0 = post.mean + post.std * randn(post.mean.shape, gens, self.device, post.mean.dtype)
        return (vae.config.scaling_factor * x0).repeat_interleave(run.per_prompt, dim=0)

    def _fidelity_start(self, reference: Tensor, fidelity: float, run: "_Run") -> tuple[Tensor, int]:
        """The input's latent, noised to the first timestep that will be denoised, and how many steps to skip
        (all of them, and no noise, when int(steps * (1 - fidelity)) is 0).

        divergence: the original noises to one grid step before the first step it denoises (vd-reference D.8
        #3); we noise to the level that step expects, as img2img does.
        """
        x0 = self._encode_latents(reference, run)
        ts = run.sampler.timesteps(run.steps)
        keep = int(len(ts) * (1 - fidelity))  # parity: the original's int(steps * (1 - fidelity))
        skip = len(ts) - keep
        if keep == 0:
            return x0, skip
        z = randn(x0.shape, run.generator, self.device, x0.dtype)
        return run.sampler.noised(x0, int(ts[skip]), z), skip

    def _sample(self, run: "_Run", streams: list[Context], denoise: Denoiser, progress: bool,
                start: Tensor | None = None, skip: int = 0) -> Tensor:
        """Sample latents with classifier-free guidance. `start`/`skip`: begin from a noised sample part-way
        (DDIM only)."""
        # parity: noise is drawn in the model's dtype, as the reference does (its embeddings' dtype); under
        # autocast our tokens may be float32, and fp16 and fp32 draws from one generator differ
        if start is not None:
            x = start
        elif run.latents is not None:
            x = run.latents.to(self.device)
        else:
            x = randn(run.shape, run.generator, self.device, self.dtype)

        def eps_fn(x_in: Tensor, t: Tensor) -> Tensor:
            if run.cfg:
                uncond, cond = denoise(torch.cat([x_in, x_in]), t, streams).chunk(2)
                return uncond + run.guidance * (cond - uncond)
            return denoise(x_in, t, streams)

        timesteps = run.sampler.timesteps(run.steps)
        bar = tqdm(total=len(timesteps) - skip, disable=not progress, desc="denoising")

        def on_step(i: int, t: Tensor, latents: Tensor) -> None:
            bar.update()
            if run.callback is not None and i % run.callback_steps == 0:
                run.callback(i, t, latents)

        extra = {"skip": skip} if skip else {}
        try:
            with torch.no_grad():  # (the denoiser runs in the weights' dtype; the sampler's math is elementwise)
                x = run.sampler.sample(eps_fn, x, run.steps, generator=run.generator, eta=run.eta, callback=on_step,
                                       **extra)
        finally:
            bar.close()
        if not torch.isfinite(x).all():
            raise FloatingPointError("denoising produced NaN or inf latents; try float32 (dtype=torch.float32)")
        return x

    def _generate(self, run: "_Run", streams: list[Context], progress: bool) -> GenerationOutput:
        x = self._sample(run, streams, self.denoiser, progress)
        if run.output_type == "latent":
            return GenerationOutput(x)
        return GenerationOutput(to_output(self._decode(x), run.output_type))

    def _generate_text(self, run: "_Run", streams: list[Context], decoding: dict, progress: bool) -> TextOutput:
        x = self._sample(run, streams, self.text_denoiser, progress).flatten(1)  # [N, 768]
        optimus, tok = self.c.optimus, self.c.optimus_tokenizer
        dedupe = decoding.pop("dedupe")
        gens = run.generator if isinstance(run.generator, list) else [run.generator] * len(x)
        texts = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            z = x.to(next(optimus.parameters()).dtype)
            for zi, g in zip(z, gens):  # one sentence per latent, drawing from its generator, as the original
                ids = optimus.generate(zi[None], tok.bos_id, tok.eos_id, generator=g, **decoding)[0]
                text = tok.decode(ids)
                texts.append(remove_duplicate_word(text) if dedupe else text)
        return TextOutput(texts, x)

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

