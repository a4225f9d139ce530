"""The `vd` command: one subcommand per task. User mistakes end with one line on stderr and exit status 2."""

import argparse
import os
import sys
from pathlib import Path

import PIL.Image
import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WRITABLE = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
TASK_OF = {"text-to-image": "text_to_image", "image-variation": "image_variation", "dual-guided": "dual_guided"}


class UserError(Exception):
    """A mistake in the command line or its files, reported as one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vd", description="Versatile Diffusion: text-to-image, image variation and "
                                "dual-guided generation.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("batch", help="run a JSONL file of jobs, resumable, over every GPU with torchrun (vd batch -h)")

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("-o", "--output", required=True, help="image file to write (PNG, JPEG, WebP...); with "
                       "--num-images > 1, NAME-0.png, NAME-1.png, ...")
        s.add_argument("--model", default="shi-labs/versatile-diffusion",
                       help="hub repo id, diffusers-layout folder, original .pth, or converted folder")
        s.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
        s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
        s.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
        s.add_argument("--height", type=int, default=None, help="image height in pixels (default 512)")
        s.add_argument("--width", type=int, default=None, help="image width in pixels (default 512)")
        s.add_argument("--scheduler", default="ddim", help="ddim, pndm or lms (default ddim)")
        s.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
        s.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
        s.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="weights dtype (default fp16 on CUDA, fp32 on CPU)")
        s.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    t2i = sub.add_parser("text-to-image", help="generate an image from a text prompt")
    t2i.add_argument("prompt")
    t2i.add_argument("--negative", default=None, help="negative prompt")
    common(t2i)
    var = sub.add_parser("image-variation", help="generate variations of an image")
    var.add_argument("image", help="input image file")
    var.add_argument("--negative", default=None, help="negative image file")
    common(var)
    dual = sub.add_parser("dual-guided", help="generate from a text prompt and an image together")
    dual.add_argument("prompt")
    dual.add_argument("image", help="input image file")
    dual.add_argument("--strength", type=float, default=0.5, help="text weight: 1 = text only, 0 = image only")
    dual.add_argument("--negative", default=None, help="negative prompt")
    common(dual)
    return p


def _open_image(path: str, what: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read image {path!r} ({e})") from None


def _outputs(output: str, n: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() not in WRITABLE:
        raise UserError(f"--output: expected an image file name ending in one of {sorted(WRITABLE)}, got {output!r}")
    if not out.parent.resolve().is_dir():
        raise UserError(f"--output: folder {str(out.parent)!r} does not exist")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def _save(img: PIL.Image.Image, path: Path) -> None:
    """Write through a temporary file in the same folder, so a failure leaves no half-written image."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        img.save(tmp, format=PIL.Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> list[Path]:
    from vd.pipeline import VersatileDiffusion

    if args.num_images < 1:
        raise UserError(f"--num-images: expected an integer >= 1, got {args.num_images}")
    paths = _outputs(args.output, args.num_images)
    task = TASK_OF[args.command]
    image = _open_image(args.image, "image") if task != "text_to_image" else None
    negative = args.negative
    if task == "image_variation" and negative is not None:
        negative = _open_image(negative, "--negative")
    pipe = VersatileDiffusion.from_pretrained(args.model, tasks=[task], device=args.device,
                                              dtype=DTYPES.get(args.dtype), scheduler=args.scheduler)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.num_images, generator=generator, progress=not args.no_progress)
    if task == "text_to_image":
        out = pipe.text_to_image(args.prompt, negative_prompt=negative, **kwargs)
    elif task == "image_variation":
        out = pipe.image_variation(image, negative_prompt=negative, **kwargs)
    else:
        out = pipe.dual_guided(args.prompt, image, text_to_image_strength=args.strength, negative_prompt=negative,
                               **kwargs)
    for img, path in zip(out.images, paths):
        _save(img, path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from weights_convert import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # the batch job has its own parser (vd/batch.py)
        from vd.batch import main as batch_main
        return batch_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        for path in run(args):
            print(path)
    except (UserError, ValueError, TypeError, CheckpointError, FileNotFoundError, FloatingPointError) as e:
        print(f"vd: error: {e}", file=sys.stderr)
        return 2
    return 0
