"""The software versions a result depends on to the last bit: `vd --version` shows them, `vd batch` records them."""

from importlib import metadata

import torch

from vd import __version__


def versions() -> dict[str, str]:
    """vd, torch (its tag names the build: +cpu, +cu128...), its CUDA where built with one, and transformers (the
    CLIP encoders and tokenizer)."""
    out = {"vd": __version__, "torch": torch.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    out["transformers"] = metadata.version("transformers")
    return out
