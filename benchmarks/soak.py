"""Soak: many calls mixing the three tasks in one process; resident memory must stop growing.

    python benchmarks/soak.py MODEL [--calls 200] [--steps 2] [--size 64]

Prints one JSON line: RSS after the first 10% of the calls (at least 20) and at the end, and their ratio.
Exit status 1 if the end is more than 5% above the early mark.
"""

import argparse
import json
import random
import sys

import numpy as np
import PIL.Image
import torch

from vd import VersatileDiffusion


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--limit", type=float, default=1.05, help="allowed end/early RSS ratio")
    args = p.parse_args()

    pipe = VersatileDiffusion.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    rng = random.Random(0)
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(80, 64, 3) * 255).astype(np.uint8))
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, progress=False)
    early_at = max(20, args.calls // 10)
    early = None
    for i in range(args.calls):
        g = torch.Generator().manual_seed(i)
        task = rng.choice(["text_to_image", "image_variation", "dual_guided"])
        n = rng.choice([1, 2])
        scheduler = rng.choice(["ddim", "pndm", "lms"])
        if task == "text_to_image":
            pipe.text_to_image(["a cat"] * n, generator=g, scheduler=scheduler, **common)
        elif task == "image_variation":
            pipe.image_variation([image] * n, generator=g, scheduler=scheduler, **common)
        else:
            pipe.dual_guided(["a cat"] * n, [image] * n, text_to_image_strength=rng.random(), generator=g,
                             scheduler=scheduler, **common)
        if i + 1 == early_at:
            early = rss_mib()
    end = rss_mib()
    print(json.dumps({"calls": args.calls, "rss_early_mib": round(early, 1), "rss_end_mib": round(end, 1),
                      "ratio": round(end / early, 4)}))
    return 0 if end <= args.limit * early else 1


if __name__ == "__main__":
    sys.exit(main())
