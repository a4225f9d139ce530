"""Every key of the four real layouts is consumed (or ignored for a stated reason) and fills every parameter of
our full-size modules with the right shape. The checkpoints are written with meta tensors (names, shapes and
dtypes, no data), from the manifests in tests/data/manifests."""

import shutil

import torch

from manifests import MANIFESTS, read_manifest, read_mapping
from weights_convert import ALL_PARTS, open_checkpoint
from weights_convert.checkpoint import expected_shapes

INT64_KEYS = ("position_ids",)
IMAGE_SIDE = tuple(p for p in ALL_PARTS if not p.startswith("optimus."))  # what the diffusers folders hold
OPTIMUS_IGNORED = 12 + 1  # the causal-mask buffers and the tied lm_head


def _save(path, shapes: dict[str, tuple[int, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith(INT64_KEYS) else torch.float32)
          for k, s in shapes.items()}
    torch.save(sd, path)


def _diffusers_folder(root):
    """The hub repo's diffusers layout, as the 2022 files have it (legacy VAE names, position_ids buffers)."""
    for c in ("image_unet", "text_unet", "vae"):
        shapes = read_manifest(c)
        if c == "vae":  # the real file predates diffusers' attention renames
            legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            shapes = {_legacy(k, legacy): s for k, s in shapes.items()}
        _save(root / c / "diffusion_pytorch_model.bin", shapes)
    for c, n in (("text_encoder", 77), ("image_encoder", 257)):
        shapes = read_manifest(c)
        tower = "text_model" if c == "text_encoder" else "vision_model"
        shapes[f"{tower}.embeddings.position_ids"] = (1, n)
        _save(root / c / "pytorch_model.bin", shapes)
    for sub in ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler",
                "image_feature_extractor"):
        for f in (MANIFESTS / "configs" / sub).iterdir():
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / sub / f.name)
    shutil.copy(MANIFESTS / "configs" / "model_index.json", root / "model_index.json")
    return root


def _legacy(key: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        mark = f".mid_block.attentions.0.{new}."
        if mark in key:
            return key.replace(mark, f".mid_block.attentions.0.{old}.")
    return key


def _assert_full_coverage(ckpt, n_ignored: int, parts=ALL_PARTS):
    assert ckpt.parts == tuple(parts)
    consumed = sum(len(v) for v in ckpt.sources.values())
    assert len(ckpt.ignored) == n_ignored
    for part in parts:  # validate() already checked this; say it once more, explicitly
        assert {k: s.shape() for k, s in ckpt.sources[part].items()} == expected_shapes(part, ckpt.configs[part.split(".")[0]])
    return consumed


def test_diffusers_layout(tmp_path):
    root = _diffusers_folder(tmp_path / "vd")
    ckpt = open_checkpoint(root)
    consumed = _assert_full_coverage(ckpt, n_ignored=4 + 2, parts=IMAGE_SIDE)  # text UNet time MLP, position_ids
    n_source = sum(len(read_manifest(c)) for c in ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder"))
    assert consumed == n_source - 4
    assert ckpt.tokenizer == root / "tokenizer" and ckpt.scheduler["steps_offset"] == 1
    # the hub repo keeps Optimus in pretrained_pth/: found there, every key consumed or ignored for a reason
    _save(root / "pretrained_pth" / "optimus-vae.pth", read_manifest("optimus-vae"))
    ckpt = open_checkpoint(root)
    consumed_all = _assert_full_coverage(ckpt, n_ignored=4 + 2 + OPTIMUS_IGNORED)
    assert consumed_all - consumed == len(read_manifest("optimus-vae")) - OPTIMUS_IGNORED


def test_current_original_layout(tmp_path):
    root = _diffusers_folder(tmp_path / "vd")
    pth = root / "pretrained_pth" / "vd-four-flow-v1-0.pth"
    _save(pth, read_manifest("vd-four-flow-v1-0"))
    _save(root / "pretrained_pth" / "kl-f8.pth", read_manifest("kl-f8"))
    _save(root / "pretrained_pth" / "optimus-vae.pth", read_manifest("optimus-vae"))
    ckpt = open_checkpoint(pth)  # CLIP, tokenizer and preprocessing from the repo's diffusers folders
    _assert_full_coverage(ckpt, n_ignored=12 + OPTIMUS_IGNORED)  # the noise-schedule buffers, Optimus' constants
    consumed = sum(len(ckpt.sources[p]) for p in ckpt.parts if p.split(".")[0] in ("image_unet", "text_unet", "vae"))
    assert consumed == len(read_manifest("vd-four-flow-v1-0")) - 12 + len(read_manifest("kl-f8"))
    # the published row-by-row mapping (current layout -> diffusers) is what we did
    for component in ("image_unet", "text_unet"):
        for current, _, ours, part, _ in read_mapping(component):
            assert ckpt.sources[f"{component}.{part}" if part != "global" else "image_unet.global"][ours].key == current


def test_deprecated_original_layout(tmp_path):
    pth = tmp_path / "vd-four-flow-v1-0-deprecated.pth"
    manifest = read_manifest("vd-four-flow-v1-0-deprecated")
    _save(pth, manifest)
    ckpt = open_checkpoint(pth)
    _assert_full_coverage(ckpt, n_ignored=12 + OPTIMUS_IGNORED + 1 + 2)  # schedule, Optimus' constants, logit_scale, ids
    consumed = sum(len(v) for v in ckpt.sources.values())
    assert consumed + len(ckpt.ignored) == len(manifest)
    for component in ("image_unet", "text_unet"):
        for _, old, ours, part, _ in read_mapping(component):
            assert ckpt.sources[f"{component}.{part}" if part != "global" else "image_unet.global"][ours].key == old
    for kl, _, ours, _, _ in read_mapping("vae"):
        assert ckpt.sources["vae.encoder" if ours.startswith(("encoder", "quant")) else "vae.decoder"][ours].key == f"autokl.{kl}"


def test_kl_f8_alone_maps_every_key(tmp_path):
    """kl-f8.pth's 248 keys, including the 1x1-conv attention weights that become Linear weights."""
    root = tmp_path / "pretrained_pth"
    image = {k: s for k, s in read_manifest("vd-four-flow-v1-0").items() if k.startswith("diffuser.")}
    _save(root / "vd-four-flow-v1-0.pth", image)
    _save(root / "kl-f8.pth", read_manifest("kl-f8"))
    ckpt = open_checkpoint(root)
    assert len(ckpt.sources["vae.encoder"]) + len(ckpt.sources["vae.decoder"]) == 248
    q = ckpt.sources["vae.decoder"]["decoder.mid_block.attentions.0.to_q.weight"]
    assert q.file.shape(q.key) == (512, 512, 1, 1) and q.shape() == (512, 512)
