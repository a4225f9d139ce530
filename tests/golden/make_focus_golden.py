"""Make tests/data/golden/focus.safetensors and focus.json: what the original VD app computes for focus
(`adjust_rank`), masked CLIP image encoding (`CLIPImageContextEncoder._encode_wmask`) and the "Simple" colour
adjustment, so that tests/pipeline/test_focus.py can check vd against it without the original code.

Regenerate (from the repository root, with the test environment active):

    python tests/golden/make_focus_golden.py --original PATH

PATH is a checkout of SHI-Labs/Versatile-Diffusion at cf0f4a2. Nothing of it is copied into this repository: the
script reads it at generation time and runs just the needed pieces, never the app.
  - app.py is parsed with `ast`; only `decompose`, `adjust_rank` and the body of `inference_i2i`'s
    `if clr_adj == 'Simple':` block are executed, with numpy and torch in their namespace (app.py itself imports
    gradio and builds the full model at import).
  - lib/model_zoo/clip.py is loaded as a module with its registry import stubbed. CLIPImageContextEncoder is built
    with `__new__` (its __init__ downloads CLIP) around a tiny random CLIPModel: 224 px images (the original's
    mask code hard-codes 224) in 14 px patches, hidden 16, 2 layers, projection 8. Its processor is replaced by
    one that returns fixed pixel values, so both sides see the same pixels (the original's ToPILImage truncates,
    ours rounds: a documented divergence that is not under test here).
  - transformers 5 calls the vision embeddings with an `interpolate_pos_encoding` keyword that the original's
    patched forward (written for transformers 4.24) does not take; a subclass drops that keyword (always False).
Inputs come from fixed seeds; each focus output is made with torch.manual_seed(seed) right before the call, the
seed stored in the JSON. The file holds float32 tensors (masks as uint8 levels /255), well under 1 MB.
"""

import argparse
import ast
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "data" / "golden"
LEVELS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
VISION = dict(image_size=224, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, projection_dim=8)


def load_app_functions(app_py: Path) -> dict:
    """`decompose`, `adjust_rank` and the colour block from app.py, without running the rest of the app."""
    tree = ast.parse(app_py.read_text())
    wanted = [n for n in tree.body if getattr(n, "name", None) in ("decompose", "adjust_rank")]
    colour = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "clr_adj == 'Simple'"]
    assert len(wanted) == 2 and len(colour) == 1, "app.py does not look like cf0f4a2"
    ns = {"np": np, "torch": torch}
    exec(compile(ast.Module(wanted, type_ignores=[]), str(app_py), "exec"), ns)
    ns["colour_block"] = compile(ast.Module(colour[0].body, type_ignores=[]), str(app_py), "exec")
    return ns


def load_clip_module(clip_py: Path) -> types.ModuleType:
    """lib/model_zoo/clip.py with its registry stubbed (the real one imports the whole model zoo)."""
    for name in ("lib", "lib.model_zoo", "lib.model_zoo.common", "lib.model_zoo.common.get_model"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["lib.model_zoo.common.get_model"].register = lambda name: (lambda cls: cls)
    # _encode converts tensors with torchvision's ToPILImage; our stub processor ignores the images anyway
    tv, tvt = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tvt.ToPILImage = lambda: (lambda image: image)
    tv.transforms = tvt
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt})
    spec = importlib.util.spec_from_file_location("orig_clip", clip_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_clip() -> transformers.CLIPModel:
    torch.manual_seed(0)
    text = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8))
    with torch.no_grad():  # re-randomise everything, so no identity LayerNorm can hide a wiring mistake
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
        model.vision_model.embeddings.class_embedding.mul_(5)

    class Embeddings4(type(model.vision_model.embeddings)):
        def __call__(self, pixel_values, interpolate_pos_encoding=False):
            assert not interpolate_pos_encoding
            return super().__call__(pixel_values)

    model.vision_model.embeddings.__class__ = Embeddings4
    return model.eval()


def low_rank_tokens(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """[1, m, n] with a decaying spectrum (10 * 0.7^i), a small noise floor and per-token offsets."""
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = 10 * 0.7 ** torch.arange(k, dtype=torch.float32)
    x = (u * s) @ v.T + 0.01 * torch.randn(m, n, generator=g) + 0.3 * torch.randn(m, 1, generator=g)
    return x[None]


def soft_disc(h: int, w: int, cy: float, cx: float, r: float, edge: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    return ((r - d) / edge + 0.5).clamp(0, 1)


def as_levels(keep: torch.Tensor) -> torch.Tensor:
    return (keep * 255).round().to(torch.uint8)  # like a PIL mask, read back as levels / 255


def focus_goldens(app: dict, tensors: dict, meta: dict) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = {"lowrank": low_rank_tokens(256, 24, g),  # tall: [1, 256, D] as in the app, D kept small
              "noise": torch.randn(1, 256, 24, generator=g),
              "wide": low_rank_tokens(24, 64, g)}  # wide (m < n), the orientation of the app's [1, 256, 768]
    adjust = app["adjust_rank"](max_drop_rank=[1, 5], q=20)
    meta["focus"] = {"levels": LEVELS, "cases": {}}
    for c, (name, x) in enumerate(inputs.items()):
        tensors[f"focus.{name}.x"] = x
        seeds = [1000 + 10 * c + j for j in range(len(LEVELS))]
        for seed, lvl in zip(seeds, LEVELS):
            torch.manual_seed(seed)
            y = adjust(x.clone(), lvl)
            if lvl != 0.5:  # 0.5 returns the input itself
                tensors[f"focus.{name}.{lvl}"] = y.contiguous()
        meta["focus"]["cases"][name] = {"shape": list(x.shape), "seeds": seeds}
    try:
        adjust(torch.cat([inputs["lowrank"], inputs["noise"]]), 0.3)
        meta["focus"]["original_at_batch_2"] = "no error"
    except RuntimeError as e:
        meta["focus"]["original_at_batch_2"] = f"RuntimeError: {str(e).splitlines()[0]}"


def mask_goldens(clip_module: types.ModuleType, tensors: dict, meta: dict) -> None:
    model = tiny_clip()
    enc = clip_module.CLIPImageContextEncoder.__new__(clip_module.CLIPImageContextEncoder)
    torch.nn.Module.__init__(enc)
    enc.model, enc.fp16 = model, False
    ours_layout = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    tensors.update({f"clip.{k}": v.contiguous() for k, v in ours_layout.items()})

    g = torch.Generator().manual_seed(2)
    small = torch.randn(2, 3, 28, 28, generator=g)
    tensors["clip.pixels_28"] = small
    pixels = small.repeat_interleave(8, -1).repeat_interleave(8, -2)  # (2, 3, 224, 224), see test_focus.py

    ring = soft_disc(96, 96, 40, 52, 30, 6)
    box = torch.ones(96, 96)
    box[20:70, 10:50] = 0.0
    box[20:70, 50:54] = 0.5
    half = torch.ones(40, 72)
    half[:, :30] = 0.0
    large = 1 - soft_disc(256, 240, 100, 150, 70, 20) * soft_disc(256, 240, 130, 120, 90, 3)
    masks = {"partial": torch.stack([ring, box])[:, None],
             "ones": torch.ones(1, 1, 96, 96),
             "zeros": torch.zeros(1, 1, 96, 96),
             "mixed": torch.stack([torch.ones(40, 72), half])[:, None],  # one image unmasked: no shortcut
             "large": large[None, None]}
    meta["clip"] = {"vision_config": VISION, "cases": {}}
    for name, keep in masks.items():
        levels = as_levels(keep)
        b = len(levels)
        enc.processor = lambda images, return_tensors, b=b: {"pixel_values": pixels[:b]}
        images = torch.rand(b, 3, 8, 8, generator=g)  # only its dtype and device matter to the original
        tensors[f"clip.{name}.keep"] = levels
        tensors[f"clip.{name}.out"] = enc.encode(images, masks=levels.float() / 255).contiguous()
        meta["clip"]["cases"][name] = {"batch": b, "mask_hw": list(levels.shape[-2:])}


def colour_goldens(app: dict, tensors: dict, meta: dict) -> None:
    g = torch.Generator().manual_seed(3)
    yy = torch.linspace(0, 1, 16)[:, None].expand(16, 12)
    images = (0.3 * torch.rand(2, 3, 16, 12, generator=g) + 0.5 * yy + 0.1).clamp(0, 1)
    one_ref = torch.rand(3, 20, 20, generator=g)
    refs = torch.rand(2, 3, 10, 10, generator=g) * torch.tensor([0.4, 0.8, 0.2])[:, None, None] + 0.1
    tensors.update({"colors.images": images, "colors.reference": one_ref, "colors.references": refs})

    def original(cx, imout):
        ns = {"torch": torch, "cx": cx, "imout": imout}
        exec(app["colour_block"], ns)
        return torch.stack(ns["imout"])

    tensors["colors.out_one_reference"] = original(one_ref[None], images)
    tensors["colors.out_per_image"] = torch.cat([original(refs[i:i + 1], images[i:i + 1]) for i in range(2)])
    meta["colors"] = {"note": "one reference: the app's use; per image: the original run once per pair"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of SHI-Labs/Versatile-Diffusion")
    args = parser.parse_args()
    torch.set_num_threads(1)
    app = load_app_functions(args.original / "app.py")
    clip_module = load_clip_module(args.original / "lib" / "model_zoo" / "clip.py")
    tensors, meta = {}, {"original": "SHI-Labs/Versatile-Diffusion@cf0f4a2", "torch": torch.__version__,
                         "transformers": transformers.__version__, "made_by": "tests/golden/make_focus_golden.py"}
    with torch.no_grad():
        focus_goldens(app, tensors, meta)
        mask_goldens(clip_module, tensors, meta)
        colour_goldens(app, tensors, meta)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / "focus.safetensors")
    (OUT / "focus.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.glob("focus.*"))
    print(f"wrote {len(tensors)} tensors, {size / 1e3:.0f} kB, to {OUT.name}/focus.*")


if __name__ == "__main__":
    main()
