"""The `vd` command's newer subcommands on a tiny model folder, run in-process: image-to-text, text-variation,
blend, and image-variation's --focus / --fidelity / --color-adjust give what the Python API gives with the same
seed; user mistakes give one line on stderr and exit status 2."""

import numpy as np
import PIL.Image
import pytest
import torch

from vd import VersatileDiffusion
from vd.cli import main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAST = ["--steps", "2", "--seed", "0", "--no-progress", "--device", "cpu"]


def _write(folder, name, array) -> str:
    path = folder / name
    PIL.Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two pictures and a mask for the second (white = leave out)."""
    d = tmp_path_factory.mktemp("img")
    rng = np.random.RandomState(0)
    mask = np.zeros((48, 40, 3), np.uint8)
    mask[:, :20] = 255
    return {"a": _write(d, "a.png", (rng.rand(40, 48, 3) * 255).astype(np.uint8)),
            "b": _write(d, "b.png", (rng.rand(48, 40, 3) * 255).astype(np.uint8)),
            "mask": _write(d, "mask.png", mask)}


def _open(path) -> PIL.Image.Image:
    return PIL.Image.open(path).convert("RGB")


def _api(model, task, *args, **kw):
    """The Python call the CLI makes with --seed 0: output k drawn from a generator seeded with 0 + k."""
    pipe = VersatileDiffusion.from_pretrained(model, tasks=[task], device="cpu")
    n = kw.get("num_texts_per_prompt", kw.get("num_images_per_prompt", 1))
    return getattr(pipe, task)(*args, num_inference_steps=2, progress=False,
                               generator=[torch.Generator().manual_seed(k) for k in range(n)], **kw)


def test_image_to_text_prints_one_line_per_text(model, files, capsys):
    assert main(["image-to-text", files["a"], "--model", model, "--num-texts", "3", *FAST]) == 0
    out = capsys.readouterr().out
    want = _api(model, "image_to_text", _open(files["a"]), num_texts_per_prompt=3).texts
    assert len(want) == 3 and out == "\n".join(want) + "\n"
    assert main(["image-to-text", files["a"], "--model", model, *FAST]) == 0  # default: one text
    assert capsys.readouterr().out == _api(model, "image_to_text", _open(files["a"])).texts[0] + "\n"


def test_image_to_text_writes_a_file(model, files, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("old\n")
    assert main(["image-to-text", files["a"], "--model", model, "--num-texts", "2", "-o", str(out), *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    want = _api(model, "image_to_text", _open(files["a"]), num_texts_per_prompt=2).texts
    assert out.read_text(encoding="utf-8") == "\n".join(want) + "\n"
    assert out.read_text(encoding="utf-8").count("\n") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # written through a temporary file, replaced


def test_text_flow_npy_output_is_the_text_latents(model, tmp_path, capsys):
    """-o NAME.npy writes the text latents the sentences are decoded from: float32 [N, 768] (the tiny model's
    width here), what the Python call returns as `.latents`."""
    out = tmp_path / "words.npy"
    assert main(["text-variation", "a cat", "--model", model, "--num-texts", "2", "-o", str(out), *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    got, want = np.load(out), _api(model, "text_variation", "a cat", num_texts_per_prompt=2).latents
    assert got.dtype == np.float32 and got.shape == tuple(want.shape) and np.array_equal(got, want.numpy())


def test_text_variation_greedy(model, capsys):
    args = ["text-variation", "a cat", "--model", model, "--greedy", "--negative", "rain", "--temperature", "0.5"]
    assert main([*args, *FAST]) == 0
    out = capsys.readouterr().out
    want = _api(model, "text_variation", "a cat", negative_prompt="rain", greedy=True, temperature=0.5).texts
    assert out == want[0] + "\n"
    assert main(["text-variation", "a cat", "--model", model, *FAST]) == 0  # sampled, default options
    assert capsys.readouterr().out == _api(model, "text_variation", "a cat").texts[0] + "\n"


def test_blend(model, files, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["blend", files["a"], files["b"], "--weights", "1", "0.5", "--masks", "none", files["mask"],
                 "--focus", "0.5", "0.8", "--prompt", "x", "--text-strength", "0.3", "-o", str(out), "--model",
                 model, *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    got = np.asarray(PIL.Image.open(out))
    assert got.shape == (64, 64, 3)
    want = _api(model, "blend", [_open(files["a"]), _open(files["b"])], weights=[1.0, 0.5],
                masks=[None, _open(files["mask"])], focus=[0.5, 0.8], prompt="x", text_strength=0.3).images[0]
    assert np.array_equal(got, np.asarray(want))
    unmasked = _api(model, "blend", [_open(files["a"]), _open(files["b"])], weights=[1.0, 0.5], focus=[0.5, 0.8],
                    prompt="x", text_strength=0.3).images[0]
    assert not np.array_equal(got, np.asarray(unmasked))  # the mask file was used


def test_blend_mask_file_with_transparency(model, files, tmp_path):
    """An RGBA mask file (white on the left, transparent black elsewhere) means what the same picture means to
    the Python API: its first channel, not the picture over white (which would leave the whole image out)."""
    a = np.zeros((48, 40, 4), np.uint8)
    a[:, :20] = 255
    mask = tmp_path / "rgba.png"
    PIL.Image.fromarray(a, "RGBA").save(mask)
    out = tmp_path / "out.png"
    assert main(["blend", files["a"], files["b"], "--masks", "none", str(mask), "-o", str(out), "--model", model,
                 *FAST]) == 0
    want = _api(model, "blend", [_open(files["a"]), _open(files["b"])], masks=[None, PIL.Image.open(mask)])
    white = _api(model, "blend", [_open(files["a"]), _open(files["b"])], masks=[None, _open(mask)])
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want.images[0]))
    assert not np.array_equal(np.asarray(want.images[0]), np.asarray(white.images[0]))


def test_blend_one_weight_and_focus_for_all_images(model, files, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["blend", files["a"], files["b"], "--weights", "0.7", "--focus", "0.8", "--prompt", "x",
                 "--text-strength", "0.4", "--negative", "blur", "-o", str(out), "--model", model, *FAST]) == 0
    want = _api(model, "blend", [_open(files["a"]), _open(files["b"])], weights=[0.7, 0.7], focus=[0.8, 0.8],
                prompt="x", text_strength=0.4, negative_prompt="blur")
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want.images[0]))


def test_image_variation_focus_fidelity_color(model, files, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["image-variation", files["a"], "--focus", "0.2", "--fidelity", "0.5", "--color-adjust",
                 "-o", str(out), "--model", model, *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    got = np.asarray(PIL.Image.open(out))
    want = _api(model, "image_variation", _open(files["a"]), focus=0.2, fidelity=0.5, color_adjust=True).images[0]
    assert np.array_equal(got, np.asarray(want))
    plain = _api(model, "image_variation", _open(files["a"])).images[0]
    assert not np.array_equal(got, np.asarray(plain))


@pytest.mark.parametrize("args,words", [
    (["blend", "{a}", "{a}", "{a}", "{a}", "{a}", "-o", "{tmp}/x.png"], ["images", "1 to 4", "5"]),
    (["blend", "{a}", "{b}", "--masks", "{mask}", "-o", "{tmp}/x.png"], ["--masks", "(2)", "got 1"]),
    (["blend", "{a}", "{b}", "--masks", "none", "{tmp}/nope.png", "-o", "{tmp}/x.png"], ["--masks", "nope.png"]),
    (["blend", "{a}", "{b}", "{a}", "--weights", "1", "2", "-o", "{tmp}/x.png"],
     ["weights", "one number per image (3)"]),
    (["blend", "{a}", "--weights", "-1", "-o", "{tmp}/x.png"], ["weights", "-1"]),
    (["blend", "{a}", "--text-strength", "1.5", "--prompt", "x", "-o", "{tmp}/x.png"], ["text_strength", "1.5"]),
    (["blend", "{tmp}/nope.png", "-o", "{tmp}/x.png"], ["images", "nope.png"]),
    (["image-variation", "{a}", "--focus", "1.2", "-o", "{tmp}/x.png"], ["focus", "1.2"]),
    (["image-variation", "{a}", "--fidelity", "-0.1", "-o", "{tmp}/x.png"], ["fidelity", "-0.1"]),
    (["image-variation", "{a}", "--fidelity", "0.5", "--scheduler", "pndm", "-o", "{tmp}/x.png"],
     ["fidelity", "ddim"]),
    (["image-to-text", "{a}", "--num-texts", "0"], ["--num-texts", "0"]),
    (["image-to-text", "{a}", "--temperature", "0"], ["temperature", "0"]),
    (["image-to-text", "{tmp}/nope.png"], ["image", "nope.png"]),
    (["image-to-text", "{a}", "-o", "{tmp}/missing/x.txt"], ["--output", "does not exist"]),
    (["text-variation", "a", "--num-texts", "0"], ["--num-texts", "0"]),
    (["text-variation", "a", "--steps", "0"], ["num_inference_steps", "0"]),
])
def test_user_mistakes(args, words, model, files, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, **files) for a in args]
    assert main([argv[0], *FAST, *argv[1:], "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vd: error: ") and "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "missing").exists()
