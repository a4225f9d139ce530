"""`VersatileDiffusion`: every flow of the VD paper with one set of weights, checked and convenient.

Images: text_to_image, image_variation (with focus, fidelity and colour matching), dual_guided, blend.
Text: image_to_text, text_variation (the text UNet's data layers, decoded by the Optimus text VAE).

Each flow method checks its arguments (all of them, before any model runs), encodes its conditions into context
tokens or takes them as tensors (`vd.conditions`), picks the start (noise, given latents, or an init image noised
part-way) and calls the flow of the functional core, `vd.sampling`, where a reader learns what the flow computes.
Then it decodes and converts. Nothing is kept between calls, so any order of calls gives what a fresh pipeline gives.
"""

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vd import checks
from vd import sampling as core
from vd.sampling import Callback, Generator
from vd.colors import match_colors
from vd.conditioning import UNCOND_IMAGES, resized, to_pil
from vd.conditions import Conditions
from vd.fast import NoisePredictor, fast_path, speed_up_, use_triton_kernels_
from vd.loading import Components, load_components, resolve
from vd.optimus_tokenizers import remove_duplicate_word
from vd.sched import DDIM, DIFFUSERS_CLASSES, SCHEDULERS, randn, sampler_from_config, scheduler_of
from vd.tasks import TASK_PARTS, TASKS

DEFAULT_REPO = "shi-labs/versatile-diffusion"
DEFAULT_TASKS = ("text_to_image", "image_variation", "dual_guided", "blend")  # the image flows; text needs asking
Images = PIL.Image.Image | list[PIL.Image.Image] | Tensor


class _Output:
    """A flow's output, also indexed as diffusers' outputs are: `out[0]` is the first field, `out["images"]` a
    field by name; `to_tuple()` is what `return_dict=False` returns."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}[key]
        return self.to_tuple()[key]


@dataclass
class GenerationOutput(_Output):
    """`images`: list of PIL images ("pil"), float array [N, H, W, 3] in [0, 1] ("np"), tensor [N, 3, H, W] in
    [0, 1] ("pt"), or the final latents ("latent"). As a tuple: `(images,)`, as diffusers' pipelines return it."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor


@dataclass
class TextOutput(_Output):
    """`texts`: one sentence per sample; `latents`: the sampled text latents [N, 768] they were decoded from. As a
    tuple: `(texts, latents)`."""

    texts: list[str]
    latents: Tensor


class VersatileDiffusion:
    def __init__(self, components: Components, *, tasks: tuple[str, ...], device: torch.device, dtype: torch.dtype,
                 scheduler: str | None = None, uncond_image: str = "grey", compile: bool = False,
                 cuda_graphs: bool | None = None, triton_kernels: bool | None = None):
        self.components, self.tasks = components, tuple(tasks)
        if scheduler is None:
            scheduler = scheduler_of(components.scheduler_config)
        self._scheduler = checks.choice("scheduler", scheduler, list(SCHEDULERS))
        self.uncond_image = checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        self._fast_options = dict(compile=compile, cuda_graphs=cuda_graphs, triton_kernels=triton_kernels)
        self._place(device, dtype)

    def __repr__(self) -> str:
        return (f"VersatileDiffusion(tasks={list(self.tasks)}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"scheduler={self.scheduler!r}, uncond_image={self.uncond_image!r})")

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "VersatileDiffusion":
        """Move every model to `device` (and cast it to `dtype`), and return the pipeline, as diffusers'
        `pipe.to` does: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`. The
        fast path is chosen again for the new device, under the options the pipeline was loaded with; captured
        CUDA graphs are dropped. The dtype stays as it is unless given (CPU loads default to float32)."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        device = self.device if device is None else checks.device(device)
        dtype = self.dtype if dtype is None else checks.dtype(dtype)
        c = self.components
        for module in (c.image_unet, c.text_unet, c.vae, c.text_encoder, c.image_encoder, c.optimus):
            if module is not None:
                module.to(device, dtype)
        self._place(device, dtype)
        return self

    def _place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Set up for the device and dtype the models are in: the conditions' encoders, the fast path's layouts
        and kernels on CUDA, and the noise predictors."""
        self.device, self.dtype = device, dtype
        components = self.components
        self.conditions = Conditions(components, device, dtype)
        cuda_graphs, triton_kernels = fast_path(device, **self._fast_options)
        compile = self._fast_options["compile"]
        image_unet, text_unet = components.image_unet, components.text_unet
        if device.type == "cuda":  # the fast path: same math, GPU-friendly layouts (not for the VAE: vd/fast.py)
            speed_up_(image_unet, text_unet)
        if triton_kernels:
            use_triton_kernels_(image_unet, text_unet, components.vae)
        self.image_eps = self.text_eps = None
        if image_unet is not None and "data" in image_unet.parts:
            self.image_eps = NoisePredictor(image_unet, compile=compile, cuda_graphs=cuda_graphs)
        if text_unet is not None and "data" in text_unet.parts:  # text flows: the image UNet's time MLP, as VD does
            self.text_eps = NoisePredictor(text_unet, time_embedding=image_unet.time_embedding, compile=compile,
                                           cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(cls, src: str | Path = DEFAULT_REPO, *, tasks: str | list[str] | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        scheduler: Any = None, uncond_image: str = "grey", revision: str | None = None,
                        kl_f8: str | Path | None = None, clip: str | Path | None = None,
                        optimus: str | Path | None = None, optimus_tokenizer: str | Path | None = None,
                        compile: bool = False, cuda_graphs: bool | None = None,
                        triton_kernels: bool | None = None,
                        torch_dtype: torch.dtype | None = None) -> "VersatileDiffusion":
        """Load from a hub repo id, a diffusers-layout folder, an original .pth or a converted folder.

        tasks: the flows (method names; one, or a list) to load weights for; only their parts are read. Default:
          the four image flows; image_to_text and text_variation (the text UNet's 1.44 B data parameters, the
          Optimus decoder) and encode_text_latents (the Optimus encoder) must be asked for.
        device: default CUDA if available, else CPU.
        dtype: default float16 on CUDA (UNets, VAE and Optimus run in it, as the reference does; CLIP under
          autocast), float32 on CPU. `torch_dtype`, diffusers' name for it, is taken too (one or the other).
        scheduler: a sampler name of vd.sched.SCHEDULERS, overridable per call, or a diffusers scheduler object
          (its class and config, as `pipe.scheduler = ...` reads one). Default: the checkpoint's, as diffusers
          loads it: its scheduler_config.json's diffusers class ("ddim" for VD as shipped), with that config's
          Karras or SDE form.
        uncond_image: "no image" for classifier-free guidance: "grey" (what the reference means to do), "zeros"
          (the original app's all-zero embedding) or "diffusers" (what diffusers 0.42.1 computes).
        revision: the hub revision.
        kl_f8, clip: for an original .pth, the VAE file and a diffusers-layout folder with CLIP (default: beside it).
        optimus: optimus-vae.pth (default: in pretrained_pth/ of the repo or folder).
        optimus_tokenizer: a folder with BERT's vocab.txt and GPT-2's vocab.json + merges.txt (default: the
          folder's optimus_tokenizer/, else bert-base-cased and gpt2 from the hub).
        compile: torch.compile the denoising step.
        cuda_graphs: replay the denoising step from CUDA graphs (CUDA only; one capture per shape, the first call
          of a shape pays for it). Default: on for CUDA. Skipped where autograd needs the step.
        triton_kernels: run GroupNorm (with the SiLU and time-embedding add around it), GEGLU and the residual
          LayerNorms of the UNets and the VAE decoder as fused Triton kernels (CUDA only). Default: on for CUDA
          when triton is installed and `compile` is off (torch.compile fuses by itself).
        """
        tasks = _task_names(tasks)
        checks.path("src", src, "a hub repo id, a diffusers-layout or converted folder, or an original .pth")
        for name, value in (("kl_f8", kl_f8), ("clip", clip), ("optimus", optimus),
                            ("optimus_tokenizer", optimus_tokenizer)):
            if value is not None:
                checks.path(name, value, "a file or folder path, or None")
        if revision is not None and not isinstance(revision, str):
            checks.fail("revision", revision, "a branch, tag or commit hash of the hub repo, or None", TypeError)
        checks.boolean("compile", compile)
        scheduler_config = None  # a diffusers scheduler object's settings, which replace the checkpoint's
        if isinstance(scheduler, str):
            checks.choice("scheduler", scheduler, list(SCHEDULERS))
        elif scheduler is not None:
            scheduler, scheduler_config = _read_diffusers_scheduler(scheduler)
        checks.choice("uncond_image", uncond_image, UNCOND_IMAGES)
        device = checks.device(device)
        with warnings.catch_warnings():  # bad options fail before loading; a warning comes when the pipeline is built
            warnings.simplefilter("ignore")
            fast_path(device, compile, cuda_graphs, triton_kernels)
        if torch_dtype is not None:
            if dtype is not None:
                raise TypeError("dtype and torch_dtype (diffusers' name for dtype) were both given; give one of them")
            dtype = checks.dtype(torch_dtype, "torch_dtype")
        dtype = (torch.float16 if device.type == "cuda" else torch.float32) if dtype is None else checks.dtype(dtype)
        ckpt = resolve(src, tasks, revision=revision, kl_f8=kl_f8, clip=clip, optimus=optimus,
                       optimus_tokenizer=optimus_tokenizer)
        if scheduler is None:  # (checked with the checkpoint's settings before any weight is read)
            scheduler = scheduler_of(ckpt.scheduler or {})
            sampler_from_config(scheduler, ckpt.scheduler or {})
        components = load_components(ckpt, tasks, device, dtype)
        if scheduler_config is not None:
            components.scheduler_config = scheduler_config
        return cls(components, tasks=tasks, device=device, dtype=dtype, scheduler=scheduler, uncond_image=uncond_image,
                   compile=compile, cuda_graphs=cuda_graphs, triton_kernels=triton_kernels)

    @property
    def scheduler(self) -> str:
        """The name of the sampler the flows run unless a call names another (`scheduler=`)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        """A sampler name, or a diffusers scheduler object, as diffusers users swap one in:
        `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler_config, use_karras_sigmas=True)`.
        Such an object is only read: its class gives the name and its config becomes `scheduler_config`."""
        if isinstance(value, str):
            self._scheduler = checks.choice("scheduler", value, list(SCHEDULERS))
        else:
            self._scheduler, self.components.scheduler_config = _read_diffusers_scheduler(value)

    @property
    def scheduler_config(self) -> dict:
        """The samplers' settings (the checkpoint's scheduler_config.json), a copy. Change them by assigning a
        new dict, as diffusers users rebuild `pipe.scheduler` from `pipe.scheduler.config`:
        `pipe.scheduler_config = {**pipe.scheduler_config, "timestep_spacing": "trailing"}`."""
        return dict(self.components.scheduler_config)

    @scheduler_config.setter
    def scheduler_config(self, config: Mapping[str, Any]) -> None:
        if not isinstance(config, Mapping):
            checks.fail("scheduler_config", config, "a dict of scheduler_config.json keys", TypeError)
        sampler_from_config(self.scheduler, config)  # a bad key or value fails here, and leaves the old settings
        self.components.scheduler_config = dict(config)

    # ---- conditions as data

    def encode_prompt(self, prompts: str | list[str]) -> Tensor:
        """The context tokens [B, 77, D] the flows use for these prompts (CLIP text, VD's normalisation)."""
        self._need_parts("encode_prompt", "text_encoder")
        texts = checks.prompts("prompts", prompts)
        with torch.no_grad(), self._autocast():
            return self.conditions.text_embeds(texts)

    def encode_image(self, images: Images, focus: float = 0.5, generator: Generator = None, *,
                     squash: bool = False) -> Tensor:
        """The context tokens [B, 257, D] the flows use for these images (CLIP vision), focus-adjusted as
        image_variation does (its randomised PCA draws from `generator`: one, or one per image). CLIP sees the
        centre crop, as in image_variation and dual_guided, or with `squash` the whole picture squashed via
        512 x 512, as image_to_text sees it (the original app's view)."""
        self._need_parts("encode_image", "image_encoder")
        imgs = checks.images("images", images)
        focus = checks.number("focus", focus, 0.0, 1.0)
        generator = checks.generator(generator, len(imgs))
        checks.boolean("squash", squash)
        with torch.no_grad(), self._autocast():
            return self.conditions.focused(self.conditions.encode_images(imgs, squash), focus, generator)

    def encode_text_latents(self, texts: str | list[str]) -> Tensor:
        """Optimus text latents [B, 768] of sentences (the posterior mean, as the original): what image_to_text
        and text_variation sample and `decode_text` reads. Needs tasks=[..., "encode_text_latents"]."""
        self._need("encode_text_latents")
        ids, mask = self.components.optimus_tokenizer.encode_batch(checks.prompts("texts", texts))
        optimus = self.components.optimus
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return optimus.encode(ids.to(self.device), mask.to(self.device))

    def decode_text(self, latents: Tensor, generator: Generator = None, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, greedy: bool = False, max_length: int = 30,
                    dedupe: bool = True) -> list[str]:
        """Sentences from Optimus text latents [N, 768], one per latent, each sampled with its generator (or all
        from one); decoding options as in image_to_text. Needs the Optimus decoder (a text flow's task)."""
        if self.components.optimus is None or "decoder" not in self.components.optimus.parts:
            raise ValueError(f"this pipeline was loaded for tasks {list(self.tasks)}; load it with tasks=[..., "
                             "'image_to_text'] or [..., 'text_variation'] to decode text latents")
        width = self.components.optimus.config.latent_dim
        if checks.tensor("latents", latents, dims=2).shape[1] != width:
            checks.fail("latents", latents, f"a tensor [N, {width}]")
        generator = checks.generator(generator, len(latents))
        decoding = self._decoding(temperature, top_k, top_p, greedy, max_length, dedupe)
        return self._decode_text(latents, generator, decoding)

    def encode_latents(self, images: Images, generator: Generator = None, *, height: int | None = None,
                       width: int | None = None, sample: bool = True) -> Tensor:
        """Scaled VAE latents [B, C, height / 8, width / 8] of images, as the image flows encode an init_image: resized
        to height x width (default: the images' own size, rounded down to a multiple of 8), one posterior draw per
        image from `generator` (one, or one per image), or the posterior mean with `sample=False`. What
        `init_latents=` takes; passing on the same generator object to the flow gives init_image's result."""
        self._need_parts("encode_latents", "vae.encoder")
        imgs = checks.images("images", images)
        generator = checks.generator(generator, len(imgs))
        if height is None or width is None:
            height, width = _given_or(height, width, checks.common_size("images", imgs, self._factor))
        height, width = checks.size("height", height, self._factor), checks.size("width", width, self._factor)
        checks.boolean("sample", sample)
        checks.pixel_budget(len(imgs), height, width)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # in the VAE's dtype, as the flows
            x = resized(imgs, height, width).to(self.device)
            return core.encode_latents(self.components.vae, x, generator, sample=sample)

    def decode_latents(self, latents: Tensor, output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray | Tensor:
        """Images from scaled VAE latents [N, C, h, w] (a flow's output_type="latent", or your own), decoded as the
        image flows decode them: "pil", "np" (float [N, H, W, 3] in [0, 1]) or "pt" ([N, 3, H, W])."""
        self._need_parts("decode_latents", "vae.decoder")
        checks.tensor("latents", latents, dims=4)
        channels = self.components.vae.config.latent_channels
        checks.latents(latents, (latents.shape[0], channels, *latents.shape[2:]), self.device)
        checks.choice("output_type", output_type, [t for t in checks.OUTPUT_TYPES if t != "latent"])
        checks.pixel_budget(len(latents), latents.shape[2] * self._factor, latents.shape[3] * self._factor)
        return to_output(self._decode(latents.to(self.device, self.dtype)), output_type)

    # ---- image flows

    def text_to_image(self, prompt: str | list[str] | None = None, height: int | None = None,
                      width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                      eta: float = 0.0, generator: Generator = None, latents: Tensor | None = None,
                      output_type: str = "pil", return_dict: bool = True, callback: Callback | None = None,
                      callback_steps: int = 1, *, prompt_embeds: Tensor | None = None,
                      negative_prompt_embeds: Tensor | None = None, init_image: Images | None = None,
                      init_latents: Tensor | None = None, strength: float | None = None,
                      strength_rule: str | None = None, scheduler: str | None = None,
                      progress: bool = True) -> GenerationOutput | tuple:
        """Images from text (or its tokens, `prompt_embeds` [B, 77, D]), optionally from an init image."""
        self._need("text_to_image")
        text = self.conditions.text_arg("prompt", prompt, prompt_embeds)
        negative = self.conditions.negative_text(negative_prompt, negative_prompt_embeds, len(text))
        run = self._prepare(len(text), height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                            per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                            output_type=output_type, callback=callback, callback_steps=callback_steps,
                            scheduler=scheduler, return_dict=return_dict, progress=progress, init_image=init_image,
                            init_latents=init_latents, strength=strength, strength_rule=strength_rule)
        with torch.no_grad(), self._autocast():
            tokens = self.conditions.text_tokens(text, negative, run.per_prompt, run.sampling)
            x = self._sample(run, lambda s, x: core.text_to_image(self._nets, text=tokens, x=x, s=s))
        return self._images(x, run)

    def image_variation(self, image: Images | None = None, height: int | None = None, width: int | None = None,
                        num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        negative_prompt: Images | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                        generator: Generator = None, latents: Tensor | None = None, output_type: str = "pil",
                        return_dict: bool = True, callback: Callback | None = None, callback_steps: int = 1, *,
                        focus: float = 0.5, fidelity: float = 0.0, color_adjust: bool = False,
                        image_embeds: Tensor | None = None, negative_image_embeds: Tensor | None = None,
                        init_image: Images | None = None, init_latents: Tensor | None = None,
                        strength: float | None = None, strength_rule: str | None = None, scheduler: str | None = None,
                        uncond_image: str | None = None, progress: bool = True) -> GenerationOutput | tuple:
        """Variations of images (or of their tokens, `image_embeds` [B, 257, D]); negative_prompt is an image.

        focus: 0.5 = plain variation; towards 0 keeps the semantics and lets the style go, towards 1 keeps the
          style (a low-rank adjustment of the local image tokens whose randomised PCA draws from `generator`).
        fidelity: the input image itself as init image at strength 1 - fidelity (see `init_image`); 1 returns the
          input (at its own size unless height and width are given).
        color_adjust: match each output's per-channel mean and std to the input's (or the init image's).
        """
        self._need("image_variation")
        cond = self.conditions.image_arg("image", image, image_embeds)
        negative = self.conditions.negative_image(negative_prompt, negative_image_embeds, len(cond))
        mode = self._uncond_mode(uncond_image)
        focus = checks.number("focus", focus, 0.0, 1.0)
        fidelity = checks.number("fidelity", fidelity, 0.0, 1.0)
        checks.boolean("color_adjust", color_adjust)
        if fidelity > 0:
            if isinstance(cond, Tensor) and image is None:
                checks.fail("fidelity", fidelity, "0 when the condition is given as image_embeds (fidelity starts "
                            "from the input image; pass init_image= with strength=)")
            if init_image is not None or init_latents is not None or strength is not None:
                checks.fail("fidelity", fidelity, "0 when init_image, init_latents or strength is given (fidelity f "
                            "is init_image=image with strength=1 - f)")
            init_image, strength = cond, 1.0 - fidelity
        if color_adjust and image is None and init_image is None:
            checks.fail("color_adjust", color_adjust, "False when no image or init_image gives the colours")
        if color_adjust and output_type == "latent":
            checks.fail("color_adjust", color_adjust, 'False with output_type="latent" (colours are matched on the '
                        "decoded pictures)")
        run = self._prepare(len(cond), height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                            per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                            output_type=output_type, callback=callback, callback_steps=callback_steps,
                            scheduler=scheduler, return_dict=return_dict, progress=progress, init_image=init_image,
                            init_latents=init_latents, strength=strength, strength_rule=strength_rule,
                            init_name="image" if fidelity > 0 else "init_image")
        reference = run.init_images  # the input at the output size: the init image (fidelity's is the image)
        if color_adjust and reference is None:  # else the image itself gives the colours
            reference = resized(cond, run.shape[2] * self._factor, run.shape[3] * self._factor).to(self.device)
        if fidelity == 1:  # parity: the original returns the input itself
            if output_type == "latent":
                with torch.no_grad():
                    return _returned(GenerationOutput(self._init_latents(run)), run)
            images = reference.repeat_interleave(run.per_prompt, dim=0).to(self.dtype)
            return _returned(GenerationOutput(to_output(images, output_type)), run)
        with torch.no_grad(), self._autocast():
            tokens = self.conditions.image_tokens(cond, negative, mode, run.per_prompt, run.sampling, focus=focus)
            x = self._sample(run, lambda s, x: core.image_variation(self._nets, image=tokens, x=x, s=s))
        match = reference.repeat_interleave(run.per_prompt, dim=0).float() if color_adjust else None
        return self._images(x, run, match_to=match)

    def dual_guided(self, prompt: str | list[str] | None = None, image: Images | None = None,
                    text_to_image_strength: float = 0.5, height: int | None = None, width: int | None = None,
                    num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                    eta: float = 0.0, generator: Generator = None, latents: Tensor | None = None,
                    output_type: str = "pil", return_dict: bool = True, callback: Callback | None = None,
                    callback_steps: int = 1, *, negative_prompt: str | list[str] | None = None,
                    prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
                    image_embeds: Tensor | None = None, negative_image_embeds: Tensor | None = None,
                    init_image: Images | None = None, init_latents: Tensor | None = None,
                    strength: float | None = None, strength_rule: str | None = None, scheduler: str | None = None,
                    uncond_image: str | None = None, progress: bool = True) -> GenerationOutput | tuple:
        """Images from a text and an image (or their tokens). At every context layer the text stream weighs
        text_to_image_strength and the image stream the rest (1: pure text-to-image, 0: pure variation)."""
        self._need("dual_guided")
        text = self.conditions.text_arg("prompt", prompt, prompt_embeds)
        cond = self.conditions.image_arg("image", image, image_embeds)
        if len(cond) != len(text):
            checks.fail("image" if image_embeds is None else "image_embeds", f"{len(cond)} image(s)",
                        f"one image per prompt ({len(text)})")
        mixing = checks.number("text_to_image_strength", text_to_image_strength, 0.0, 1.0)
        negative = self.conditions.negative_text(negative_prompt, negative_prompt_embeds, len(text))
        negative_image = self.conditions.negative_image(None, negative_image_embeds, len(cond))
        mode = self._uncond_mode(uncond_image)
        run = self._prepare(len(text), height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                            per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                            output_type=output_type, callback=callback, callback_steps=callback_steps,
                            scheduler=scheduler, return_dict=return_dict, progress=progress, init_image=init_image,
                            init_latents=init_latents, strength=strength, strength_rule=strength_rule)
        with torch.no_grad(), self._autocast():
            text_tokens = self.conditions.text_tokens(text, negative, run.per_prompt, run.sampling)
            image_tokens = self.conditions.image_tokens(cond, negative_image, mode, run.per_prompt, run.sampling)
            x = self._sample(run, lambda s, x: core.dual_guided(
                self._nets, text=text_tokens, image=image_tokens, text_weight=mixing, x=x, s=s))
        return self._images(x, run)

    def blend(self, images: list[PIL.Image.Image] | Tensor, weights: list[float] | None = None,
              masks: list[PIL.Image.Image | Tensor | None] | None = None, focus: float | list[float] | None = None,
              prompt: str | None = None, text_strength: float = 0.0, height: int | None = None,
              width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
              num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generator = None,
              latents: Tensor | None = None, output_type: str = "pil", callback: Callback | None = None,
              callback_steps: int = 1, *, negative_prompt: str | None = None, prompt_embeds: Tensor | None = None,
              negative_prompt_embeds: Tensor | None = None, init_image: Images | None = None,
              init_latents: Tensor | None = None, strength: float | None = None, strength_rule: str | None = None,
              scheduler: str | None = None, return_dict: bool = True,
              progress: bool = True) -> GenerationOutput | tuple:
        """One image from up to four images (and optionally a text), as the original's multi-context app.

        Each image's 257 CLIP tokens are focus-adjusted (see image_variation), scaled by its weight and placed
        side by side (vd.sampling.blend_tokens). A mask (same aspect as its image; white = leave this region out)
        weights the image's patches inside CLIP. Images and masks are squashed to 512 x 512 and then to CLIP's
        square input, as the original app does, so that patches and mask line up; a mask's first channel counts,
        after the original's resize in the mask's own mode (not composited over white). With a text (prompt or
        prompt_embeds [1, 77, D]) and text_strength s > 0, the text stream weighs s and the images 1 - s. "No image"
        is an all-zero embedding.
        """
        self._need("blend")
        imgs = checks.images("images", images)
        k = len(imgs)
        if k > checks.MAX_BLEND_IMAGES:
            checks.fail("images", f"{k} images", f"1 to {checks.MAX_BLEND_IMAGES} images")
        weights = checks.per_image("weights", weights, k, 1.0, 0.0)
        focus = checks.per_image("focus", focus, k, 0.5, 0.0, 1.0)
        keep = checks.keep_masks(masks, k)
        s = checks.number("text_strength", text_strength, 0.0, 1.0)
        if prompt is not None and not isinstance(prompt, str):
            checks.fail("prompt", prompt, "a string or None", TypeError)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            checks.fail("negative_prompt", negative_prompt, "a string or None", TypeError)
        text = None
        if prompt is not None or prompt_embeds is not None:
            text = self.conditions.text_arg("prompt", prompt, prompt_embeds, batch=1)
        negative = self.conditions.negative_text(negative_prompt, negative_prompt_embeds, 1)
        use_text = text is not None and (isinstance(text, Tensor) or bool(prompt)) and s > 0  # parity: the original
        run = self._prepare(1, height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                            per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                            output_type=output_type, callback=callback, callback_steps=callback_steps,
                            scheduler=scheduler, return_dict=return_dict, progress=progress, init_image=init_image,
                            init_latents=init_latents, strength=strength, strength_rule=strength_rule)
        with torch.no_grad(), self._autocast():  # ignores an empty text or a zero strength
            image_tokens = self.conditions.blend_tokens(imgs, keep, focus, weights, run.per_prompt, run.sampling)
            if use_text:
                text_tokens = self.conditions.text_tokens(text, negative, run.per_prompt, run.sampling)
                flow = lambda st, x: core.dual_guided(
                    self._nets, text=text_tokens, image=image_tokens, text_weight=s, x=x, s=st)  # noqa: E731
            else:
                flow = lambda st, x: core.image_variation(self._nets, image=image_tokens, x=x, s=st)  # noqa: E731
            x = self._sample(run, flow)
        return self._images(x, run)

    # ---- text flows

    def image_to_text(self, image: Images | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      num_texts_per_prompt: int = 1, eta: float = 0.0, generator: Generator = None,
                      latents: Tensor | None = None, callback: Callback | None = None, callback_steps: int = 1, *,
                      image_embeds: Tensor | None = None, negative_image_embeds: Tensor | None = None,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                      max_length: int = 30, dedupe: bool = True, scheduler: str | None = None,
                      return_dict: bool = True, progress: bool = True) -> TextOutput | tuple:
        """Describe images (or their tokens): text UNet data layers + image UNet context layers, latents [N, 768]
        decoded by Optimus. "No image" for guidance is CLIP of an all-black image, as the original. Decoding samples
        with `temperature`, `top_k`, `top_p` (or `greedy`) up to `max_length` tokens; `dedupe` collapses repeated
        words as the original app does. `latents` [N, 768] is the start noise."""
        self._need("image_to_text")
        cond = self.conditions.image_arg("image", image, image_embeds)
        negative = self.conditions.negative_image(None, negative_image_embeds, len(cond))
        run = self._prepare_text(len(cond), steps=num_inference_steps, guidance=guidance_scale,
                                 per_prompt=num_texts_per_prompt, eta=eta, generator=generator, latents=latents,
                                 callback=callback, callback_steps=callback_steps, scheduler=scheduler,
                                 return_dict=return_dict, progress=progress)
        decoding = self._decoding(temperature, top_k, top_p, greedy, max_length, dedupe)
        with torch.no_grad(), self._autocast():
            tokens = self.conditions.image_tokens(cond, negative, "black", run.per_prompt, run.sampling, squash=True)
            x = self._sample(run, lambda s, x: core.image_to_text(self._nets, image=tokens, x=x, s=s))
        self._draw_unused_step_noise(run)
        x = x.flatten(1)  # [N, 768]
        return _returned(TextOutput(self._decode_text(x, run.generator, decoding), x), run)

    def text_variation(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, num_texts_per_prompt: int = 1,
                       eta: float = 0.0, generator: Generator = None, latents: Tensor | None = None,
                       callback: Callback | None = None, callback_steps: int = 1, *,
                       prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                       max_length: int = 30, dedupe: bool = True, scheduler: str | None = None,
                       return_dict: bool = True, progress: bool = True) -> TextOutput | tuple:
        """Rephrase texts (or their tokens): text UNet data + context layers, decoded by Optimus (see
        image_to_text)."""
        self._need("text_variation")
        text = self.conditions.text_arg("prompt", prompt, prompt_embeds)
        negative = self.conditions.negative_text(negative_prompt, negative_prompt_embeds, len(text))
        run = self._prepare_text(len(text), steps=num_inference_steps, guidance=guidance_scale,
                                 per_prompt=num_texts_per_prompt, eta=eta, generator=generator, latents=latents,
                                 callback=callback, callback_steps=callback_steps, scheduler=scheduler,
                                 return_dict=return_dict, progress=progress)
        decoding = self._decoding(temperature, top_k, top_p, greedy, max_length, dedupe)
        with torch.no_grad(), self._autocast():
            tokens = self.conditions.text_tokens(text, negative, run.per_prompt, run.sampling)
            x = self._sample(run, lambda s, x: core.text_variation(self._nets, text=tokens, x=x, s=s))
        self._draw_unused_step_noise(run)
        x = x.flatten(1)  # [N, 768]
        return _returned(TextOutput(self._decode_text(x, run.generator, decoding), x), run)

    # ---- checks

    def _need(self, task: str) -> None:
        self._need_parts(task, *TASK_PARTS[task], task=task)

    def _need_parts(self, what: str, *parts: str, task: str | None = None) -> None:
        have = {p for t in self.tasks for p in TASK_PARTS[t]}
        if not set(parts) <= have:
            hint = task or next(t for t in TASKS if set(parts) <= set(TASK_PARTS[t]))
            raise ValueError(f"this pipeline was loaded for tasks {list(self.tasks)}; load it with "
                             f"tasks=[..., {hint!r}] to run {what}")

    def _decoding(self, temperature, top_k, top_p, greedy, max_length, dedupe) -> dict:
        return checks.decoding(temperature, top_k, top_p, greedy, max_length, dedupe,
                               max_positions=self.components.optimus.config.dec_positions)

    @property
    def _factor(self) -> int:
        return self.components.vae.config.downscale

    @property
    def _nets(self) -> core.Nets:
        image, text = self.components.image_unet, self.components.text_unet
        return core.Nets(image=self.image_eps, text=self.text_eps,
                         image_context=image.context_layers() if image is not None and "context" in image.parts
                         else None,
                         text_context=text.context_layers() if text is not None and "context" in text.parts else None)

    def _uncond_mode(self, value: str | None) -> str:
        return self.uncond_image if value is None else checks.choice("uncond_image", value, UNCOND_IMAGES)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def _prepare(self, batch: int, *, height, width, steps, guidance, per_prompt, eta, generator, latents, output_type,
                 callback, callback_steps, scheduler, return_dict, progress, init_image=None, init_latents=None,
                 strength=None, strength_rule=None, init_name="init_image") -> "_Call":
        """Check every argument of an image flow before any model runs. A height or width left open comes from
        the init image, else init_latents, else latents, else the UNet's sample size. An init image (or fidelity,
        init_name "image") starts under `strength_rule`: "original" (DDIM only, and always for fidelity) or
        "diffusers" (any sampler that starts part-way); by default the first for DDIM, else the second."""
        unet, factor = self.components.image_unet.config, self._factor
        init_images = None
        if init_image is not None and init_latents is not None:
            checks.fail("init_latents", init_latents, "None when init_image is given (one or the other)")
        if init_image is not None:
            init_images = checks.images(init_name, init_image)
            if len(init_images) not in (1, batch):
                checks.fail(init_name, f"{len(init_images)} images", f"one image or {batch} (one per prompt)")
            if height is None or width is None:  # the init image's own size where not given, as img2img
                height, width = _given_or(height, width, checks.common_size(init_name, init_images, factor))
        default = (unet.sample_size or 64) * factor
        if init_latents is not None:
            checks.tensor("init_latents", init_latents, dims=4)
            height, width = _given_or(height, width, (init_latents.shape[2] * factor, init_latents.shape[3] * factor))
        if isinstance(latents, Tensor) and latents.dim() == 4 and 0 not in latents.shape:  # (checked in _call)
            height, width = _given_or(height, width, (latents.shape[2] * factor, latents.shape[3] * factor))
        height = checks.size("height", default if height is None else height, factor)
        width = checks.size("width", default if width is None else width, factor)
        checks.choice("output_type", output_type, checks.OUTPUT_TYPES)
        run = self._call(batch, (unet.in_channels, height // factor, width // factor), steps=steps, guidance=guidance,
                         per_prompt=per_prompt, per_prompt_name="num_images_per_prompt", eta=eta, generator=generator,
                         latents=latents, output_type=output_type, callback=callback, callback_steps=callback_steps,
                         scheduler=scheduler, return_dict=return_dict, progress=progress)
        checks.pixel_budget(run.shape[0], height, width)
        starts = init_images is not None or init_latents is not None
        if strength_rule is not None:
            checks.choice("strength_rule", strength_rule, core.STRENGTH_RULES)
        for key, value in (("strength", strength), ("strength_rule", strength_rule)):
            if value is not None and not starts:
                checks.fail(key, value, "None unless init_image or init_latents is given")
        if not starts:
            return run
        name = init_name if init_latents is None else "init_latents"
        if latents is not None:
            checks.fail("latents", "a tensor", f"None when {name} is given (the start comes from it)")
        rule = checks.start_rule(run.sampling.sampler, run.scheduler, strength_rule, fidelity=init_name != "init_image",
                                 name=name)
        strength = checks.number("strength", core.DEFAULT_STRENGTH if strength is None else strength, 0.0, 1.0)
        if init_latents is not None:
            init_latents = checks.latents(init_latents, (init_latents.shape[0], *run.shape[1:]), self.device,
                                          name="init_latents")
            rows = sorted({1, batch, run.shape[0]})
            if init_latents.shape[0] not in rows:
                expected = "1 row (one prompt, one image)" if len(rows) == 1 else (
                    f"{', '.join(map(str, rows[:-1]))} or {rows[-1]} rows (one for all, one per prompt or one per "
                    "image)")
                checks.fail("init_latents", init_latents, expected)
            if len(init_latents) == 1 and batch > 1:
                init_latents = init_latents.expand(batch, -1, -1, -1)
        elif init_images is not None:
            init_images = resized(init_images, height, width).to(self.device)
            if len(init_images) == 1 and batch > 1:
                init_images = init_images.expand(batch, -1, -1, -1)
        t_enc = checks.start_steps(strength, run.sampling.num_steps, rule)
        return dataclasses.replace(run, init_images=init_images, init_latents=init_latents,
                                   sampling=dataclasses.replace(run.sampling, t_enc=t_enc, strength_rule=rule))

    def _prepare_text(self, batch: int, *, steps, guidance, per_prompt, eta, generator, latents, callback,
                      callback_steps, scheduler, return_dict, progress) -> "_Call":
        features = tuple(self.components.text_unet.config.in_channels)  # (768, 1, 1): a text latent in the text UNet
        if isinstance(latents, Tensor) and latents.dim() == 2:
            latents = latents.reshape(latents.shape[0], -1, *([1] * (len(features) - 1)))  # from [N, 768]
        run = self._call(batch, features, steps=steps, guidance=guidance, per_prompt=per_prompt,
                         per_prompt_name="num_texts_per_prompt", eta=eta, generator=generator, latents=latents,
                         output_type="text", callback=callback, callback_steps=callback_steps, scheduler=scheduler,
                         return_dict=return_dict, progress=progress)
        checks.text_budget(run.shape[0])
        return run

    def _call(self, batch: int, sample_shape: tuple[int, ...], *, steps, guidance, per_prompt, per_prompt_name, eta,
              generator, latents, output_type, callback, callback_steps, scheduler, return_dict, progress) -> "_Call":
        """The arguments every flow shares, checked, as a `_Call`."""
        name = checks.choice("scheduler", self.scheduler if scheduler is None else scheduler, list(SCHEDULERS))
        sampler = sampler_from_config(name, self.components.scheduler_config)
        steps = checks.steps(steps, sampler)
        guidance = checks.guidance(guidance)
        per_prompt = checks.integer(per_prompt_name, per_prompt, 1)
        eta = checks.eta(eta, sampler, steps)
        total = batch * per_prompt
        shape = (total, *sample_shape)
        sampling = core.Sampling(sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=eta,
                                 generator=checks.generator(generator, total))
        return _Call(sampling=sampling, scheduler=name, per_prompt=per_prompt, shape=shape,
                     latents=checks.latents(latents, shape, self.device), output_type=output_type,
                     callback=callback, callback_steps=checks.callback(callback, callback_steps),
                     return_dict=checks.boolean("return_dict", return_dict),
                     progress=checks.boolean("progress", progress))

    # ---- sampling and outputs

    def _init_latents(self, run: "_Call") -> Tensor:
        """The init latents of a run, one row per sample: given, or one posterior draw per init image from its
        generator (the first of its samples), repeated for its samples as the original does. Under diffusers' rule
        a list of generators draws one posterior sample per output, each from its own generator, as diffusers'
        img2img pipelines do (they pair several images with several prompts tiled; here each keeps its own)."""
        x0, images, gens = run.init_latents, run.init_images, run.generator
        if x0 is None:
            if isinstance(gens, list) and run.sampling.strength_rule == "diffusers":
                images = images.repeat_interleave(run.per_prompt, dim=0)
            elif isinstance(gens, list):
                gens = gens[::run.per_prompt]
            with torch.autocast(self.device.type, enabled=False):  # in the VAE's dtype, as the decode
                x0 = core.encode_latents(self.components.vae, images, gens)
        x0 = x0.to(self.device, self.dtype)
        return x0 if len(x0) == run.shape[0] else x0.repeat_interleave(run.per_prompt, dim=0)

    def _sample(self, run: "_Call", flow: Callable[[core.Sampling, Tensor], Tensor]) -> Tensor:
        """Start latents (noise in the model's dtype as the reference draws it, given latents, or noised init
        latents), then `flow(sampling, x)` with a progress bar and the user's callback."""
        s = run.sampling
        if s.t_enc is not None:
            x = core.noised_start(s.sampler, self._init_latents(run), s.num_steps, s.t_enc, s.generator,
                                  s.strength_rule)
        elif run.latents is not None:
            x = run.latents.to(self.device)
        else:
            x = randn(run.shape, s.generator, self.device, self.dtype)
        skipped = 0 if s.t_enc is None else max(s.num_steps - s.t_enc, 0) * s.sampler.evals_per_step
        total = len(s.sampler.timesteps(s.num_steps)) - skipped  # model calls
        bar = tqdm(total=total, disable=not run.progress, desc="denoising")

        def on_step(i: int, t: Tensor, latents: Tensor) -> None:
            bar.update()
            i -= skipped  # a partial run counts from its first step, as diffusers' img2img loops do
            if run.callback is not None and i % run.callback_steps == 0:  # parity: i counts model evaluations
                run.callback(i // s.sampler.evals_per_step, t, latents)

        try:
            x = flow(dataclasses.replace(s, callback=on_step), x)
        finally:
            bar.close()
        if not torch.isfinite(x).all():
            hint = "; try float32 (dtype=torch.float32)" if x.dtype != torch.float32 else ""
            if s.sampler.rescale_betas_zero_snr and s.sampler.prediction_type == "epsilon":
                hint = ("; the schedule ends at zero SNR (rescale_betas_zero_snr), where a noise prediction "
                        "(prediction_type 'epsilon') says nothing of the image: it is meant for "
                        "'v_prediction' models")
            raise FloatingPointError(f"denoising produced NaN or inf latents{hint}")
        return x

    def _images(self, x: Tensor, run: "_Call", match_to: Tensor | None = None) -> GenerationOutput | tuple:
        if run.output_type == "latent":
            return _returned(GenerationOutput(x), run)
        images = self._decode(x)
        if match_to is not None:
            images = match_colors(images, match_to)
        return _returned(GenerationOutput(to_output(images, run.output_type)), run)

    @torch.no_grad()
    def _decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [N, 3, H, W] in [0, 1], in the VAE's dtype (as diffusers returns "pt" images). A
        non-finite fp16 decode is retried in float32."""
        vae = self.components.vae
        with torch.autocast(self.device.type, enabled=False):  # in the weights' dtype, as the reference does
            images = core.decode_latents(vae, latents)
            if not torch.isfinite(images).all() and self.dtype in (torch.float16, torch.bfloat16):
                warnings.warn("the VAE decode gave NaN/inf in reduced precision; decoding again in float32",
                              stacklevel=3)
                images = core.decode_latents(copy.deepcopy(vae).float(), latents.float()).clamp(0, 1).to(self.dtype)
        if not torch.isfinite(images).all():
            raise FloatingPointError("the VAE decode produced NaN or inf values even in float32")
        return images.clamp(0, 1)

    def _draw_unused_step_noise(self, run: "_Call") -> None:
        """The original's DDIM draws each step's noise even at eta 0 (and multiplies it by 0), from the stream its
        Optimus then samples words from: draw it too, so a seeded text flow writes the original's sentences."""
        s = run.sampling
        if isinstance(s.sampler, DDIM) and s.eta == 0:
            for _ in s.sampler.timesteps(s.num_steps):
                randn(run.shape, s.generator, self.device, self.dtype)

    def _decode_text(self, latents: Tensor, generator: Generator, decoding: dict) -> list[str]:
        """One sentence per latent [N, 768], drawing from its generator, as the original."""
        optimus, tok = self.components.optimus, self.components.optimus_tokenizer
        decoding = dict(decoding)
        dedupe = decoding.pop("dedupe")
        gens = generator if isinstance(generator, list) else [generator] * len(latents)
        texts = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            z = latents.to(self.device, next(optimus.parameters()).dtype)
            for zi, g in zip(z, gens):
                ids = optimus.generate(zi[None], tok.bos_id, tok.eos_id, generator=g, **decoding)[0]
                text = tok.decode(ids)
                texts.append(remove_duplicate_word(text) if dedupe else text)
        return texts


@dataclass(frozen=True, kw_only=True)
class _Call:
    """The checked arguments of one flow call."""

    sampling: core.Sampling
    scheduler: str
    per_prompt: int
    shape: tuple[int, ...]  # (N, C, h, w) latents, or (N, 768, 1, 1) text latents
    latents: Tensor | None
    output_type: str
    callback: Callback | None
    callback_steps: int
    return_dict: bool
    progress: bool
    init_images: Tensor | None = None   # [B, 3, H, W] in [0, 1], at the output size
    init_latents: Tensor | None = None  # [B or N, C, h, w]

    @property
    def generator(self) -> Generator:
        return self.sampling.generator


def _read_diffusers_scheduler(value: object) -> tuple[str, dict]:
    """(sampler name, scheduler_config) of a diffusers scheduler object, read without importing diffusers: its
    class names the sampler (as `_class_name` does in a saved folder) and its config is the settings. A class vd
    lacks, or a setting it refuses, fails here."""
    cls, config = type(value).__name__, getattr(value, "config", None)
    if cls not in DIFFUSERS_CLASSES or not isinstance(config, Mapping):
        raise TypeError(f"scheduler: expected a sampler name (one of {sorted(SCHEDULERS)}) or a diffusers scheduler "
                        f"of one of the classes {sorted(DIFFUSERS_CLASSES)}, got an object of type {cls}")
    config = {**config, "_class_name": cls}
    name = scheduler_of(config)
    try:
        sampler_from_config(name, config)
    except ValueError as e:
        raise ValueError(f"scheduler: {e}") from None
    return name, config


def _task_names(value: object) -> tuple[str, ...]:
    """from_pretrained's tasks: the default image flows, or the names given (one, or a list), once each."""
    if value is None:
        return DEFAULT_TASKS
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        checks.fail("tasks", value, f"a list of task names, some of {list(TASKS)}", TypeError)
    if not value:
        checks.fail("tasks", value, f"some of {list(TASKS)}")
    return tuple(dict.fromkeys(checks.choice("tasks", t, TASKS) for t in value))


def _given_or(height: int | None, width: int | None, size: tuple[int, int]) -> tuple[int | None, int | None]:
    """height and width, each taken from `size` (height, width) where it is not given."""
    return size[0] if height is None else height, size[1] if width is None else width


def _returned(output: GenerationOutput | TextOutput, run: _Call) -> GenerationOutput | TextOutput | tuple:
    return output if run.return_dict else output.to_tuple()


def to_output(images: Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | Tensor:
    """Images [N, 3, H, W] in [0, 1] as "pt" (as is), "np" (float32 [N, H, W, 3]) or "pil" (rounded to uint8)."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.cpu().permute(0, 2, 3, 1).float().numpy()
    return to_pil(images)
