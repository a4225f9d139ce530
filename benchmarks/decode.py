"""VAE decode timing for bench.py (--decode-repeats): the decode of one image's latents as each pipeline runs it
after sampling, interleaved, compared with the eager reference's image; and the candidate of our default's VAE in
channels-last memory (on a copy, called directly, against the same direct call of the NCHW original).
"""

import copy
import json
import statistics
import traceback
from pathlib import Path

import torch

from bench import DTYPES, Impl, diff, interleaved, keep, ours_name, timed


def decode_latents(a, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents of one image (what sampling ends with), the same for every implementation."""
    channels = json.loads((Path(a.ckpt) / "vae" / "config.json").read_text())["latent_channels"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, channels, a.size // 8, a.size // 8, generator=g).to(device, dtype)


def measure_decode(impls: list[Impl], a, device: torch.device, res: dict) -> None:
    """The VAE decode of one image as each pipeline runs it after sampling, interleaved, median of
    --decode-repeats; the images compared with the eager reference's. Then the candidate: our default's VAE in
    channels-last memory (on a copy, called directly, against the same direct call of the NCHW original)."""
    z = decode_latents(a, device, DTYPES[a.dtype])
    for impl in impls:
        for _ in range(2):
            impl.decode(z)
    keep(res, "decode_s", interleaved(impls, lambda impl: impl.decode(z), a.decode_repeats, device))
    diff({impl.name: impl.decode(z).float().cpu().numpy() for impl in impls}, res, "decode_")
    ours = next((impl for impl in impls if impl.name == ours_name("default")), None)
    if ours is not None:
        try:
            res[ours.name]["decode_candidates"] = vae_channels_last(ours.pipe.components.vae, z, a, device)
        except Exception as e:  # a candidate's failure is a result, not the end of the run
            traceback.print_exc()
            res[ours.name]["decode_candidates"] = {"error": f"{type(e).__name__}: {e}"}


@torch.no_grad()
def vae_channels_last(vae, z: torch.Tensor, a, device: torch.device) -> dict:
    nhwc = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    x = z / vae.config.scaling_factor
    calls = {"NCHW": lambda: vae.decode(x), "channels-last": lambda: nhwc.decode(x.contiguous(
        memory_format=torch.channels_last))}
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for r in range(a.decode_repeats):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            times[name].append(timed(calls[name], device))
    plain, other = calls["NCHW"]().float(), calls["channels-last"]().float()
    return {"direct_decode_s": {name: statistics.median(t) for name, t in times.items()},
            "rel_diff": ((other - plain).norm() / plain.norm()).item()}
