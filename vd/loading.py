"""Build our modules for the parts a set of tasks needs and fill them from a checkpoint.

Modules are built on the meta device (no memory, no random init) and filled with `load_state_dict(assign=True)`,
so a part's tensors are the checkpoint's own (memory-mapped where the file allows) unless a cast or a move to
another device is asked for (an accelerator gets them streamed: weights_convert.streaming). Parts no task needs
are never built, checked or read.
"""

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vd.nn import AutoencoderKL, UNet
from vd.nn.optimus import OptimusVAE
from vd.optimus_tokenizers import OptimusTokenizers
from vd.tasks import parts_for
from weights_convert import Checkpoint, CheckpointError, open_checkpoint
from weights_convert.checkpoint import build_meta
from weights_convert.hub import download, looks_like_repo_id


@dataclass
class Components:
    """What the facade runs. Any of them is None when no requested task needs it."""

    image_unet: UNet | None
    text_unet: UNet | None            # its context layers only
    vae: AutoencoderKL | None         # its decoder (and the encoder for image variation's fidelity)
    text_encoder: nn.Module | None    # transformers CLIPTextModelWithProjection
    image_encoder: nn.Module | None   # transformers CLIPVisionModelWithProjection
    tokenizer: object | None          # transformers CLIPTokenizer
    image_processor: object | None    # transformers CLIP image processor
    scheduler_config: dict
    optimus: OptimusVAE | None = None                     # the text VAE's decoder (text flows)
    optimus_tokenizer: OptimusTokenizers | None = None


def resolve(src: str | Path, tasks: Iterable[str], *, revision: str | None = None, kl_f8=None, clip=None,
            optimus=None, optimus_tokenizer=None) -> Checkpoint:
    """Open `src` (hub repo id, diffusers folder, original .pth, or converted folder), downloading only what
    the tasks need from the hub."""
    parts = parts_for(tasks)
    if looks_like_repo_id(src):
        src = download(str(src), parts, revision=revision)
    return open_checkpoint(src, kl_f8=kl_f8, clip=clip, optimus=optimus, optimus_tokenizer=optimus_tokenizer,
                           validate=False, need=parts)  # load_components validates, reusing the modules it builds


def load_components(ckpt: Checkpoint, tasks: Iterable[str], device: torch.device, dtype: torch.dtype) -> Components:
    tasks = list(tasks)
    parts = parts_for(tasks)
    ckpt.require(parts, f"tasks {tasks}")
    if "text_encoder" in parts and ckpt.tokenizer is None:  # fail before building anything
        raise CheckpointError(f"{ckpt.origin}: has no tokenizer folder, needed for {tasks} (an original .pth "
                              "carries none: pass clip= a diffusers-layout folder)")
    optimus_tokenizer = None
    if any(p.startswith("optimus.") for p in parts):  # before any weight is read: it may need the hub
        optimus_tokenizer = _optimus_tokenizer(ckpt)
        cfg, sizes = ckpt.configs["optimus"], (len(optimus_tokenizer.bert), len(optimus_tokenizer.gpt2))
        if sizes != (cfg.enc_vocab, cfg.dec_vocab):
            raise CheckpointError(f"{ckpt.origin}: the Optimus tokenizers have {sizes[0]} (BERT) and {sizes[1]} (GPT-2 "
                                  f"with <PAD> <BOS> <EOS>) tokens, the weights {cfg.enc_vocab} and {cfg.dec_vocab}")
    by_component: dict[str, set[str]] = {}
    for p in parts:
        component, _, sub = p.partition(".")
        by_component.setdefault(component, set()).add(sub)

    # every module on the meta device first, and the parts they hold checked against them before any weight is
    # read; parts no task needs are neither built nor checked (building them cost a fifth of a load)
    built = {c: build_meta(c, ckpt.configs[c], subs) for c, subs in by_component.items()}
    ckpt.validate({f"{c}.{s}" if s else c: built[c] for c, subs in by_component.items() for s in subs})
    with ThreadPoolExecutor(1, thread_name_prefix="vd-tokenizer") as pool:
        # the CLIP tokenizer (tens of milliseconds of Python) loads while the weights are read
        pending = pool.submit(_clip_tokenizer, ckpt.tokenizer) if "text_encoder" in built else None
        loaded = ckpt.load_parts(parts, dtype, device)
        tokenizer = pending.result() if pending is not None else None
    for component, model in built.items():
        state = {}
        for sub in by_component[component]:
            state.update(loaded.pop(f"{component}.{sub}" if sub else component))
        model.load_state_dict(state, strict=True, assign=True)
        _rebuild_position_ids(model)
        built[component] = model.to(device).eval().requires_grad_(False)

    image_processor = None
    if "image_encoder" in built:
        image_processor = make_image_processor(ckpt.image_processor or {})
    return Components(built.get("image_unet"), built.get("text_unet"), built.get("vae"), built.get("text_encoder"),
                      built.get("image_encoder"), tokenizer, image_processor, dict(ckpt.scheduler or {}),
                      built.get("optimus"), optimus_tokenizer)


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


def _optimus_tokenizer(ckpt: Checkpoint) -> OptimusTokenizers:
    """The checkpoint's Optimus tokenizer folder, else the hub's bert-base-cased and gpt2 vocabularies (the files
    the original repo ships are those)."""
    if ckpt.optimus_tokenizer is not None:
        return OptimusTokenizers.from_pretrained(ckpt.optimus_tokenizer, ckpt.optimus_tokenizer)
    try:
        return OptimusTokenizers.from_pretrained()
    except Exception as e:  # offline, or the hub refused: say what is missing and how to give it
        raise CheckpointError(f"{ckpt.origin}: has no optimus_tokenizer/ folder and the hub's bert-base-cased / gpt2 "
                              f"vocabularies could not be fetched ({type(e).__name__}); pass optimus_tokenizer= a "
                              "folder with vocab.txt, vocab.json and merges.txt") from None


def _rebuild_position_ids(model: nn.Module) -> None:
    """transformers' CLIP keeps a non-persistent `position_ids` buffer, which a meta build leaves empty."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        if attr != "position_ids":
            raise CheckpointError(f"buffer {name!r} was not filled by the checkpoint")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


def make_image_processor(config: dict):
    """The CLIP image processor the reference pipelines use: transformers' PIL backend when torchvision is absent,
    chosen without touching `transformers.CLIPImageProcessor` (merely reading that name makes transformers warn
    about its fallback to the PIL backend)."""
    import importlib.util

    import transformers
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil is not None and importlib.util.find_spec("torchvision") is None:
        return pil.from_dict(settings)
    return transformers.CLIPImageProcessor.from_dict(settings)
