"""Loading for the text flows: only their parts are read, the default tasks leave them out, and every checkpoint
layout (.bin folder, both original layouts, converted folders) gives the same text outputs."""

import pytest
import torch

import tiny_pipeline as tp
from flows import CPU, F32, FAST, TEXT_TASKS
from helpers import random_image, seeded
import copy
import shutil

from safetensors.torch import load_file

from vd import VersatileDiffusion
from vd.loading import load_components
from vd.pipeline import DEFAULT_TASKS
from vd.tasks import TASK_PARTS
from weights_convert import open_checkpoint
from weights_convert.convert import convert

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*rescale already rescaled.*", "ignore:.*weights_only.*")


# ---- 7. lean loading for the text flows

def test_image_to_text_loads_only_its_parts(folder, pipe, loaded_parts):
    lean = VersatileDiffusion.from_pretrained(folder, tasks=["image_to_text"], device="cpu")
    assert sorted(loaded_parts) == sorted(TASK_PARTS["image_to_text"])
    c = lean.components
    assert c.vae is None and c.text_encoder is None and c.tokenizer is None
    text_unet = dict(c.text_unet.named_parameters())
    assert "conv_in.weight" in text_unet and not any(".attentions." in k for k in text_unet)
    assert not hasattr(c.text_unet, "time_embedding")
    image_unet = dict(c.image_unet.named_parameters())
    assert all(k.startswith("time_embedding.") or ".attentions." in k for k in image_unet)
    assert any(".attentions." in k for k in image_unet) and "conv_in.weight" not in image_unet
    assert c.optimus.parts == {"decoder"} and not hasattr(c.optimus, "encoder")
    assert c.optimus_tokenizer is not None and c.image_encoder is not None
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'text_to_image'\]"):
        lean.text_to_image("the cat", **FAST)
    with pytest.raises(ValueError, match="text_variation"):
        lean.text_variation("the cat", **FAST)
    img = random_image(70)
    a = lean.image_to_text(img, generator=seeded(0), **FAST)
    b = pipe.image_to_text(img, generator=seeded(0), **FAST)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts


def test_text_variation_loads_only_its_parts(folder, pipe, loaded_parts):
    lean = VersatileDiffusion.from_pretrained(folder, tasks=["text_variation"], device="cpu")
    assert sorted(loaded_parts) == sorted(TASK_PARTS["text_variation"])
    c = lean.components
    assert c.vae is None and c.image_encoder is None and c.image_processor is None
    assert set(dict(c.image_unet.named_parameters())) == {k for k, _ in pipe.components.image_unet.named_parameters()
                                                          if k.startswith("time_embedding.")}
    assert c.optimus.parts == {"decoder"}
    a = lean.text_variation("the cat", generator=seeded(0), **FAST)
    b = pipe.text_variation("the cat", generator=seeded(0), **FAST)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts


def test_default_tasks_leave_the_text_flows_out(folder, loaded_parts):
    plain = VersatileDiffusion.from_pretrained(folder, device="cpu")
    assert plain.tasks == DEFAULT_TASKS and not set(TEXT_TASKS) & set(plain.tasks)
    assert not any(p.startswith("optimus") or p == "text_unet.data" for p in loaded_parts)
    assert plain.components.optimus is None and plain.text_eps is None
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'image_to_text'\]"):
        plain.image_to_text(random_image(71), **FAST)
    with pytest.raises(ValueError, match=r"load it with tasks=\[\.\.\., 'text_variation'\]"):
        plain.text_variation("the cat", **FAST)


# ---- 8. every checkpoint layout gives the same text outputs

@pytest.fixture(scope="module")
def layouts(folder, tmp_path_factory):
    """The tiny model as a .bin diffusers folder and in both original layouts (configs for the originals)."""
    from diffusers import VersatileDiffusionPipeline
    root = tmp_path_factory.mktemp("layouts")
    binary = root / "bin"
    VersatileDiffusionPipeline(**copy.deepcopy(tp.build_components(seed=0))).save_pretrained(
        binary, safe_serialization=False)
    tp.write_optimus(binary / "pretrained_pth", 4)  # the same Optimus as tp.save's
    tp.write_optimus_tokenizer(binary / "optimus_tokenizer")
    for c in ("text_encoder", "image_encoder"):  # transformers may write safetensors regardless
        f = binary / c / "model.safetensors"
        if f.is_file():
            torch.save(load_file(f), binary / c / "pytorch_model.bin")
            f.unlink()
    assert not list(binary.rglob("*.safetensors"))
    (root / "deprecated").mkdir()
    originals = tp.write_originals(folder, root / "hub_repo" / "vd", root / "deprecated")
    return {"bin": binary, **originals}


def _text_outputs(p: VersatileDiffusion):
    # Weights read from different files sit at different memory alignments (a memory-mapped safetensors tensor
    # starts wherever its offset falls), and CPU matmul kernels round differently for different alignments. Copy
    # every weight into a fresh allocation first, so bit-equal outputs mean bit-equal weights.
    c = p.components
    for part in (c.image_unet, c.text_unet, c.text_encoder, c.image_encoder, c.optimus):
        for w in part.parameters():
            w.data = w.data.clone()
    a = p.image_to_text(random_image(80), generator=seeded(0), **FAST)
    b = p.text_variation("the cat", num_texts_per_prompt=2, generator=seeded(1), **FAST)
    return a.latents, a.texts, b.latents, b.texts


@pytest.fixture(scope="module")
def expected_text(folder):
    """From a pipeline of its own: _text_outputs re-allocates the weights of the one it is given, and the module's
    shared `pipe` must keep the memory-mapped ones its lean-loading tests compare with bit for bit."""
    return _text_outputs(VersatileDiffusion.from_pretrained(folder, tasks=TEXT_TASKS, device="cpu"))


def _same(got, want):
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert torch.equal(got[2], want[2]) and got[3] == want[3]


def _from_checkpoint(ckpt) -> VersatileDiffusion:
    return VersatileDiffusion(load_components(ckpt, TEXT_TASKS, CPU, F32), tasks=tuple(TEXT_TASKS), device=CPU,
                              dtype=F32)


def test_bin_folder(layouts, expected_text):
    bin_pipe = VersatileDiffusion.from_pretrained(layouts["bin"], tasks=TEXT_TASKS, device="cpu")
    _same(_text_outputs(bin_pipe), expected_text)


def test_current_original_layout(layouts, expected_text):
    """vd-four-flow-v1-0.pth with optimus-vae.pth beside it in pretrained_pth/, the tokenizer folder in the repo."""
    ckpt = open_checkpoint(layouts["current"], configs=layouts["configs"])
    assert {s.file.path.name for s in ckpt.sources["optimus.decoder"].values()} == {"optimus-vae.pth"}
    assert ckpt.optimus_tokenizer.name == "optimus_tokenizer"
    _same(_text_outputs(_from_checkpoint(ckpt)), expected_text)


def test_deprecated_original_layout(layouts, folder, expected_text):
    """vd-four-flow-v1-0-deprecated.pth holds Optimus under optimus.*; the tokenizers come from elsewhere."""
    ckpt = open_checkpoint(layouts["deprecated"], configs=layouts["configs"], clip=folder,
                           optimus_tokenizer=folder / "optimus_tokenizer")
    assert {s.file.path for s in ckpt.sources["optimus.decoder"].values()} == {layouts["deprecated"]}
    _same(_text_outputs(_from_checkpoint(ckpt)), expected_text)


@pytest.mark.parametrize("layout", ["current", "deprecated", "safetensors"])
def test_converted_folder(layout, layouts, folder, expected_text, tmp_path):
    src = folder if layout == "safetensors" else layouts[layout]
    kw = {} if layout == "safetensors" else dict(configs=layouts["configs"], clip=folder)
    if layout == "deprecated":
        kw["optimus_tokenizer"] = folder / "optimus_tokenizer"
    out = convert(src, tmp_path / "out", **kw)
    for name in ("vocab.txt", "vocab.json", "merges.txt"):  # the converted folder carries the tokenizer files
        assert (out / "optimus_tokenizer" / name).read_bytes() == (folder / "optimus_tokenizer" / name).read_bytes()
    moved = tmp_path / "moved"  # self-contained: nothing points back at the source
    shutil.move(out, moved)
    _same(_text_outputs(VersatileDiffusion.from_pretrained(moved, tasks=TEXT_TASKS, device="cpu")), expected_text)
