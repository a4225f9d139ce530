"""The tiny model every pipeline test module loads (once per module), with every flow's weights."""

import pytest

import tiny_pipeline as tp
from flows import ALL_TASKS, captured  # noqa: F401 - `captured` is a fixture for the modules here
from vd import VersatileDiffusion


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd")


@pytest.fixture(scope="module")
def pipe(folder):
    return VersatileDiffusion.from_pretrained(folder, tasks=ALL_TASKS, device="cpu")


@pytest.fixture(scope="module")
def ours(folder):
    """For parity with the reference: its "no image" condition (our default, a true grey, is tested apart)."""
    return VersatileDiffusion.from_pretrained(folder, uncond_image="diffusers")
