"""How close our fp16 GPU path is to diffusers' on the same weights, stage by stage (text_to_image).

    python benchmarks/fp16_check.py CKPT [--device cuda] [--steps 50]

With random weights 50 guided steps are chaotic: fp16 rounding differences grow until the decoded images
differ, so the end-to-end image difference alone says little. This compares each stage on identical inputs:
the prompt tokens, one UNet call with guidance (same latents, same tokens), and the whole sampling run.
Prints one JSON line of relative errors (max abs difference / max abs of the reference).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_ours, load_reference  # noqa: E402

PROMPT = "a red car parked in the sun, photograph"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    device, dtype = torch.device(a.device), torch.float16 if a.device.startswith("cuda") else torch.float32
    ref = load_reference(a.ckpt, "text_to_image", device, dtype).pipe
    ours = load_ours(a.ckpt, "text_to_image", device, dtype).pipe
    out = {}

    want = ref._encode_prompt(PROMPT, device, 1, True, None)  # [uncond, cond]
    got = torch.cat([ours.encode_prompt(""), ours.encode_prompt(PROMPT)])
    out["tokens"] = rel(got, want)

    from vd.nn import Context
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.tensor(981, device=device)
    ref_eps = ref.image_unet(x, t, encoder_hidden_states=want).sample
    our_eps = ours.image_eps(x, t, [Context(ours.components.text_unet.context_layers(), want)])
    out["unet_step"] = rel(our_eps, ref_eps)

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    lat_ref = ref(PROMPT, num_inference_steps=a.steps, generator=g(), output_type="latent").images
    lat_ours = ours.text_to_image(PROMPT, num_inference_steps=a.steps, generator=g(), output_type="latent",
                                  progress=False).images
    out[f"latents_after_{a.steps}_steps"] = rel(lat_ours, lat_ref)
    for n in (1, 5):
        r = ref(PROMPT, num_inference_steps=n, generator=g(), output_type="latent").images
        o = ours.text_to_image(PROMPT, num_inference_steps=n, generator=g(), output_type="latent",
                               progress=False).images
        out[f"latents_after_{n}_steps"] = rel(o, r)
    out["latent_abs_max_ref"] = lat_ref.float().abs().max().item()
    print("FP16CHECK " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
