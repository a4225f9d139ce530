"""Golden outputs of the ORIGINAL Versatile Diffusion research code for our UNet flows.

Read by tests/pipeline/test_original_flows.py, which rebuilds the original-layout weights described here, converts them
with our weights_convert tables and checks that vd's UNets and DDIM sampler give the same numbers (fp32, 1e-5).

How the file was made
---------------------
The original code is SHI-Labs/Versatile-Diffusion at commit cf0f4a2 (its `lib/model_zoo`). This script imports
it from a local checkout (never copied here) and:

1. builds a tiny original image UNet (`openaimodel.UNetModel2D_Next`, parts global+data+context) and a tiny
   original text UNet (`UNetModel0D_Next`, parts data+context, no time MLP of its own - as the released config
   `vd_four_flow_v1-0` has them) whose structure is tests/helpers.py TINY_UNET_A with 32 norm groups (the
   original hard-codes GroupNorm(32, .)) and 16-wide context tokens; the text UNet's data is a 24-d latent
   (768 at full size);
2. fills every parameter from a fixed seed with a counter-based generator (exact integer arithmetic, the same
   bits everywhere; norm weights near 1, other vectors small, matrices ~ 1/sqrt(fan_in)), so no zero-initialised
   output layer hides a wiring mistake. The weights are not stored: flows.json lists every key of the original
   v2 layout (`diffuser.image.*`, `diffuser.text.*`, as in vd-four-flow-v1-0.pth) with its shape and kind, and
   `draw_state` rebuilds the exact state dict from that list and the seed (checked by the recorded sums);
3. runs the original `VD_v2_0` methods on a light stand-in instance (the class, created without its config
   machinery: `diffuser = {'image', 'text'}`, `global_layer_ptr = 'image'`, its own `register_schedule` with the
   released schedule: "linear" = sqrt-linear 0.00085..0.012 squared, 1000 steps) and records:
   (a) `apply_model` for x_type text/image x c_type image/text (the text flow takes latents [B, D]);
   (b) `apply_model_multicontext` for x_type image with [text ratio r_t, image ratio r_i] = (0.3, 0.7) and the
       un-normalised (2, 1), the image tokens being two images' tokens concatenated along the token axis;
   (c) image-to-text latents: `DDIMSampler.sample`, x_type text, c_type image, CFG 7.5, eta 0, 10 steps;
   (d) fidelity: `DDIMSampler.sample` with x_info x0 + x0_forward_timesteps s = 6 (x_type image, uncond zeros,
       CFG 7.5), with the q_sample noise it draws recorded; and the app's blend: `sample_multicontext` with a
       text stream (ratio 0.3) and an image stream of two images' weighted tokens (ratio 0.7, uncond zeros).
   The samplers' starting noise comes from the global torch RNG (the original's `xt` input is unusable: it calls
   `.astype(dtype)` on it, which fails for a torch tensor and for a numpy array alike), so x_T is re-drawn from the same seed and stored; the DDIM sampler subclass below
   only skips the original's unconditional move of its schedule buffers to CUDA.
Imports the code paths never use (torchvision, matplotlib, the VAE module) are stubbed in sys.modules.

Outputs: tests/data/golden/flows.safetensors (inputs, outputs, the original's alphas_cumprod) and flows.json
(configs, settings, the weight list and seed).

Regenerate:  python tests/golden/make_flows_golden.py --original PATH/TO/Versatile-Diffusion
"""

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from helpers import TINY_UNET_A, flat_config  # noqa: E402

OUT = TESTS / "data" / "golden"
IMAGE_UNET = dict(TINY_UNET_A, cross_attention_dim=16, norm_num_groups=32)  # diffusers-style, for our side
TEXT_DIM = 24                                                              # text latent width (768 in VD)
TEXT_UNET = flat_config(IMAGE_UNET, [TEXT_DIM, 1, 1])
SCHEDULE = dict(beta_schedule="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)  # vd.yaml
BATCH, IMAGE_TOKENS, TEXT_TOKENS, LATENT = 2, 5, 6, 8
STEPS, GUIDANCE, FIDELITY_S, BLEND_TEXT = 10, 7.5, 6, 0.3
WEIGHT_SEED = 11


def import_original(root: Path):
    """lib.model_zoo.{openaimodel, vd, ddim} of the checkout, with unused heavy imports stubbed."""
    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    for name in ("torchvision", "torchvision.models", "matplotlib", "matplotlib.pyplot"):
        stub(name)
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]
    stub("lib.model_zoo.autokl", AutoencoderKL=None)  # the VAE (and its LPIPS loss) is not needed here
    sys.path.insert(0, str(root))
    from lib.model_zoo import ddim, openaimodel, vd
    return openaimodel, vd, ddim


def original_args(d: dict) -> tuple[dict, dict]:
    """Constructor kwargs of the original image and text UNets with the structure of diffusers config `d`."""
    chs = d["block_out_channels"]
    down = [t.startswith("CrossAttn") for t in d["down_block_types"]]
    up = [t.startswith("CrossAttn") for t in d["up_block_types"]]
    assert up == down[::-1], "the original puts context layers at the same levels on both paths"
    assert d["norm_num_groups"] == 32, "the original hard-codes GroupNorm(32, .)"
    mult = [c // chs[0] for c in chs]
    assert [m * chs[0] for m in mult] == chs
    common = dict(model_channels=chs[0], channel_mult=mult, num_heads=d["attention_head_dim"],
                  context_dim=d["cross_attention_dim"], use_checkpoint=True)
    image = dict(common, in_channels=d["in_channels"], out_channels=d["out_channels"],
                 num_res_blocks=d["layers_per_block"], attention_resolutions=[2**i for i, a in enumerate(down) if a],
                 parts=["global", "data", "context"])
    text = dict(common, input_channels=TEXT_DIM, output_channels=TEXT_DIM,
                num_noattn_blocks=[d["layers_per_block"]] * len(chs), second_dim=[4] * len(chs), with_attn=down,
                parts=["data", "context"])
    return image, text


def uniform(n: int, start: int, seed: int) -> np.ndarray:
    """n float64 numbers uniform in [0, 1): splitmix64 of the counters start.. (exact integer arithmetic, so the
    weights are the same bits on every machine and version, and the test can rebuild them)."""
    i = np.arange(start, start + n, dtype=np.uint64)
    z = np.uint64(seed) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_state(spec: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The float32 state dict described by `spec` ("key AxB kind" in order; kind "norm" for norm weights,
    "vector" for other 1-d parameters, "matrix" otherwise), drawn from one counter stream: unit-variance uniform
    noise u, norm weights 1 + 0.2 u, vectors 0.1 u, matrices u / sqrt(fan_in) (helpers.randomize_'s scheme)."""
    out, start = {}, 0
    for entry in spec:
        key, dims, kind = entry.split()
        shape = [int(d) for d in dims.split("x")]
        n = math.prod(shape)
        u = math.sqrt(3.0) * (2.0 * uniform(n, start, seed) - 1.0)
        start += n
        if kind == "norm":
            v = 1.0 + 0.2 * u
        elif kind == "vector":
            v = 0.1 * u
        else:
            v = u / math.sqrt(n // shape[0])
        out[key] = torch.from_numpy(v.reshape(shape)).float()
    return out


def weight_spec(module: nn.Module, prefix: str) -> list[str]:
    """"key AxB kind" of every parameter, norms found by module type (the original names its norms
    in_layers.0, out_layers.0, ...). No parameter keeps its zero init."""
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    kind = lambda p: "norm" if id(p) in norm_weights else "vector" if p.dim() == 1 else "matrix"  # noqa: E731
    return [f"{prefix}{k} {'x'.join(map(str, p.shape))} {kind(p)}" for k, p in module.named_parameters()]


def stand_in_vd(vd, image: nn.Module, text: nn.Module) -> nn.Module:
    """A VD_v2_0 holding only the two denoisers and the schedule; every method run below is the original's."""
    net = vd.VD_v2_0.__new__(vd.VD_v2_0)
    nn.Module.__init__(net)
    net.parameterization, net.v_posterior, net.device = "eps", 0.0, "cpu"
    net.diffuser = nn.ModuleDict({"image": image, "text": text})
    net.global_layer_ptr = "image"  # configs/model/vd.yaml
    net.register_schedule(beta_schedule=SCHEDULE["beta_schedule"], timesteps=SCHEDULE["timesteps"],
                          linear_start=SCHEDULE["linear_start"], linear_end=SCHEDULE["linear_end"])
    return net.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, type=Path, help="checkout of SHI-Labs/Versatile-Diffusion (cf0f4a2)")
    args = ap.parse_args(argv)
    openaimodel, vd, ddim = import_original(args.original.resolve())
    torch.set_num_threads(1)

    image_args, text_args = original_args(IMAGE_UNET)
    image = openaimodel.UNetModel2D_Next(**image_args)
    text = openaimodel.UNetModel0D_Next(**text_args)
    net = stand_in_vd(vd, image, text)
    spec = weight_spec(net.diffuser, "diffuser.")  # the v2 layout of vd-four-flow-v1-0.pth
    weights = draw_state(spec, WEIGHT_SEED)
    net.diffuser.load_state_dict({k[len("diffuser."):]: v for k, v in weights.items()}, strict=True)

    class Sampler(ddim.DDIMSampler):
        def register_buffer(self, name, attr):  # the original moves every tensor to CUDA here; keep it on the CPU
            setattr(self, name, attr)

    sampler = Sampler(net)
    out: dict[str, torch.Tensor] = {"schedule.alphas_cumprod": net.alphas_cumprod.clone()}
    g = torch.Generator().manual_seed(13)
    dim = IMAGE_UNET["cross_attention_dim"]
    inputs = {
        "x_image": torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
        "x_text": torch.randn(BATCH, TEXT_DIM, generator=g),
        "t": torch.tensor([801, 301]),
        "c_image": torch.randn(BATCH, IMAGE_TOKENS, dim, generator=g),
        "c_image2": torch.randn(BATCH, IMAGE_TOKENS, dim, generator=g),
        "c_text": torch.randn(BATCH, TEXT_TOKENS, dim, generator=g),
        "u_text": torch.randn(BATCH, TEXT_TOKENS, dim, generator=g),
        "u_image": torch.randn(BATCH, IMAGE_TOKENS, dim, generator=g),
    }
    out.update({f"inputs.{k}": v for k, v in inputs.items()})
    tokens = {"image": inputs["c_image"], "text": inputs["c_text"]}

    with torch.no_grad():
        # (a) single-context flows: data layers of x_type, context layers of c_type, time MLP of the image UNet
        for x_type in ("text", "image"):
            for c_type in ("image", "text"):
                o = net.apply_model({"type": x_type, "x": inputs[f"x_{x_type}"]}, inputs["t"],
                                    {"type": c_type, "c": tokens[c_type]})
                out[f"apply_model.{x_type}_from_{c_type}"] = o
        # (b) multi-context mixing (the app lists the text stream first)
        two_images = torch.cat([inputs["c_image"], inputs["c_image2"]], dim=1)
        for name, (r_text, r_image) in {"0.3": (0.3, 0.7), "2_1": (2.0, 1.0)}.items():
            o = net.apply_model_multicontext(
                {"type": "image", "x": inputs["x_image"]}, inputs["t"],
                [{"type": "text", "c": inputs["c_text"], "ratio": r_text},
                 {"type": "image", "c": two_images, "ratio": r_image}])
            out[f"multicontext.{name}"] = o

    # (c) image -> text latents (inference_i2t: u = the image encoder's tokens of a black image; here random)
    seed = 21
    torch.manual_seed(seed)
    x_T = torch.randn(BATCH, TEXT_DIM)
    torch.manual_seed(seed)  # the sampler's first draw is x_T = torch.randn(shape)
    o, inter = sampler.sample(steps=STEPS, shape=[BATCH, TEXT_DIM], x_info={"type": "text"},
                              c_info={"type": "image", "conditioning": inputs["c_image"],
                                      "unconditional_conditioning": inputs["u_image"],
                                      "unconditional_guidance_scale": GUIDANCE}, eta=0.0, verbose=False)
    out.update({"i2t.x_T": x_T, "i2t.first_step": inter["pred_xt"][0], "i2t.out": o})

    # (d1) fidelity (inference_i2i with 0 < fid < 1): q_sample(x0, grid[s]) with global-RNG noise, then grid[s-1..0]
    x0 = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    drawn = {}
    q_sample = net.q_sample

    def recording_q_sample(x_start, t, noise=None):  # the original's own draw, recorded
        noise = torch.randn_like(x_start) if noise is None else noise
        drawn.update(noise=noise.clone(), t=t.clone())
        return q_sample(x_start, t, noise)

    net.q_sample = recording_q_sample
    torch.manual_seed(22)
    o, _ = sampler.sample(steps=STEPS, shape=[BATCH, 4, LATENT, LATENT],
                          x_info={"type": "image", "x0": x0, "x0_forward_timesteps": FIDELITY_S},
                          c_info={"type": "image", "conditioning": inputs["c_image"],
                                  "unconditional_conditioning": torch.zeros_like(inputs["c_image"]),
                                  "unconditional_guidance_scale": GUIDANCE}, eta=0.0, verbose=False)
    del net.q_sample
    assert torch.equal(drawn["t"], drawn["t"][:1].expand(BATCH))
    fidelity_t = int(drawn["t"][0])
    out.update({"fidelity.x0": x0, "fidelity.noise": drawn["noise"], "fidelity.out": o})

    # (d2) the app's blend (inference_mcg): text stream + one image stream of two images' weighted tokens
    seed = 23
    torch.manual_seed(seed)
    x_T = torch.randn(BATCH, 4, LATENT, LATENT)
    images = torch.cat([inputs["c_image"] * 1.0, inputs["c_image2"] * 0.5], dim=1)
    torch.manual_seed(seed)
    o, _ = sampler.sample_multicontext(
        steps=STEPS, shape=[BATCH, 4, LATENT, LATENT], x_info={"type": "image"},
        c_info_list=[{"type": "text", "conditioning": inputs["c_text"], "unconditional_conditioning": inputs["u_text"],
                      "unconditional_guidance_scale": GUIDANCE, "ratio": BLEND_TEXT},
                     {"type": "image", "conditioning": images, "unconditional_conditioning": torch.zeros_like(images),
                      "unconditional_guidance_scale": GUIDANCE, "ratio": 1 - BLEND_TEXT}],
        eta=0.0, verbose=False)
    out.update({"blend.x_T": x_T, "blend.c_image": images, "blend.out": o})

    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "flows.safetensors")
    meta = {
        "original": {"repo": "SHI-Labs/Versatile-Diffusion", "commit": "cf0f4a2",
                     "image_unet_args": image_args, "text_unet_args": text_args, "global_layer_ptr": "image",
                     "schedule": SCHEDULE},
        "image_unet": IMAGE_UNET, "text_unet": TEXT_UNET,
        "weights": {"seed": WEIGHT_SEED, "spec": spec,
                    "sum": math.fsum(v.double().sum().item() for v in weights.values()),
                    "abs_sum": math.fsum(v.double().abs().sum().item() for v in weights.values())},
        "steps": STEPS, "guidance_scale": GUIDANCE, "eta": 0.0,
        "multicontext_ratios": {"0.3": [0.3, 0.7], "2_1": [2.0, 1.0]},
        "fidelity": {"x0_forward_timesteps": FIDELITY_S, "noised_to_t": fidelity_t},
        "blend": {"text_ratio": BLEND_TEXT, "image_weights": [1.0, 0.5]},
    }
    (OUT / "flows.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT / "flows.safetensors").stat().st_size
    print(f"wrote {len(out)} tensors ({len(spec)} weights rebuilt from the json), {size / 1e3:.0f} kB; "
          f"fidelity noised to t={fidelity_t}")
    for k in sorted(k for k in out if not k.startswith(("inputs.", "schedule."))):
        print(f"  {k:32s} {tuple(out[k].shape)}  max|.| {out[k].abs().max():.3g}")


if __name__ == "__main__":
    main()
