"""Parity with diffusers 0.42.1 beyond the hand-written fixtures: seeded random configs drawn from the options our
config mapping accepts (vd/nn/config.py), so that no option is right only for the configs we thought of.

Modules run in float64 (tolerance 1e-10 of the output scale, as test_nn_parity.py); whole pipelines in float32
(max abs diff of the "np" images <= 1e-3, as test_pipeline_parity.py; of "latent" outputs, relative to their
largest value). Drawing such configs found that the reference's cross-attention mid block ignores
only_cross_attention, which ours honoured.
"""

import copy
import random

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from helpers import flat_config, random_image, randomize_, rel_err
from vd.nn import AutoencoderKL, Context, UNet, UNetConfig, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel  # noqa: E402

from vd import VersatileDiffusion  # noqa: E402

MODULE_TOL, IMAGE_TOL = 1e-10, 1e-3
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*scale.*deprecated", "ignore:.*rescale already rescaled.*")


def random_unet(r: random.Random, context_dim: int | None = None) -> dict:
    """An image-UNet config.json with 1-4 levels and every option VD leaves at its default drawn at random."""
    n, groups = r.randint(1, 4), r.choice([1, 2, 4])
    channels = [groups * 2 * r.randint(2, 6) for _ in range(n)]
    heads = [r.choice([h for h in (1, 2, 4) if c % h == 0]) for c in channels]
    d = dict(sample_size=r.choice([4, 6, 8]), in_channels=r.randint(1, 5), out_channels=r.randint(1, 5),
             block_out_channels=channels, norm_num_groups=groups, attention_head_dim=heads,
             down_block_types=[r.choice(["CrossAttnDownBlock2D", "DownBlock2D", "UNetResDownBlock2D"])
                               for _ in range(n)],
             up_block_types=[r.choice(["CrossAttnUpBlock2D", "UpBlock2D", "UNetResCrossAttnUpBlock2D"])
                             for _ in range(n)],
             cross_attention_dim=context_dim or r.choice([8, 12, 16]),
             layers_per_block=r.choice([r.randint(1, 3), [r.randint(1, 3) for _ in range(n)]]))
    maybe = {  # option: the values drawn when it is set (each is set with probability 0.3)
        "transformer_layers_per_block": [2, [r.randint(1, 2) for _ in range(n)]],
        "use_linear_projection": [True],
        "only_cross_attention": [True, [r.random() < 0.5 for _ in range(n)]],
        "mid_block_only_cross_attention": [True, False],
        "mid_block_type": [None, "UNetMidBlock2D"],
        "norm_eps": [1e-6, 1e-3],
        "flip_sin_to_cos": [False],
        "freq_shift": [1],  # (larger shifts divide by zero in both for narrow first levels)
        "time_embedding_dim": [8, 24, 40],
        "downsample_padding": [0],
        "center_input_sample": [True],
        "conv_in_kernel": [1, 5],
        "conv_out_kernel": [1, 5],
        "upcast_attention": [True],
        "mid_block_scale_factor": [0.5, 1.5],
        "resnet_time_scale_shift": ["scale_shift"],
        "act_fn": ["swish"],
        "time_embedding_act_fn": ["silu", "mish", "gelu", "relu", "SiLU"],
        "timestep_post_act": ["swish", "mish", "gelu", "relu"],
        # (options the reference ignores for these block types)
        "resnet_skip_time_act": [True],
        "resnet_out_scale_factor": [2.0],
        "cross_attention_norm": ["layer_norm"],
    }
    for key, values in maybe.items():
        if r.random() < 0.3:
            d[key] = r.choice(values)
    return d


def random_vae(r: random.Random, levels: int | None = None, latent_channels: int | None = None) -> dict:
    n, groups = levels or r.randint(1, 4), r.choice([1, 2, 4])
    d = dict(block_out_channels=[groups * 2 * r.randint(1, 4) for _ in range(n)], norm_num_groups=groups,
             layers_per_block=r.randint(1, 2), latent_channels=latent_channels or r.randint(1, 6),
             in_channels=3, out_channels=3, sample_size=64,
             down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    for key, value in (("mid_block_add_attention", False), ("use_quant_conv", False),
                       ("use_post_quant_conv", False), ("scaling_factor", 0.5), ("act_fn", "swish"),
                       # (options that only other pipelines read: the reference's VAE and VD pipelines ignore them)
                       ("shift_factor", 0.1159), ("latents_mean", [0.1] * d["latent_channels"]),
                       ("latents_std", [2.0] * d["latent_channels"]), ("force_upcast", False)):
        if r.random() < 0.3:
            d[key] = value
    return d


def _pair(ref_cls, our_cls, cfg_cls, config: dict, seed: int):
    ref = randomize_(ref_cls.from_config(config), seed).double().eval()
    ours = our_cls(cfg_cls.from_diffusers(dict(ref.config))).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("seed", range(12))
@torch.no_grad()
def test_random_unets(seed, check):
    r = random.Random(seed)
    config = random_unet(r)
    g = torch.Generator().manual_seed(seed)
    batch, side = r.randint(1, 3), 2 ** (len(config["block_out_channels"]) + 1)  # room for padding-free downs
    flat_in = r.choice([[6, 1, 1], 5, [3, 2, 2]])
    for flat in (False, True):
        if flat:
            ref, ours = _pair(UNetFlatConditionModel, UNet, UNetConfig, flat_config(config, flat_in), seed)
            shape = tuple(flat_in) if isinstance(flat_in, list) else (flat_in, 4, 1)
        else:
            ref, ours = _pair(UNet2DConditionModel, UNet, UNetConfig, config, seed)
            shape = (config["in_channels"], side + r.randint(0, 3), side + r.randint(0, 3))
        x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
        ctx = torch.randn(batch, r.choice([1, 5, 77]), config["cross_attention_dim"], generator=g,
                          dtype=torch.float64)
        t = torch.randint(0, 1000, (batch,), generator=g)
        want = ref(x, t, encoder_hidden_states=ctx).sample
        context = Context(ours.context_layers(), ctx)
        check(rel_err(ours(x, t, [context]), want), MODULE_TOL, "flat" if flat else "2d")
        check(rel_err(ours(x, t, [context.with_keys_values()]), want), MODULE_TOL, "keys and values once")


@pytest.mark.parametrize("kernel", [2, 4])
@torch.no_grad()
def test_even_conv_kernels_pad_as_diffusers(kernel, check):
    """An even conv_in/conv_out kernel pads (k - 1) // 2: a 9 x 9 input gives an 8 x 8 UNet and a 7 x 7 output."""
    config = dict(sample_size=8, in_channels=3, out_channels=2, block_out_channels=[8], norm_num_groups=2,
                  attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=8, layers_per_block=1,
                  conv_in_kernel=kernel, conv_out_kernel=kernel)
    ref, ours = _pair(UNet2DConditionModel, UNet, UNetConfig, config, kernel)
    x, ctx = torch.randn(2, 3, 9, 9, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    want, got = ref(x, 10, encoder_hidden_states=ctx).sample, ours(x, 10, [Context(ours.context_layers(), ctx)])
    assert got.shape == want.shape == (2, 2, 7, 7)
    check(rel_err(got, want), MODULE_TOL, "2d")


@pytest.mark.parametrize("seed", range(12))
@torch.no_grad()
def test_random_vaes(seed, check):
    r = random.Random(seed)
    config = random_vae(r)
    ref, ours = _pair(RefVAE, AutoencoderKL, VAEConfig, config, seed)
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    x = torch.rand(r.randint(1, 2), 3, f * r.randint(1, 4), f * r.randint(1, 4), generator=g, dtype=torch.float64)
    z = torch.randn(r.randint(1, 2), config["latent_channels"], r.randint(1, 5), r.randint(1, 5), generator=g,
                    dtype=torch.float64)
    want, got = ref.encode(2 * x - 1).latent_dist, ours.encode(2 * x - 1)
    check(rel_err(got.mean, want.mean), MODULE_TOL, "mean")
    check(rel_err(got.std, want.std), MODULE_TOL, "std")
    check(rel_err(ours.decode(z), ref.decode(z).sample), MODULE_TOL, "decode")


# ---- whole pipelines: random UNet, VAE, CLIP towers, image processor and schedule

def random_pipeline(r: random.Random, seed: int) -> dict:
    """The eight components of diffusers' VersatileDiffusionPipeline, each drawn at random."""
    from diffusers import DDIMScheduler
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    torch.manual_seed(seed)
    context_dim = r.choice([8, 16, 24])
    tokenizer = tp.tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=r.choice([16, 32]), intermediate_size=37,
        num_hidden_layers=r.randint(1, 3), num_attention_heads=4, max_position_embeddings=77,
        projection_dim=context_dim, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        hidden_act=r.choice(["quick_gelu", "gelu"])))
    side, patch = r.choice([(224, 14), (32, 8), (48, 16)])
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=r.choice([16, 32]), intermediate_size=37, num_hidden_layers=r.randint(1, 3),
        num_attention_heads=4, image_size=side, patch_size=patch, projection_dim=context_dim))
    vae = random_vae(r, levels=r.randint(2, 4), latent_channels=r.choice([3, 4]))
    unet = random_unet(r, context_dim)
    unet.update(in_channels=vae["latent_channels"], out_channels=vae["latent_channels"])
    schedule = dict(tp.SCHEDULER)
    if r.random() < 0.5:
        schedule.update(beta_schedule=r.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
                        steps_offset=r.choice([0, 1]), set_alpha_to_one=r.choice([True, False]),
                        timestep_spacing=r.choice(["leading", "linspace", "trailing"]),
                        prediction_type=r.choice(["epsilon", "v_prediction"]))
    processor = dict(tp.IMAGE_PROCESSOR, size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                     resample=r.choice([2, 3]))
    return dict(tokenizer=tokenizer, image_feature_extractor=CLIPImageProcessor(**processor),
                text_encoder=text_encoder.eval(), image_encoder=image_encoder.eval(),
                image_unet=randomize_(UNet2DConditionModel.from_config(unet), seed + 1).eval(),
                text_unet=randomize_(UNetFlatConditionModel.from_config(flat_config(unet, [6, 1, 1])), seed + 2),
                vae=randomize_(RefVAE.from_config(vae), seed + 3).eval(), scheduler=DDIMScheduler.from_config(schedule))


def _image(r: random.Random) -> PIL.Image.Image:
    return random_image(r.randint(0, 999), (r.randint(20, 80), r.randint(20, 80)))


PROMPTS = ["the cat", "a dog", "rain", "", "and on ring", "cat " * 40]


def random_call(r: random.Random, task: str, unet: dict, vae: dict) -> tuple[dict, list[int]]:
    """Arguments both implementations take (sizes are multiples of 8, which the reference requires), and the
    seeds of the generators to pass with them."""
    batch = r.randint(1, 2)

    def some(draw):
        return [draw() for _ in range(batch)] if batch > 1 else draw()
    kw = dict(num_inference_steps=r.randint(1, 4), guidance_scale=r.choice([1.0, 3.0, 7.5]),
              num_images_per_prompt=r.randint(1, 2), output_type=r.choice(["np", "np", "pt", "latent"]),
              scheduler=r.choice(["ddim", "pndm", "lms"]), eta=r.choice([0.0, 0.0, 0.5, 1.0]))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if r.random() < 0.5 or unet["sample_size"] * factor % 8:
        kw.update(height=8 * r.randint(1, 5), width=8 * r.randint(1, 5))
    if task != "image_variation":
        kw["prompt"] = some(lambda: r.choice(PROMPTS))
    if task != "text_to_image":
        kw["image"] = some(lambda: _image(r))
    if task == "text_to_image" and r.random() < 0.5:
        kw["negative_prompt"] = some(lambda: r.choice(PROMPTS))
    if task == "image_variation" and r.random() < 0.5:
        kw["negative_prompt"] = some(lambda: _image(r))
    if task == "dual_guided":
        kw["text_to_image_strength"] = r.choice([0.0, 0.25, 0.5, 0.8, 1.0])
    n, latent_shape = batch * kw["num_images_per_prompt"], (kw.get("height", unet["sample_size"] * factor) // factor,
                                                           kw.get("width", unet["sample_size"] * factor) // factor)
    how = r.choice(["generator", "list", "latents"])
    if how == "latents":
        kw["latents"] = torch.randn(n, vae["latent_channels"], *latent_shape,
                                    generator=torch.Generator().manual_seed(n))
    seeds = list(range(n)) if how == "list" else [r.randint(0, 99)]
    return kw, seeds


def _generator(seeds: list[int]):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return gens if len(gens) > 1 else gens[0]


@pytest.mark.parametrize("seed", range(3))
def test_random_pipelines(seed, tmp_path, patched_dual, check):
    r = random.Random(seed)
    components = random_pipeline(r, seed)
    folder = tp.save(copy.deepcopy(components), tmp_path / "vd")
    ours = VersatileDiffusion.from_pretrained(folder, uncond_image="diffusers")
    unet, vae = dict(components["image_unet"].config), dict(components["vae"].config)
    for task in ("text_to_image", "image_variation", "dual_guided"):
        kw, seeds = random_call(r, task, unet, vae)
        scheduler = kw.pop("scheduler")
        ref = tp.reference(task, folder, scheduler)
        want = ref(**{k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()},
                   generator=_generator(seeds)).images
        got = getattr(ours, task)(**kw, generator=_generator(seeds), scheduler=scheduler, progress=False).images
        want, got = np.asarray(want), np.asarray(got)
        assert got.shape == want.shape
        # images lie in [0, 1]; "latent" outputs can reach 1e5 (cosine betas, one trailing step), where float32
        # leaves 1e-2 of absolute rounding: compare those relative to their largest value
        scale = max(1.0, float(np.abs(want).max()))
        check(float(np.abs(got - want).max()) / scale, IMAGE_TOL, f"{task} {scheduler}")
