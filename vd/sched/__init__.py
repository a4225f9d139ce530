"""Samplers for VD, each a frozen config with `sample()`: DDIM (the shipped default), PNDM/PLMS, LMS, DDPM, Euler,
Euler ancestral, Heun, DPM-Solver++(2M) (also SDE), UniPC; the "_karras" ones use Karras et al.'s sigmas."""

from collections.abc import Mapping
from typing import Any

from .ddim import DDIM
from .ddpm import DDPM
from .dpmpp import DPMSolverPP, DPMSolverPPKarras, DPMSolverPPSDE, DPMSolverPPSDEKarras
from .euler import Euler, EulerAncestral, EulerKarras
from .heun import Heun, HeunKarras
from .lms import LMS, LMSKarras
from .noise import randn
from .pndm import PNDM
from .unipc import UniPC

Sampler = DDIM | PNDM | LMS | DDPM | Euler | EulerAncestral | Heun | DPMSolverPP | UniPC

# the original three (kept as they were for their tests; SCHEDULERS is the registry of every name)
SAMPLERS: dict[str, type[DDIM] | type[PNDM] | type[LMS]] = {"ddim": DDIM, "pndm": PNDM, "lms": LMS}

# every scheduler name -> its class; diffusers' equivalent in the README's sampler table
SCHEDULERS: dict[str, type[Sampler]] = {
    **SAMPLERS,
    "lms_karras": LMSKarras,
    "ddpm": DDPM,
    "euler": Euler,
    "euler_karras": EulerKarras,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "heun_karras": HeunKarras,
    "dpmpp_2m": DPMSolverPP,
    "dpmpp_2m_karras": DPMSolverPPKarras,
    "dpmpp_2m_sde": DPMSolverPPSDE,
    "dpmpp_2m_sde_karras": DPMSolverPPSDEKarras,
    "unipc": UniPC,
}


def sampler_from_config(name: str, config: Mapping[str, Any]) -> Sampler:
    """The sampler `name` built from a raw scheduler_config.json dict (any sampler from VD's DDIM config), as
    diffusers' `XScheduler.from_config(config)` with the name's one override (`use_karras_sigmas=True`, ...)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].from_config(config)


__all__ = ["DDIM", "DDPM", "DPMSolverPP", "Euler", "EulerAncestral", "Heun", "LMS", "PNDM", "SAMPLERS", "SCHEDULERS",
           "Sampler", "UniPC", "randn", "sampler_from_config"]
