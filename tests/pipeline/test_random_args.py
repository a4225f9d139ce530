"""Randomised arguments (valid and invalid, from a seeded generator) for the three tasks, then for blend and the
text flows: every call either returns the requested number of images (of the requested size) or texts, or raises
ValueError or TypeError."""

import random

import numpy as np
import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from vd import VersatileDiffusion

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:prompt longer")

CALLS = 80


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return VersatileDiffusion.from_pretrained(tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("t") / "vd"))


def _image(rng: random.Random):
    h, w = rng.choice([(16, 16), (40, 24), (64, 96)])
    arr = np.random.RandomState(rng.randrange(1000)).rand(h, w, 3)
    kind = rng.choice(["pil", "pil", "list", "tensor", "bad"])
    if kind == "pil":
        return PIL.Image.fromarray((arr * 255).astype(np.uint8))
    if kind == "list":
        return [PIL.Image.fromarray((arr * 255).astype(np.uint8))] * rng.choice([1, 2])
    if kind == "tensor":
        return torch.from_numpy(arr).permute(2, 0, 1)[None].float() * rng.choice([1.0, 1.0, 255.0])
    return rng.choice(["img.png", None, 3, [], torch.zeros(3, 8, 8)])


def _arguments(rng: random.Random) -> tuple[str, dict]:
    task = rng.choice(["text_to_image", "image_variation", "dual_guided"])
    pick = lambda good, bad: rng.choice(good) if rng.random() < 0.93 else rng.choice(bad)  # noqa: E731
    kw = dict(
        num_inference_steps=pick([1, 2], [0, -3, 1.5, "2"]),
        guidance_scale=pick([0.0, 1.0, 3.0, 7.5], [-1.0, float("nan"), "high"]),
        num_images_per_prompt=pick([1, 2], [0, 1.0]),
        height=pick([None, 32, 48], [12, 0, "64"]),
        width=pick([None, 40, 64], [7, -8]),
        eta=pick([0.0, 0.5], [-1.0]),
        scheduler=pick(["ddim", "pndm", "lms"], ["k_euler", None, 5]),
        output_type=pick(["np", "pil", "pt"], ["png", None]),
        progress=False,
    )
    if task != "image_variation":
        kw["prompt"] = pick(["the cat", ["a", "the dog"]], [[], 5, ["a", None]])
    if task != "text_to_image":
        kw["image"] = _image(rng)
    if task == "dual_guided":
        kw["text_to_image_strength"] = pick([0.0, 0.4, 1.0], [1.2, -0.5])
    if task == "text_to_image" and rng.random() < 0.3:
        kw["negative_prompt"] = pick(["blurry"], [["a", "b", "c"], 3])
    return task, kw


def _expected(task: str, kw: dict) -> tuple[int, int, int]:
    def count(v):
        return len(v) if isinstance(v, list) else (v.shape[0] if isinstance(v, torch.Tensor) else 1)
    batch = count(kw["prompt"] if task != "image_variation" else kw["image"])
    return batch * kw["num_images_per_prompt"], kw["height"] or 64, kw["width"] or 64


def test_random_arguments(pipe):
    rng = random.Random(1234)
    outcomes = {"images": 0, "ValueError": 0, "TypeError": 0}
    for _ in range(CALLS):
        task, kw = _arguments(rng)
        try:
            images = getattr(pipe, task)(**kw).images
        except (ValueError, TypeError) as e:
            outcomes[type(e).__name__] += 1
            continue
        n, h, w = _expected(task, kw)
        if kw["output_type"] == "pil":
            assert len(images) == n and all(im.size == (w, h) for im in images)
        elif kw["output_type"] == "np":
            assert images.shape == (n, h, w, 3) and np.isfinite(images).all()
        else:
            assert tuple(images.shape) == (n, 3, h, w)
        outcomes["images"] += 1
    # the generator really exercises both sides
    assert outcomes["images"] >= 10 and outcomes["ValueError"] >= 10 and outcomes["TypeError"] >= 5, outcomes


def _flow_arguments(rng: random.Random) -> tuple[str, dict, int]:
    """A blend, image_to_text or text_variation call, and the number of outputs it asks for."""
    task = rng.choice(["blend", "image_to_text", "text_variation"])
    pick = lambda good, bad: rng.choice(good) if rng.random() < 0.9 else rng.choice(bad)  # noqa: E731

    def picture() -> PIL.Image.Image:
        h, w = rng.choice([(16, 16), (40, 24)])
        return PIL.Image.fromarray((np.random.RandomState(rng.randrange(99)).rand(h, w, 3) * 255).astype(np.uint8))

    kw = dict(num_inference_steps=pick([1, 2], [0, "2", 1.5]), guidance_scale=pick([1.0, 4.0], [-1.0, float("nan")]),
              eta=pick([0.0, 0.5], [-0.2]), scheduler=pick([None, "ddim", "dpmpp_2m", "euler_a"], ["bogus", 3]),
              progress=False)
    per_call = pick([1, 2], [0, 1.0])
    if task == "blend":
        n = rng.randint(1, 4)
        kw["images"] = pick([[picture() for _ in range(n)]], [[], [picture()] * 5, "x.png", None])
        if rng.random() < 0.5:
            kw["weights"] = pick([[rng.choice([0.5, 1.0]) for _ in range(n)]], [[1.0] * (n + 1), [-1.0] * n, "1"])
        if rng.random() < 0.3:
            kw["focus"] = pick([0.3, [0.5] * n], [2.0, [0.5] * (n + 2)])
        if rng.random() < 0.4:
            kw.update(prompt=pick(["a cat"], [5, ["a", "b"]]), text_strength=pick([0.0, 0.3], [1.5, -0.1]))
        kw.update(num_images_per_prompt=per_call, output_type=pick(["np", "pil", "pt"], ["jpg"]),
                  height=pick([None, 32], [12]), width=pick([None, 48], [0]))
        return task, kw, per_call
    kw.update(num_texts_per_prompt=per_call, temperature=pick([1.0, 0.7], [0.0, float("inf")]),
              top_k=pick([0, 5], [-1, 2.5]), top_p=pick([1.0, 0.9], [0.0, 1.5]), max_length=pick([5, 30], [0, "30"]),
              greedy=pick([False, True], ["yes"]))
    if task == "image_to_text":
        kw["image"] = pick([picture(), [picture(), picture()]], [None, [], "a"])
        inputs = len(kw["image"]) if isinstance(kw["image"], list) else 1
    else:
        kw["prompt"] = pick(["a cat", ["a cat", "the dog"]], [None, [], 5])
        inputs = len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1
        if rng.random() < 0.3:
            kw["negative_prompt"] = pick(["blurry"], [3, ["a", "b", "c"]])
    return task, kw, inputs * per_call if isinstance(per_call, int) else 0


@pytest.fixture(scope="module")
def flows(folder):
    return VersatileDiffusion.from_pretrained(folder, tasks=["blend", "image_to_text", "text_variation"])


def test_random_flow_arguments(flows):
    rng = random.Random(4321)
    outcomes = {"outputs": 0, "ValueError": 0, "TypeError": 0}
    for i in range(CALLS):
        task, kw, n = _flow_arguments(rng)
        try:
            out = getattr(flows, task)(**kw, generator=torch.Generator().manual_seed(i))
        except (ValueError, TypeError) as e:
            outcomes[type(e).__name__] += 1
            continue
        if task == "blend":
            assert len(out.images) == n
        else:
            assert len(out.texts) == n and all(isinstance(t, str) for t in out.texts)
        outcomes["outputs"] += 1
    assert outcomes["outputs"] >= 10 and outcomes["ValueError"] >= 10 and outcomes["TypeError"] >= 5, outcomes
