"""A tiny random Versatile Diffusion pipeline built from diffusers' and transformers' own classes, and saved with
diffusers' `save_pretrained`: the reference side of the facade parity tests."""

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import TINY_UNET_A, flat_config, randomize_
from vd.nn import UNetConfig, VAEConfig
from vd.nn.optimus import OptimusConfig, OptimusVAE
from weights_convert import keymaps as km
from weights_convert.layouts import SCHEDULE_BUFFERS

# Every image UNet level gets the same context width as the CLIP projections (16).
IMAGE_UNET = dict(TINY_UNET_A, cross_attention_dim=16, sample_size=8)
TEXT_UNET = flat_config(IMAGE_UNET, [24, 1, 1])
# four levels, so images are 8x the latents as in VD (and an odd latent size is reachable: 72 px -> 9)
VAE = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
           sample_size=64, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SCHEDULER = json.loads((Path(__file__).parent / "data" / "manifests" / "configs" / "scheduler" /
                        "scheduler_config.json").read_text())
IMAGE_PROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                       crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the start of every CLIP vocabulary)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_tokenizer():
    """A real CLIPTokenizer with a small BPE vocabulary (bytes, a few merges, the two specials)."""
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"),
              ("o", "n"), ("r", "e"), ("i", "n"), ("in", "g</w>")]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def build_components(seed: int = 0) -> dict:
    """All eight components of diffusers' VersatileDiffusionPipeline, tiny and with every weight random."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=14, projection_dim=16))
    image_unet = randomize_(UNet2DConditionModel.from_config(IMAGE_UNET), seed + 1)
    text_unet = randomize_(UNetFlatConditionModel.from_config(TEXT_UNET), seed + 2)
    vae = randomize_(AutoencoderKL.from_config(VAE), seed + 3)
    # the reference pipelines pick a scheduler class from the config; the VD file is a DDIM one
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    processor = CLIPImageProcessor(**IMAGE_PROCESSOR)
    return dict(tokenizer=tokenizer, image_feature_extractor=processor, text_encoder=text_encoder.eval(),
                image_encoder=image_encoder.eval(), image_unet=image_unet.eval(), text_unet=text_unet.eval(),
                vae=vae.eval(), scheduler=scheduler)


def save(components: dict, folder: Path, optimus_seed: int = 4) -> Path:
    """The diffusers folder, plus what the hub repo adds for the text flows: pretrained_pth/optimus-vae.pth (with
    a config beside it, as the tiny Optimus is not VD's) and the Optimus tokenizer files."""
    from diffusers import VersatileDiffusionPipeline
    VersatileDiffusionPipeline(**copy.deepcopy(components)).save_pretrained(folder)
    write_optimus(folder / "pretrained_pth", optimus_seed)
    write_optimus_tokenizer(folder / "optimus_tokenizer")
    return folder


# ---- a tiny Optimus text VAE, in the layout of optimus-vae.pth, with the tiny vocabularies of the goldens

_OPTIMUS_GOLDEN = json.loads((Path(__file__).parent / "data" / "golden" / "optimus.json").read_text())
# the text latents of the tiny text UNet are 24 wide (TEXT_UNET's in_channels)
OPTIMUS = OptimusConfig(**{**_OPTIMUS_GOLDEN["config"], "latent_dim": TEXT_UNET["in_channels"][0]})


# keys of optimus-vae.pth we read past: the tied head and the causal masks
OPTIMUS_CONSTANTS = ("decoder.lm_head.weight", *(f"decoder.transformer.h.{i}.attn.bias" for i in range(OPTIMUS.dec_layers)))


def optimus_original_state(seed: int) -> dict[str, torch.Tensor]:
    """A random tiny Optimus as optimus-vae.pth stores it: with the tied lm_head and GPT-2's causal-mask buffers."""
    state = randomize_(OptimusVAE(OPTIMUS), seed).state_dict()
    state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"]
    n = OPTIMUS.dec_positions
    for i in range(OPTIMUS.dec_layers):
        state[f"decoder.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return state


def write_optimus(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(optimus_original_state(seed), folder / "optimus-vae.pth")
    (folder / "optimus-vae.json").write_text(json.dumps(vars(OPTIMUS)))
    return folder / "optimus-vae.pth"


def write_optimus_tokenizer(folder: Path) -> Path:
    """vocab.txt (BERT), vocab.json + merges.txt (GPT-2) of the tiny golden vocabularies."""
    m = _OPTIMUS_GOLDEN
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(p + "\n" for p in m["bert_vocab"]), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(m["gpt2_vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in m["gpt2_merges"]),
                                       encoding="utf-8")
    return folder


def load_reference_components(folder: Path) -> dict:
    """Each component loaded from the saved folder by its own class (diffusers' pipeline loader cannot resolve
    the class name it writes for text_unet, "UNetFlatConditionModel")."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)
    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        image_feature_extractor=CLIPImageProcessor.from_pretrained(folder / "image_feature_extractor"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval(),
        image_unet=UNet2DConditionModel.from_pretrained(folder / "image_unet").eval(),
        text_unet=UNetFlatConditionModel.from_pretrained(folder / "text_unet").eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
    )


def reference(task: str, folder: Path, scheduler: str | None = "ddim"):
    """A fresh reference pipeline for one task over components loaded from the saved folder (the reference
    mutates its UNets, so every test gets its own), with the scheduler chosen as diffusers users do; None: the
    class the folder's model_index.json names, from its scheduler folder, as diffusers' pipeline loader does."""
    import diffusers
    from diffusers import (DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler, VersatileDiffusionDualGuidedPipeline,
                           VersatileDiffusionImageVariationPipeline, VersatileDiffusionTextToImagePipeline)
    c = load_reference_components(folder)
    if scheduler is None:
        _, name = json.loads((folder / "model_index.json").read_text())["scheduler"]
        c["scheduler"] = getattr(diffusers, name).from_pretrained(folder / "scheduler")
    else:
        c["scheduler"] = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "lms": LMSDiscreteScheduler}[scheduler].from_config(
            c["scheduler"].config)
    if task == "text_to_image":
        keys = ("tokenizer", "text_encoder", "image_unet", "text_unet", "vae", "scheduler")
        pipe = VersatileDiffusionTextToImagePipeline(**{k: c[k] for k in keys})
    elif task == "image_variation":
        keys = ("image_feature_extractor", "image_encoder", "image_unet", "vae", "scheduler")
        pipe = VersatileDiffusionImageVariationPipeline(**{k: c[k] for k in keys})
    else:
        pipe = VersatileDiffusionDualGuidedPipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the tiny model in the original SHI-Labs layouts (our key tables run backwards)

def tiny_configs(folder) -> dict:
    """The configs an original .pth does not carry, for the tiny model (the defaults are the full-size VD ones)."""
    clip = {c: {k: v for k, v in json.loads((folder / c / "config.json").read_text()).items() if not k.startswith("_")}
            for c in ("text_encoder", "image_encoder")}
    return {"image_unet": UNetConfig.from_diffusers(IMAGE_UNET),
            "text_unet": UNetConfig.from_diffusers(TEXT_UNET), "vae": VAEConfig.from_diffusers(VAE),
            "optimus": OPTIMUS, **clip}


def to_original(state: dict[str, torch.Tensor], layers: list[km.Layer]) -> dict[str, torch.Tensor]:
    """Our (= diffusers') state dict -> the original layout: each key goes back through the layer whose target
    holds it (longest target; the output head's layer has an empty target and names its layers in its table),
    renames undone, and a transform undone (1x1 conv weights for the kl-f8 attention)."""
    out = {}
    for key, t in state.items():
        held = [L for L in layers if L.target and key.startswith(L.target + ".")]
        if held:
            layer = max(held, key=lambda L: len(L.target))
            suffix = key[len(layer.target) + 1:]
        else:
            heads = [L for L in layers if not L.target and km.rename(key, _inverse(L.renames)) != key]
            assert len(heads) == 1, f"no layer (or several) holds {key!r}"
            layer, suffix = heads[0], key
        if layer.transform == km.CONV1X1_TO_LINEAR and t.dim() == 2:
            t = t[:, :, None, None]
        out[f"{layer.source}.{km.rename(suffix, _inverse(layer.renames))}"] = t.clone()
    assert len(out) == len(state)
    return out


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


def state_of(folder, component) -> dict[str, torch.Tensor]:
    (f,) = (folder / component).glob("*.safetensors")
    return load_file(f)


def schedule_buffers() -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return {name: betas.clone() for name in SCHEDULE_BUFFERS}


def _current_layout(image, text, cfg) -> dict[str, torch.Tensor]:
    return {**to_original(image, km.unet_layers_v2(cfg["image_unet"], "diffuser.image", with_time=True)),
            **to_original(text, km.unet_layers_v2(cfg["text_unet"], "diffuser.text", with_time=False))}


def write_originals(st: Path, current_repo: Path, deprecated_dir: Path) -> dict:
    """The tiny diffusers folder `st` in both original layouts. The current one sits in pretrained_pth/ of a copy
    of the diffusers folder at `current_repo` (as on the hub), so its kl-f8.pth and CLIP/tokenizer are found by
    default; the deprecated one is written into `deprecated_dir`."""
    cfg = tiny_configs(st)
    image, vae = state_of(st, "image_unet"), state_of(st, "vae")
    text = {k: v for k, v in state_of(st, "text_unet").items() if not k.startswith("time_embedding.")}  # not stored

    repo = current_repo
    shutil.copytree(st, repo)
    current = repo / "pretrained_pth" / "vd-four-flow-v1-0.pth"  # optimus-vae.pth is there already
    current.parent.mkdir(exist_ok=True)
    torch.save({**_current_layout(image, text, cfg), **schedule_buffers()}, current)
    torch.save(to_original(vae, km.vae_layers_ldm(cfg["vae"])), current.parent / "kl-f8.pth")

    text_layers, vision_layers = km.clip_layers("clip.model")
    deprecated = deprecated_dir / "vd-four-flow-v1-0-deprecated.pth"
    sd = {**to_original(image, km.unet_layers_v1(cfg["image_unet"], "model.diffusion_model.unet_image",
                                                  "model.diffusion_model.time_embed")),
          **to_original(text, km.unet_layers_v1(cfg["text_unet"], "model.diffusion_model.unet_text", None)),
          **to_original(vae, km.vae_layers_ldm(cfg["vae"], "autokl")),
          **to_original(state_of(st, "text_encoder"), text_layers),
          **to_original(state_of(st, "image_encoder"), vision_layers),
          # a full CLIPModel also has these; the release also carries Optimus and the training schedule
          "clip.model.logit_scale": torch.tensor(4.6052),
          "clip.model.text_model.embeddings.position_ids": torch.arange(77)[None],
          **{f"optimus.{k}": t for k, t in torch.load(st / "pretrained_pth" / "optimus-vae.pth").items()},
          **schedule_buffers()}
    torch.save(sd, deprecated)
    return {"current": current, "deprecated": deprecated, "configs": cfg}
