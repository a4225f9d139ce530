"""A VD checkpoint in any layout, seen as our parts: which tensor of which file fills each of our parameters.

Parts (one safetensors file each once converted):
  image_unet.global / .data / .context   the image UNet split as VD splits it (vd.nn.unet)
  text_unet.data / .context              the text UNet (its time MLP is the image UNet's, as in the original)
  vae.encoder / vae.decoder              kl-f8, with quant_conv / post_quant_conv
  text_encoder / image_encoder           CLIP ViT-L/14 towers with their projections (transformers names)
  optimus.encoder / optimus.decoder      the Optimus text VAE (BERT encoder, GPT-2 decoder; vd.nn.optimus)
A caller says which parts it needs (vd.tasks knows which parts a task needs); opening a checkpoint for some
parts opens only their files, and reads names and shapes only; `load(part)` reads that part's tensors.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from vd.nn import AutoencoderKL, UNet, UNetConfig, VAEConfig
from vd.nn.optimus import OptimusConfig, OptimusVAE
from weights_convert.keymaps import Transform
from weights_convert.streaming import read_tensors
from weights_convert.tensorfile import CheckpointError, TensorFile

COMPONENT_PARTS = {
    "image_unet": ("global", "data", "context"),
    "text_unet": ("data", "context"),
    "vae": ("encoder", "decoder"),
    "text_encoder": (),
    "image_encoder": (),
    "optimus": ("encoder", "decoder"),
}
ALL_PARTS = tuple(f"{c}.{p}" if p else c for c, ps in COMPONENT_PARTS.items() for p in (ps or ("",)))


def part_of(component: str, key: str) -> str:
    """Which part of `component` our parameter `key` belongs to."""
    if component in ("image_unet", "text_unet"):
        if key.startswith("time_embedding."):
            return f"{component}.global"
        return f"{component}.context" if ".attentions." in key else f"{component}.data"
    if component == "vae":
        return "vae.encoder" if key.startswith(("encoder.", "quant_conv.")) else "vae.decoder"
    if component == "optimus":
        return "optimus.encoder" if key.startswith("encoder.") else "optimus.decoder"
    return component


@dataclass(frozen=True)
class Source:
    """Where one of our tensors comes from."""

    file: TensorFile
    key: str
    transform: Transform | None = None

    def shape(self) -> tuple[int, ...]:
        s = self.file.shape(self.key)
        return self.transform.shape(s) if self.transform else s

    def dtype(self) -> torch.dtype:
        return self.file.dtype(self.key)


@dataclass
class Checkpoint:
    origin: str                                                   # what was opened, for messages
    configs: dict[str, object] = field(default_factory=dict)      # UNetConfig / VAEConfig / CLIP config dict
    sources: dict[str, dict[str, Source]] = field(default_factory=dict)  # part -> {our key: source}
    ignored: dict[str, str] = field(default_factory=dict)         # "file: key" -> why it is not used
    tokenizer: Path | None = None                                 # folder of CLIPTokenizer files
    optimus_tokenizer: Path | None = None                         # folder with vocab.txt, vocab.json, merges.txt
    image_processor: dict | None = None                           # CLIPImageProcessor settings
    scheduler: dict | None = None                                 # scheduler_config.json
    config_files: dict[str, str] = field(default_factory=dict)    # component -> config file, for messages

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in ALL_PARTS if p in self.sources)

    def require(self, parts: Iterable[str], why: str) -> None:
        missing = [p for p in parts if p not in self.sources]
        if missing:
            raise CheckpointError(f"{self.origin}: has no {', '.join(missing)}, needed for {why}")

    def load(self, part: str, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Read one part's tensors (memory-mapped where the file allows), moved to `device` and then cast to
        `dtype` if given (moving first keeps a CPU copy of a cast out of host memory)."""
        return self.load_parts([part], dtype, device)[part]

    def load_parts(self, parts: Iterable[str], dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> dict[str, dict[str, Tensor]]:
        """`load` for several parts in one pass, so that an accelerator gets all their files through one stream
        (`weights_convert.streaming`); each tensor is cast as soon as it arrives."""
        wanted = [(part, key, src) for part in parts for key, src in self.sources[part].items()]
        out: dict[str, dict[str, Tensor]] = {part: {} for part in parts}
        for i, t in read_tensors([(src.file, src.key) for _, _, src in wanted], device):
            part, key, src = wanted[i]
            if src.transform:
                t = src.transform(t)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            out[part][key] = t
        return out

    def add(self, component: str, key: str, source: Source) -> None:
        part = part_of(component, key)
        bucket = self.sources.setdefault(part, {})
        if key in bucket:
            raise CheckpointError(f"{source.file.path}: {source.key!r} and {bucket[key].key!r} "
                                  f"both map to {component} {key!r}")
        bucket[key] = source

    def validate(self, built: dict[str, nn.Module] | None = None) -> None:
        """Every parameter of every present part is filled, with the right shape and a floating-point dtype where
        the parameter is floating point, and nothing else is. `built`: part -> a meta module holding it; then only
        those parts are checked, against these modules (a loader checks what it fills with what it fills)."""
        for part in self.parts if built is None else [p for p in self.parts if p in built]:
            component = part.split(".")[0]
            if built is None:
                want = expected_tensors(part, self.configs[component])
            else:
                want = {k: v for k, v in built[part].state_dict().items() if part_of(component, k) == part}
            have = self.sources[part]
            where = self.config_files.get(component, "the config")
            for key in sorted(set(want) - set(have)):
                # name the files of this component (a part can be missing from them entirely)
                files = sorted({str(s.file.path) for p, srcs in self.sources.items() if p.split(".")[0] == component
                                for s in srcs.values()}) or [self.origin]
                raise CheckpointError(f"{', '.join(files)}: missing {component} weight {key!r} (part {part}; "
                                      f"expected according to {where})")
            for key in sorted(set(have) - set(want)):
                raise CheckpointError(f"{have[key].file.path}: unexpected key {have[key].key!r} "
                                      f"({component} has no {key!r} according to {where})")
            for key, src in have.items():
                if src.shape() != tuple(want[key].shape):
                    raise CheckpointError(f"{src.file.path}: {src.key!r} has shape {list(src.shape())}, but "
                                          f"{where} implies {list(want[key].shape)}")
                if want[key].is_floating_point() and not src.dtype().is_floating_point:
                    raise CheckpointError(f"{src.file.path}: {src.key!r} has dtype {src.dtype()}, but {component} "
                                          f"{key!r} is a floating-point weight")


def expected_shapes(part: str, config: object) -> dict[str, tuple[int, ...]]:
    """{key: shape} of one part of our modules, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in expected_tensors(part, config).items()}


def expected_tensors(part: str, config: object) -> dict[str, Tensor]:
    """One part's state dict as meta tensors (names, shapes and dtypes; no memory)."""
    component, _, sub = part.partition(".")
    return build_meta(component, config, {sub}).state_dict()


class _SkipInit(TorchFunctionMode):
    """Skips the weight initialisers that module constructors call on meta tensors: they fill nothing there, yet
    they were a third of the time spent building the modules of a load. A mode is thread-local, so modules other
    threads build meanwhile are initialised as usual."""

    INITIALISERS = frozenset({
        nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
        nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
        Tensor.uniform_, Tensor.normal_, Tensor.fill_, Tensor.zero_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **(kwargs or {}))


def build_meta(component: str, config: object, subs: Iterable[str]) -> nn.Module:
    """Our module for some parts of a component (sub-part names, "" for a CLIP tower) on the meta device: no
    memory, no values; `load_state_dict(assign=True)` fills it."""
    if component in ("text_encoder", "image_encoder", "optimus"):
        _transformers_models()  # imported first, not under the meta device (see there)
    with torch.device("meta"), _SkipInit():
        if component in ("image_unet", "text_unet"):
            return UNet(config, parts=frozenset(subs))
        if component == "vae":
            return AutoencoderKL(config, parts=frozenset(subs))
        if component == "optimus":
            return OptimusVAE(config, parts=frozenset(subs))
        return build_clip(component, config)


def _transformers_models() -> tuple[type, ...]:
    """The transformers models our components are built from (the CLIP towers, Optimus' BERT), imported. Called
    before the meta device becomes the default: a module first imported under it runs its import-time code there,
    and on torch 2.6 the import of torch._dynamo that these pull in fails ("Tensor.item() cannot be called on
    meta tensors"). Here, not at import: transformers is slow to import."""
    from transformers import BertModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    return BertModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection


def build_clip(component: str, config: dict):
    """A transformers CLIP tower with projection (on the current default device)."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    if component == "text_encoder":
        return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
    return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))


def config_to_json(config: object) -> dict:
    """Our dataclass configs (or a CLIP config dict) as plain JSON."""
    if isinstance(config, (UNetConfig, VAEConfig, OptimusConfig)):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    return dict(config)


_CLIP_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim",
              "vocab_size", "max_position_embeddings", "image_size", "patch_size", "num_channels")


def check_clip_config(d: object) -> dict:
    """A CLIP tower's config (transformers' names), its sizes checked so that a bad value names its key here
    rather than failing inside transformers; ValueError("key: ...")."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, got a {type(d).__name__}")
    for key in _CLIP_INTS:
        v = d.get(key)
        if key in d and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{key}: expected a positive integer, got {v!r}")
    eps = d.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm_eps: expected a positive number, got {eps!r}")
    if "hidden_size" in d and "num_attention_heads" in d and d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError(f"num_attention_heads: expected a divisor of hidden_size {d['hidden_size']}, got "
                         f"{d['num_attention_heads']}")
    if "image_size" in d and "patch_size" in d and d["image_size"] % d["patch_size"]:
        raise ValueError(f"patch_size: expected a divisor of image_size {d['image_size']}, got {d['patch_size']}")
    return d


def config_from_json(component: str, d: dict) -> object:
    """One component's config from our converted folder's JSON; ValueError/TypeError if it is malformed."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, got a {type(d).__name__}")
    if component in ("image_unet", "text_unet"):
        d = dict(d)
        if "mid_attention" in d:  # folders converted before mid_block named the kind of mid block
            old = d.pop("mid_attention")
            d["mid_block"] = {True: "cross_attention", False: "none"}[old] if isinstance(old, bool) else old
        return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    if component == "vae":
        return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    if component == "optimus":
        return OptimusConfig(**d)
    return check_clip_config(dict(d))
