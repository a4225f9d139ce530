"""The `vd` command: one subcommand per task. User mistakes (bad arguments or files, outputs that cannot be
written) end with one line on stderr and exit status 2; Ctrl-C with 130. Image k of --num-images is seeded
with --seed + k and generated in calls of at most CHUNK images, so results do not depend on the chunking."""

import argparse
import json
import random
import sys
from pathlib import Path

import PIL.Image
import torch

from vd import checks, files
from vd.arrays import npy_bytes, npy_rows
from vd.fast import EAGER
from vd.files import OutputError, check_writable
from vd.images import open_image
from vd.jobs import TEXT_TASKS
from vd.sampling import DEFAULT_STRENGTH, STRENGTH_RULES
from vd.sched import GENERATING, sampler_from_config
from vd.versions import versions

CHUNK = 8  # images per facade call (fewer when the pixel budget, vd.checks.MAX_PIXELS, says so)
WRITABLE = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
LATENTS = ".npy"  # -o NAME.npy: the latents, not decoded (what latents= takes back): [1, 4, h, w], or [N, 768] texts
TASK_OF = {"text-to-image": "text_to_image", "image-variation": "image_variation", "dual-guided": "dual_guided",
           "blend": "blend", "image-to-text": "image_to_text", "text-variation": "text_variation"}


class UserError(Exception):
    """A mistake in the command line or its files, reported as one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vd", description="Versatile Diffusion: text-to-image, image variation, "
                                "dual-guided generation, blending, image-to-text and text variation.")
    p.add_argument("--version", action="version", version=" ".join(f"{k} {v}" for k, v in versions().items()),
                   help="show the versions of vd, torch and transformers, and exit")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("batch", help="run a JSONL file of jobs, resumable, over every GPU with torchrun (vd batch -h)")

    def common(s: argparse.ArgumentParser, text: bool = False) -> None:
        if text:
            s.add_argument("-o", "--output", default=None, help="text file to write, one sentence per line "
                           "(default: print them), or .npy for their text latents (float32 [N, 768])")
            s.add_argument("--num-texts", dest="num_images", type=int, default=1, help="sentences to generate "
                           "(default 1)")
            s.add_argument("--temperature", type=float, default=1.0, help="decoding temperature (default 1)")
            s.add_argument("--greedy", action="store_true", help="decode by argmax instead of sampling")
            s.add_argument("--optimus", default=None, help="optimus-vae.pth (default: in the model's pretrained_pth/)")
        else:
            s.add_argument("-o", "--output", required=True, help="image file to write (PNG, JPEG, WebP...), or .npy "
                           "for the latents, not decoded; with --num-images > 1, NAME-0.png, NAME-1.png, ...")
            s.add_argument("--height", type=int, default=None, help="image height in pixels (default 512)")
            s.add_argument("--width", type=int, default=None, help="image width in pixels (default 512)")
            s.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
            s.add_argument("--init-image", default=None, help="start from this image, noised part-way (any "
                           "sampler but pndm)")
            s.add_argument("--init-strength", type=float, default=None, help="with --init-image: 0 keeps it, 1 "
                           "starts from noise (default 0.75)")
            s.add_argument("--strength-rule", choices=STRENGTH_RULES, default=None,
                           help="with --init-image: 'original' (VD's; DDIM only, its default) or 'diffusers' "
                           "(diffusers' img2img; the other samplers' default)")
        s.add_argument("--model", default="shi-labs/versatile-diffusion",
                       help="hub repo id, diffusers-layout folder, original .pth, or converted folder")
        s.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
        s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
        s.add_argument("--seed", type=int, default=None, help="random seed, 0 to 2**64 - 1; image k gets seed + k "
                       "(default: random)")
        s.add_argument("--scheduler", default=None, help=f"sampler: {', '.join(GENERATING)} (default: the model's, "
                       "ddim for VD)")
        s.add_argument("--scheduler-set", action="append", default=[], metavar="KEY=VALUE",
                       help="a scheduler_config.json setting over the model's, VALUE as JSON or else a string "
                            "(e.g. timestep_spacing=trailing, use_karras_sigmas=true); repeatable")
        s.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
        s.add_argument("--dtype", choices=sorted(checks.DTYPES), default=None,
                       help="weights dtype (default fp16 on CUDA, fp32 on CPU)")
        s.add_argument("--eager", action="store_true", help="on CUDA, plain PyTorch: no CUDA graphs and no Triton "
                       "kernels (slower; for debugging)")
        s.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    t2i = sub.add_parser("text-to-image", help="generate an image from a text prompt")
    t2i.add_argument("prompt")
    t2i.add_argument("--negative", default=None, help="negative prompt")
    common(t2i)
    var = sub.add_parser("image-variation", help="generate variations of an image")
    var.add_argument("image", help="input image file")
    var.add_argument("--negative", default=None, help="negative image file")
    var.add_argument("--focus", type=float, default=0.5, help="0 = keep semantics, 1 = keep style (default 0.5)")
    var.add_argument("--fidelity", type=float, default=0.0, help="0 = from noise, towards 1 = closer to the input")
    var.add_argument("--color-adjust", action="store_true", help="match the input's colour statistics")
    common(var)
    dual = sub.add_parser("dual-guided", help="generate from a text prompt and an image together")
    dual.add_argument("prompt")
    dual.add_argument("image", help="input image file")
    dual.add_argument("--strength", type=float, default=0.5, help="text weight: 1 = text only, 0 = image only")
    dual.add_argument("--negative", default=None, help="negative prompt")
    common(dual)
    blend = sub.add_parser("blend", help="generate one image from up to four images (and a text)")
    blend.add_argument("images", nargs="+", help="input image files (1 to 4)")
    blend.add_argument("--weights", type=float, nargs="+", default=None,
                       help="one weight for all images, or one per image (default 1)")
    blend.add_argument("--focus", type=float, nargs="+", default=None,
                       help="one focus for all images, or one per image (default 0.5)")
    blend.add_argument("--masks", nargs="+", default=None, help="one mask file per image (white = leave out), "
                       "or 'none'")
    blend.add_argument("--prompt", default=None, help="optional text")
    blend.add_argument("--text-strength", type=float, default=0.0, help="weight of the text (default 0)")
    blend.add_argument("--negative", default=None, help="negative prompt (with --prompt)")
    common(blend)
    i2t = sub.add_parser("image-to-text", help="describe an image")
    i2t.add_argument("image", help="input image file")
    common(i2t, text=True)
    t2t = sub.add_parser("text-variation", help="rephrase a text")
    t2t.add_argument("prompt")
    t2t.add_argument("--negative", default=None, help="negative prompt")
    common(t2t, text=True)
    return p


def _open_image(path: str, what: str, as_is: bool = False) -> PIL.Image.Image:
    try:
        return open_image(path, what, as_is=as_is)
    except ValueError as e:
        raise UserError(str(e)) from None


def _outputs(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() not in WRITABLE | {LATENTS}:
        raise UserError(f"--output: expected an image file name ending in one of {sorted(WRITABLE)}, or {LATENTS} "
                        f"for the latents, got {output!r}")
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    for path in paths:
        if path.is_dir():
            raise UserError(f"--output: {path}: is a folder, not a file")
    _writable(paths[-1])  # the longest name; all are in one folder
    return paths


def _writable(path: Path) -> None:
    try:
        check_writable(path)
    except OutputError as e:
        raise UserError(f"--output: {e}") from None


def _chunks(n: int, height: int | None, width: int | None) -> list[range]:
    """Image indices 0..n-1 in facade calls of at most CHUNK images and within the per-call pixel budget (an
    unset size counts as VD's 512)."""
    pixels = (height or 512) * (width or 512)
    checks.pixel_budget(1, height or 512, width or 512)
    size = max(1, min(CHUNK, checks.MAX_PIXELS // pixels))
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _draws_per_call(task: str, args: argparse.Namespace) -> bool:
    """Whether the call draws from the first image's generator on behalf of all (an init image's encoding,
    fidelity, focus, blend): then images generated together would depend on which ones share a call."""
    return (task == "blend" or args.init_image is not None or getattr(args, "fidelity", 0) > 0
            or getattr(args, "focus", 0.5) != 0.5)


def run(args: argparse.Namespace) -> list[Path]:
    """Generate what the command asks for, printing each output file once it is complete; its paths."""
    from vd.pipeline import VersatileDiffusion

    task = TASK_OF[args.command]
    flag = "--num-texts" if task in TEXT_TASKS else "--num-images"
    if args.num_images < 1:
        raise UserError(f"{flag}: expected an integer >= 1, got {args.num_images}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    try:
        checks.seed("--seed", seed, args.num_images)
    except ValueError:
        raise UserError(f"--seed: expected an integer in [0, {checks.MAX_SEED - (args.num_images - 1)}] (output k "
                        f"is seeded with seed + k), got {seed}") from None
    device = checks.device(args.device)
    if task in TEXT_TASKS:
        paths = [_text_output(args.output)] if args.output else []
        chunks = [range(i, min(i + CHUNK, args.num_images)) for i in range(0, args.num_images, CHUNK)]
    else:
        chunks = _chunks(args.num_images, args.height, args.width)
        if _draws_per_call(task, args):  # one image per call, so that each depends on its own seed alone
            chunks = [range(k, k + 1) for k in range(args.num_images)]
        paths = _outputs(args.output, args.num_images)
    latents = bool(paths) and paths[0].suffix.lower() == LATENTS
    if latents and getattr(args, "color_adjust", False):
        raise UserError(f"--color-adjust: expected it with an image output (colours are matched on the decoded "
                        f"pictures), not with {LATENTS} latents")
    image = _open_image(args.image, "image") if task in ("image_variation", "dual_guided", "image_to_text") else None
    init = _open_image(args.init_image, "--init-image") if getattr(args, "init_image", None) else None
    if getattr(args, "strength_rule", None) is not None and init is None:
        raise UserError(f"--strength-rule: expected it with --init-image only, got {args.strength_rule!r}")
    if getattr(args, "init_strength", None) is not None:
        if init is None:
            raise UserError(f"--init-strength: expected it with --init-image only, got {args.init_strength}")
        if not 0 <= args.init_strength <= 1:
            raise UserError(f"--init-strength: expected a number in [0, 1], got {args.init_strength}")
    if args.scheduler is not None:
        try:
            checks.generating_scheduler("--scheduler", args.scheduler)
        except ValueError as e:
            raise UserError(str(e)) from None
    settings = _scheduler_settings(args.scheduler_set, args.scheduler)
    # what the command's own --scheduler or --strength-rule rules out of a start from an image, before the model loads
    strength = getattr(args, "init_strength", None)
    checks.settled_start(args.scheduler, settings, getattr(args, "strength_rule", None),
                         start="init_image" if init is not None else None, fidelity=getattr(args, "fidelity", 0.0) > 0,
                         strength=DEFAULT_STRENGTH if strength is None else strength, steps=args.steps)
    negative = getattr(args, "negative", None)
    if task == "image_variation" and negative is not None:
        negative = _open_image(negative, "--negative")
    extra = {}
    if task == "blend":
        if not 1 <= len(args.images) <= checks.MAX_BLEND_IMAGES:
            raise UserError(f"images: expected 1 to {checks.MAX_BLEND_IMAGES} image files, "
                            f"got {len(args.images)}")
        if args.masks is not None and len(args.masks) != len(args.images):
            raise UserError(f"--masks: expected one mask per image ({len(args.images)}) or none, got {len(args.masks)}")

        def one_or_each(values: list[float] | None) -> float | list[float] | None:  # one number serves every image
            return values[0] if values is not None and len(values) == 1 else values
        extra = dict(images=[_open_image(f, "images") for f in args.images], weights=one_or_each(args.weights),
                     focus=one_or_each(args.focus),
                     masks=None if args.masks is None else
                     [None if m.lower() == "none" else _open_image(m, "--masks", as_is=True) for m in args.masks],
                     prompt=args.prompt, text_strength=args.text_strength, negative_prompt=args.negative)
    pipe = VersatileDiffusion.from_pretrained(args.model, tasks=[task], device=device,
                                              dtype=checks.DTYPES.get(args.dtype), scheduler=args.scheduler,
                                              optimus=getattr(args, "optimus", None), **(EAGER if args.eager else {}))
    if settings:
        try:
            pipe.scheduler_config = {**pipe.scheduler_config, **settings}
        except (ValueError, TypeError) as e:
            raise UserError(f"--scheduler-set: {e}") from None
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=not args.no_progress)
    texts, text_latents = [], []
    for chunk in chunks:  # image (text) k is drawn from its own generator seeded with seed + k, whatever the chunks
        kwargs["generator"] = [torch.Generator().manual_seed(seed + k) for k in chunk]
        if task in TEXT_TASKS:
            kwargs.update(num_texts_per_prompt=len(chunk), temperature=args.temperature, greedy=args.greedy)
            out = (pipe.image_to_text(image, **kwargs) if task == "image_to_text" else
                   pipe.text_variation(args.prompt, negative_prompt=negative, **kwargs))
            texts += out.texts
            text_latents.append(out.latents)
            continue
        kwargs.update(height=args.height, width=args.width, num_images_per_prompt=len(chunk), init_image=init,
                      strength=args.init_strength, strength_rule=args.strength_rule,
                      output_type="latent" if latents else "pil")
        if task == "text_to_image":
            out = pipe.text_to_image(args.prompt, negative_prompt=negative, **kwargs)
        elif task == "image_variation":
            out = pipe.image_variation(image, negative_prompt=negative, focus=args.focus, fidelity=args.fidelity,
                                       color_adjust=args.color_adjust, **kwargs)
        elif task == "dual_guided":
            out = pipe.dual_guided(args.prompt, image, text_to_image_strength=args.strength,
                                   negative_prompt=negative, **kwargs)
        else:
            out = pipe.blend(**extra, **kwargs)
        for img, k in zip(out.images, chunk):
            if latents:
                files.write_bytes(paths[k], npy_bytes(img))
            else:
                fmt = PIL.Image.registered_extensions()[paths[k].suffix.lower()]
                files.save(paths[k], lambda tmp: img.save(tmp, format=fmt))
            print(paths[k], flush=True)  # listed as soon as it is complete (an interrupt keeps what is listed)
    if task in TEXT_TASKS:
        if latents:
            files.write_bytes(paths[0], npy_rows(torch.cat(text_latents)))
            print(paths[0])
        elif paths:
            files.write_bytes(paths[0], ("\n".join(texts) + "\n").encode())
            print(paths[0])
        else:
            print("\n".join(texts))
    return paths


def _scheduler_settings(pairs: list[str], scheduler: str) -> dict:
    """--scheduler-set KEY=VALUE pairs as a dict, VALUE read as JSON (true, 3, 0.5, [...]) or else kept as the
    string it is; checked against --scheduler before the model loads (without one, against the model's own
    sampler once it has loaded)."""
    settings = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"--scheduler-set: expected KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    try:
        if scheduler is not None:  # (a name already checked)
            sampler_from_config(scheduler, settings)
    except (ValueError, TypeError) as e:
        raise UserError(f"--scheduler-set: {e}") from None
    return settings


def _text_output(output: str) -> Path:
    out = Path(output)
    _writable(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from weights_convert import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # the batch job has its own parser (vd/batch.py)
        from vd.batch import main as batch_main
        return batch_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        run(args)  # prints each output's path once it is written
    except KeyboardInterrupt:
        print("vd: interrupted; the files already listed are complete, nothing is half-written", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, CheckpointError, OSError, FloatingPointError) as e:
        print(f"vd: error: {_as_options(_one_line(e))}", file=sys.stderr)
        return 2
    return 0


# the Python API's argument names the facade's errors start with -> the options a user of the command typed
OPTION_OF = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "text_to_image_strength": "--strength",
             "strength": "--init-strength", "strength_rule": "--strength-rule", "init_image": "--init-image",
             "negative_prompt": "--negative",
             "num_images_per_prompt": "--num-images", "num_texts_per_prompt": "--num-texts",
             "text_strength": "--text-strength", "fidelity": "--fidelity", "focus": "--focus", "weights": "--weights",
             "masks": "--masks", "height": "--height", "width": "--width", "scheduler": "--scheduler",
             "temperature": "--temperature", "device": "--device", "optimus": "--optimus"}


def _as_options(message: str) -> str:
    """An error that starts with an argument's Python name, said with the command's option too."""
    name, sep, rest = message.partition(":")
    return f"{OPTION_OF[name]} ({name}){sep}{rest}" if sep and name in OPTION_OF else message


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, OutputError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    text = str(e).strip()
    return " ".join(text.split("\n")) if text else type(e).__name__
