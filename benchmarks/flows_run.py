"""Time the flows the reference does not have (ours only): image_to_text, text_variation, blend, and
image_variation with focus, fidelity and colour matching.

    python benchmarks/flows_run.py CKPT [--device cuda] [--steps 50] [--size 512] [--json OUT]

One warm-up call each (excluded), then the median of `--repeats` calls; also checks every output is finite
(texts: non-empty list). On random weights the texts are gibberish: this measures speed and the GPU path.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import condition_image, init_device, timed  # noqa: E402


def timed_median(fn, device: torch.device, repeats: int):
    """Median seconds of fn() over `repeats` calls after a warm-up, and its output."""
    out = fn()
    return statistics.median(timed(fn, device) for _ in range(repeats)), out


def main() -> None:
    from vd.pipeline import VersatileDiffusion

    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    init_device(device)
    image, other = condition_image(a.size, 0), condition_image(a.size, 1)
    mask = torch.zeros(a.size, a.size)
    mask[:, : a.size // 2] = 1  # leave out the left half of the second image
    common = dict(num_inference_steps=a.steps, progress=False)

    def g():
        return torch.Generator().manual_seed(0)

    t0 = time.perf_counter()
    text = VersatileDiffusion.from_pretrained(a.ckpt, tasks=["image_to_text", "text_variation"], device=device)
    load_text = time.perf_counter() - t0
    calls = {
        "image_to_text": lambda: text.image_to_text(image, generator=g(), **common).texts,
        "text_variation": lambda: text.text_variation("a red car parked in the sun", generator=g(), **common).texts,
    }
    results = {}
    for name, fn in calls.items():
        seconds, texts = timed_median(fn, device, a.repeats)
        assert isinstance(texts, list) and len(texts) == 1, texts
        results[name] = dict(seconds=seconds, output=texts[0][:80])
        print(json.dumps({name: results[name]}), flush=True)
    text = None  # free the text flows before the image ones load
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    pipe = VersatileDiffusion.from_pretrained(a.ckpt, tasks=["image_variation", "blend"], device=device)
    load_image = time.perf_counter() - t0
    size = dict(height=a.size, width=a.size, output_type="np", **common)
    calls = {
        "image_variation": lambda: pipe.image_variation(image, generator=g(), **size).images,
        "image_variation focus 0.2, fidelity 0.5, color_adjust": lambda: pipe.image_variation(
            image, focus=0.2, fidelity=0.5, color_adjust=True, generator=g(), **size).images,
        "blend 2 images (one masked) + text 0.3": lambda: pipe.blend(
            [image, other], weights=[1.0, 0.7], masks=[None, mask], focus=[0.5, 0.8], prompt="a red car",
            text_strength=0.3, generator=g(), **size).images,
    }
    for name, fn in calls.items():
        seconds, images = timed_median(fn, device, a.repeats)
        assert np.isfinite(images).all() and images.shape == (1, a.size, a.size, 3), images.shape
        results[name] = dict(seconds=seconds)
        print(json.dumps({name: results[name]}), flush=True)
    summary = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", steps=a.steps,
                   size=a.size, load_seconds={"text flows": load_text, "image flows": load_image}, results=results)
    print(f"\n| flow ({a.steps} steps, {a.size}px) | seconds per call |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.3f} |")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
