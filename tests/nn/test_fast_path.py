"""The GPU fast path's pieces that also run on the CPU give the plain path's results."""

import pytest
import torch

from helpers import TINY_UNET_A, flat_config, randomize_, rel_err
from vd.fast import NoisePredictor, speed_up_
from vd.nn import Context, UNet, UNetConfig


def _unets():
    cfg = UNetConfig.from_diffusers(TINY_UNET_A)
    image = UNet(cfg).eval()
    text = UNet(UNetConfig.from_diffusers(flat_config(TINY_UNET_A, [24, 1, 1])), parts=frozenset({"context"})).eval()
    for i, m in enumerate((image, text)):
        randomize_(m, i)
    return image, text


@torch.no_grad()
def test_channels_last_and_fused_projections_keep_the_math(check):
    image, text = _unets()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx, 0.3), Context(image.context_layers(), ctx[:, :5], 0.7)]
    want = image(x, 500, streams)
    state = {k: v.clone() for k, v in image.state_dict().items()}
    speed_up_(image, text)
    assert image.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attn1 = image.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn1.qkv_weight is not None  # and q, k, v are views into it: no memory added
    assert attn1.to_v.weight.untyped_storage().data_ptr() == attn1.qkv_weight.untyped_storage().data_ptr()
    assert text.context_layers()[0].transformer_blocks[0].attn2.kv_weight is not None
    got = image(x.to(memory_format=torch.channels_last), 500, streams)
    check(rel_err(got, want), 1e-5)  # fp32: other kernels, other rounding
    # the stacked copies are not part of the checkpoint
    assert image.state_dict().keys() == state.keys()


@torch.no_grad()
def test_denoiser_plain_and_compiled(check):
    image, text = _unets()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx)]
    want = image(x, torch.tensor(321), streams)
    assert torch.equal(NoisePredictor(image)(x, torch.tensor(321), streams), want)
    # torch.compile's graph capture and guards, without paying for code generation in the test suite
    compiled = NoisePredictor(image)
    compiled.compiled = torch.compile(image, backend="aot_eager", dynamic=False)
    check(rel_err(compiled(x, torch.tensor(321), streams), want), 1e-5)


@torch.no_grad()
def test_denoiser_with_another_unets_time_embedding():
    """The text flows run the text UNet's data layers with the image UNet's time MLP."""
    image, text = _unets()
    other = randomize_(UNet(image.config, parts=frozenset({"global"})), 7).time_embedding
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    streams = [Context(text.context_layers(), ctx)]
    want = image(x, torch.tensor(321), streams, time_embedding=other)
    assert not torch.equal(want, image(x, torch.tensor(321), streams))
    assert torch.equal(NoisePredictor(image, time_embedding=other)(x, torch.tensor(321), streams), want)


def test_cuda_graphs_are_ignored_on_cpu():
    image, text = _unets()
    d = NoisePredictor(image, cuda_graphs=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    with torch.no_grad():
        assert torch.equal(d(x, torch.tensor(5), [Context(text.context_layers(), ctx)]),
                           image(x, torch.tensor(5), [Context(text.context_layers(), ctx)]))
    assert not d.graphs


@pytest.mark.parametrize("before", [False, True])
def test_denoiser_leaves_cudnn_autotuning_as_it_found_it(before):
    """The denoiser turns cuDNN autotuning on for CUDA inputs only while it runs; the user's setting survives."""
    image, text = _unets()
    torch.backends.cudnn.benchmark = before
    try:
        with torch.no_grad():
            NoisePredictor(image)(torch.randn(1, 4, 8, 8), torch.tensor(5), [Context(text.context_layers(),
                                                                             torch.randn(1, 77, 16))])
        assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = False
