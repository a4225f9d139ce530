"""Every command in README.md runs, with the tiny model standing in for the real weights.

Shell lines are run in order in one folder (so `astronaut.png` from the first exists for the next), with
`--model <tiny>` where the README relies on the hub default, and at most 2 steps. The Python block runs with the
hub id replaced by the tiny folder. The set-up and test commands are the ones .ci/run executes; the torchrun
lines are exercised by tests/cli/test_batch.py (two gloo ranks on the CPU), except the multi-node one. The research
example's batch file and command run in test_research_example, with its inputs.
"""

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from helpers import REPO, image_size
from vd.cli import main as vd_main
from weights_convert.__main__ import main as convert_main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*weights_only.*")
ROOT = REPO
README = (ROOT / "README.md").read_text()
HUB = "shi-labs/versatile-diffusion"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def python_block(word: str) -> str:
    """The Python block that mentions `word` (the main example: "captions"; the research ones: "pred_text.npy",
    "ONE_GPU", "pred_clip_tokens.npy" and "CLIP_MEAN"; the inversion one: "ddim_inverse")."""
    (block,) = [b for b in blocks("python") if word in b]
    return block


def jsonl_block(word: str) -> str:
    """The JSONL block that mentions `word` (the batch example: "red fox"; the research one: "pred_text.npy")."""
    (block,) = [b for b in blocks("jsonl") if word in b]
    return block


def research_command(cmd: str) -> bool:
    return "recon.jsonl" in cmd


def shell_commands() -> list[str]:
    text = "\n".join(blocks("sh")).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_setup_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    setup, test = shell_commands()[0], next(c for c in shell_commands() if "pytest" in c)
    assert setup == "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
    for part in setup.split(" && ") + test.split(" && "):
        assert part in ci, f"{part!r} is not run by .ci/run"


def _fast(argv: list[str], model: str) -> list[str]:
    """The README's arguments, with the tiny model and 2 steps (the last --steps wins)."""
    argv = [*argv, "--model", model] if "--model" not in argv else list(argv)
    return argv if argv[0] == "batch" else [*argv, "--steps", "2", "--no-progress"]


def test_every_shell_command(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the batch example's inputs: the README's own job file (at 2 steps) and an image for it
    jobs = [{**json.loads(line), "num_inference_steps": 2} for line in jsonl_block("red fox").splitlines()]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    (tmp_path / "inputs").mkdir()
    PIL.Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)).save("inputs/cat.jpg")
    originals = tp.write_originals(Path(model), tmp_path / "repo", tmp_path)
    ran = []
    for cmd in [c for line in shell_commands() for c in line.split(" && ")
                if not line.startswith("python3 -m venv") and "pytest" not in line and not research_command(line)]:
        argv = shlex.split(cmd)
        if argv[0] == "torchrun":
            continue  # tests/cli/test_batch.py runs two gloo ranks
        if argv[:3] == ["python", "-m", "vd"]:
            argv = ["vd", *argv[3:]]
        if argv[0] == "vd":
            code = vd_main(_fast(argv[1:], model))
        elif argv[0] == "python" and argv[1].startswith("benchmarks/"):  # CPU and tiny instead of GPU and full
            small = {"full": "small", "cuda": "cpu", "fp16": "fp32"}
            args = [small.get(a, a) for a in argv[2:]]
            if argv[1].endswith("bench.py"):
                args += ["--device", "cpu", "--size", "64", "--steps", "1", "--step-repeats", "1", "--e2e-repeats",
                         "1", "--warmup", "0", "--no-isolate", "--json", "bench.json"]
            code = subprocess.run([sys.executable, str(ROOT / argv[1]), *args], timeout=600).returncode
            argv = ["python", "-m", Path(argv[1]).stem]
        elif argv[:3] == ["python", "-m", "weights_convert"]:
            args = [model if a == HUB else a for a in argv[3:]]
            if args[0].startswith("pretrained_pth/"):  # the tiny .pth, read with the tiny configs
                args[0] = str(originals["current"])
                args[args.index("--clip") + 1] = model
                monkeypatch.setattr("weights_convert.layouts.VD_IMAGE_UNET", originals["configs"]["image_unet"])
                monkeypatch.setattr("weights_convert.layouts.VD_TEXT_UNET", originals["configs"]["text_unet"])
                monkeypatch.setattr("weights_convert.layouts.VD_VAE", originals["configs"]["vae"])
                monkeypatch.setattr("weights_convert.presets.CLIP_TEXT", originals["configs"]["text_encoder"])
                monkeypatch.setattr("weights_convert.presets.CLIP_VISION", originals["configs"]["image_encoder"])
            code = convert_main(args)
        else:
            raise AssertionError(f"README command not covered by this test: {cmd}")
        assert code == 0, cmd
        ran.append(argv[0] if argv[0] == "vd" else argv[2])
    for name in ("astronaut.png", "variation.png", "dual.png", "squirrel-0.png", "squirrel-1.png", "lighthouse.png",
                 "closer.png", "blend.png"):
        assert image_size(name)[0] > 0
    assert len(Path("sentences.txt").read_text().splitlines()) == 1
    assert image_size("lighthouse.png") == (640, 384)
    records = [json.loads(line) for line in Path("results/records.jsonl").read_text().splitlines()]
    assert len(records) == 4  # 2 + 1 + 1 images
    for folder in ("vd-t2i", "vd-full"):
        assert json.loads(Path(folder, "config.json").read_text())["format"] == "vd"
    assert ran.count("vd") == 10 and ran.count("weights_convert") == 2
    assert ran.count("make_checkpoint") == ran.count("bench") == 1
    assert set(json.loads(Path("bench.json").read_text())["tasks"]) == {"text_to_image", "image_variation",
                                                                        "dual_guided"}


def test_python_example(model, monkeypatch):
    code = python_block("captions")
    assert HUB in code
    from vd import VersatileDiffusion
    for task in ("text_to_image", "image_variation", "dual_guided", "blend", "image_to_text",
                 "text_variation"):  # 2 steps instead of 50
        method = getattr(VersatileDiffusion, task)
        monkeypatch.setattr(VersatileDiffusion, task,
                            lambda self, *a, _m=method, **k: _m(self, *a, **{**k, "num_inference_steps": 2}))
    namespace = {}
    exec(code.replace(f'"{HUB}"', repr(model)), namespace)
    assert isinstance(namespace["image"], PIL.Image.Image) and len(namespace["variations"]) == 2
    assert isinstance(namespace["mixed"], PIL.Image.Image)
    assert isinstance(namespace["closer"], PIL.Image.Image) and isinstance(namespace["blended"], PIL.Image.Image)
    assert len(namespace["captions"]) == 2 and all(isinstance(t, str) for t in namespace["captions"])
    assert len(namespace["rephrased"]) == 1
    assert isinstance(namespace["g"], torch.Generator)


def _research_inputs(seed: int, arrays: dict[str, tuple[int, ...]], pictures: str) -> None:
    """Random float32 arrays of the given shapes (tokens 16 wide, as the tiny model's; 768 at full size) and two
    40 x 48 pictures, `pictures`/0.png and 1.png, in the current folder."""
    rng = np.random.RandomState(seed)
    for name, shape in arrays.items():
        np.save(name, rng.randn(*shape).astype(np.float32) * 0.1)
    Path(pictures).mkdir()
    for i in range(2):
        PIL.Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)).save(f"{pictures}/{i}.png")


def test_research_example(model, tmp_path, monkeypatch):
    """The research example on the tiny model: predicted features from .npy files (16-wide here, 768 at full
    size), low-level reconstructions as init images, 4 steps; then its batch file and command, which give the
    same images."""
    code = python_block("pred_text.npy")
    assert HUB in code
    from vd import VersatileDiffusion
    monkeypatch.chdir(tmp_path)
    _research_inputs(0, {"pred_text.npy": (2, 77, 16), "pred_vision.npy": (2, 257, 16)}, "lowlevel")
    method = VersatileDiffusion.dual_guided
    monkeypatch.setattr(VersatileDiffusion, "dual_guided",
                        lambda self, *a, **k: method(self, *a, **{**k, "num_inference_steps": 4}))
    exec(code.replace(f'"{HUB}"', repr(model)), {})
    for i in range(2):
        assert image_size(f"recon-{i}.png") == (48, 40)
    jobs = [{**json.loads(line), "num_inference_steps": 4} for line in jsonl_block("pred_text.npy").splitlines()]
    Path("recon.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    (cmd,) = [c for c in shell_commands() if research_command(c)]
    argv = shlex.split(cmd)
    assert argv[:2] == ["vd", "batch"]
    monkeypatch.setattr(VersatileDiffusion, "dual_guided", method)  # the steps are in the job file
    assert vd_main(_fast(argv[1:], model) + ["--no-progress"]) == 0
    for i in range(2):  # the batch file gives the Python example's images
        want = np.asarray(PIL.Image.open(f"recon-{i}.png"))
        assert np.array_equal(np.asarray(PIL.Image.open(f"recon/recon-{i}-0.png")), want), i


@pytest.mark.parametrize("one_gpu", [False, True])
def test_seeded_once_example(model, tmp_path, monkeypatch, one_gpu):
    """The seeded-once example after the first (it uses its pipe and tokens), 4 steps on the tiny model: item i is
    the call from its init image's latents, with the CPU generator after i posterior draws and the other after i
    start noises (and i * int(0.75 * 4) step draws with ONE_GPU): each call draws once from each."""
    from vd import VersatileDiffusion
    monkeypatch.chdir(tmp_path)
    _research_inputs(0, {"pred_text.npy": (2, 77, 16), "pred_vision.npy": (2, 257, 16)}, "lowlevel")
    method = VersatileDiffusion.dual_guided
    monkeypatch.setattr(VersatileDiffusion, "dual_guided",
                        lambda self, *a, **k: method(self, *a, **{**k, "num_inference_steps": 4, "progress": False}))
    names = {}
    exec(python_block("pred_text.npy").replace(f'"{HUB}"', repr(model)), names)
    code = python_block("ONE_GPU")
    assert "STEPS, STRENGTH, ONE_GPU = 50, 0.75, False" in code
    exec(code.replace("50, 0.75, False", f"4, 0.75, {one_gpu}"), names)
    pipe, text, vision = names["pipe"], names["text"], names["vision"]
    draws = 1 + (int(0.75 * 4) if one_gpu else 0)
    for i in range(2):
        cpu, gpu = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        shape = (1, 4, 40 // 8, 48 // 8)
        for _ in range(i):
            torch.randn(shape, generator=cpu)
        for _ in range(i * draws):
            torch.randn(shape, generator=gpu)
        x0 = pipe.encode_latents(PIL.Image.open(f"lowlevel/{i}.png"), generator=cpu)
        want = method(pipe, prompt_embeds=text[i:i + 1], image_embeds=vision[i:i + 1], text_to_image_strength=0.4,
                      init_latents=x0, strength=0.75, num_inference_steps=4, generator=gpu, progress=False).images[0]
        got = np.asarray(PIL.Image.open(f"recon-seeded-once-{i}.png"))
        assert got.shape == (40, 48, 3)
        assert np.array_equal(got, np.asarray(want)), i
        if i:  # another state of the generators gives another picture
            other = method(pipe, prompt_embeds=text[i:i + 1], image_embeds=vision[i:i + 1],
                           text_to_image_strength=0.4, init_latents=pipe.encode_latents(
                               PIL.Image.open(f"lowlevel/{i}.png"), generator=torch.Generator().manual_seed(0)),
                           strength=0.75, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                           progress=False).images[0]
            assert not np.array_equal(got, np.asarray(other))


def test_brain_diffuser_targets_example(model):
    """The Brain-Diffuser targets example on the tiny model. The pixels CLIP sees are those of its transformers
    4.19 path, written here from that release's source: the float array * 255 truncated to uint8, PIL bicubic to
    224 x 224, / 255, normalised in float32; the targets are encode_image's and the captions' mean encode_prompt."""
    from vd import VersatileDiffusion
    from vd.conditioning import pixel_values
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["dual_guided"])
    stimulus = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (425, 425, 3)).astype(np.uint8))
    names = dict(pipe=pipe, stimulus=stimulus, stimulus_texts=["a cat", "the dog on a mat"], np=np, torch=torch,
                 Image=PIL.Image)
    exec(python_block("brain_diffuser_pixels"), names)
    seen = names["brain_diffuser_pixels"](stimulus)
    assert seen.size == (512, 512) and seen.mode == "RGB"
    x = torch.from_numpy(np.array(stimulus.resize((512, 512), PIL.Image.BILINEAR))).permute(2, 0, 1).float() / 255
    arrays = (((x * 2 - 1) + 1) / 2).permute(1, 2, 0).numpy()
    truncated = PIL.Image.fromarray((arrays * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(seen), np.asarray(truncated))
    resized = np.asarray(stimulus.resize((512, 512), PIL.Image.BILINEAR))
    assert np.array_equal(np.asarray(truncated), resized - ((resized >= 1) & (resized <= 63)))  # README's 1 to 63
    processor = pipe.components.image_processor
    side = processor.crop_size["height"]
    small = np.asarray(truncated.resize((side, side), PIL.Image.BICUBIC)).astype(np.float32) / 255
    mean, std = (np.array(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    normalised = torch.from_numpy(((small - mean) / std).transpose(2, 0, 1))[None]
    assert torch.equal(pixel_values(processor, [seen]), normalised)
    assert torch.equal(names["vision_target"], pipe.encode_image(seen))
    assert torch.equal(names["text_target"], pipe.encode_prompt(["a cat", "the dog on a mat"]).mean(0, keepdim=True))


def test_mindeye_example(model, tmp_path, monkeypatch):
    """The MindEye example on the tiny model (4 steps): predicted tokens from a .npy file, blurry pictures as init
    images; each output is the call with strength_rule="diffusers" (unipc's default) and has the init image's size."""
    code = python_block("pred_clip_tokens.npy")
    assert HUB in code
    from vd import VersatileDiffusion
    monkeypatch.chdir(tmp_path)
    _research_inputs(2, {"pred_clip_tokens.npy": (2, 257, 16)}, "blurry")
    method = VersatileDiffusion.image_variation
    monkeypatch.setattr(VersatileDiffusion, "image_variation",
                        lambda self, *a, **k: method(self, *a, **{**k, "num_inference_steps": 4, "progress": False}))
    exec(code.replace(f'"{HUB}"', repr(model)), {})
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["image_variation"], uncond_image="zeros")
    tokens = torch.from_numpy(np.load("pred_clip_tokens.npy"))
    for i in range(2):
        want = method(pipe, image_embeds=tokens[i:i + 1], init_image=PIL.Image.open(f"blurry/{i}.png"), strength=0.85,
                      strength_rule="diffusers", scheduler="unipc", num_inference_steps=4, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(i), progress=False).images[0]
        assert image_size(f"mindeye-{i}.png") == (48, 40)
        assert np.array_equal(np.asarray(PIL.Image.open(f"mindeye-{i}.png")), np.asarray(want)), i


def test_mindeye_exact_start_example(model, tmp_path, monkeypatch):
    """The exact-start MindEye example after the first (it uses its pipe and tokens), 4 steps on the tiny model:
    each output is the call from init_latents encode_pixels made of the CLIP-normalised picture, drawn with the
    generator the call then goes on with."""
    from vd import VersatileDiffusion
    from vd import sampling
    monkeypatch.chdir(tmp_path)
    _research_inputs(2, {"pred_clip_tokens.npy": (2, 257, 16)}, "blurry")
    method = VersatileDiffusion.image_variation
    monkeypatch.setattr(VersatileDiffusion, "image_variation",
                        lambda self, *a, **k: method(self, *a, **{**k, "num_inference_steps": 4, "progress": False}))
    names = {}
    exec(python_block("pred_clip_tokens.npy").replace(f'"{HUB}"', repr(model)), names)
    exec(python_block("CLIP_MEAN"), names)
    pipe, tokens = names["pipe"], names["tokens"]
    mean, std = names["CLIP_MEAN"], names["CLIP_STD"]
    for i in range(2):
        pixels = torch.from_numpy(np.array(PIL.Image.open(f"blurry/{i}.png"))).permute(2, 0, 1)[None] / 255
        g = torch.Generator().manual_seed(i)
        x0 = sampling.encode_pixels(pipe.components.vae, (pixels - mean) / std, g)
        want = method(pipe, image_embeds=tokens[i:i + 1], init_latents=x0, strength=0.85, num_inference_steps=4,
                      guidance_scale=3.5, generator=g, progress=False).images[0]
        assert image_size(f"mindeye-exact-{i}.png") == (48, 40)
        assert np.array_equal(np.asarray(PIL.Image.open(f"mindeye-exact-{i}.png")), np.asarray(want)), i


def test_inversion_example(model, monkeypatch):
    """The DDIM inversion example on the tiny model (2 steps) with a 48 x 40 picture, not the default 64 x 64:
    noise of the image latents' shape, and a picture of the image's size from it (no size passed)."""
    from vd import VersatileDiffusion
    method = VersatileDiffusion.text_to_image
    monkeypatch.setattr(VersatileDiffusion, "text_to_image",
                        lambda self, *a, **k: method(self, *a, **{**k, "num_inference_steps": 2, "progress": False}))
    pipe = VersatileDiffusion.from_pretrained(model, tasks=["text_to_image"])
    image = PIL.Image.fromarray((np.random.RandomState(1).rand(48, 40, 3) * 255).astype(np.uint8))
    namespace = {"pipe": pipe, "image": image}
    exec(textwrap.dedent(python_block("ddim_inverse")), namespace)  # (the block is indented in a list item)
    x0, noise = namespace["x0"], namespace["noise"]
    assert x0.shape == noise.shape == (1, 4, 6, 5) and (noise - x0).abs().max() > 0.1
    assert isinstance(namespace["again"], PIL.Image.Image) and namespace["again"].size == (40, 48)


def test_the_sampler_table_names_every_sampler():
    """README's sampler table has one row per name `scheduler=` takes, in the order of vd.sched.SCHEDULERS."""
    from vd.sched import SCHEDULERS
    section = README.split("\n## Samplers\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert rows == list(SCHEDULERS)


def test_documented_signatures_are_the_methods():
    """README's `text_to_image(...)` line names every parameter, and its `from_pretrained(...)` line some, in the
    methods' order and with their defaults (a bare name: one that has no default or must be given)."""
    import inspect

    from vd import VersatileDiffusion
    text = README.replace("\n", " ")
    for name, every in (("text_to_image", True), ("from_pretrained", False)):
        (line,) = re.findall(rf"`{name}\((.*?)\)`", text)
        documented = [re.sub(r"\s+", "", p) for p in line.split(",") if p.strip() != "*"]
        params = inspect.signature(getattr(VersatileDiffusion, name)).parameters
        real = [n for n in params if n not in ("self", "cls")]
        names = [d.split("=")[0] for d in documented]
        assert names == (real if every else [n for n in real if n in names]), name
        for d in documented:
            if "=" in d:
                key, default = d.split("=", 1)
                assert default == repr(params[key].default).replace("'", '"'), d
