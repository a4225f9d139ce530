"""The full-size presets, built on the meta device, have exactly the real checkpoints' names, shapes and counts."""

import json

import pytest
import torch

from manifests import MANIFESTS, read_manifest
from vd.nn import VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE, AutoencoderKL, UNet, UNetConfig, VAEConfig

PRESETS = {
    "image_unet": lambda: UNet(VD_IMAGE_UNET),
    "text_unet": lambda: UNet(VD_TEXT_UNET),
    "vae": lambda: AutoencoderKL(VD_VAE),
}
COUNTS = {"image_unet": 859_520_964, "text_unet": 1_708_848_448, "vae": 83_653_863}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_manifest(name):
    with torch.device("meta"):
        model = PRESETS[name]()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_manifest(name)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name]
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_real_configs_map_to_presets():
    """The shipped config.json files map onto exactly our presets."""
    load = lambda c: json.loads((MANIFESTS / "configs" / c / "config.json").read_text())  # noqa: E731
    assert UNetConfig.from_diffusers(load("image_unet")) == VD_IMAGE_UNET
    assert UNetConfig.from_diffusers(load("text_unet")) == VD_TEXT_UNET
    assert VAEConfig.from_diffusers(load("vae")) == VD_VAE


def test_context_sites():
    """16 context layers per UNet, in the same order and widths in both."""
    with torch.device("meta"):
        image = UNet(VD_IMAGE_UNET, parts=frozenset({"context"}))
        text = UNet(VD_TEXT_UNET, parts=frozenset({"context"}))
    assert VD_IMAGE_UNET.num_context_sites == 16
    widths = [t.norm.num_channels for t in image.context_layers()]
    assert widths == [t.norm.num_channels for t in text.context_layers()]
    assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    assert sum(p.numel() for p in text.parameters()) == 267_239_360
