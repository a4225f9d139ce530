"""Write a random-weight Versatile Diffusion checkpoint in the diffusers folder layout, for benchmarks.

    python benchmarks/make_checkpoint.py OUT [--size full|small] [--dtype fp16|fp32] [--device cpu|cuda]

`full` uses the real config.json files of shi-labs/versatile-diffusion (tests/data/manifests/configs), so both
our loader and diffusers' load identical, full-size weights without the hub. `small` is a tiny config for CPU
smoke runs. Each component is built with diffusers'/transformers' own classes on the meta device, filled in
place with seeded random numbers (std 1/sqrt(fan_in): activations stay O(1), so fp16 does not overflow; norm
weights 1, biases 0) and written with save_pretrained as safetensors. The tokenizer is generated: the real
CLIP vocabulary cannot be downloaded here, so we write a byte-level BPE vocabulary of CLIP's size (49408 ids)
with synthetic merges, as vocab.json + merges.txt, the files the hub repo has.

For the text flows it also writes what the hub repo keeps beside the diffusers folders: a random Optimus text
VAE as pretrained_pth/optimus-vae.pth (the original key layout, with its tied head and causal-mask buffers) and
optimus_tokenizer/ with synthetic vocabularies of the real sizes (BERT 28,996 pieces with [PAD] [UNK] [CLS]
[SEP] [MASK] at their real ids; GPT-2 50,257 byte-level tokens).
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "manifests" / "configs"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MODELS = ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder")
CLIP_VOCAB = 49408

# `small`: every level of VD's UNets kept (3 cross-attention levels + 1 plain, 16 context sites), tiny widths.
SMALL_UNET = dict(block_out_channels=[32, 32, 64, 64], attention_head_dim=2, cross_attention_dim=32,
                  norm_num_groups=8, layers_per_block=1, sample_size=8)
SMALL_VAE = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64)
SMALL_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=32)
SMALL_OPTIMUS = dict(latent_dim=32, enc_vocab=200, enc_dim=32, enc_layers=2, enc_heads=4, enc_mlp_dim=64,
                     enc_positions=96, dec_vocab=603, dec_dim=32, dec_layers=2, dec_heads=4, dec_positions=64)
BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}  # bert-base-cased's ids


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def configs(size: str, vocab_size: int) -> dict[str, dict]:
    """The component configs: the real ones, or the real ones shrunk for `small`."""
    c = {name: load_json(CONFIGS / name / "config.json") for name in MODELS}
    if size == "small":
        c["image_unet"].update(SMALL_UNET)
        c["text_unet"].update(SMALL_UNET, in_channels=[32, 1, 1], out_channels=[32, 1, 1], sample_size=None)
        c["vae"].update(SMALL_VAE)
        c["text_encoder"].update(SMALL_CLIP, vocab_size=vocab_size)
        c["image_encoder"].update(SMALL_CLIP)
    return c


def build(name: str, config: dict) -> nn.Module:
    """One component on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if name == "image_unet":
            return UNet2DConditionModel.from_config(config)
        if name == "text_unet":
            return UNetFlatConditionModel.from_config(config)
        if name == "vae":
            return AutoencoderKL.from_config(config)
        if name == "text_encoder":
            return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))


@torch.no_grad()
def randomize(model: nn.Module, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """Materialise a meta model on `device` in `dtype` and fill it with seeded random weights."""
    model = nn.Module.to(model, dtype).to_empty(device=device)  # (nn.Module.to: diffusers warns on its own .to)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:                       # linear, conv, embedding tables: unit gain
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith("weight"):          # GroupNorm / LayerNorm scales
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:                                  # CLIP's class_embedding
            p.normal_(0.0, 1.0 / math.sqrt(p.numel()), generator=g)
    for name, b in model.named_buffers():
        if not name.endswith("position_ids"):  # the only buffer of these models (transformers' CLIP)
            raise ValueError(f"unexpected buffer {name!r}: cannot randomise it")
        b.copy_(torch.arange(b.shape[-1], device=device).expand(b.shape))
    return model.eval()


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the start of every CLIP vocabulary)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path, size: int) -> int:
    """A CLIP-style BPE tokenizer: the 512 byte symbols, `size - 514` synthetic two-symbol merges (printable
    ASCII pairs first), the two specials last (ids size-2, size-1, as in CLIP). Returns the vocabulary size."""
    chars = bytes_to_unicode()
    merges = []
    for a in chars:
        for b in chars:
            merges += [(a, b), (a, b + "</w>")]
    merges = merges[: size - 2 * len(chars) - 2]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(CONFIGS / "tokenizer" / name, folder / name)
    return size


def write_optimus_tokenizer(folder: Path, bert_size: int, gpt2_size: int) -> None:
    """Synthetic vocab.txt (WordPiece) and vocab.json + merges.txt (byte-level BPE, <|endoftext|> last)."""
    chars = bytes_to_unicode()
    bert = [BERT_SPECIALS.get(i, f"[unused{i}]") for i in range(104)]
    bert += [c for c in chars if c.isprintable()] + [f"##{c}" for c in chars if c.isprintable()]
    bert = (bert + [f"w{i}" for i in range(bert_size - len(bert))])[:bert_size]
    merges = [(a, b) for a in chars for b in chars][: gpt2_size - len(chars) - 1]  # printable ASCII first
    gpt2 = chars + [a + b for a, b in merges] + ["<|endoftext|>"]
    assert len(bert) == len(set(bert)) == bert_size and len(gpt2) == len(set(gpt2)) == gpt2_size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(p + "\n" for p in bert), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(gpt2)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def write_optimus(out: Path, size: str, dtype: torch.dtype, device: str, seed: int) -> None:
    """A random Optimus as the original optimus-vae.pth stores it, and its tokenizer files."""
    from vd.nn.optimus import VD_OPTIMUS, OptimusConfig, OptimusVAE
    cfg = VD_OPTIMUS if size == "full" else OptimusConfig(**SMALL_OPTIMUS)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = OptimusVAE(cfg)
    state = {k: v.cpu() for k, v in randomize(model, dtype, device, seed).state_dict().items()}
    n = sum(v.numel() for v in state.values())
    state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"]
    mask = torch.tril(torch.ones(cfg.dec_positions, cfg.dec_positions)).view(1, 1, cfg.dec_positions, -1)
    state.update({f"decoder.transformer.h.{i}.attn.bias": mask for i in range(cfg.dec_layers)})
    (out / "pretrained_pth").mkdir(exist_ok=True)
    torch.save(state, out / "pretrained_pth" / "optimus-vae.pth")
    if size != "full":  # a non-standard Optimus says so in a config beside the file
        (out / "pretrained_pth" / "optimus-vae.json").write_text(json.dumps(SMALL_OPTIMUS))
    write_optimus_tokenizer(out / "optimus_tokenizer", cfg.enc_vocab, cfg.dec_vocab - 3)
    print(f"{'optimus':14s} {n / 1e6:8.1f} M params  {time.perf_counter() - t0:6.1f} s", flush=True)


def write(out: Path, size: str, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """Write the whole checkpoint folder; one component at a time, so memory holds at most one."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out / "tokenizer", CLIP_VOCAB if size == "full" else 600)
    for name, config in configs(size, vocab).items():
        t0 = time.perf_counter()
        model = randomize(build(name, config), dtype, device, seed + MODELS.index(name))
        n = sum(p.numel() for p in model.parameters())
        model.to("cpu").save_pretrained(out / name)
        del model
        print(f"{name:14s} {n / 1e6:8.1f} M params  {time.perf_counter() - t0:6.1f} s", flush=True)
    write_optimus(out, size, dtype, device, seed + len(MODELS))
    for name, file in (("scheduler", "scheduler_config.json"), ("image_feature_extractor", "preprocessor_config.json")):
        (out / name).mkdir(exist_ok=True)
        shutil.copyfile(CONFIGS / name / file, out / name / file)
    shutil.copyfile(CONFIGS / "model_index.json", out / "model_index.json")
    (out / "benchmark_checkpoint.json").write_text(json.dumps(
        dict(size=size, dtype=str(dtype).removeprefix("torch."), seed=seed, weights="random, std 1/sqrt(fan_in)"),
        indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is much faster)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    write(args.out, args.size, DTYPES[args.dtype], args.device, args.seed)
    print(f"wrote {args.out} ({args.size}, {args.dtype}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
