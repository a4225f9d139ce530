"""Typed configs for the UNets and the VAE, their full-size VD presets, and the mapping from diffusers config.json.

Our field names say what they mean: diffusers' `attention_head_dim` is really the number of heads for these
models (diffusers issue #2011), so here it is `num_heads`. Per-level tuples are in down-path order; the up path
mirrors them. Options of diffusers' UNet2DConditionModel that VD never uses are built where they are cheap
(a resnet-only or no mid block, scale-and-shift time conditioning, activations on the time embedding) and
otherwise refused with a clear error rather than silently ignored, unless the reference ignores them too
(mid_block_only_cross_attention for its cross-attention mid blocks; upcast_attention, which only changes fp16
rounding).
"""

import math
from dataclasses import dataclass, fields

from vd.nn.layers import ACTIVATIONS


@dataclass(frozen=True)
class UNetConfig:
    """One VD UNet. The image UNet has `flat_dim` 0 (2-D convolutions); the text UNet (`flat`) has flat_dim > 0:
    its hidden states are [B, C, flat_dim, 1] and its data is [B, *in_channels] (e.g. (768, 1, 1))."""

    in_channels: int | tuple[int, ...]
    out_channels: int | tuple[int, ...]
    block_channels: tuple[int, ...]          # width of each resolution level
    down_attention: tuple[bool, ...]         # which down levels hold context layers
    up_attention: tuple[bool, ...]           # which up levels hold context layers (up-path order)
    layers_per_block: tuple[int, ...]        # resnets per down level; the mirrored up level has one more
    num_heads: tuple[int, ...]               # attention heads per level
    context_dim: tuple[int, ...]             # width of the context tokens per level
    transformer_depth: tuple[int, ...]       # transformer blocks in each context layer, per level
    only_cross_attention: tuple[bool, ...]   # attn1 attends to the context too (not in VD)
    mid_block: str = "cross_attention"       # resnet, context layer, resnet; "resnet": one resnet; "none": none
    mid_transformer_depth: int = 1           # transformer blocks in the mid context layer
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int | None = None        # default 4 x block_channels[0]
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    linear_projection: bool = False          # proj_in/proj_out as Linear instead of 1x1 conv
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | None = None           # default latent size (image UNet)
    flat_dim: int = 0
    time_scale_shift: bool = False           # 2-D resnets: the time embedding scales and shifts (not in VD)
    time_mlp_post_act: str | None = None     # an activation after the time MLP's last layer (not in VD)
    time_embed_act: str | None = None        # an activation on the time embedding every resnet gets (not in VD)

    def __post_init__(self):
        _check_fields(self, _UNET_KINDS)
        n = len(self.block_channels)
        for name in ("down_attention", "up_attention", "layers_per_block", "num_heads", "context_dim",
                     "transformer_depth", "only_cross_attention"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} needs one entry per level ({n}), got {getattr(self, name)}")
        for ch, heads in zip(self.block_channels, self.num_heads):
            if heads < 1 or ch < heads:
                raise ValueError(f"UNetConfig: {ch} channels cannot be split into {heads} heads")
        _check_groups(self.norm_groups, self.block_channels)

    @property
    def flat(self) -> bool:
        """The text UNet (flat data: Linear layers over [C, flat_dim, 1]); False for the image UNet."""
        return self.flat_dim > 0

    @property
    def mid_attention(self) -> bool:
        """The mid block holds a context layer."""
        return self.mid_block == "cross_attention"

    @property
    def time_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_channels[0]

    @property
    def num_context_sites(self) -> int:
        """How many context layers (transformers) one forward passes through, in forward order."""
        down = sum(n for n, a in zip(self.layers_per_block, self.down_attention) if a)
        up = sum(n + 1 for n, a in zip(self.layers_per_block[::-1], self.up_attention) if a)
        return down + int(self.mid_attention) + up

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        """Map a diffusers UNet2DConditionModel / UNetFlatConditionModel config.json onto ours."""
        return _from_diffusers(_unet_from_diffusers, d, _UNET_SOURCE)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    mid_attention: bool = True
    quant_conv: bool = True
    post_quant_conv: bool = True
    sample_size: int | None = None

    def __post_init__(self):
        _check_fields(self, _VAE_KINDS)
        _check_groups(self.norm_groups, self.block_channels)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for kl-f8)."""
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        """Map a diffusers AutoencoderKL config.json onto ours."""
        return _from_diffusers(_vae_from_diffusers, d, _VAE_SOURCE)


# ---- type and range checks, so a bad config.json is an error naming its key when it is opened, not a failure
# inside a module (or after denoising)

def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _ints(v) -> bool:
    return isinstance(v, tuple) and len(v) > 0 and all(_positive_int(x) for x in v)


def _bools(v) -> bool:
    return isinstance(v, tuple) and all(isinstance(x, bool) for x in v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MID_BLOCKS = ("cross_attention", "resnet", "none")
_KINDS = {
    "int": (_positive_int, "a positive integer"),
    "int0": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "int?": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "ints": (_ints, "a non-empty list of positive integers"),
    "int|ints": (lambda v: _positive_int(v) or _ints(v), "a positive integer or a list of them"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bools": (_bools, "a list of true/false"),
    "number": (_number, "a finite number"),
    "positive": (lambda v: _number(v) and v > 0, "a positive number"),
    "mid": (lambda v: v in MID_BLOCKS, f"one of {MID_BLOCKS}"),
    "act?": (lambda v: v is None or isinstance(v, str) and v in ACTIVATIONS, f"null or one of {tuple(ACTIVATIONS)}"),
}
_UNET_KINDS = {
    "in_channels": "int|ints", "out_channels": "int|ints", "block_channels": "ints", "down_attention": "bools",
    "up_attention": "bools", "layers_per_block": "ints", "num_heads": "ints", "context_dim": "ints",
    "transformer_depth": "ints", "only_cross_attention": "bools", "mid_block": "mid",
    "mid_transformer_depth": "int", "norm_groups": "int", "norm_eps": "positive", "flip_sin_to_cos": "bool",
    "freq_shift": "number", "time_embed_dim": "int?", "downsample_padding": "int0", "mid_block_scale_factor": "number",
    "linear_projection": "bool", "center_input_sample": "bool", "conv_in_kernel": "int", "conv_out_kernel": "int",
    "sample_size": "int?", "flat_dim": "int0", "time_scale_shift": "bool", "time_mlp_post_act": "act?",
    "time_embed_act": "act?",
}
_VAE_KINDS = {
    "in_channels": "int", "out_channels": "int", "latent_channels": "int", "block_channels": "ints",
    "layers_per_block": "int", "norm_groups": "int", "scaling_factor": "positive", "mid_attention": "bool",
    "quant_conv": "bool", "post_quant_conv": "bool", "sample_size": "int?",
}


class ConfigKeyError(ValueError):
    """A config value of the wrong type or range; `key` is our field name (the diffusers readers rename it)."""

    def __init__(self, key: str, value, expected: str):
        super().__init__(f"{key}: expected {expected}, got {value!r}")
        self.key, self.value, self.expected = key, value, expected


def _check_fields(config, kinds: dict[str, str]) -> None:
    for f in fields(config):
        ok, expected = _KINDS[kinds[f.name]]
        if not ok(getattr(config, f.name)):
            raise ConfigKeyError(f.name, getattr(config, f.name), expected)


def _check_groups(groups: int, channels: tuple[int, ...]) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigKeyError("norm_groups", groups, f"a divisor of every block's channels {list(channels)}")


# ---- full-size presets (the published config.json files of shi-labs/versatile-diffusion)

_VD_LEVELS = dict(
    block_channels=(320, 640, 1280, 1280),
    down_attention=(True, True, True, False),
    up_attention=(False, True, True, True),
    layers_per_block=(2, 2, 2, 2),
    num_heads=(8, 8, 8, 8),
    context_dim=(768, 768, 768, 768),
    transformer_depth=(1, 1, 1, 1),
    only_cross_attention=(False, False, False, False),
)
VD_IMAGE_UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=64, **_VD_LEVELS)
VD_TEXT_UNET = UNetConfig(in_channels=(768, 1, 1), out_channels=(768, 1, 1), flat_dim=4, **_VD_LEVELS)
VD_VAE = VAEConfig(sample_size=256)


# ---- diffusers config.json -> ours

# Options our modules do not implement, with the values we accept (diffusers' default first).
# (resnet_skip_time_act, resnet_out_scale_factor and cross_attention_norm only reach block types VD does not use,
# so the reference ignores them for ours, and so do we.)
_UNET_FIXED = {
    "act_fn": ("silu", "swish"), "time_embedding_type": ("positional",), "time_cond_proj_dim": (None,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "resnet_time_scale_shift": ("default", "scale_shift"),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID = {"UNetMidBlock2DCrossAttn": "cross_attention", "UNetMidBlock2D": "resnet", None: "none"}


# our field -> the diffusers config.json key it comes from (for error messages)
_UNET_SOURCE = {"block_channels": "block_out_channels", "down_attention": "down_block_types",
                "up_attention": "up_block_types", "num_heads": "attention_head_dim",
                "context_dim": "cross_attention_dim",
                "transformer_depth": "transformer_layers_per_block",
                "mid_transformer_depth": "transformer_layers_per_block", "mid_block": "mid_block_type",
                "norm_groups": "norm_num_groups", "time_embed_dim": "time_embedding_dim",
                "linear_projection": "use_linear_projection", "time_embed_act": "time_embedding_act_fn",
                "time_mlp_post_act": "timestep_post_act"}
_VAE_SOURCE = {"block_channels": "block_out_channels", "norm_groups": "norm_num_groups",
               "mid_attention": "mid_block_add_attention", "quant_conv": "use_quant_conv",
               "post_quant_conv": "use_post_quant_conv"}


def _from_diffusers(build, d: dict, renames: dict[str, str]):
    """build(d) with a config error naming the config.json key, and a non-object config refused."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, got a {type(d).__name__}")
    try:
        return build(d)
    except ConfigKeyError as e:
        key = renames.get(e.key, e.key)
        raise ValueError(f"{key}: expected {e.expected}, got {d.get(key, e.value)!r}") from None
    except TypeError as e:  # a wrongly typed value met before the field checks (e.g. len() of a number)
        raise ValueError(f"a value has the wrong type ({e})") from None


def _activation(name):
    """diffusers reads activation names lower-cased ("SiLU" is "silu")."""
    return name.lower() if isinstance(name, str) else name


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {name}={value} needs {n} entries, one per block")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"config {name}={value}: nested per-layer values are not supported")
        return tuple(value)
    return (value,) * n


def _check_fixed(d: dict, fixed: dict[str, tuple], what: str) -> None:
    for key, allowed in fixed.items():
        if key in d and d[key] not in allowed:
            only = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"{what} config {key}={d[key]!r} is not supported (only {only})")


def _unet_from_diffusers(d: dict) -> UNetConfig:
    def unalias(t):  # the reference reads "UNetResDownBlock2D" as "DownBlock2D" (down and up blocks only)
        return t[len("UNetRes"):] if isinstance(t, str) and t.startswith("UNetRes") else t

    down = [unalias(t) for t in d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])]
    up = [unalias(t) for t in d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)]
    flat = bool(down) and all(t.endswith("Flat") for t in down)

    def kind(t: str | None) -> str | None:  # "CrossAttnDownBlockFlat" -> "CrossAttnDownBlock2D"; 2D names not flat
        if not flat or t is None:
            return t
        return t.replace("Flat", "2D") if "Flat" in t else ""

    _check_fixed(d, _UNET_FIXED, "UNet")
    if d.get("num_attention_heads") is not None:
        raise ValueError("UNet config num_attention_heads must be null (the reference refuses it too; "
                         "attention_head_dim holds the head counts)")
    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(channels)
    if len(down) != n or len(up) != n:
        raise ValueError(f"UNet config needs {n} down_block_types and up_block_types, got {down} and {up}")
    for t in down:
        if kind(t) not in _DOWN:
            raise ValueError(f"UNet config down block type {t!r} is not supported")
    for t in up:
        if kind(t) not in _UP:
            raise ValueError(f"UNet config up block type {t!r} is not supported")
    mid_type = kind(d.get("mid_block_type", "UNetMidBlockFlatCrossAttn" if flat else "UNetMidBlock2DCrossAttn"))
    if mid_type not in _MID:
        raise ValueError(f"UNet config mid_block_type {d.get('mid_block_type')!r} is not supported")
    if d.get("norm_num_groups", 32) is None:
        raise ValueError("UNet config norm_num_groups=None is not supported")
    heads = d.get("attention_head_dim", 8)
    only_cross = d.get("only_cross_attention", False)

    def io(value):  # the flat UNet's data shape: an int n means (n, flat_dim, 1)
        if not flat:
            return int(value)
        return tuple(value) if isinstance(value, (list, tuple)) else (int(value), 4, 1)

    depth = _per_level(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    # parity: the reference's flat down/up blocks drop transformer_layers_per_block (one transformer block
    # each); only its mid block honours it. Its cross-attention mid blocks (2D and flat) also drop
    # mid_block_only_cross_attention: the mid transformer's attn1 is always self-attention.
    return UNetConfig(
        in_channels=io(d.get("in_channels", 4)),
        out_channels=io(d.get("out_channels", 4)),
        block_channels=channels,
        down_attention=tuple(_DOWN[kind(t)] for t in down),
        up_attention=tuple(_UP[kind(t)] for t in up),
        layers_per_block=_per_level(d.get("layers_per_block", 2), n, "layers_per_block"),
        num_heads=_per_level(heads, n, "attention_head_dim"),
        context_dim=_per_level(d.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
        transformer_depth=(1,) * n if flat else depth,
        mid_transformer_depth=depth[-1],
        only_cross_attention=_per_level(only_cross, n, "only_cross_attention"),
        mid_block=_MID[mid_type],
        norm_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        time_embed_dim=d.get("time_embedding_dim"),
        downsample_padding=d.get("downsample_padding", 1),
        mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
        linear_projection=d.get("use_linear_projection", False),
        center_input_sample=d.get("center_input_sample", False),
        conv_in_kernel=d.get("conv_in_kernel", 3),  # (unused by the flat UNet)
        conv_out_kernel=d.get("conv_out_kernel", 3),
        sample_size=d.get("sample_size"),
        flat_dim=4 if flat else 0,
        time_mlp_post_act=_activation(d.get("timestep_post_act")),
        time_embed_act=_activation(d.get("time_embedding_act_fn")),
        # parity: the reference's flat resnets always add the time embedding (they ignore scale_shift)
        time_scale_shift=not flat and d.get("resnet_time_scale_shift") == "scale_shift",
    )


# (shift_factor, latents_mean and latents_std are read by other pipelines only: diffusers' AutoencoderKL and its VD
# pipelines ignore them, and so do we; force_upcast too, which VD's pipelines never consult.)
_VAE_FIXED = {"act_fn": ("silu", "swish")}


def _vae_from_diffusers(d: dict) -> VAEConfig:
    _check_fixed(d, _VAE_FIXED, "AutoencoderKL")
    channels = tuple(d.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(key, [want] * len(channels))
        if list(types) != [want] * len(channels):
            raise ValueError(f"AutoencoderKL config {key}={types} is not supported (only {want} per level)")
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        block_channels=channels,
        layers_per_block=d.get("layers_per_block", 1),
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
        mid_attention=d.get("mid_block_add_attention", True),
        quant_conv=d.get("use_quant_conv", True),
        post_quant_conv=d.get("use_post_quant_conv", True),
        sample_size=d.get("sample_size"),
    )
