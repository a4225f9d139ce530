"""Samplers for VD: DDIM (the shipped default), PNDM/PLMS and LMS, each a frozen config with `sample()`."""

from collections.abc import Mapping
from typing import Any

from .ddim import DDIM
from .lms import LMS
from .noise import randn
from .pndm import PNDM

SAMPLERS: dict[str, type[DDIM] | type[PNDM] | type[LMS]] = {"ddim": DDIM, "pndm": PNDM, "lms": LMS}


def sampler_from_config(name: str, config: Mapping[str, Any]) -> DDIM | PNDM | LMS:
    """The sampler `name` built from a raw scheduler_config.json dict (any sampler from VD's DDIM config)."""
    if name not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name].from_config(config)


__all__ = ["DDIM", "LMS", "PNDM", "SAMPLERS", "randn", "sampler_from_config"]
