"""Parity of vd.nn with diffusers 0.42.1 on tiny random configs, in float64 on CPU.

Each test builds the reference from a diffusers config dict, re-randomises every parameter, loads its state
dict into ours strictly (which checks names and shapes), and compares outputs. Tolerance: 1e-10 of the output
scale in float64.
"""

import pytest
import torch

from helpers import (TINY_UNET_A, TINY_UNET_B, TINY_UNET_C, TINY_UNET_NO_MID, TINY_VAE_A, TINY_VAE_B, flat_config,
                     randomize_, rel_err)
from vd.nn import AutoencoderKL, Context, UNet, UNetConfig, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel  # noqa: E402
from diffusers.models import DualTransformer2DModel, Transformer2DModel  # noqa: E402
from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel  # noqa: E402

TOL = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:.*scale.*deprecated")


def _pair(ref_cls, our_cls, cfg_cls, config: dict, seed: int):
    ref = randomize_(ref_cls.from_config(config), seed).double().eval()
    ours = our_cls(cfg_cls.from_diffusers(dict(ref.config))).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _unets(config: dict, seed: int):
    return _pair(UNet2DConditionModel, UNet, UNetConfig, config, seed)


def _context(config: dict, n_tokens: int, batch: int, seed: int) -> torch.Tensor:
    dim = config["cross_attention_dim"]
    dim = dim if isinstance(dim, int) else dim[0]
    return torch.randn(batch, n_tokens, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same_context_dim(config: dict) -> dict:
    """Contexts are one tensor for the whole UNet, so give every level the same context width."""
    d = dict(config)
    if not isinstance(d["cross_attention_dim"], int):
        d["cross_attention_dim"] = d["cross_attention_dim"][0]
    return d


@pytest.mark.parametrize("config", [TINY_UNET_A, _same_context_dim(TINY_UNET_B), TINY_UNET_C, TINY_UNET_NO_MID],
                         ids=["A", "B", "C", "no_mid"])
@pytest.mark.parametrize("n_tokens", [77, 257])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
@torch.no_grad()
def test_unet2d(config, n_tokens, size, check):
    ref, ours = _unets(config, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, config["in_channels"], *size, generator=g, dtype=torch.float64)
    ctx = _context(config, n_tokens, 2, seed=3)
    t = torch.tensor([981, 7])
    want = ref(x, t, encoder_hidden_states=ctx).sample
    got = ours(x, t, [Context(ours.context_layers(), ctx)])
    check(rel_err(got, want), TOL)


@pytest.mark.parametrize("config", [TINY_UNET_A, _same_context_dim(TINY_UNET_B), TINY_UNET_C, TINY_UNET_NO_MID],
                         ids=["A", "B", "C", "no_mid"])
@pytest.mark.parametrize("in_features", [[24, 1, 1], 6])
@torch.no_grad()
def test_unet_flat(config, in_features, check):
    ref, ours = _pair(UNetFlatConditionModel, UNet, UNetConfig, flat_config(config, in_features), seed=4)
    shape = tuple(in_features) if isinstance(in_features, list) else (in_features, 4, 1)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ctx = _context(config, 77, 3, seed=6)
    t = torch.tensor(501)  # a 0-d timestep broadcasts over the batch
    want = ref(x, t, encoder_hidden_states=ctx).sample
    got = ours(x, t, [Context(ours.context_layers(), ctx)])
    assert got.shape == x.shape[:1] + shape
    check(rel_err(got, want), TOL)


@pytest.mark.parametrize("config", [TINY_VAE_A, TINY_VAE_B], ids=["A", "B"])
@torch.no_grad()
def test_vae(config, check):
    ref, ours = _pair(RefVAE, AutoencoderKL, VAEConfig, config, seed=7)
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2 - 1
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    check(rel_err(got.mean, want.mean), TOL, "mean")
    check(rel_err(got.logvar, want.logvar), TOL, "logvar")
    check(rel_err(got.std, want.std), TOL, "std")
    z = torch.randn(2, config["latent_channels"], 5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    check(rel_err(ours.decode(z), ref.decode(z).sample), TOL, "decode")


def _swap_transformers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """What diffusers' text-to-image pipeline does to its UNets: exchange every Transformer2DModel in place."""
    for name, module in list(a.named_modules()):
        if isinstance(module, Transformer2DModel):
            parent, idx = name.rsplit(".", 1)
            pa, pb = a.get_submodule(parent), b.get_submodule(parent)
            pa[int(idx)], pb[int(idx)] = pb[int(idx)], pa[int(idx)]


def _vd_pair(config: dict):
    """Reference image and text UNets, and ours loaded from them."""
    ref_img, ours_img = _unets(config, seed=10)
    ref_txt, ours_txt = _pair(UNetFlatConditionModel, UNet, UNetConfig, flat_config(config, [24, 1, 1]), seed=11)
    return ref_img, ref_txt, ours_img, ours_txt


@pytest.mark.parametrize("config", [TINY_UNET_A, _same_context_dim(TINY_UNET_B)], ids=["A", "B"])
@torch.no_grad()
def test_text_to_image_composition(config, check):
    ref_img, ref_txt, ours_img, ours_txt = _vd_pair(config)
    x = torch.randn(2, config["in_channels"], 8, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ctx = _context(config, 77, 2, seed=13)
    got = ours_img(x, 421, [Context(ours_txt.context_layers(), ctx)])
    plain = ours_img(x, 421, [Context(ours_img.context_layers(), ctx)])
    _swap_transformers(ref_img, ref_txt)
    want = ref_img(x, 421, encoder_hidden_states=ctx).sample
    check(rel_err(got, want), TOL)
    assert rel_err(plain, want) > 1e-3  # the text context layers really were used


def _to_dual(ref_img, ref_txt, mix: float, text_len: int, image_len: int) -> None:
    """diffusers' _convert_to_dual_attention + set_transformer_params, on the modules directly."""
    for name, module in list(ref_img.named_modules()):
        if isinstance(module, Transformer2DModel):
            parent, idx = name.rsplit(".", 1)
            dual = DualTransformer2DModel(in_channels=module.config.in_channels, norm_num_groups=module.config.norm_num_groups,
                                          num_attention_heads=module.config.num_attention_heads,
                                          attention_head_dim=module.config.attention_head_dim,
                                          cross_attention_dim=module.config.cross_attention_dim)
            dual.transformers[0] = module
            dual.transformers[1] = ref_txt.get_submodule(parent)[int(idx)]
            dual.mix_ratio, dual.condition_lengths = mix, [text_len, image_len]
            dual.transformer_index_for_condition = [1, 0]
            ref_img.get_submodule(parent)[int(idx)] = dual


@pytest.mark.parametrize("config", [TINY_UNET_A, _same_context_dim(TINY_UNET_B)], ids=["A", "B"])
@pytest.mark.parametrize("s", [0.0, 0.3, 1.0])
@torch.no_grad()
def test_dual_guidance(config, s, patched_dual, check):
    ref_img, ref_txt, ours_img, ours_txt = _vd_pair(config)
    x = torch.randn(2, config["in_channels"], 8, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    text, image = _context(config, 77, 2, seed=15), _context(config, 257, 2, seed=16)
    streams = [Context(ours_txt.context_layers(), text, s), Context(ours_img.context_layers(), image, 1 - s)]
    got = ours_img(x, 333, streams)

    # the closed form, from the two reference stacks run separately, per site
    _to_dual(ref_img, ref_txt, s, 77, 257)
    want = ref_img(x, 333, encoder_hidden_states=torch.cat([text, image], dim=1)).sample
    check(rel_err(got, want), TOL)

    # the end points equal the single-stack forwards
    if s == 1.0:
        single = ours_img(x, 333, [Context(ours_txt.context_layers(), text)])
        check(rel_err(got, single), TOL, "vs text-only forward")
    if s == 0.0:
        single = ours_img(x, 333, [Context(ours_img.context_layers(), image)])
        check(rel_err(got, single), TOL, "vs image-only forward")


@torch.no_grad()
def test_mixing_closed_form_at_one_site():
    """apply_context at one site equals x + s*(T_text(x) - x) + (1-s)*(T_image(x) - x)."""
    ref_img, ref_txt, ours_img, ours_txt = _vd_pair(TINY_UNET_A)
    site_img, site_txt = ours_img.context_layers()[0], ours_txt.context_layers()[0]
    h = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    text, image = _context(TINY_UNET_A, 77, 2, 17), _context(TINY_UNET_A, 257, 2, 18)
    from vd.nn import apply_context
    s = 0.3
    got = apply_context(0, h, [Context([site_txt], text, s), Context([site_img], image, 1 - s)])
    want = h + s * (site_txt(h, text) - h) + (1 - s) * (site_img(h, image) - h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@torch.no_grad()
def test_float32_tolerance(check):
    """The fp32 forward stays within 1e-5 of the output scale of the fp32 reference."""
    ref = randomize_(UNet2DConditionModel.from_config(TINY_UNET_A), 19).eval()
    ours = UNet(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    err = rel_err(ours(x, 500, [Context(ours.context_layers(), ctx)]), ref(x, 500, encoder_hidden_states=ctx).sample)
    check(err, 1e-5)
