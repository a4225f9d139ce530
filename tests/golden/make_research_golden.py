"""Golden outputs of the ORIGINAL code for the Brain-Diffuser reconstruction recipe (init latent + strength + two
mixed contexts), on the tiny random UNets of flows.json.

Read by tests/pipeline/test_research_golden.py. The recipe, as published in ozcelikfu/brain-diffuser
(scripts/versatilediffusion_reconstruct_images.py), per item:

    t_enc = int(strength * N)                          # N = 50, strength 0.75 -> 37
    z_enc = sampler.stochastic_encode(x0, torch.tensor([t_enc]))
    z = sampler.decode_dc(z_enc, first_conditioning=[uim, cim], second_conditioning=[utx, ctx], t_start=t_enc,
                          unconditional_guidance_scale=7.5, xtype='image', first_ctype='vision',
                          second_ctype='prompt', mixed_ratio=1 - mixing)                   # mixing 0.4

How the file was made
---------------------
`stochastic_encode` and `decode_dc` are Brain-Diffuser's additions (its versatile_diffusion/lib/model_zoo/ddim_vd.py)
to a vendored copy of SHI-Labs/Versatile-Diffusion at commit 51dcd3b; the vendored model code differs from 51dcd3b
only by fp16 casts in `UNetModelVD.forward(_dc)` (it ran the UNet in half precision on a GPU). So this script
imports, from local checkouts (never copied here):
- SHI-Labs 51dcd3b's `lib.model_zoo` (`UNetModelVD.forward_dc`, `VD.apply_model_dc`, `DDPM.register_schedule`,
  `DDIMSampler`), with Brain-Diffuser's `ddim_vd.py` loaded into that package in place of 51dcd3b's own (it adds
  `stochastic_encode`, `decode_dc`; its other changes only read the device from `model.model.diffusion_model`);
- SHI-Labs cf0f4a2's `lib.model_zoo` (make_flows_golden.py's import and stand-in), for the cross-check below.

1. The weights are flows.json's (the v2 layout of cf0f4a2, drawn by `draw_state` from its seed; checked by its
   recorded sums). 51dcd3b's `UNetModelVD` (image `UNetModel2D`, text `UNetModel0D_MultiDim`, one shared time MLP:
   the Nov-2022 `*-deprecated.pth` layout) is built with the same structure and gets the same tensors: its layers,
   walked in forward order, take the v2 data and context blocks in order (the v2 layout numbers them that way).
2. Per case, random stand-ins for the encoders' outputs (the test is at the UNet + sampler level): init latent x0,
   image tokens cim and uim (real: CLIP of the given image / of a grey image), text tokens ctx and utx (real: the
   predicted text tokens / CLIP of the empty prompt). `torch.manual_seed(seed)` (the script seeds 0 once), then the
   two calls above, on the CPU in fp32, eta 0. The noise is `torch.randn_like(x0)` from the global RNG, one draw
   for the whole batch; it is re-drawn from the same seed and stored for diagnosis (and checked against z_enc).
   (The published script seeds once before its loop: see 5.)
   Recorded: the grid timestep x0 was noised to (ascending DDIM grid `range(0, 1000, 1000 // N) + 1`, index
   t_enc) and the timesteps decode_dc visited (grid indices t_enc - 1 down to 0).
3. Cross-check: cf0f4a2's `DDIMSampler.sample_multicontext` started from x0 with `x0_forward_timesteps = t_enc`
   and the streams [image: uim/cim, ratio 1 - mixing], [text: utx/ctx, ratio mixing], on the v2 stand-in with the
   same weights and seed, draws the same noise and gives the same latents; the largest difference over the output
   scale is asserted below 1e-5 (the golden tolerance) and recorded (`cross_check` in the json).
4. Edge cases of the original, recorded as the exception it raises (or "returns the input"): stochastic_encode
   with t_enc = N (index out of range), decode_dc with t_start = 0, sample_multicontext with x0_forward_timesteps
   0 and N.
5. The published loop, seeded once: `torch.manual_seed(seed)`, then three items one after another (each its own
   x0, cim, ctx; one uim, utx), each stochastic_encode + decode_dc as above, all on one RNG stream (the CPU's
   here). So an item's start noise depends on the draws of the items before it: its own start noise, then one
   draw of x's shape per step decode_dc runs (DDIM's `noise_like`, multiplied by sigma = 0 at eta 0). Recorded:
   the outputs, and each item's start noise replayed from the seed that way (checked against its z_enc). (On
   the published script's GPUs these draws fall on three streams: the VAE's posterior sample on the CPU
   generator, the start noise on that of cuda:0, which holds x0, and the step draws on that of cuda:1, which
   holds the UNet.)

Outputs: tests/data/golden/research.safetensors and research.json.

Regenerate:  python tests/golden/make_research_golden.py --original PATH/TO/Versatile-Diffusion@cf0f4a2 \
                 --original-51dcd3b PATH/TO/Versatile-Diffusion@51dcd3b --brain-diffuser PATH/TO/brain-diffuser
"""

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golden.make_flows_golden import (IMAGE_TOKENS, IMAGE_UNET, LATENT, OUT, SCHEDULE, TEXT_TOKENS,  # noqa: E402
                                      WEIGHT_SEED, draw_state, import_original, original_args, stand_in_vd,
                                      weight_spec)

GUIDANCE, MIXING = 7.5, 0.4
CASES = {  # name: (N, strength, batch, noise seed)
    "recipe": (50, 0.75, 1, 0),  # as published: t_enc = 37, one item, torch.manual_seed(0)
    "n10": (10, 0.55, 2, 1),     # t_enc = 5, a batch of two (one noise draw for both)
}
LOOP = (10, 0.55, 3, 2)  # (N, strength, items, seed): three items one after another after one torch.manual_seed


def import_51dcd3b(root: Path, brain_diffuser: Path):
    """51dcd3b's lib.model_zoo.{openaimodel, vd} and Brain-Diffuser's ddim_vd inside that package."""
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]  # cf0f4a2's package, imported first; its modules stay alive through our references
    sys.path = [p for p in sys.path if not (Path(p) / "lib" / "model_zoo").is_dir()]
    stub = types.ModuleType("lib.model_zoo.autoencoder")
    stub.AutoencoderKL = None  # the VAE is not needed
    sys.modules[stub.__name__] = stub
    sys.path.insert(0, str(root))
    from lib.model_zoo import openaimodel, vd
    path = brain_diffuser / "versatile_diffusion" / "lib" / "model_zoo" / "ddim_vd.py"
    spec = importlib.util.spec_from_file_location("lib.model_zoo.ddim_vd", path)
    ddim_vd = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ddim_vd
    spec.loader.exec_module(ddim_vd)
    return openaimodel, vd, ddim_vd


def v1_args(image_args: dict, text_args: dict) -> tuple[dict, dict]:
    """Constructor kwargs of 51dcd3b's UNetModel2D / UNetModel0D_MultiDim with the structure of cf0f4a2's."""
    keep = ("model_channels", "channel_mult", "num_heads", "context_dim", "use_checkpoint")
    levels = len(image_args["channel_mult"])
    image = {k: image_args[k] for k in keep}
    image.update(input_channels=image_args["in_channels"], output_channels=image_args["out_channels"],
                 num_noattn_blocks=[image_args["num_res_blocks"]] * levels,
                 with_attn=[2**i in image_args["attention_resolutions"] for i in range(levels)])
    text = {k: v for k, v in text_args.items() if k != "parts"}
    return image, text


def v1_state(unet_vd: nn.Module, transformer: type, v2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The v2 tensors under 51dcd3b's UNetModelVD names: each UNet's layers in forward order (input blocks, middle
    block, output blocks, out) take the next v2 context block (SpatialTransformer) or data block (anything else)."""
    out = {f"time_embed.{k[len('image.time_embed.'):]}": v for k, v in v2.items() if k.startswith("image.time_embed.")}
    for side, net in (("image", unet_vd.unet_image), ("text", unet_vd.unet_text)):
        count = {"data": 0, "context": 0}
        blocks = [f"input_blocks.{i}" for i in range(len(net.input_blocks))] + ["middle_block"]
        blocks += [f"output_blocks.{i}" for i in range(len(net.output_blocks))]
        layers = [(f"{b}.{j}", layer) for b in blocks for j, layer in enumerate(net.get_submodule(b))]
        for name, layer in layers + [("out", net.out)]:
            part = "context" if isinstance(layer, transformer) else "data"
            src = f"{side}.{part}_blocks.{count[part]}.0."
            count[part] += 1
            for k in layer.state_dict():
                out[f"unet_{side}.{name}.{k}"] = v2[src + k]
        used = {f"{side}.{part}_blocks.{i}.0." for part in count for i in range(count[part])}
        assert {k for k in v2 if k.startswith(f"{side}.") and ".time_embed." not in k} == {
            k for k in v2 if any(k.startswith(u) for u in used)}, "every v2 block is used once"
    return out


def stand_in_vd_v1(vd, unet_vd: nn.Module) -> nn.Module:
    """51dcd3b's VD holding only the UNet and the schedule (released config: vd_noema, linear 0.00085..0.012)."""
    net = vd.VD.__new__(vd.VD)
    nn.Module.__init__(net)
    net.parameterization, net.v_posterior, net.device = "eps", 0.0, "cpu"
    net.model = nn.Module()
    net.model.diffusion_model = unet_vd
    net.register_schedule(beta_schedule=SCHEDULE["beta_schedule"], timesteps=SCHEDULE["timesteps"],
                          linear_start=SCHEDULE["linear_start"], linear_end=SCHEDULE["linear_end"])
    return net.eval()


def on_cpu(sampler_class: type) -> type:
    class Sampler(sampler_class):
        def register_buffer(self, name, attr):  # the original moves every tensor to CUDA here; keep it on the CPU
            setattr(self, name, attr)
    return Sampler


def error_of(f) -> str:
    try:
        f()
    except Exception as e:  # noqa: BLE001 - recording what the original raises
        return f"{type(e).__name__}: {e}"
    return "no error"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, type=Path, help="SHI-Labs/Versatile-Diffusion at cf0f4a2")
    ap.add_argument("--original-51dcd3b", required=True, type=Path, help="SHI-Labs/Versatile-Diffusion at 51dcd3b")
    ap.add_argument("--brain-diffuser", required=True, type=Path, help="ozcelikfu/brain-diffuser")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    # cf0f4a2 and flows.json's weights
    openaimodel2, vd2, ddim2 = import_original(args.original.resolve())
    image_args, text_args = original_args(IMAGE_UNET)
    net2 = stand_in_vd(vd2, openaimodel2.UNetModel2D_Next(**image_args), openaimodel2.UNetModel0D_Next(**text_args))
    spec = weight_spec(net2.diffuser, "diffuser.")
    flows = json.loads((OUT / "flows.json").read_text())
    assert spec == flows["weights"]["spec"] and WEIGHT_SEED == flows["weights"]["seed"]
    weights = {k[len("diffuser."):]: v for k, v in draw_state(spec, WEIGHT_SEED).items()}
    net2.diffuser.load_state_dict(weights, strict=True)
    sampler2 = on_cpu(ddim2.DDIMSampler)(net2)

    # 51dcd3b + Brain-Diffuser's sampler, same weights
    openaimodel1, vd1, ddim_vd = import_51dcd3b(args.original_51dcd3b.resolve(), args.brain_diffuser.resolve())
    image1, text1 = v1_args(image_args, text_args)
    unet_vd = openaimodel1.UNetModelVD.__new__(openaimodel1.UNetModelVD)
    nn.Module.__init__(unet_vd)
    unet_vd.unet_image = openaimodel1.UNetModel2D(**image1)
    unet_vd.unet_text = openaimodel1.UNetModel0D_MultiDim(**text1)
    unet_vd.time_embed = unet_vd.unet_image.time_embed  # as UNetModelVD.__init__: one time MLP, the image UNet's
    del unet_vd.unet_image.time_embed, unet_vd.unet_text.time_embed
    unet_vd.model_channels, unet_vd.device = unet_vd.unet_image.model_channels, "cpu"
    unet_vd.load_state_dict(v1_state(unet_vd, openaimodel1.SpatialTransformer, weights), strict=True)
    net1 = stand_in_vd_v1(vd1, unet_vd)
    sampler = on_cpu(ddim_vd.DDIMSampler_VD)(net1)
    assert torch.allclose(net1.alphas_cumprod, net2.alphas_cumprod, rtol=0, atol=0)

    visited: list[int] = []
    p_sample = sampler.p_sample_ddim_dc

    def recording_p_sample(x, c0, c1, t, index, **kw):
        assert torch.equal(t, t[:1].expand_as(t)) and int(t[0]) == sampler.ddim_timesteps[index]
        visited.append(int(t[0]))
        return p_sample(x, c0, c1, t, index, **kw)

    sampler.p_sample_ddim_dc = recording_p_sample
    out: dict[str, torch.Tensor] = {}
    meta_cases, cross = {}, {}
    g = torch.Generator().manual_seed(31)
    dim = IMAGE_UNET["cross_attention_dim"]
    for name, (n, strength, batch, seed) in CASES.items():
        x = {
            "x0": torch.randn(batch, 4, LATENT, LATENT, generator=g),
            "cim": torch.randn(batch, IMAGE_TOKENS, dim, generator=g),
            "uim": torch.randn(batch, IMAGE_TOKENS, dim, generator=g),
            "ctx": torch.randn(batch, TEXT_TOKENS, dim, generator=g),
            "utx": torch.randn(batch, TEXT_TOKENS, dim, generator=g),
        }
        t_enc = int(strength * n)
        with torch.no_grad():
            sampler.make_schedule(ddim_num_steps=n, ddim_eta=0.0, verbose=False)
            torch.manual_seed(seed)
            z_enc = sampler.stochastic_encode(x["x0"], torch.tensor([t_enc]))
            visited.clear()
            z = sampler.decode_dc(z_enc, first_conditioning=[x["uim"], x["cim"]],
                                  second_conditioning=[x["utx"], x["ctx"]], t_start=t_enc,
                                  unconditional_guidance_scale=GUIDANCE, xtype="image", first_ctype="vision",
                                  second_ctype="prompt", mixed_ratio=1 - MIXING)
        torch.manual_seed(seed)
        noise = torch.randn_like(x["x0"])
        noised_to = int(sampler.ddim_timesteps[t_enc])
        a = net1.alphas_cumprod[noised_to]
        assert torch.allclose(z_enc, a.sqrt() * x["x0"] + (1 - a).sqrt() * noise, rtol=0, atol=1e-6)
        assert visited == [k * (1000 // n) + 1 for k in range(t_enc)][::-1]

        # cf0f4a2: sample_multicontext from x0 with x0_forward_timesteps = t_enc
        torch.manual_seed(seed)
        z2, _ = sampler2.sample_multicontext(
            steps=n, shape=list(x["x0"].shape), x_info={"type": "image", "x0": x["x0"], "x0_forward_timesteps": t_enc},
            c_info_list=[{"type": "image", "conditioning": x["cim"], "unconditional_conditioning": x["uim"],
                          "unconditional_guidance_scale": GUIDANCE, "ratio": 1 - MIXING},
                         {"type": "text", "conditioning": x["ctx"], "unconditional_conditioning": x["utx"],
                          "unconditional_guidance_scale": GUIDANCE, "ratio": MIXING}], eta=0.0, verbose=False)
        cross[name] = ((z2 - z).abs().max() / z.abs().max()).item()
        assert cross[name] < 1e-5, (name, cross[name])  # float32 rounding only (a wrong weight would be O(1))

        out.update({f"{name}.{k}": v for k, v in x.items()})
        out.update({f"{name}.noise": noise, f"{name}.z_enc": z_enc, f"{name}.out": z})
        meta_cases[name] = {"steps": n, "strength": strength, "t_enc": t_enc, "batch": batch, "noise_seed": seed,
                            "noised_to_t": noised_to, "visited": list(visited)}

    # edge cases of the original (N = 10, case n10's inputs)
    x0, c0, c1 = out["n10.x0"], [out["n10.uim"], out["n10.cim"]], [out["n10.utx"], out["n10.ctx"]]
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    x_dc = torch.randn_like(x0)
    dc0 = sampler.decode_dc(x_dc, c0, c1, t_start=0, unconditional_guidance_scale=GUIDANCE, mixed_ratio=1 - MIXING)
    streams = [{"type": "image", "conditioning": out["n10.cim"], "unconditional_conditioning": out["n10.uim"],
                "unconditional_guidance_scale": GUIDANCE, "ratio": 1 - MIXING}]

    def multicontext(s):
        return lambda: sampler2.sample_multicontext(10, list(x0.shape), {"type": "image", "x0": x0,
                                                                         "x0_forward_timesteps": s},
                                                    streams, verbose=False)
    edges = {
        "stochastic_encode t_enc=N": error_of(lambda: sampler.stochastic_encode(x0, torch.tensor([10]))),
        "decode_dc t_start=0": "returns its input" if torch.equal(dc0, x_dc) else "changes its input",
        "sample_multicontext x0_forward_timesteps=0": error_of(multicontext(0)),
        "sample_multicontext x0_forward_timesteps=N": error_of(multicontext(10)),
    }

    # the published loop: torch.manual_seed once, then item after item on one RNG stream (LOOP's inputs from g)
    n, strength, items, seed = LOOP
    t_enc = int(strength * n)
    x = {"x0": torch.randn(items, 4, LATENT, LATENT, generator=g),
         "cim": torch.randn(items, IMAGE_TOKENS, dim, generator=g),
         "ctx": torch.randn(items, TEXT_TOKENS, dim, generator=g),
         "uim": torch.randn(1, IMAGE_TOKENS, dim, generator=g),  # the same "no image" / "no text" every item
         "utx": torch.randn(1, TEXT_TOKENS, dim, generator=g)}
    sampler.make_schedule(ddim_num_steps=n, ddim_eta=0.0, verbose=False)
    a = net1.alphas_cumprod[int(sampler.ddim_timesteps[t_enc])]
    z_encs, zs = [], []
    torch.manual_seed(seed)
    with torch.no_grad():
        for k in range(items):
            z_encs.append(sampler.stochastic_encode(x["x0"][k:k + 1], torch.tensor([t_enc])))
            zs.append(sampler.decode_dc(z_encs[-1], first_conditioning=[x["uim"], x["cim"][k:k + 1]],
                                        second_conditioning=[x["utx"], x["ctx"][k:k + 1]], t_start=t_enc,
                                        unconditional_guidance_scale=GUIDANCE, xtype="image", first_ctype="vision",
                                        second_ctype="prompt", mixed_ratio=1 - MIXING))
    # replay the stream: per item, the start noise, then one (unused, eta 0) draw per step decode_dc ran
    torch.manual_seed(seed)
    noises = []
    for k in range(items):
        noises.append(torch.randn_like(x["x0"][k:k + 1]))
        assert torch.allclose(z_encs[k], a.sqrt() * x["x0"][k:k + 1] + (1 - a).sqrt() * noises[k], rtol=0, atol=1e-6)
        for _ in range(t_enc):
            torch.randn_like(x["x0"][k:k + 1])
    out.update({f"loop.{k}": v for k, v in x.items()})
    out.update({"loop.noise": torch.cat(noises), "loop.z_enc": torch.cat(z_encs), "loop.out": torch.cat(zs)})
    loop = {"steps": n, "strength": strength, "t_enc": t_enc, "items": items, "noise_seed": seed,
            "draws_per_item": 1 + t_enc}

    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "research.safetensors")
    meta = {
        "original": {"sampler": "ozcelikfu/brain-diffuser 31d52c0 versatile_diffusion/lib/model_zoo/ddim_vd.py",
                     "model": "SHI-Labs/Versatile-Diffusion 51dcd3b (UNetModelVD.forward_dc, VD.apply_model_dc)",
                     "cross_check": "SHI-Labs/Versatile-Diffusion cf0f4a2 DDIMSampler.sample_multicontext",
                     "v1_image_unet_args": image1, "v1_text_unet_args": text1},
        "weights": "flows.json",
        "guidance_scale": GUIDANCE, "mixing": MIXING, "mixed_ratio": 1 - MIXING, "eta": 0.0,
        "cases": meta_cases,
        "loop": loop,
        "cross_check": cross,
        "edges": edges,
    }
    (OUT / "research.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT / "research.safetensors").stat().st_size
    print(f"wrote {len(out)} tensors, {size / 1e3:.1f} kB")
    print(json.dumps({"cases": meta_cases, "loop": loop, "cross_check": cross, "edges": edges}, indent=1))
    for k in sorted(k for k in out if k.endswith((".z_enc", ".out"))):
        print(f"  {k:16s} {tuple(out[k].shape)}  max|.| {out[k].abs().max():.3g}")


if __name__ == "__main__":
    main()
