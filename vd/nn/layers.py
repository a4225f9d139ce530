"""Building blocks shared by the image UNet, the flat text UNet and the VAE.

Parameter names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, `to_q`, `ff.net.0.proj`, ...) so the
diffusers-layout checkpoints of shi-labs/versatile-diffusion load with a strict `load_state_dict`, with no
renaming. The math is that of the original LDM/VD code (CompVis `openaimodel.py`, SHI-Labs `openaimodel.py`
at cf0f4a2).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vd.nn.fusable import GroupNorm, KernelHook, LayerNorm


KeysValues = tuple[Tensor, Tensor]  # an attention's keys and values, [B, heads, L, head_dim] each
BlockKeysValues = tuple[KeysValues | None, KeysValues]  # a TransformerBlock's: attn1 (if it reads the context), attn2


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], always in float32."""
    half = dim // 2
    # parity: frequencies and products in float32 whatever the model dtype, as the reference does
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# the activations a UNet config may name: diffusers' names (its config values, read lower-cased)
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}


class TimestepEmbedding(nn.Module):
    """The global layer of VD: an MLP on the sinusoidal embedding, shared by every flow. `post_act` (diffusers'
    timestep_post_act, not in VD) names an activation after its last layer."""

    def __init__(self, in_dim: int, dim: int, post_act: str | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.post_act = post_act

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear_2(F.silu(self.linear_1(x)))
        return h if self.post_act is None else ACTIVATIONS[self.post_act](h)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between and a 1x1 shortcut if widths differ.

    `scale_shift` (diffusers' resnet_time_scale_shift="scale_shift", not in VD): the time embedding gives a scale
    and a shift applied after norm2 instead of a shift before it."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float,
                 kernel_size: int = 3, output_scale: float = 1.0, scale_shift: bool = False):
        super().__init__()
        pad = kernel_size // 2
        self.output_scale, self.scale_shift = output_scale, scale_shift
        self.norm1 = GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size, padding=pad)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch * (2 if scale_shift else 1)) if temb_ch is not None else None
        self.norm2 = GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size, padding=pad)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        shift = self.time_emb_proj(F.silu(temb)) if self.time_emb_proj is not None else None  # (B, out_ch or 2x)
        if self.scale_shift:
            scale, shift = shift[:, :, None, None].chunk(2, dim=1)
            h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        else:
            h = self.conv2(self.norm2(h, shift, silu=True))  # silu(norm2(h + shift)), one pass when fused
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out / self.output_scale if self.output_scale != 1.0 else out


class FlatResnetBlock(ResnetBlock):
    """The text UNet's residual block: a 1x1-conv ResnetBlock on [B, C*fd, 1, 1], the view of [B, C, fd, 1]."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, flat_dim: int):
        super().__init__(in_ch * flat_dim, out_ch * flat_dim, temb_ch, groups, eps, kernel_size=1)
        self.flat_dim = flat_dim

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        b, c, fd, w = x.shape  # (B, C, fd, 1)
        out = super().forward(x.reshape(b, c * fd, 1, 1), temb)  # (B, C'*fd, 1, 1)
        return out.reshape(b, -1, fd, w)


class FlatLinear(nn.Linear):
    """A Linear over the trailing dims `in_shape` -> `out_shape`; the flat UNet's stand-in for convs and resampling.

    The weight stays the 2-D (prod(out_shape), prod(in_shape)) matrix the checkpoints store.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        super().__init__(math.prod(in_shape), math.prod(out_shape))
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[: x.dim() - len(self.in_shape)]
        return super().forward(x.reshape(*lead, self.in_features)).reshape(*lead, *self.out_shape)


class Downsample(nn.Module):
    """Strided 3x3 conv; padding 0 means the VAE's asymmetric (right/bottom) zero pad first."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to the skip's size when the input is odd-sized), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention; cross-attention when `context` is given."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # key `to_out.0`: the reference keeps a Dropout at .1
        # optional stacked copies of the projections (fuse_projections), never saved
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("kv_weight", None, persistent=False)

    def fuse_projections(self) -> None:
        """Stack the projections that read the same input, so they run as one matmul (a GPU speed-up). The
        separate weights become views into the stacked one: no memory is added, and state_dict is unchanged."""
        if self.to_q.bias is not None or self.kv_weight is not None:
            return  # VD's transformers have no projection biases; nothing else needs this
        self_attention = self.to_q.in_features == self.to_k.in_features
        parts = [self.to_q, self.to_k, self.to_v] if self_attention else [self.to_k, self.to_v]
        stacked = torch.cat([p.weight for p in parts])
        rows = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(stacked[rows:rows + n], requires_grad=p.weight.requires_grad)
            rows += n
        if self_attention:
            self.qkv_weight = stacked
        self.kv_weight = stacked[-2 * self.to_k.out_features:]

    def _apply(self, fn, recurse=True):
        """A move or cast (`.to`, `.half`, ...) makes a new tensor of each weight, so the projections would no
        longer be views into the stacked one (their memory held twice): stack them again. (An in-place change
        such as `share_memory` keeps the views, and them.)"""
        super()._apply(fn, recurse)
        stacked, k = self.kv_weight, self.to_k.weight
        if stacked is not None and k.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr():
            self.qkv_weight = self.kv_weight = None
            self.fuse_projections()
        return self

    def keys_values(self, context: Tensor) -> KeysValues:
        """The keys and values [B, heads, L, head_dim] of a context: fixed while sampling, so computed once."""
        if self.kv_weight is not None:
            k, v = F.linear(context, self.kv_weight).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        return tuple(rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (k, v))

    def forward(self, x: Tensor, context: Tensor | None = None, keys_values: KeysValues | None = None) -> Tensor:
        """Self-attention (no context), or cross-attention to `context` or to its precomputed `keys_values`."""
        if context is None and keys_values is None and self.qkv_weight is not None:
            q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads)
                       for a in F.linear(x, self.qkv_weight).chunk(3, dim=-1))
        else:
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
            k, v = keys_values or self.keys_values(x if context is None else context)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(KernelHook, nn.Module):
    """Gated GELU (Shazeer 2020): the first half of the projection, gated by the exact GELU of the second (one
    pass over the projection when a fused kernel is installed)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.uses_kernel(h):
            return self.kernel(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # keys `net.0.proj` and `net.2`; index 1 is the reference's Dropout(0)
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, only_cross_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def keys_values(self, context: Tensor) -> BlockKeysValues:
        """The keys and values of `context` for each of this block's attentions that reads it."""
        return self.attn1.keys_values(context) if self.only_cross_attention else None, self.attn2.keys_values(context)

    def forward(self, x: Tensor, context: Tensor, keys_values: BlockKeysValues | None = None) -> Tensor:
        kv1, kv2 = keys_values or (None, None)
        h = self.attn1(self.norm1(x), context if self.only_cross_attention else None, kv1)
        x, h = self.norm2.add_norm(x, h)  # x = x + attn1(...); h = norm2(x)
        x, h = self.norm3.add_norm(x, self.attn2(h, context, kv2))
        return x + self.ff(h)


class SpatialTransformer(nn.Module):
    """A context layer of VD: tokens from every position of [B, C, H, W] attend to a context [B, L, D].

    The flat UNet feeds [B, C, fd, 1], i.e. fd tokens. Output = input + the transformer's residual.
    """

    def __init__(self, ch: int, heads: int, context_dim: int, depth: int, groups: int,
                 linear_projection: bool = False, only_cross_attention: bool = False):
        super().__init__()
        head_dim = ch // heads
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear_projection else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim, only_cross_attention) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, ch) if linear_projection else nn.Conv2d(inner, ch, 1)

    def keys_values(self, context: Tensor) -> list[BlockKeysValues]:
        """The keys and values of `context` for every block, computed in the blocks' dtype."""
        context = context.to(self.norm.weight.dtype)
        return [block.keys_values(context) for block in self.transformer_blocks]

    def forward(self, x: Tensor, context: Tensor, keys_values: Sequence[BlockKeysValues] | None = None) -> Tensor:
        """x + the transformer's residual; `keys_values` (from `keys_values(context)`) spares the projections."""
        _, _, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(rearrange(y, "b c h w -> b (h w) c"))
        else:
            y = rearrange(self.proj_in(y), "b c h w -> b (h w) c")
        for i, block in enumerate(self.transformer_blocks):
            y = block(y, context, keys_values[i] if keys_values is not None else None)
        if self.linear_projection:
            y = rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        else:
            y = self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))
        return x + y
