"""Argument checks for the facade and the CLI: each names the argument, the value given and what was expected,
and all run before any model does."""

import math
import numbers
import os
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from vd.conditioning import APP_SIDE
from vd.images import to_rgb
from vd.sampling import start_step
from vd.sched import DDIM, GENERATING, SCHEDULERS, sampler_from_config

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the applications' names
# Per facade call: images x height x width. Beyond it a call is refused rather than left to fail in the
# allocator (64 images of 512 x 512; the CLI and `vd batch` split larger requests into calls within it).
MAX_PIXELS = 2**24
# Per call of a text flow: texts. Each holds its context's keys and values at the 16 context sites while sampling
# (image_to_text: 257 tokens x 24,960 channels, twice with guidance: 25.7 MB in fp16, as Context.with_keys_values
# allocates them for the full-size config; 26 GB for 1024 texts). The CLI splits larger requests into calls; a
# batch job asking for more is refused.
MAX_TEXTS = 1024
MAX_GUIDANCE = 1000.0  # far above any useful scale (1 to 20); beyond, guided noise overflows fp16 for sure
MAX_SEED = 2**64 - 1   # torch.Generator.manual_seed takes 0 .. 2**64 - 1
MAX_BLEND_IMAGES = 4   # blend's images (the original app's four slots)


def _show(value: object) -> str:
    """A short description of a value: arrays, tensors and images by type and shape, not by their contents."""
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, PIL.Image.Image):
        return f"a PIL image of mode {value.mode} and size {value.size}"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (np.ndarray, Tensor, PIL.Image.Image)):
        return f"a {type(value).__name__} of {len(value)}, the first {_show(value[0])}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(name: str, value: object, expected: str, error: type[Exception] = ValueError) -> NoReturn:
    raise error(f"{name}: expected {expected}, got {_show(value)}")


def prompts(name: str, value: object) -> list[str]:
    """A str or a non-empty list of str, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            fail(name, value, "a non-empty list of strings")
        return list(value)
    fail(name, value, "a string or a non-empty list of strings", TypeError)


def images(name: str, value: object) -> list[PIL.Image.Image] | torch.Tensor:
    """A PIL image, a non-empty list of them, or a float tensor [B, 3, H, W] with values in [0, 1]."""
    if isinstance(value, PIL.Image.Image):
        return [_pil(name, value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        return [_pil(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() != 4 or value.shape[1] != 3 or value.shape[0] == 0:
            fail(name, value, "a float tensor of shape [B, 3, H, W]")
        if value.shape[2] == 0 or value.shape[3] == 0:
            fail(name, value, "an image at least 1 pixel high and wide")
        if not torch.isfinite(value).all() or value.min() < 0 or value.max() > 1:
            fail(name, f"tensor with values in [{value.min().item():.3g}, {value.max().item():.3g}]",
                 "values in [0, 1]")
        return value
    if isinstance(value, (list, tuple)) and not value:
        fail(name, value, "a non-empty list of PIL images")
    fail(name, value, "a PIL image, a list of PIL images, or a float tensor [B, 3, H, W] in [0, 1]", TypeError)


def _pil(name: str, img: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB image with at least one pixel (16-bit and float modes rescaled, not clipped: vd.images)."""
    if img.width == 0 or img.height == 0:
        fail(name, img, "an image at least 1 pixel high and wide")
    return to_rgb(img, name)


def _plain(value: object) -> object:
    """A 0-d tensor or array as the Python number it holds (as diffusers takes `guidance_scale=torch.tensor(7.5)`,
    e.g. from a torch.linspace sweep); anything else as it is."""
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, f"an integer >= {minimum}", TypeError)
    if value < minimum or (maximum is not None and value > maximum):
        fail(name, value, f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""))
    return int(value)


def number(name: str, value: object, low: float, high: float | None = None) -> float:
    """A finite real number in [low, high] (NaN and infinities are refused whatever the bounds)."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, value, "a number", TypeError)
    try:
        real = float(value)
    except OverflowError:  # an integer beyond float's range
        real = math.inf
    if not (math.isfinite(real) and real >= low and (high is None or real <= high)):
        fail(name, value, f"a finite number in [{low}, {high}]" if high is not None else f"a finite number >= {low}")
    return real


def guidance(value: object) -> float:
    """guidance_scale in [0, MAX_GUIDANCE]: a larger scale makes the latents non-finite for sure."""
    return number("guidance_scale", value, 0.0, MAX_GUIDANCE)


def eta(value: object, sampler=None, steps: int | None = None) -> float:
    """eta >= 0 (0 = DDIM, 1 = DDPM's variance), and at most the sampler's `max_eta(steps)` when it has one: above
    it a DDIM step takes the square root of a negative number, so the result is NaN for sure."""
    value = number("eta", value, 0.0)
    bound = sampler.max_eta(steps) if hasattr(sampler, "max_eta") and steps is not None else None
    if bound is not None and value > bound:
        fail("eta", value, f"at most {bound:.4f} with {steps} DDIM steps (beyond it a step's noise exceeds what the "
             "schedule leaves room for: NaN for sure)")
    return value


def seed(name: str, value: object, count: int = 1) -> int:
    """A seed for `count` generators seeded value, value + 1, ...: an integer in [0, 2**64 - count]."""
    return integer(name, value, 0, MAX_SEED - (count - 1))


def steps(value: object, sampler) -> int:
    """num_inference_steps in [1, the most this sampler's schedule places] (`max_steps`: with "leading" spacing
    and a steps_offset, VD's 1, the first timestep must stay below num_train_timesteps), and one whose timesteps
    the schedule places (computing them is cheap: a "leading" one refuses some counts below its largest)."""
    steps = integer("num_inference_steps", value, 1, sampler.max_steps())
    sampler.timesteps(steps)
    return steps


def pixel_budget(images: int, height: int, width: int) -> None:
    """Refuse a call whose output would exceed MAX_PIXELS (images x height x width) before anything is
    allocated; split such a request into several calls (each image seeded on its own gives the same images)."""
    total = images * height * width
    if total > MAX_PIXELS:
        raise ValueError(f"num_images_per_prompt x height x width: expected at most {MAX_PIXELS} pixels per call "
                         f"(e.g. {MAX_PIXELS // (512 * 512)} images of 512 x 512), got {images} x {height} x "
                         f"{width} = {total}; ask for fewer or smaller images per call")


def text_budget(texts: int) -> None:
    """Refuse a text-flow call of more than MAX_TEXTS texts before anything is allocated (each seeded on its own
    gives the same texts in smaller calls)."""
    if texts > MAX_TEXTS:
        raise ValueError(f"num_texts_per_prompt x inputs (prompts or images): expected at most {MAX_TEXTS} texts "
                         f"per call, got {texts}; ask for fewer texts per call")


def device(value: object) -> torch.device:
    """A device this machine has: ValueError for an unknown name ("foo") or an absent one ("cuda" without CUDA,
    "cuda:3" with two GPUs)."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, (str, torch.device)):
        fail("device", value, "a device name such as 'cpu' or 'cuda', or a torch.device", TypeError)
    try:
        dev = torch.device(value)
    except RuntimeError:
        fail("device", value, "a device name such as 'cpu', 'cuda' or 'cuda:1'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail("device", value, "a device this machine has (CUDA is not available here)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail("device", value, f"a CUDA device index below {torch.cuda.device_count()}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        fail("device", value, "a device this machine has (MPS is not available here)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        module = getattr(torch, dev.type, None)
        if module is None or not getattr(module, "is_available", lambda: False)():
            fail("device", value, f"a device this machine has ({dev.type} is not available here)")
    return dev


def dtype(value: object, name: str = "dtype") -> torch.dtype:
    """A floating-point dtype the models can run in."""
    allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    names = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"
    if not isinstance(value, torch.dtype):
        fail(name, value, f"a torch.dtype: {names}", TypeError)
    if value not in allowed:
        fail(name, value, names)
    return value


def size(name: str, value: object, factor: int) -> int:
    """A positive multiple of the VAE's downscale factor (pixels)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, f"a positive integer multiple of {factor}", TypeError)
    if value <= 0 or value % factor:
        fail(name, value, f"a positive multiple of {factor}")
    return int(value)


def choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """One of the names `allowed` (tested as a str first: `in` would compare an array elementwise)."""
    if not isinstance(value, str) or value not in allowed:
        fail(name, value, f"one of {list(allowed)}")
    return value


def generating_scheduler(name: str, value: object) -> str:
    """A sampler name for the command line, which starts from noise and writes pictures: one of the samplers that
    generate, not ddim_inverse (it turns given image latents into noise)."""
    if value in SCHEDULERS and value not in GENERATING:
        raise ValueError(f"{name}: {value!r} turns given image latents into noise, and the command line takes no "
                         'latents: use the Python API, or a batch job with "latents" and "output_type": "latent"')
    return choice(name, value, GENERATING)


def negative(name: str, value: object, batch: int, kind: str) -> list | None:
    """A negative prompt (kind 'text') or negative image (kind 'image'): one, or one per prompt."""
    if value is None:
        return None
    items = prompts(name, value) if kind == "text" else images(name, value)
    if len(items) not in (1, batch):
        fail(name, f"{len(items)} {kind}s", f"one {kind} or {batch} (one per prompt)")
    if len(items) == 1 and batch > 1:
        return items.expand(batch, -1, -1, -1) if isinstance(items, torch.Tensor) else items * batch
    return items


def generator(value: object, total: int) -> torch.Generator | list[torch.Generator] | None:
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        if len(value) != total:
            fail("generator", f"a list of {len(value)} generators", f"one generator or a list of {total} "
                 "(batch size x num_images_per_prompt)")
        return list(value)
    fail("generator", value, "a torch.Generator or a list of them", TypeError)


def latents(value: object, shape: tuple[int, ...], device: torch.device, name: str = "latents"
            ) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        fail(name, value, "a torch.Tensor", TypeError)
    if tuple(value.shape) != shape:
        fail(name, value, f"a tensor of shape {list(shape)}")
    if not value.is_floating_point():
        fail(name, value, "a floating-point tensor")
    if value.device.type not in ("cpu", device.type):
        fail(name, f"tensor on {value.device}", f"a tensor on the CPU or on {device}")
    if not torch.isfinite(value).all():
        fail(name, "tensor with NaN or inf values", "finite values")
    return value


def callback(value: object, steps: object) -> int:
    """callback_steps for `value`; None is taken where there is no callback (as the reference takes it)."""
    if value is not None and not callable(value):
        fail("callback", value, "a callable(step, timestep, latents) or None", TypeError)
    return 1 if steps is None and value is None else integer("callback_steps", steps, 1)


def per_image(name: str, value: object, k: int, default: float, low: float,
              high: float | None = None) -> list[float]:
    """One number for all k images, or a list of k numbers (blend's weights and focus)."""
    if value is None:
        return [default] * k
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            fail(name, value, f"one number per image ({k})")
        return [number(f"{name}[{i}]", v, low, high) for i, v in enumerate(value)]
    return [number(name, value, low, high)] * k


def keep_masks(masks: object, k: int) -> list[Tensor | None]:
    """The blend masks (white = leave out) as keep-weights [1, 1, 512, 512] in [0, 1] (None = keep everything)."""
    if masks is None:
        return [None] * k
    if not isinstance(masks, (list, tuple)) or len(masks) != k:
        fail("masks", masks, f"a list of {k} masks (one per image; None for no mask)")
    keep = []
    for i, m in enumerate(masks):
        name = f"masks[{i}]"
        if m is None:
            keep.append(None)
            continue
        if isinstance(m, PIL.Image.Image):
            m = _mask_picture(name, m)
        elif isinstance(m, Tensor):
            if not m.is_floating_point() or m.dim() not in (2, 3) or (m.dim() == 3 and m.shape[0] != 1):
                fail(name, m, "a float tensor [H, W] or [1, H, W]")
            if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                fail(name, "a tensor with values outside [0, 1]", "values in [0, 1]")
            m = F.interpolate(m.float().reshape(1, 1, *m.shape[-2:]), size=(APP_SIDE, APP_SIDE), mode="bilinear",
                              antialias=True)  # as a picture is
        else:
            fail(name, m, "a PIL image, a float tensor [H, W] in [0, 1], or None", TypeError)
        keep.append((1 - m.float()).reshape(1, 1, *m.shape[-2:]))
    return keep


def _mask_picture(name: str, m: PIL.Image.Image) -> Tensor:
    """A mask picture as the original app reads it: resized to 512 x 512 (bilinear, in its own mode: PIL's resize
    of a transparent RGBA mask darkens its transparent parts), then its first channel in [0, 1], not composited
    over white. Palette masks are resized in their colours (the original would read palette indices), 16-bit ones
    as 32-bit integers (what every Pillow can resize)."""
    if m.width == 0 or m.height == 0:
        fail(name, m, "an image at least 1 pixel high and wide")
    if m.mode in ("P", "PA"):
        m = m.convert("RGBA" if m.mode == "PA" or m.info.get("transparency") is not None else "RGB")
    elif m.mode.startswith("I;16"):
        m = m.convert("I")
    m = m.resize((APP_SIDE, APP_SIDE), PIL.Image.Resampling.BILINEAR)
    if "A" in m.getbands():
        m = m.convert("RGB")  # drops the alpha band, no compositing
    m.info.pop("transparency", None)
    return torch.from_numpy(np.asarray(_pil(name, m))[..., 0].copy()).float() / 255


def decoding(temperature, top_k, top_p, greedy, max_length, dedupe, *, max_positions: int) -> dict:
    """The text flows' decoding options, checked, as keyword arguments of `OptimusVAE.generate` (+ dedupe)."""
    if not isinstance(greedy, bool):
        fail("greedy", greedy, "True or False", TypeError)
    if not isinstance(dedupe, bool):
        fail("dedupe", dedupe, "True or False", TypeError)
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and temperature <= 0:
        fail("temperature", temperature, "a number > 0 (use greedy=True for argmax decoding)")
    temperature = number("temperature", temperature, 0.0)
    return dict(temperature=temperature, top_k=integer("top_k", top_k, 0),
                top_p=number("top_p", top_p, 0.0, 1.0), greedy=greedy,
                max_length=integer("max_length", max_length, 2, max_positions), dedupe=dedupe)


def path(name: str, value: object, expected: str) -> str | os.PathLike:
    """A str or os.PathLike, not yet looked up (what it names is checked where it is opened)."""
    if not isinstance(value, (str, os.PathLike)) or value == "":
        fail(name, value, expected, TypeError if not isinstance(value, str) else ValueError)
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        fail(name, value, "True or False", TypeError)
    return value


def tensor(name: str, value: object, dims: int) -> Tensor:
    """A floating-point tensor with `dims` dimensions and finite values."""
    if not isinstance(value, Tensor):
        fail(name, value, f"a torch.Tensor with {dims} dimensions", TypeError)
    if value.dim() != dims or not value.is_floating_point() or 0 in value.shape:
        fail(name, value, f"a non-empty floating-point tensor with {dims} dimensions")
    return finite(name, value)


def finite(name: str, value: Tensor) -> Tensor:
    if not torch.isfinite(value).all():
        fail(name, "a tensor with NaN or inf values", "finite values")
    return value


def tokens(name: str, value: object, shape: tuple[int, int], device: torch.device,
           batch: int | tuple[int, ...] | None = None) -> Tensor:
    """Context tokens [B, L, D] as the encoders give them (`shape` = (L, D)), B in `batch` when given."""
    value = tensor(name, value, dims=3)
    if tuple(value.shape[1:]) != tuple(shape):
        fail(name, value, f"context tokens of shape [B, {shape[0]}, {shape[1]}]")
    allowed = (batch,) if isinstance(batch, int) else batch
    if allowed is not None and value.shape[0] not in allowed:
        fail(name, value, f"a batch of {' or '.join(map(str, allowed))} (one per prompt)")
    if value.device.type not in ("cpu", device.type):
        fail(name, f"tensor on {value.device}", f"a tensor on the CPU or on {device}")
    return value


def common_size(name: str, value: list[PIL.Image.Image] | Tensor, factor: int) -> tuple[int, int]:
    """(height, width) shared by all images, rounded down to a multiple of `factor`."""
    sizes = {(im.height, im.width) for im in value} if isinstance(value, list) else {tuple(value.shape[-2:])}
    if len(sizes) > 1:
        fail(name, f"images of sizes {sorted(sizes)}", "images of one size, or height= and width= to resize them to")
    h, w = sizes.pop()
    if h < factor or w < factor:
        fail(name, f"an image of {h}x{w} pixels", f"at least {factor}x{factor} pixels")
    return h // factor * factor, w // factor * factor


def start_rule(sampler, scheduler: str, given: str | None, *, fidelity: bool, name: str) -> str:
    """The rule an init image (`name`) starts under: `given`, else "original" for DDIM and "diffusers" for the
    other samplers; refused where the sampler lacks it. Fidelity always starts under the original's rule."""
    if fidelity:  # the original app's option, with its rule
        if given == "diffusers":
            fail("strength_rule", given, "None or 'original' with fidelity (the original app's rule)")
        if not isinstance(sampler, DDIM):
            raise ValueError(f"fidelity: expected the scheduler the original starts part-way (ddim), got {scheduler!r}")
        return "original"
    rule = given or ("original" if isinstance(sampler, DDIM) else "diffusers")
    if rule == "original" and not isinstance(sampler, DDIM):
        fail("strength_rule", rule, f"'diffusers' with scheduler {scheduler!r} (the original's rule is DDIM's)")
    if not sampler.starts_part_way:
        others = [n for n, cls in SCHEDULERS.items() if not cls.starts_part_way]
        raise ValueError(f"{name}: expected a scheduler that starts part-way (any but {' and '.join(others)}), got "
                         f"{scheduler!r}")
    return rule


def start_steps(strength: float, num_steps: int, rule: str) -> int:
    """t_enc, the steps an init image at `strength` runs; diffusers' rule refuses a run of none, as diffusers does."""
    t_enc = start_step(strength, num_steps)
    if rule == "diffusers" and t_enc == 0:
        fail("strength", strength, f"at least 1 / num_inference_steps = {1 / num_steps:g} with strength_rule "
             "'diffusers' (it runs the last int(strength * num_inference_steps) steps)")
    return t_enc


def settled_start(scheduler: str | None, settings: dict, rule: str | None, *, start: str | None, fidelity: bool,
                  strength: float, steps: int) -> None:
    """start_rule's and start_steps' refusals, ahead of loading, where the call settles the rule itself: by its
    scheduler's name (with these settings) or its strength_rule. `start`: the init argument's name, if any. With
    neither, the model's default sampler settles it and the facade checks when it runs; so it does a start together
    with fidelity, and a step count below 1."""
    if start is not None and fidelity:
        return
    if scheduler is not None and (start is not None or fidelity):
        sampler = sampler_from_config(scheduler, settings)
        rule = start_rule(sampler, scheduler, rule, fidelity=fidelity, name=start or "image")
    if start is not None and rule is not None and steps >= 1:
        start_steps(strength, steps, rule)
