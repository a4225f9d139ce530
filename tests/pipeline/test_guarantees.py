"""Guarantees: determinism, isolation between calls, recovery from exceptions, and no silently broken images."""

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from vd import VersatileDiffusion

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
KW = dict(num_inference_steps=3, output_type="np", progress=False)
IMG = PIL.Image.fromarray((np.random.RandomState(0).rand(48, 40, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")


@pytest.fixture(scope="module")
def pipe(folder):
    return VersatileDiffusion.from_pretrained(folder)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_bit_identical(pipe):
    for call in (lambda: pipe.text_to_image("the cat", generator=_g(), **KW),
                 lambda: pipe.image_variation(IMG, generator=_g(), eta=0.5, **KW),
                 lambda: pipe.dual_guided("the cat", IMG, generator=_g(), **KW)):
        assert np.array_equal(call().images, call().images)


def test_call_order_does_not_matter(pipe, folder):
    first = pipe.text_to_image("the cat", generator=_g(), **KW).images
    dual = pipe.dual_guided("the cat", IMG, text_to_image_strength=0.4, generator=_g(), **KW).images
    pipe.image_variation(IMG, generator=_g(), **KW)
    last = pipe.text_to_image("the cat", generator=_g(), **KW).images
    assert np.array_equal(first, last)
    fresh = VersatileDiffusion.from_pretrained(folder, tasks=["dual_guided"])
    assert np.array_equal(dual, fresh.dual_guided("the cat", IMG, text_to_image_strength=0.4, generator=_g(), **KW).images)


def test_exception_in_callback_leaves_pipeline_usable(pipe):
    want = pipe.image_variation(IMG, generator=_g(), **KW).images

    def fail(i, t, x):
        if i == 1:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        pipe.image_variation(IMG, generator=_g(), callback=fail, **KW)
    assert np.array_equal(want, pipe.image_variation(IMG, generator=_g(), **KW).images)


def test_nan_latents_are_an_error(pipe, monkeypatch):
    unet = pipe.components.image_unet
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="NaN") as info:
        pipe.text_to_image("the cat", generator=_g(), **KW)
    assert "float32" not in str(info.value)  # this pipeline runs in float32 already: no advice to switch to it


def test_zero_terminal_snr_with_noise_prediction_names_the_cause(pipe, folder):
    """A zero-SNR schedule starting at its last trained timestep (alpha_bar = 0) makes a noise-predicting model's
    first DDIM step divide by 0: the reference returns NaN images, ours says why (the setting is meant for
    v-prediction models)."""
    from diffusers import DDIMScheduler
    config = {**pipe.scheduler_config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    ref = tp.reference("text_to_image", folder)
    ref.scheduler = DDIMScheduler.from_config(config)
    assert np.isnan(ref("the cat", generator=_g(), num_inference_steps=3, output_type="np").images).all()
    saved = pipe.scheduler_config
    pipe.scheduler_config = config
    try:
        with pytest.raises(FloatingPointError, match=r"NaN.*zero SNR.*'epsilon'.*'v_prediction'"):
            pipe.text_to_image("the cat", generator=_g(), **KW)
        pipe.scheduler_config = {**config, "prediction_type": "v_prediction"}
        assert np.isfinite(pipe.text_to_image("the cat", generator=_g(), **KW).images).all()
    finally:
        pipe.scheduler_config = saved


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (numpy 2 copy= in diffusers' UniPC)
def test_unipc_without_lower_order_final_is_refused_before_the_model_runs(pipe, folder, monkeypatch):
    """UniPC with lower_order_final=False takes its last step, onto sigma 0, at full order: the reference returns
    non-finite images; ours refuses the call by name before the UNet runs once (and runs it ending at sigma_min)."""
    from diffusers import UniPCMultistepScheduler
    config = {**pipe.scheduler_config, "lower_order_final": False}
    ref = tp.reference("text_to_image", folder)
    ref.scheduler = UniPCMultistepScheduler.from_config(config)
    assert not np.isfinite(ref("the cat", generator=_g(), num_inference_steps=3, output_type="np").images).any()
    unet, calls = pipe.components.image_unet, []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    saved = pipe.scheduler_config
    pipe.scheduler_config = config
    try:
        with pytest.raises(ValueError, match="^lower_order_final=False with solver_order 2 needs final_sigmas_type "
                                             "'sigma_min' for UniPC"):
            pipe.text_to_image("the cat", generator=_g(), scheduler="unipc", **KW)
        assert not calls
        pipe.scheduler_config = {**config, "final_sigmas_type": "sigma_min"}
        assert np.isfinite(pipe.text_to_image("the cat", generator=_g(), scheduler="unipc", **KW).images).all()
    finally:
        pipe.scheduler_config = saved


@pytest.fixture(scope="module")
def bf16(folder):
    return VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], dtype=torch.bfloat16)


def test_reduced_precision_nan_decode_is_retried_in_float32(bf16):
    """A VAE that overflows in reduced precision (as kl-f8 can in fp16) is decoded again in float32."""
    def overflow_in_low_precision(module, args, out):
        return out * float("inf") if out.dtype != torch.float32 else out
    handle = bf16.components.vae.decoder.conv_out.register_forward_hook(overflow_in_low_precision)
    try:
        with pytest.warns(UserWarning, match="float32"):
            images = bf16.text_to_image("the cat", generator=_g(), **KW).images
    finally:
        handle.remove()
    assert np.isfinite(images).all() and images.std() > 0


def test_nan_decode_in_float32_is_an_error(bf16):
    handle = bf16.components.vae.decoder.conv_out.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with (pytest.raises(FloatingPointError, match="even in float32"),
              pytest.warns(UserWarning, match="again in float32")):  # (the float32 retry comes first)
            bf16.text_to_image("the cat", generator=_g(), **KW)
    finally:
        handle.remove()


def test_noise_is_drawn_in_the_model_dtype(bf16, monkeypatch):
    """As the reference: latents are drawn in the model's dtype even when autocast makes the tokens float32
    (on CUDA the CLIP norm runs in float32 under autocast); fp16 and fp32 draws from one generator differ."""
    import vd.pipeline
    seen = []
    original = vd.pipeline.randn
    monkeypatch.setattr(vd.pipeline, "randn", lambda shape, g, device, dtype: seen.append(dtype) or original(
        shape, g, device, dtype))
    import vd.conditions
    encode = vd.conditions.encode_text  # as under CUDA autocast: float32 tokens from a reduced-precision model
    monkeypatch.setattr(vd.conditions, "encode_text", lambda *a: encode(*a).float())
    bf16.text_to_image("the cat", generator=_g(), **KW)
    assert seen == [torch.bfloat16]


def test_nan_latents_in_reduced_precision_suggest_float32(bf16, monkeypatch):
    unet = bf16.components.image_unet
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"NaN.*try float32"):
        bf16.text_to_image("the cat", generator=_g(), **KW)
