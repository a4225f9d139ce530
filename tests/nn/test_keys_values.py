"""A context's keys and values computed once (Context.with_keys_values) give exactly the per-step results."""

import pytest
import torch

from helpers import TINY_UNET_A, TINY_UNET_B, TINY_UNET_C, randomize_
from vd.fast import speed_up_
from vd.nn import Context, UNet, UNetConfig


def _unet(config: dict, seed: int = 0) -> UNet:
    return randomize_(UNet(UNetConfig.from_diffusers(config)).eval(), seed)


def _tokens(unet: UNet, n: int, length: int, seed: int) -> torch.Tensor:
    width = unet.context_layers()[0].transformer_blocks[0].attn2.to_k.in_features
    return torch.randn(n, length, width, generator=torch.Generator().manual_seed(seed))


# A: VD's shape; B: two-block transformers, linear projections (one context width for every level); C: attn1
# reads the context too
@pytest.mark.parametrize("config", [TINY_UNET_A, dict(TINY_UNET_B, cross_attention_dim=16), TINY_UNET_C],
                         ids=["A", "B", "C"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "stacked"])
@torch.no_grad()
def test_precomputed_keys_values_are_bit_equal(config, fused):
    unet = _unet(config)
    if fused:
        speed_up_(unet)
    x = torch.randn(2, config["in_channels"], 8, 8)
    streams = [Context(unet.context_layers(), _tokens(unet, 2, 7, 1), 0.3),
               Context(unet.context_layers(), _tokens(unet, 2, 5, 2), 0.7)]
    want = unet(x, 321, streams)
    got = unet(x, 321, [c.with_keys_values() for c in streams])
    assert torch.equal(got, want)


def test_keys_values_keep_the_gradient_to_the_tokens():
    unet = _unet(TINY_UNET_A).requires_grad_(False)
    x = torch.randn(1, 4, 8, 8)
    tokens = _tokens(unet, 1, 7, 1).requires_grad_()
    per_step = torch.autograd.grad(unet(x, 5, [Context(unet.context_layers(), tokens)]).square().sum(), tokens)[0]
    once = torch.autograd.grad(unet(x, 5, [Context(unet.context_layers(), tokens).with_keys_values()]).square().sum(),
                               tokens)[0]
    assert per_step.abs().sum() > 0
    assert torch.equal(once, per_step)


def test_keys_values_come_in_the_layers_dtype_and_skip_unused_streams():
    unet = _unet(TINY_UNET_A).to(torch.float64)
    tokens = _tokens(unet, 1, 7, 1)  # float32
    c = Context(unet.context_layers(), tokens).with_keys_values()
    k, v = c.keys_values[0][0][1]
    attn2 = unet.context_layers()[0].transformer_blocks[0].attn2
    assert c.tokens.dtype == k.dtype == v.dtype == torch.float64
    assert k.shape == v.shape == (1, attn2.heads, 7, attn2.to_k.out_features // attn2.heads)
    assert Context(unet.context_layers(), tokens, 0.0).with_keys_values().keys_values is None


def test_a_unet_without_context_layers_takes_a_context():
    """A UNet of plain blocks (no cross-attention, no mid block) takes a context and its keys and values (of no
    layers), and ignores it."""
    unet = _unet(dict(TINY_UNET_A, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                      mid_block_type=None))
    x, tokens = torch.randn(1, 4, 8, 8), torch.randn(1, 7, TINY_UNET_A["cross_attention_dim"])
    context = Context(unet.context_layers(), tokens)
    other = Context(unet.context_layers(), torch.randn_like(tokens))
    assert unet.context_layers() == [] and torch.equal(unet(x, 5, [context.with_keys_values()]), unet(x, 5, [other]))
