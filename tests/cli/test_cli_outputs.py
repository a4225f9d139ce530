"""The `vd` command, hardened: large --num-images run in chunks with per-image seeds (same images whatever the
chunking), a per-call pixel budget, output problems found before any model runs (or, like a full disk, reported
when they happen) as one line with status 2 and nothing half-written, devices and seeds checked, and a
mistyped local path named as such."""

import errno

import numpy as np
import PIL.Image
import pytest
import torch

import vd.cli
from vd import VersatileDiffusion
from vd.cli import main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAST = ["--steps", "2", "--seed", "7", "--no-progress", "--height", "16", "--width", "24"]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: the checks must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")
    monkeypatch.setattr(VersatileDiffusion, "from_pretrained", boom)


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vd: error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, (w, err)
    return err


def test_chunks_give_the_images_of_per_image_seeds(model, tmp_path, monkeypatch):
    calls = []
    real = VersatileDiffusion.text_to_image

    def spy(self, *a, **k):
        calls.append(k["num_images_per_prompt"])
        return real(self, *a, **k)
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", spy)
    monkeypatch.setattr(vd.cli, "CHUNK", 2)
    assert main(["text-to-image", "the cat", "-o", str(tmp_path / "a.png"), "--model", model, "--num-images", "5",
                 *FAST]) == 0
    assert calls == [2, 2, 1]
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"])
    for k in range(5):
        want = real(pipe, "the cat", num_inference_steps=2, height=16, width=24, progress=False,
                    generator=torch.Generator().manual_seed(7 + k)).images[0]
        got = np.asarray(PIL.Image.open(tmp_path / f"a-{k}.png"), dtype=np.int16)
        # one call per image against calls of two: float summation order may move a pixel one 8-bit step
        assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1, k


def test_pixel_budget_and_sizes_before_loading(no_model, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["text-to-image", "a", "-o", out, "--height", "1048576", "--width", "512"]) == 2
    _one_line(capsys, "height x width", "16777216", "1048576")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,words", [
    (["--seed", str(2**64)], ["--seed", str(2**64)]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--seed", str(2**64 - 1), "--num-images", "2"], ["--seed", str(2**64 - 2), "seed + k"]),
    (["--device", "foo"], ["device", "'foo'"]),
    (["--device", "cuda:99"], ["device", "cuda:99"]),
])
def test_bad_seed_and_device_before_loading(no_model, tmp_path, capsys, args, words):
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), *args]) == 2
    _one_line(capsys, *words)


@pytest.mark.parametrize("args,words", [
    (["image-variation", "in.png", "--fidelity", "0.3", "--scheduler", "unipc"], ["--fidelity", "(ddim)", "'unipc'"]),
    (["text-to-image", "a", "--init-image", "in.png", "--scheduler", "pndm"], ["--init-image", "part-way", "'pndm'"]),
    (["text-to-image", "a", "--init-image", "in.png", "--scheduler", "euler", "--strength-rule", "original"],
     ["--strength-rule", "'euler'"]),
    (["dual-guided", "a", "in.png", "--init-image", "in.png", "--scheduler", "unipc", "--init-strength", "0.4"],
     ["--init-strength", "1 / num_inference_steps = 0.5", "0.4"]),
    (["text-to-image", "a", "--init-image", "in.png", "--strength-rule", "diffusers", "--init-strength", "0.4"],
     ["--init-strength", "1 / num_inference_steps = 0.5", "0.4"]),  # the rule given, the sampler left to the model
])
def test_a_start_the_command_rules_out_before_loading(no_model, tmp_path, capsys, args, words):
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    args = [str(tmp_path / a) if a == "in.png" else a for a in args]
    assert main([*args, "-o", str(tmp_path / "x.png"), "--steps", "2"]) == 2
    _one_line(capsys, *words)


def test_a_start_with_no_steps_is_the_steps_error(model, tmp_path, capsys):
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    assert main(["text-to-image", "a", "--init-image", str(tmp_path / "in.png"), "--scheduler", "euler", "--steps",
                 "0", "-o", str(tmp_path / "x.png"), "--model", model]) == 2
    _one_line(capsys, "--steps", ">= 1", "got 0")


def test_steps_beyond_the_schedule(model, tmp_path, capsys):
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", model, "--steps", "1000"]) == 2
    _one_line(capsys, "num_inference_steps", "<= 999", "1000")


def test_mistyped_local_path_is_named(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection\nand more lines")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", "conv/c1x"]) == 2
    _one_line(capsys, "conv/c1x", "no such local file or folder", "hub repo id", "couldn't connect")


def test_output_is_checked_before_loading(no_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    for out, words in [(tmp_path / "dir.png", ["dir.png", "is a folder"]),
                       (tmp_path / "file" / "x.png", ["file", "not a folder"]),
                       (tmp_path / "none" / "x.png", ["none", "does not exist"])]:
        assert main(["text-to-image", "a", "-o", str(out)]) == 2
        _one_line(capsys, *words)
    # a read-only folder, as the OS refuses it (root ignores chmod, so the refusal is patched in)
    real_open = open

    def read_only(path, *a, **k):
        if ".partial-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", read_only)
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png")]) == 2
    _one_line(capsys, tmp_path / "x.png", "Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file"]


def test_full_disk_while_writing(model, tmp_path, capsys, monkeypatch):
    real_save = PIL.Image.Image.save

    def full(self, fp, *a, **k):
        real_save(self, fp, *a, **k)  # the bytes went out, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(PIL.Image.Image, "save", full)
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", model, *FAST]) == 2
    _one_line(capsys, tmp_path / "x.png", "No space left on device")
    assert list(tmp_path.iterdir()) == []  # neither the image nor its temporary file


def test_long_name_fits_with_the_temporary_suffix(model, tmp_path, capsys):
    out = tmp_path / ("n" * 250 + ".png")  # 254 bytes: the limit is 255, the temporary suffix adds more
    assert main(["text-to-image", "a", "-o", str(out), "--model", model, *FAST]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_ctrl_c_is_status_130(model, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", interrupted)
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", model, *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_ctrl_c_midway_lists_the_files_already_written(model, tmp_path, capsys, monkeypatch):
    """Outputs are listed as they are written: after an interrupt, the listed files are exactly the complete ones."""
    real, calls = VersatileDiffusion.text_to_image, []

    def second_call_interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", second_call_interrupted)
    monkeypatch.setattr("vd.cli.CHUNK", 2)
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", model, "--num-images", "5",
                 *FAST]) == 130
    listed = capsys.readouterr().out.split()
    assert listed == [str(tmp_path / "x-0.png"), str(tmp_path / "x-1.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]


def test_init_image_one_image_per_call(model, tmp_path, monkeypatch):
    """--init-image / --init-strength: each image is the Python call with its own seed (one image per call, as the
    init image's encoding draws from the call's first generator)."""
    init = tmp_path / "init.png"
    PIL.Image.fromarray((np.random.RandomState(3).rand(16, 24, 3) * 255).astype(np.uint8)).save(init)
    out = tmp_path / "b.png"
    assert main(["text-to-image", "the cat", "-o", str(out), "--model", model, "--num-images", "2",
                 "--init-image", str(init), "--init-strength", "0.5", "--steps", "4", "--seed", "7",
                 "--no-progress"]) == 0
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"])
    for k in range(2):
        want = pipe.text_to_image("the cat", init_image=PIL.Image.open(init), strength=0.5, num_inference_steps=4,
                                  generator=[torch.Generator().manual_seed(7 + k)], progress=False).images[0]
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / f"b-{k}.png")), np.asarray(want)), k


@pytest.mark.parametrize("option,value", [("--init-strength", "0.5"), ("--strength-rule", "diffusers")])
def test_init_options_need_an_init_image(no_model, tmp_path, capsys, option, value):
    assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), option, value]) == 2
    _one_line(capsys, option, "--init-image")


def test_init_image_with_any_sampler_that_starts_part_way(model, tmp_path, monkeypatch):
    """--init-image with --scheduler unipc runs diffusers' img2img rule (its default there); --strength-rule
    reaches the flow."""
    seen = []
    real = VersatileDiffusion.text_to_image

    def spy(self, *a, **k):
        seen.append((k["scheduler"] if "scheduler" in k else self.scheduler, k["strength_rule"]))
        return real(self, *a, **k)
    monkeypatch.setattr(VersatileDiffusion, "text_to_image", spy)
    PIL.Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(tmp_path / "in.png")
    for extra in (["--scheduler", "unipc"], ["--strength-rule", "diffusers"]):
        assert main(["text-to-image", "a", "-o", str(tmp_path / "x.png"), "--model", model, *FAST,
                     "--init-image", str(tmp_path / "in.png"), *extra]) == 0
    assert seen == [("unipc", None), ("ddim", "diffusers")]


def test_npy_output_is_the_latents(model, tmp_path):
    """-o NAME.npy writes each output's latents, not decoded: float32 [1, 4, h, w], what the facade returns with
    output_type="latent"; decoded, they give the picture the same command writes as a PNG."""
    argv = ["text-to-image", "the cat", "--model", model, "--num-images", "2", *FAST]
    assert main([*argv, "-o", str(tmp_path / "a.npy")]) == 0
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"])
    seeds = [torch.Generator().manual_seed(7 + k) for k in range(2)]
    want = pipe.text_to_image("the cat", num_inference_steps=2, height=16, width=24, num_images_per_prompt=2,
                              generator=seeds, output_type="latent", progress=False).images
    for k in range(2):
        got = np.load(tmp_path / f"a-{k}.npy")
        assert got.dtype == np.float32 and got.shape == (1, 4, 2, 3)
        assert np.array_equal(got, want[k:k + 1].numpy()), k
        picture = np.asarray(pipe.decode_latents(torch.from_numpy(got))[0], dtype=np.int16)
        # decoded alone against in a call of two: float summation order may move a pixel one 8-bit step
        assert np.abs(picture - np.asarray(PIL.Image.open(tmp_path / f"a-{k}.png"), dtype=np.int16)).max() <= 1, k
