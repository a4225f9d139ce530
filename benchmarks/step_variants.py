"""Which GPU settings make our text_to_image UNet step and VAE decode fastest (ours only, one process).

    python benchmarks/step_variants.py CKPT [--device cuda] [--repeats 20] [--json OUT]

Times one guided UNet step (batch 2, 64x64 latents, 77 text tokens) replayed from a CUDA graph, and one VAE
decode (eager), for each combination of: memory format (channels-last, our default on CUDA, or contiguous
NCHW) and cuDNN autotuning (`torch.backends.cudnn.benchmark` off, torch's default, or on). Medians of
`--repeats` timed calls after warm-up; the graph capture happens after the memory-format switch.
"""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import sync  # noqa: E402


def median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    from vd.fast import NoisePredictor
    from vd.nn import Context
    from vd.pipeline import VersatileDiffusion

    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    pipe = VersatileDiffusion.from_pretrained(a.ckpt, tasks=["text_to_image"], device=device)
    unet, vae = pipe.components.image_unet, pipe.components.vae
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).to(device, torch.float16)
    tokens = torch.randn(2, 77, 768, generator=g).to(device, torch.float16)
    z = torch.randn(1, 4, 64, 64, generator=g).to(device, torch.float16) / vae.config.scaling_factor
    t = torch.tensor(981, device=device)
    rows = []
    for layout, autotune in itertools.product(("channels_last", "contiguous"), (False, True)):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        unet.to(memory_format=fmt)
        vae.to(memory_format=fmt)
        torch.backends.cudnn.benchmark = autotune
        step = NoisePredictor(unet, cuda_graphs=True)
        streams = [Context(pipe.components.text_unet.context_layers(), tokens)]
        row = dict(layout=layout, cudnn_benchmark=autotune,
                   unet_step_graph_ms=median_ms(lambda: step(x, t, streams), device, a.repeats),
                   unet_step_eager_ms=median_ms(lambda: unet(x, t, streams), device, max(5, a.repeats // 4)),
                   vae_decode_ms=median_ms(lambda: vae.decode(z), device, max(5, a.repeats // 4)))
        rows.append(row)
        print(json.dumps(row), flush=True)
        step = None
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    print("\n| layout | cudnn.benchmark | UNet step, CUDA graph (ms) | UNet step, eager (ms) | VAE decode (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['cudnn_benchmark']} | {r['unet_step_graph_ms']:.2f} | "
              f"{r['unet_step_eager_ms']:.2f} | {r['vae_decode_ms']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(device), rows=rows), indent=1))


if __name__ == "__main__":
    main()
