"""Seconds per image with the fast samplers next to DDIM at 50 steps (issue 17), ours only, one process.

For each (sampler, steps): text_to_image end to end (median of --repeats, after one untimed run), the time of one
denoising step inside that run (median gap between callbacks: UNet with guidance + the sampler's update), and the
sampler's own cost per step (its whole loop with a free model: a precomputed output), as a share of the step.
Every configuration is timed in one process, alternating, so processes sharing the CPU slow all of them alike.

    python benchmarks/samplers.py CKPT --device cpu --size 128 --repeats 2 --markdown out/samplers.md
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vd import VersatileDiffusion  # noqa: E402
from vd.sched import sampler_from_config  # noqa: E402

from bench import sync, timed  # noqa: E402

RUNS = [("ddim", 50), ("dpmpp_2m_karras", 20), ("dpmpp_2m_karras", 25), ("unipc", 20), ("unipc", 25)]


def one_image(pipe, name: str, steps: int, size: int) -> tuple[float, list[float]]:
    """(seconds for the call, seconds between consecutive step callbacks)."""
    marks = []

    def on_step(i, t, x):
        sync(pipe.device)
        marks.append(time.perf_counter())

    sync(pipe.device)
    t0 = time.perf_counter()
    pipe.text_to_image("a lighthouse at dusk", num_inference_steps=steps, height=size, width=size, output_type="np",
                       generator=torch.Generator().manual_seed(0), scheduler=name, callback=on_step, progress=False)
    sync(pipe.device)
    return time.perf_counter() - t0, [b - a for a, b in zip(marks, marks[1:])]


def sampler_only(pipe, name: str, steps: int, size: int, repeats: int = 5) -> float:
    """Seconds per step of the sampler's own loop, with a model that costs nothing (a fixed output)."""
    sampler = sampler_from_config(name, pipe.components.scheduler_config)
    shape = (1, pipe.components.image_unet.config.in_channels, size // pipe._factor, size // pipe._factor)
    x = torch.randn(shape, device=pipe.device, dtype=pipe.dtype)
    out = torch.randn_like(x)
    return statistics.median(timed(lambda: sampler.sample(lambda x_in, t: out, x, steps), pipe.device)
                             for _ in range(repeats)) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="diffusers-layout VD folder (benchmarks/make_checkpoint.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                    help="CUDA graphs (default: the library's, on for CUDA)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = VersatileDiffusion.from_pretrained(args.ckpt, tasks=["text_to_image"], device=device, dtype=dtype,
                                              cuda_graphs=args.cuda_graphs)
    for name, _ in RUNS:  # untimed: first-call costs, CUDA graph captures
        one_image(pipe, name, 2, args.size)
    e2e = {run: [] for run in RUNS}
    gaps = {run: [] for run in RUNS}
    for r in range(args.repeats):
        for run in RUNS if r % 2 == 0 else RUNS[::-1]:
            seconds, g = one_image(pipe, *run, args.size)
            e2e[run].append(seconds)
            gaps[run].extend(g)
    rows = []
    for name, steps in RUNS:
        step = statistics.median(gaps[(name, steps)])
        own = sampler_only(pipe, name, steps, args.size)
        rows.append(dict(sampler=name, steps=steps, seconds_per_image=statistics.median(e2e[(name, steps)]),
                         all=e2e[(name, steps)], step_s=step, sampler_step_s=own, sampler_share=own / step))
    base = rows[0]["seconds_per_image"]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{args.size}x{args.size}, {device} ({card}), {dtype}, guidance 7.5, batch 1, median of {args.repeats}, "
             f"torch {torch.__version__}",
             "", "| sampler | steps | s / image | vs DDIM 50 | s / step (in the run) | sampler's own s / step | share |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['seconds_per_image']:.2f} | "
                     f"{row['seconds_per_image'] / base:.2f}x | {row['step_s']:.3f} | "
                     f"{row['sampler_step_s'] * 1e3:.2f} ms | {row['sampler_share']:.2%} |")
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    result = dict(size=args.size, device=str(device), dtype=str(dtype), rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
