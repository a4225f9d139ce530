"""The `vd` command on a tiny model folder: files written and readable, equal to the Python API; user mistakes
give one line on stderr and exit status 2."""

import os
import shutil
import subprocess
import sys
from importlib import metadata

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

import vd
from helpers import image_size
from vd import VersatileDiffusion
from vd.cli import main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAST = ["--steps", "2", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    PIL.Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)).save(path)
    return str(path)


def _api(model, task, *args, **kw):
    pipe = VersatileDiffusion.from_pretrained(model, tasks=[task])
    return getattr(pipe, task)(*args, num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                               progress=False, **kw).images


def test_text_to_image(model, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["text-to-image", "the cat", "-o", str(out), "--model", model, "--negative", "rain", *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    want = _api(model, "text_to_image", "the cat", negative_prompt="rain")[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want))


def test_image_variation_several_images(model, picture, tmp_path):
    out = tmp_path / "var.png"
    assert main(["image-variation", picture, "-o", str(out), "--model", model, "--num-images", "2",
                 "--scheduler", "lms", "--height", "72", "--width", "40", *FAST]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["var-0.png", "var-1.png"]
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["image_variation"], scheduler="lms")
    want = pipe.image_variation(PIL.Image.open(picture).convert("RGB"), num_inference_steps=2, height=72, width=40,
                                num_images_per_prompt=2, progress=False,  # image k is seeded with --seed + k
                                generator=[torch.Generator().manual_seed(7 + k) for k in range(2)])
    for i, img in enumerate(want.images):
        got = PIL.Image.open(tmp_path / f"var-{i}.png")
        assert got.size == (40, 72) and np.array_equal(np.asarray(got), np.asarray(img))


def test_scheduler_settings(model, tmp_path):
    """--scheduler-set KEY=VALUE (JSON, else a string) over the model's scheduler_config, as
    `pipe.scheduler_config = {**pipe.scheduler_config, KEY: VALUE}` in Python."""
    out = tmp_path / "cat.png"
    assert main(["text-to-image", "the cat", "-o", str(out), "--model", model, "--scheduler", "dpmpp_2m",
                 "--scheduler-set", "timestep_spacing=trailing", "--scheduler-set", "solver_order=3",
                 "--scheduler-set", "use_lu_lambdas=true", *FAST]) == 0
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"], scheduler="dpmpp_2m")
    pipe.scheduler_config = {**pipe.scheduler_config, "timestep_spacing": "trailing", "solver_order": 3,
                             "use_lu_lambdas": True}
    want = pipe.text_to_image("the cat", num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                              progress=False).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want))
    plain = _api(model, "text_to_image", "the cat", scheduler="dpmpp_2m")[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))


def test_dual_guided_as_python_module(model, picture, tmp_path):
    out = tmp_path / "dual.png"
    cmd = [sys.executable, "-m", "vd", "dual-guided", "the cat", picture, "--strength", "0.3", "-o", str(out),
           "--model", model, "--dtype", "fp32", "--device", "cpu", *FAST]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # a normal run shows no warnings (transformers' image-processor fallback included)
    want = _api(model, "dual_guided", "the cat", PIL.Image.open(picture).convert("RGB"), text_to_image_strength=0.3)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want[0]))


@pytest.mark.parametrize("args,words", [
    (["text-to-image", "a", "-o", "{tmp}/x.txt"], ["--output", "x.txt"]),
    (["text-to-image", "a", "-o", "{tmp}/missing/x.png"], ["--output", "does not exist"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--steps", "0"], ["error: --steps (num_inference_steps):", "0"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--guidance", "nan"], ["error: --guidance (guidance_scale):"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--height", "100"], ["--height", "100", "multiple of 8"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler", "k_heun"], ["scheduler", "k_heun"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler", "ddim_inverse"],
     ["--scheduler: 'ddim_inverse' turns given image latents into noise, and the command line takes no latents"]),
    (["text-to-image", "a", "-o", "{tmp}/x.npz"], ["--output", ".npy for the latents", "x.npz"]),
    (["image-variation", "{picture}", "-o", "{tmp}/x.npy", "--color-adjust"],
     ["--color-adjust: expected it with an image output", "not with .npy latents"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--num-images", "0"], ["--num-images", "0"]),
    (["image-variation", "{tmp}/nope.png", "-o", "{tmp}/x.png"], ["image", "nope.png"]),
    (["dual-guided", "a", "{tmp}/x.txt", "-o", "{tmp}/x.png"], ["image", "x.txt"]),
    (["dual-guided", "a", "{picture}", "-o", "{tmp}/x.png", "--strength", "2"],
     ["error: --strength (text_to_image_strength):", "2"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--model", "{tmp}/no-such-model"], ["no-such-model"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler-set", "timestep_spacing"],
     ["--scheduler-set: expected KEY=VALUE, got 'timestep_spacing'"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler-set", "clip_sample=yes"],
     ["--scheduler-set: clip_sample: expected true or false for DDIM, got 'yes'"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler", "unipc", "--scheduler-set", "predict_x0=false"],
     ["--scheduler-set: predict_x0=False needs final_sigmas_type 'sigma_min'"]),
    (["text-to-image", "a", "-o", "{tmp}/x.png", "--scheduler-set", "beta_end=2"],
     ["--scheduler-set: beta_end must be a finite number in [0.0, 1.0] for DDIM, got 2"]),
    (["text-variation", "a", "--optimus", "{tmp}/no-optimus.pth"],
     ["error: --optimus (optimus): ", "no-optimus.pth: no such file"]),
])
def test_user_mistakes(args, words, model, picture, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not an image")
    argv = [a.format(tmp=tmp_path, picture=picture) for a in args]
    if "--model" not in argv:
        argv += ["--model", model]
    assert main([argv[0], *FAST, *argv[1:]]) == 2  # the case's own options come last and win
    err = capsys.readouterr().err.strip()
    assert err.startswith("vd: error: ") and "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "x.png").exists()


def test_console_script_reports_one_line(tmp_path):
    exe = shutil.which("vd", path=os.path.dirname(sys.executable))
    assert exe, "the `vd` console script is installed with the package"
    done = subprocess.run([exe, "text-to-image", "a", "-o", str(tmp_path / "a.gif.txt")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--output" in done.stderr


def test_version_names_what_results_depend_on(capsys):
    """`vd --version`: the package's version (the installed distribution's, read from vd.__version__), torch's
    build and transformers', which a bug report or a reproduced result needs."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    cuda = f" cuda {torch.version.cuda}" if torch.version.cuda else ""
    assert capsys.readouterr().out == (f"vd {vd.__version__} torch {torch.__version__}{cuda} "
                                       f"transformers {transformers.__version__}\n")
    assert metadata.version("vd") == vd.__version__


@pytest.mark.parametrize("eager", [False, True])
def test_eager_turns_the_cuda_fast_path_off(eager, model, tmp_path, monkeypatch):
    """--eager asks for cuda_graphs=False and triton_kernels=False; without it from_pretrained's defaults hold."""
    seen = {}
    load = VersatileDiffusion.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(VersatileDiffusion, "from_pretrained", classmethod(spy))
    out = tmp_path / "a.png"
    assert main(["text-to-image", "x", "-o", str(out), "--model", model, *FAST, *(["--eager"] if eager else [])]) == 0
    assert image_size(out)[0] > 0
    want = {"cuda_graphs": False, "triton_kernels": False} if eager else {}
    assert {k: seen[k] for k in ("cuda_graphs", "triton_kernels") if k in seen} == want
