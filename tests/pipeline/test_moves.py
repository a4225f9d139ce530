"""`pipe.to`: a pipeline cast (or moved) gives what a pipeline loaded that way gives, and a bad argument fails
before anything moves. Only the CPU is here, so the casts stand for the moves: both go through the same code."""

import numpy as np
import pytest
import torch

import vd.pipeline
from flows import ALL_TASKS
from helpers import random_image, rel_err, seeded
from vd import VersatileDiffusion

KW = dict(num_inference_steps=3, progress=False)
IMG = random_image(0)


def _outputs(pipe: VersatileDiffusion) -> tuple:
    """One image flow, one text flow and encode_text_latents: between them, every model."""
    images = pipe.dual_guided("the cat", IMG, generator=seeded(1), output_type="np", **KW).images
    texts = pipe.image_to_text(IMG, generator=seeded(2), **KW)
    return images, texts.latents, pipe.encode_text_latents("the cat")


def _equal(a: tuple, b: tuple) -> bool:
    return np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def _weights(pipe: VersatileDiffusion) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every model, cloned."""
    return {f"{name}.{k}": v.detach().clone() for name, m in vars(pipe.components).items()
            if isinstance(m, torch.nn.Module) for k, v in [*m.named_parameters(), *m.named_buffers()]}


def test_cast_gives_what_loading_in_that_dtype_gives(folder, check):
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=ALL_TASKS, device="cpu")
    before, weights = _outputs(pipe), _weights(pipe)
    assert pipe.to(torch.float64) is pipe and pipe.dtype == torch.float64
    assert repr(pipe) == (f"VersatileDiffusion(tasks={ALL_TASKS}, device='cpu', dtype=torch.float64, "
                          "scheduler='ddim', uncond_image='grey')")
    cast = _outputs(pipe)
    loaded = VersatileDiffusion.from_pretrained(folder, tasks=ALL_TASKS, device="cpu", dtype=torch.float64)
    assert _equal(cast, _outputs(loaded))
    assert not np.array_equal(cast[0], before[0])  # float64 draws other noise: the cast took effect
    # float32 -> float64 -> float32 loses nothing: every weight is what it was, bit for bit
    assert pipe.to("cpu", torch.float32) is pipe and pipe.dtype == torch.float32
    again = _weights(pipe)
    assert again.keys() == weights.keys() and len(weights) > 100
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in weights.items())
    # and so are the outputs, up to float32 rounding: the weights now lie at other memory alignments, where Intel
    # MKL (torch's x86 BLAS) may round the same product differently (an AMD EPYC: 2.1e-6 in the text latents)
    for got, want, what in zip(_outputs(pipe), before, ("images", "text latents", "encoded text")):
        check(rel_err(torch.as_tensor(got), torch.as_tensor(want)), 1e-5, what)


def test_torch_dtype_is_diffusers_name_for_dtype(folder):
    """`from_pretrained(..., torch_dtype=...)`, as diffusers' examples load: the same as dtype=; not both."""
    pipe = VersatileDiffusion.from_pretrained(folder, tasks=["text_to_image"], device="cpu", torch_dtype=torch.float64)
    floating = [w for w in _weights(pipe).values() if w.is_floating_point()]
    assert pipe.dtype == torch.float64 and floating and all(w.dtype == torch.float64 for w in floating)
    with pytest.raises(TypeError, match=r"^dtype and torch_dtype \(diffusers' name for dtype\) were both given"):
        VersatileDiffusion.from_pretrained(folder, dtype=torch.float32, torch_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"^torch_dtype: expected a torch.dtype: torch.float16, .* got 'float16'"):
        VersatileDiffusion.from_pretrained(folder, torch_dtype="float16")


def test_bad_arguments_move_nothing(pipe):
    want = pipe.text_to_image("the cat", generator=seeded(3), output_type="np", **KW).images
    with pytest.raises(TypeError, match=r"dtype: expected a torch.dtype: torch.float16, .* got 'float16'"):
        pipe.to("cpu", "float16")
    with pytest.raises(ValueError, match=r"dtype: expected torch.float16, torch.bfloat16, torch.float32 or "
                                         r"torch.float64, got torch.int64"):
        pipe.to(torch.int64)
    with pytest.raises(ValueError, match=r"device: expected a device name .*got 'gpu'"):
        pipe.to("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: expected a device this machine has \(CUDA is not available"):
            pipe.to("cuda", torch.float16)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert np.array_equal(pipe.text_to_image("the cat", generator=seeded(3), output_type="np", **KW).images, want)


def test_a_move_chooses_the_fast_path_from_the_load_options(folder, monkeypatch):
    """The options from_pretrained was given reach the new device's choice unresolved: a CPU load leaves
    cuda_graphs and triton_kernels at None (on for CUDA, tests/nn/test_fast_path.py), so a move to CUDA runs fast."""
    pipe = VersatileDiffusion.from_pretrained(folder, tasks="text_to_image", device="cpu")
    seen = []
    monkeypatch.setattr(vd.pipeline, "fast_path", lambda device, **kw: seen.append((device, kw)) or (False, False))
    pipe.to(torch.float64)
    assert seen == [(torch.device("cpu"), dict(compile=False, cuda_graphs=None, triton_kernels=None))]
