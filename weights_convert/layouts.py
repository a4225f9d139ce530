"""Readers for every layout shi-labs/versatile-diffusion was published in, and for our converted folders.

  diffusers folders   image_unet/ text_unet/ vae/ text_encoder/ image_encoder/ tokenizer/ scheduler/ ...
                      (config.json per folder; *.safetensors or *.bin; model_index.json is not needed and its
                      class names are never resolved; it only tells a folder saved for one pipeline, which has
                      no text_unet/)
  current original    vd-four-flow-v1-0(.pth|-fp16.pth): diffuser.image.* + diffuser.text.*, plus kl-f8.pth
                      and optimus-vae.pth beside it
  Nov-2022 original   vd-four-flow-v1-0(-fp16)-deprecated.pth: model.diffusion_model.*, autokl.*, clip.model.*,
                      optimus.*
  converted           config.json with "format": "vd" and one <part>.safetensors per part
The Optimus text VAE is not in the diffusers folders: it is read from optimus-vae.pth (the hub repo keeps it in
pretrained_pth/), and its tokenizer files from an optimus_tokenizer/ folder when there is one.

Each reader routes every source key to one of our parameters or to a named reason for ignoring it; anything
else is an error naming the file and the key. `open_checkpoint` then checks names and shapes against our
modules built from the configs (`Checkpoint.validate`).
"""

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from vd.nn import VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE, UNetConfig, VAEConfig
from vd.nn.optimus import VD_OPTIMUS
from weights_convert import optimus as optimus_keys
from weights_convert import presets
from weights_convert.checkpoint import (ALL_PARTS, COMPONENT_PARTS, Checkpoint, Source, check_clip_config,
                                        config_from_json, part_of)
from weights_convert.keymaps import (LEGACY_VAE_ATTENTION, Layer, clip_layers, find_layer, rename,
                                     unet_layers_v1, unet_layers_v2, vae_layers_ldm)
from weights_convert.tensorfile import CheckpointError, TensorFile

FORMAT = "vd"
FORMAT_VERSION = 1
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
ORIGINAL_FILES = ("vd-four-flow-v1-0.pth", "vd-four-flow-v1-0-fp16.pth", "vd-four-flow-v1-0-deprecated.pth",
                  "vd-four-flow-v1-0-fp16-deprecated.pth")
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")

# Source keys we read past on purpose, and why.
WHY_SCHEDULE = "noise-schedule buffer of the training code; the schedule comes from the scheduler config"
WHY_POSITION_IDS = "constant position-id buffer; transformers rebuilds it"
WHY_TEXT_TIME = ("the text UNet's copy of the time MLP; every VD flow uses the image UNet's, which the original "
                 "stores only once")
OPTIMUS_FILE = "optimus-vae.pth"
OPTIMUS_TOKENIZER = "optimus_tokenizer"
OPTIMUS_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt")
WHY_LOGIT_SCALE = "CLIP's contrastive temperature, unused by VD"

Route = tuple[str, str, object] | str | None  # (component, our key, transform) | reason to ignore | unexpected


def open_checkpoint(src: str | Path, *, kl_f8: str | Path | None = None, clip: str | Path | None = None,
                    optimus: str | Path | None = None, optimus_tokenizer: str | Path | None = None,
                    configs: dict[str, object] | None = None, validate: bool = True,
                    need: Iterable[str] | None = None) -> Checkpoint:
    """Open a local checkpoint in any supported layout (names and shapes only) and validate it (a loader that
    validates only the parts it fills, against the modules it builds anyway, passes validate=False).

    kl_f8: the VAE file for the current original layout (default: kl-f8.pth beside it).
    clip: a diffusers-layout folder giving what an original .pth lacks (CLIP towers, tokenizer, preprocessing);
      default: the folder two levels above the .pth if it is one (the hub repo keeps the .pth in pretrained_pth/).
    optimus: the Optimus text VAE file (default: optimus-vae.pth beside the .pth, or in the folder's
      pretrained_pth/). optimus_tokenizer: a folder with vocab.txt, vocab.json, merges.txt (default: an
      optimus_tokenizer/ folder there, if any).
    configs: component configs for original layouts (default: the full-size VD ones; tests pass tiny ones).
    need: the parts the caller will read (default: all). Only their files are opened and checked (a damaged text
      UNet does not stop image variation): component folders and converted part files of other components are
      not opened, kl-f8.pth only for the VAE, the CLIP folder only for the towers. A separate optimus-vae.pth is
      opened only if one of them is Optimus's: listing its tensors means unpickling its index, a tenth of a
      text_to_image load.
    """
    path = Path(src)
    need = None if need is None else tuple(need)
    if _is_dir(path):
        conf = path / "config.json"
        if conf.is_file() and _json(conf).get("format") == FORMAT:
            ckpt = read_converted(path, need)
        elif (path / "model_index.json").is_file() or any(_is_dir(path / c) for c in COMPONENT_PARTS):
            ckpt = read_diffusers(path, need)
        else:
            found = [path / n for n in ORIGINAL_FILES if (path / n).is_file()]
            if not found:
                raise CheckpointError(f"{path}: not a VD checkpoint folder (no model_index.json, no component "
                                      f"folders, no config.json of ours, no {ORIGINAL_FILES[0]})")
            ckpt = read_original(found[0], kl_f8=kl_f8, clip=clip, configs=configs, need=need)
    elif path.is_file():
        ckpt = read_original(path, kl_f8=kl_f8, clip=clip, configs=configs, need=need)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    wants_optimus = need is None or any(p.split(".")[0] == "optimus" for p in need)
    _add_optimus(ckpt, path, optimus, optimus_tokenizer, configs, wants_optimus)
    if validate:
        ckpt.validate()
    return ckpt


def _add_optimus(ckpt: Checkpoint, path: Path, optimus: str | Path | None, tokenizer: str | Path | None,
                 configs: dict[str, object] | None, wanted: bool = True) -> None:
    """The Optimus weights (from optimus-vae.pth, where the checkpoint itself has none) and tokenizer folder.
    Unless `wanted`, the file is not opened (a path given for it must still exist)."""
    here = path if path.is_dir() else path.parent
    optimus = Path(optimus) if optimus is not None else None
    if optimus is not None and not optimus.is_file():
        raise CheckpointError(f"optimus: {optimus}: no such file")
    if optimus is not None and not wanted:
        optimus = None
    elif optimus is None and wanted and "optimus" not in ckpt.configs:
        for guess in (here / OPTIMUS_FILE, here / "pretrained_pth" / OPTIMUS_FILE):
            if guess.is_file():
                optimus = guess
                break
    if optimus is not None:
        file = TensorFile(Path(optimus))
        for key in file.keys():
            r = optimus_keys.route(key)
            if r is None:
                raise CheckpointError(f"{file.path}: unexpected key {key!r} (not an Optimus text VAE weight)")
            if isinstance(r, str):
                ckpt.ignored[f"{file.path}: {key}"] = r
            else:
                ckpt.add("optimus", r[1], Source(file, key))
        # a config beside the file (e.g. optimus-vae.json) describes a non-standard Optimus; default: VD's
        side = Path(optimus).with_suffix(".json")
        if "optimus" in (configs or {}):
            ckpt.configs["optimus"] = configs["optimus"]
            ckpt.config_files["optimus"] = "the configs['optimus'] passed in"
        elif side.is_file():
            try:
                ckpt.configs["optimus"] = config_from_json("optimus", _json(side))
            except TypeError as e:
                raise CheckpointError(f"{side}: not an Optimus config ({e})") from None
            ckpt.config_files["optimus"] = str(side)
        else:
            ckpt.configs["optimus"], ckpt.config_files["optimus"] = VD_OPTIMUS, "the VD preset config"
    given = tokenizer is not None
    if tokenizer is None:
        # a folder's own, or (for a .pth in the hub repo's pretrained_pth/) the repo's
        for guess in (here / OPTIMUS_TOKENIZER, *(() if path.is_dir() else (here.parent / OPTIMUS_TOKENIZER,))):
            if guess.is_dir():
                tokenizer = guess
                break
    if tokenizer is not None:
        missing = [f for f in OPTIMUS_TOKENIZER_FILES if not (Path(tokenizer) / f).is_file()]
        if missing:
            raise CheckpointError(f"{'optimus_tokenizer: ' if given else ''}{tokenizer}: not an Optimus tokenizer "
                                  f"folder (missing {', '.join(missing)})")
        ckpt.optimus_tokenizer = Path(tokenizer)


def _is_dir(path: Path) -> bool:
    """Path.is_dir, except that a path that exists but cannot be followed (a symlink loop, no permission) is an
    error naming it rather than silently absent."""
    try:
        return path.is_dir() or (path.is_symlink() and os.stat(path) is None)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None


def _json(path: Path) -> dict:
    """A JSON file holding an object; CheckpointError naming the file otherwise."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a {type(d).__name__}")
    return d


def _collect(ckpt: Checkpoint, file: TensorFile, route: Callable[[str], Route]) -> None:
    for key in file.keys():
        r = route(key)
        if r is None:
            raise CheckpointError(f"{file.path}: unexpected key {key!r}")
        if isinstance(r, str):
            ckpt.ignored[f"{file.path}: {key}"] = r
        else:
            component, ours, transform = r
            ckpt.add(component, ours, Source(file, key, transform))


# ---- diffusers folders

def weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of one diffusers/transformers component folder; safetensors preferred, then the fp16
    variant. A diffusers model's shard index comes before its single file, a transformers model's after it (the
    order each library looks in)."""
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for stem in WEIGHT_STEMS:
                # the variant's index: "X.safetensors.index.fp16.json" (current) or "X.fp16.safetensors.index.json"
                indexes = list(dict.fromkeys([folder / f"{stem}{ext}.index{variant}.json",
                                              folder / f"{stem}{variant}{ext}.index.json"]))
                single = folder / f"{stem}{variant}{ext}"
                order = [single, *indexes] if stem in ("model", "pytorch_model") else [*indexes, single]
                for f in order:
                    if f.is_file():
                        return [f] if f == single else _shards(f)
    raise CheckpointError(f"{folder}: no weight file (expected diffusion_pytorch_model.safetensors or .bin, "
                          "model.safetensors or pytorch_model.bin)")


def _shards(index: Path) -> list[Path]:
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file name")
    return sorted({index.parent / f for f in weight_map.values()})


def _diffusers_route(component: str) -> Callable[[str], Route]:
    def route(key: str) -> Route:
        if component == "text_unet" and key.startswith("time_embedding."):
            return WHY_TEXT_TIME
        if component in ("text_encoder", "image_encoder") and key.endswith("position_ids"):
            return WHY_POSITION_IDS
        if component == "vae" and ".mid_block.attentions.0." in key:
            head, _, tail = key.partition(".mid_block.attentions.0.")
            key = f"{head}.mid_block.attentions.0.{rename(tail, LEGACY_VAE_ATTENTION)}"
        return component, key, None
    return route


# Folders diffusers writes for one VD pipeline after `remove_unused_weights()` (its docs' recipe) have no
# text_unet/: the text-to-image one keeps the text UNet's context layers (swapped in) as image_unet's attentions,
# the dual-guided one both UNets' as image_unet's DualTransformer2DModel (transformers.0: image, .1: text).
SAVED_TEXT_TO_IMAGE = "VersatileDiffusionTextToImagePipeline"
SAVED_DUAL_GUIDED = "VersatileDiffusionDualGuidedPipeline"


def _saved_pipeline(folder: Path) -> str | None:
    """The pipeline class of a saved text-to-image or dual-guided folder without text_unet/, else None."""
    index = folder / "model_index.json"
    if _is_dir(folder / "text_unet") or not index.is_file():
        return None
    name = _json(index).get("_class_name")
    return name if name in (SAVED_TEXT_TO_IMAGE, SAVED_DUAL_GUIDED) else None


def _saved_route(saved: str) -> Callable[[str], Route]:
    """image_unet's keys of a saved pipeline: its attentions go to the context layers they hold."""
    def route(key: str) -> Route:
        if ".attentions." not in key:
            return "image_unet", key, None
        if saved == SAVED_TEXT_TO_IMAGE:
            return "text_unet", key, None
        head, sep, tail = key.partition(".transformers.")
        index, _, rest = tail.partition(".")
        if not sep or index not in ("0", "1"):
            return None
        return ("image_unet" if index == "0" else "text_unet"), f"{head}.{rest}", None
    return route


def _text_context_config(image: UNetConfig) -> UNetConfig:
    """A text UNet whose context layers are shaped as the image UNet's (all a saved pipeline keeps of it)."""
    return replace(image, in_channels=VD_TEXT_UNET.in_channels, out_channels=VD_TEXT_UNET.out_channels,
                   flat_dim=VD_TEXT_UNET.flat_dim, sample_size=None)


def _components(need: Iterable[str] | None) -> set[str]:
    """The components holding the needed parts (all of them when need is None)."""
    return set(COMPONENT_PARTS) if need is None else {p.split(".")[0] for p in need}


def read_diffusers(folder: Path, need: Iterable[str] | None = None) -> Checkpoint:
    """need: the parts the caller will read (default all); other component folders are not opened."""
    ckpt = Checkpoint(origin=str(folder))
    wanted, saved = _components(need), _saved_pipeline(folder)
    if saved is not None and "text_unet" in wanted:
        wanted.add("image_unet")  # which holds the text context layers
    for component in COMPONENT_PARTS:
        sub = folder / component
        if component not in wanted or not _is_dir(sub):
            continue
        conf = sub / "config.json"
        if not conf.is_file():
            raise CheckpointError(f"{conf}: missing (every component folder needs its config.json)")
        d = _json(conf)
        if saved == SAVED_DUAL_GUIDED and component == "image_unet":
            d = {**d, "dual_cross_attention": False}  # its two context layers are read apart (_saved_route)
        try:
            if component in ("image_unet", "text_unet"):
                ckpt.configs[component] = UNetConfig.from_diffusers(d)
            elif component == "vae":
                ckpt.configs[component] = VAEConfig.from_diffusers(d)
            else:
                ckpt.configs[component] = check_clip_config({k: v for k, v in d.items() if not k.startswith("_")})
        except ValueError as e:
            raise CheckpointError(f"{conf}: {e}") from None
        ckpt.config_files[component] = str(conf)
        route, held = _diffusers_route(component), [p for p in ALL_PARTS if p.split(".")[0] == component]
        if saved is not None and component == "image_unet":
            ckpt.configs["text_unet"] = _text_context_config(ckpt.configs[component])
            ckpt.config_files["text_unet"] = f"{conf} (a saved {saved}: the text context layers are image_unet's)"
            route = _saved_route(saved)
            if saved == SAVED_TEXT_TO_IMAGE:  # its attentions are the text context layers, not the image ones
                held.remove("image_unet.context")
            held.append("text_unet.context")
        for part in held:  # a component folder holds all of its parts: validate them all
            ckpt.sources.setdefault(part, {})
        for f in weight_files(sub):
            _collect(ckpt, TensorFile(f), route)
    if (folder / "tokenizer").is_dir():
        ckpt.tokenizer = folder / "tokenizer"
    pre = folder / "image_feature_extractor" / "preprocessor_config.json"
    if pre.is_file():
        ckpt.image_processor = _json(pre)
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        ckpt.scheduler = _json(sched)
    return ckpt


# ---- original SHI-Labs files

def _layer_route(tables: dict[str, list[Layer]], ignore: Callable[[str], str | None]) -> Callable[[str], Route]:
    """Route keys through the layer tables of several components."""
    layers = {layer.source: layer for table in tables.values() for layer in table}
    owner = {layer.source: component for component, table in tables.items() for layer in table}

    def route(key: str) -> Route:
        why = ignore(key)
        if why:
            return why
        found = find_layer(layers, key)
        if found is None:
            return None
        layer, suffix = found
        new = rename(suffix, layer.renames)
        return owner[layer.source], (f"{layer.target}.{new}" if layer.target else new), layer.transform
    return route


def read_original(pth: Path, *, kl_f8: str | Path | None = None, clip: str | Path | None = None,
                  configs: dict[str, object] | None = None, need: Iterable[str] | None = None) -> Checkpoint:
    """need: the parts the caller will read (default all); kl-f8.pth and the CLIP folder only if they hold some."""
    wanted = _components(need)
    cfg = {"image_unet": VD_IMAGE_UNET, "text_unet": VD_TEXT_UNET, "vae": VD_VAE,
           "text_encoder": presets.CLIP_TEXT, "image_encoder": presets.CLIP_VISION, **(configs or {})}
    file = TensorFile(pth)
    keys = file.keys()
    ckpt = Checkpoint(origin=str(pth), scheduler=dict(presets.SCHEDULER), image_processor=dict(presets.IMAGE_PROCESSOR))
    if any(k.startswith("diffuser.image.") for k in keys):          # current layout (Feb 2023)
        tables = {"image_unet": unet_layers_v2(cfg["image_unet"], "diffuser.image", with_time=True),
                  "text_unet": unet_layers_v2(cfg["text_unet"], "diffuser.text", with_time=False)}
        _collect(ckpt, file, _layer_route(tables, lambda k: WHY_SCHEDULE if k in SCHEDULE_BUFFERS else None))
        ckpt.configs.update({c: cfg[c] for c in ("image_unet", "text_unet")})
        vae_file = Path(kl_f8) if kl_f8 else pth.parent / "kl-f8.pth"
        if kl_f8 and not vae_file.is_file():
            raise CheckpointError(f"kl_f8: {vae_file}: no such file")
        if "vae" in wanted and vae_file.is_file():  # (kl-f8.pth beside the .pth is optional; kl_f8= is checked above)
            vae = TensorFile(vae_file)
            _collect(ckpt, vae, _layer_route({"vae": vae_layers_ldm(cfg["vae"])}, lambda k: None))
            ckpt.configs["vae"] = cfg["vae"]
    elif any(k.startswith("model.diffusion_model.") for k in keys):  # Nov-2022 layout
        text, vision = clip_layers("clip.model")
        tables = {
            "image_unet": unet_layers_v1(cfg["image_unet"], "model.diffusion_model.unet_image",
                                         "model.diffusion_model.time_embed"),
            "text_unet": unet_layers_v1(cfg["text_unet"], "model.diffusion_model.unet_text", None),
            "vae": vae_layers_ldm(cfg["vae"], "autokl"),
            "text_encoder": text, "image_encoder": vision,
        }
        layers = _layer_route(tables, _ignore_v1)

        def route(key: str) -> Route:
            if key.startswith("optimus."):
                r = optimus_keys.route(key, "optimus.")
                return r if r is None or isinstance(r, str) else ("optimus", r[1], None)
            return layers(key)
        _collect(ckpt, file, route)
        ckpt.configs.update({c: cfg[c] for c in COMPONENT_PARTS if c != "optimus"})
        if "optimus.encoder" in ckpt.sources or "optimus.decoder" in ckpt.sources:
            ckpt.configs["optimus"] = cfg.get("optimus", VD_OPTIMUS)
    else:
        raise CheckpointError(f"{pth}: not a VD checkpoint (no 'diffuser.image.*' or 'model.diffusion_model.*' keys)")
    # configs name where a shape mismatch comes from
    ckpt.config_files.update({c: f"the configs[{c!r}] passed in" if c in (configs or {}) else "the VD preset config"
                              for c in ckpt.configs})
    _add_clip_assets(ckpt, pth, clip, wanted)
    return ckpt


def _ignore_v1(key: str) -> str | None:
    if key in SCHEDULE_BUFFERS:
        return WHY_SCHEDULE
    if key == "clip.model.logit_scale":
        return WHY_LOGIT_SCALE
    if key.startswith("clip.model.") and key.endswith("position_ids"):
        return WHY_POSITION_IDS
    return None


def _add_clip_assets(ckpt: Checkpoint, pth: Path, clip: str | Path | None, wanted: set[str]) -> None:
    """Take the CLIP towers (if the .pth lacks them), tokenizer and preprocessing from a diffusers folder."""
    if clip is None:
        guess = pth.resolve().parent.parent
        if not (guess / "tokenizer").is_dir():
            return
        clip = guess
    elif not _is_dir(Path(clip)):
        raise CheckpointError(f"{clip}: no such folder (clip=, the diffusers folder with the CLIP towers)")
    other = read_diffusers(Path(clip), [c for c in ("text_encoder", "image_encoder") if c in wanted])
    for component in ("text_encoder", "image_encoder"):
        if component not in ckpt.configs and component in other.configs:
            ckpt.configs[component] = other.configs[component]
            ckpt.config_files[component] = other.config_files[component]
            ckpt.sources[component] = other.sources[component]
    ckpt.tokenizer = other.tokenizer
    ckpt.image_processor = other.image_processor or ckpt.image_processor


# ---- our converted folders

def read_converted(folder: Path, need: Iterable[str] | None = None) -> Checkpoint:
    """need: the parts the caller will read (default all); other part files are not opened."""
    meta = _json(folder / "config.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / 'config.json'}: format_version {meta.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; convert the checkpoint again")
    ckpt = Checkpoint(origin=str(folder), image_processor=meta.get("image_processor"), scheduler=meta.get("scheduler"))
    configs = meta.get("configs")
    if not isinstance(configs, dict):
        raise CheckpointError(f"{folder / 'config.json'}: configs: expected a JSON object, got {configs!r}")
    for c, d in configs.items():
        try:
            ckpt.configs[c] = config_from_json(c, d)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: configs.{c}: {e}") from None
    ckpt.config_files = {c: str(folder / "config.json") for c in ckpt.configs}
    for key, user in (("tokenizer", "text_encoder"), ("optimus_tokenizer", "optimus")):
        if meta.get(key):
            needed = need is None or any(p.split(".")[0] == user for p in need)
            if needed and not _is_dir(folder / meta[key]):
                raise CheckpointError(f"{folder / meta[key]}: missing (config.json names it as the {key} folder)")
            setattr(ckpt, key, folder / meta[key])
    for part in meta.get("parts", []):
        component = part.split(".")[0]
        if component not in ckpt.configs:
            raise CheckpointError(f"{folder / 'config.json'}: part {part!r} has no config for {component!r}")
        if need is not None and part not in need:
            continue
        file = TensorFile(folder / f"{part}.safetensors")
        ckpt.sources.setdefault(part, {})

        def route(key: str, component=component, part=part) -> Route:
            return (component, key, None) if part_of(component, key) == part else None
        _collect(ckpt, file, route)
    return ckpt
