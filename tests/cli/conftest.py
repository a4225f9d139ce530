"""What the command-line tests share."""

import pytest

import tiny_pipeline as tp


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The tiny random model's folder (diffusers layout, written by diffusers), as a command-line argument."""
    return str(tp.save(tp.build_components(seed=0), tmp_path_factory.mktemp("tiny") / "vd"))
