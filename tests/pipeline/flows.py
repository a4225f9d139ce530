"""What the pipeline tests share: the tiny model's tasks, a spy on the core's loop, a counting noise predictor, and
CLIP tokens computed by hand (vd.conditioning), to check the facade against manual compositions."""

from types import SimpleNamespace

import PIL.Image
import pytest
import torch

import tiny_pipeline as tp
from vd import sampling as core
from vd.conditioning import encode_image, encode_text, mask_token_weights, pixel_values
from vd.tasks import TASKS

ALL_TASKS = list(TASKS)  # every flow, and encode_text_latents
TEXT_TASKS = ["image_to_text", "text_variation"]
LATENT = tp.OPTIMUS.latent_dim  # 24: the tiny text UNet's features
FAST = dict(num_inference_steps=2, progress=False)
CPU, F32 = torch.device("cpu"), torch.float32


def same_layers(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.fixture
def captured(monkeypatch):
    """Every call of the core's loop (vd.sampling.denoise): its model, streams, start and skip (it still runs)."""
    calls = []
    original = core.denoise

    def spy(model, streams, x, s):
        skip = 0 if s.t_enc is None else s.num_steps - s.t_enc
        calls.append(SimpleNamespace(model=model, streams=streams, start=x, skip=skip, sampling=s))
        return original(model, streams, x, s)

    monkeypatch.setattr(core, "denoise", spy)
    return calls


class Counting:
    """Wraps a noise predictor and records the timestep of every call."""

    def __init__(self, inner):
        self.inner, self.ts = inner, []

    def __call__(self, x, t, streams):
        self.ts.append(int(t))
        return self.inner(x, t, streams)


def clip_image(pipe, imgs, *, squash=False, keep=None) -> torch.Tensor:
    """CLIP tokens of PIL images: centre-cropped, or (squash) as the original app shows them: resized to 512 x 512
    (bicubic), then squashed to CLIP's square input."""
    if squash:
        imgs = [im.convert("RGB").resize((512, 512), PIL.Image.Resampling.BICUBIC) for im in imgs]
    pixels = pixel_values(pipe.components.image_processor, imgs, square=squash)
    tw = None
    if keep is not None:
        tw = mask_token_weights(keep, pipe.components.image_encoder.config.patch_size, pixels.shape[-1])
    return encode_image(pipe.components.image_encoder, pixels, token_weights=tw)


def clip_text(pipe, texts) -> torch.Tensor:
    return encode_text(pipe.components.text_encoder, pipe.components.tokenizer, texts, CPU)


def max_abs_diff(a, b) -> float:
    """The largest absolute difference of two arrays of the same shape (the parity tests' measure)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(abs(a - b).max())
