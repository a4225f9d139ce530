"""The VD denoisers: UNet2DCondition (image flow) and UNetFlat (text flow) on one skeleton, and the VD composition.

Versatile Diffusion splits each denoiser into three parts (SHI-Labs `vd.py` `VD_v2_0.apply_model` at cf0f4a2):
  global  - the timestep MLP (`time_embedding`), shared by all flows;
  data    - everything tied to the output modality: conv_in, resnets, down/upsamplers, the output head;
  context - the 16 spatial transformers, tied to the conditioning modality.
A flow runs the data layers of the output's UNet with the context layers of the condition's UNet, e.g.
text-to-image = image UNet data + text UNet context. Here that is an argument of `forward` (a list of `Context`
streams), so no module is ever swapped or mutated between calls. With several streams every context site mixes
them: `h + sum_k w_k * (T_k(h, c_k) - h)` (dual guidance: text weight s, image weight 1 - s).

Both UNets keep diffusers' parameter names. The text UNet works on hidden states [B, C, fd, 1] (fd = 4): its
"convolutions" are Linear layers over the flattened trailing dims and its resnets use 1x1 convs on [B, C*fd, 1, 1].
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from vd.nn.config import UNetConfig
from vd.nn.fusable import GroupNorm
from vd.nn.layers import (ACTIVATIONS, BlockKeysValues, Downsample, FlatLinear, FlatResnetBlock, ResnetBlock,
                          SpatialTransformer, TimestepEmbedding, Upsample, timestep_embedding)

UNET_PARTS = frozenset({"global", "data", "context"})
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where torch.autocast exists (not "meta")


@dataclass(frozen=True)
class Context:
    """One conditioning stream: the context layers to use (`UNet.context_layers()` of the condition's UNet),
    the tokens [B, L, D] they attend to, and the stream's weight at every context site.

    `keys_values`, per layer, are the attentions' keys and values of the tokens (`with_keys_values`): they stay
    fixed while sampling, so a sampler loop computes them once instead of once per step."""

    layers: Sequence[SpatialTransformer]
    tokens: Tensor
    weight: float = 1.0
    keys_values: Sequence[list[BlockKeysValues]] | None = None

    def with_keys_values(self) -> "Context":
        """This stream with its keys and values computed, in the layers' dtype and with autocast off (as the
        UNet runs: vd.fast.NoisePredictor)."""
        if self.keys_values is not None or self.weight == 0 or not self.layers:  # done, never run, or no layers
            return self
        device = self.tokens.device.type
        with torch.autocast(device, enabled=False) if device in AUTOCAST_DEVICES else contextlib.nullcontext():
            kv = [layer.keys_values(self.tokens) for layer in self.layers]
        return replace(self, tokens=self.tokens.to(self.layers[0].norm.weight.dtype), keys_values=kv)


def apply_context(site: int, h: Tensor, contexts: Sequence[Context]) -> Tensor:
    """Run context site `site` of every stream on h and mix the streams' residuals by their weights."""
    def run(c: Context) -> Tensor:
        return c.layers[site](h, c.tokens, None if c.keys_values is None else c.keys_values[site])

    active = [c for c in contexts if c.weight != 0]
    if len(active) == 1 and active[0].weight == 1:
        return run(active[0])
    mixed = sum(c.weight * (run(c) - h) for c in active)
    return mixed + h


class UNet(nn.Module):
    """A VD denoiser built from the parts asked for (a missing part has no parameters at all)."""

    def __init__(self, cfg: UNetConfig, parts: frozenset[str] = UNET_PARTS):
        super().__init__()
        if not parts <= UNET_PARTS:
            raise ValueError(f"parts must be a subset of {sorted(UNET_PARTS)}, got {sorted(parts)}")
        self.config, self.parts = cfg, frozenset(parts)
        data, context = "data" in parts, "context" in parts
        chs, flat, fd = cfg.block_channels, cfg.flat, cfg.flat_dim
        n = len(chs)
        if "global" in parts:
            self.time_embedding = TimestepEmbedding(chs[0], cfg.time_dim, cfg.time_mlp_post_act)
        if data:
            if flat:
                self.conv_in = FlatLinear(cfg.in_channels, (chs[0], fd, 1))
            else:
                self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], cfg.conv_in_kernel,
                                         padding=(cfg.conv_in_kernel - 1) // 2)

        def resnet(cin: int, cout: int, output_scale: float = 1.0) -> nn.Module:
            if flat:  # parity: the flat block ignores output scaling, as the reference does
                return FlatResnetBlock(cin, cout, cfg.time_dim, cfg.norm_groups, cfg.norm_eps, fd)
            return ResnetBlock(cin, cout, cfg.time_dim, cfg.norm_groups, cfg.norm_eps, output_scale=output_scale,
                               scale_shift=cfg.time_scale_shift)

        def transformer(ch: int, level: int, only_cross: bool, depth: int | None = None) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.context_dim[level],
                                      depth or cfg.transformer_depth[level], cfg.norm_groups, cfg.linear_projection,
                                      only_cross)

        # Down path; `skip_channels` tracks the widths pushed onto the skip stack, which the up path pops.
        skip_channels = [chs[0]]
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            block, cin = nn.Module(), chs[max(i - 1, 0)]
            if data:
                block.resnets = nn.ModuleList(
                    [resnet(cin if j == 0 else ch, ch) for j in range(cfg.layers_per_block[i])])
            if context and cfg.down_attention[i]:
                block.attentions = nn.ModuleList(
                    [transformer(ch, i, cfg.only_cross_attention[i]) for _ in range(cfg.layers_per_block[i])])
            skip_channels += [ch] * cfg.layers_per_block[i]
            if i < n - 1:
                if data:
                    block.downsamplers = nn.ModuleList(
                        [FlatLinear((ch, fd, 1), (ch, fd, 1)) if flat else Downsample(ch, cfg.downsample_padding)])
                skip_channels.append(ch)
            self.down_blocks.append(block)

        if cfg.mid_block != "none":
            self.mid_block = nn.Module()
            if data:
                self.mid_block.resnets = nn.ModuleList(
                    [resnet(chs[-1], chs[-1], cfg.mid_block_scale_factor) for _ in range(1 + cfg.mid_attention)])
            if context and cfg.mid_attention:
                self.mid_block.attentions = nn.ModuleList(
                    [transformer(chs[-1], n - 1, False, cfg.mid_transformer_depth)])

        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for i, ch in enumerate(chs[::-1]):
            level = n - 1 - i
            block, layers = nn.Module(), cfg.layers_per_block[level] + 1
            widths = [skip_channels.pop() for _ in range(layers)]
            if data:
                block.resnets = nn.ModuleList(
                    [resnet((prev if j == 0 else ch) + widths[j], ch) for j in range(layers)])
            if context and cfg.up_attention[i]:
                block.attentions = nn.ModuleList(
                    [transformer(ch, level, cfg.only_cross_attention[level]) for _ in range(layers)])
            if i < n - 1 and data:
                block.upsamplers = nn.ModuleList([FlatLinear((ch, fd, 1), (ch, fd, 1)) if flat else Upsample(ch)])
            self.up_blocks.append(block)
            prev = ch

        if data:
            self.conv_norm_out = GroupNorm(cfg.norm_groups, chs[0], eps=cfg.norm_eps)
            if flat:
                self.conv_out = FlatLinear((chs[0], fd, 1), cfg.out_channels)
            else:
                self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, cfg.conv_out_kernel,
                                          padding=(cfg.conv_out_kernel - 1) // 2)

    def context_layers(self) -> list[SpatialTransformer]:
        """This UNet's context layers in the order a forward visits them."""
        if "context" not in self.parts:
            raise RuntimeError(f"this UNet was built without its context layers (parts={sorted(self.parts)})")
        blocks = [*self.down_blocks, *([self.mid_block] if self.config.mid_attention else []), *self.up_blocks]
        return [t for b in blocks for t in getattr(b, "attentions", ())]

    def forward(self, x: Tensor, t: Tensor | float, contexts: Sequence[Context],
                time_embedding: TimestepEmbedding | None = None) -> Tensor:
        """Predict the noise of x at timestep(s) t with this UNet's data layers and the given context streams.

        x: [B, C, H, W] (image UNet) or [B, *in_channels] (text UNet); t: scalar or [B]. `time_embedding`
        overrides the global layer (the text flow uses the image UNet's, as the original does).
        """
        cfg = self.config
        if "data" not in self.parts:
            raise RuntimeError(f"this UNet was built without its data layers (parts={sorted(self.parts)})")
        time_mlp = time_embedding if time_embedding is not None else getattr(self, "time_embedding", None)
        if time_mlp is None:
            raise RuntimeError("this UNet has no time embedding of its own: pass time_embedding=")
        for c in contexts:
            if len(c.layers) != cfg.num_context_sites:
                raise ValueError(f"a context stream has {len(c.layers)} layers, "
                                 f"this UNet needs {cfg.num_context_sites}")

        t = torch.as_tensor(t, device=x.device)
        t = (t[None] if t.dim() == 0 else t).expand(x.shape[0])  # (B,)
        temb = time_mlp(timestep_embedding(t, cfg.block_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))
        if cfg.time_embed_act is not None:
            temb = ACTIVATIONS[cfg.time_embed_act](temb)
        sites = iter(range(cfg.num_context_sites))  # context sites in forward order, as context_layers() lists them

        if cfg.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)  # (B, C0, H, W); the text UNet: (B, C0, fd, 1)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            for resnet in block.resnets:
                h = resnet(h, temb)
                if cfg.down_attention[i]:
                    h = apply_context(next(sites), h, contexts)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)  # (B, Ci, H / 2^(i+1), W / 2^(i+1)); flat: same shape
                skips.append(h)

        if cfg.mid_block != "none":
            h = self.mid_block.resnets[0](h, temb)
            if cfg.mid_attention:
                h = apply_context(next(sites), h, contexts)
                h = self.mid_block.resnets[1](h, temb)

        for i, block in enumerate(self.up_blocks):
            for resnet in block.resnets:
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb)  # the skip of the same level, on channels
                if cfg.up_attention[i]:
                    h = apply_context(next(sites), h, contexts)
            if hasattr(block, "upsamplers"):
                up = block.upsamplers[0]
                # an odd-sized latent upsamples to the size of the skip it meets next (flat: a Linear, no size)
                h = up(h, skips[-1].shape[2:]) if isinstance(up, Upsample) else up(h)
        # (B, C0, H, W) -> (B, out_channels, H, W); flat: (B, C0, fd, 1) -> (B, *out_channels)
        return self.conv_out(self.conv_norm_out(h, silu=True))
