"""Samplers for VD, each a frozen config with `sample()`: DDIM (the shipped default), PNDM/PLMS, LMS, DDPM, Euler,
Euler ancestral, Heun, DPM-Solver++(2M) (also SDE), UniPC; the "_karras" ones use Karras et al.'s sigmas.

Words: a *sampler* is one of these classes, a loop over a noise schedule (`Schedule`, the fields they share with
scheduler_config.json). The user picks one by name with `scheduler=` / `--scheduler` (diffusers' word for the same
thing); `SCHEDULERS` maps those names to the classes."""

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

# every scheduler name -> its sampler class; diffusers' equivalent in the README's sampler table
SCHEDULERS: dict[str, type[Sampler]] = {
    "ddim": DDIM,
    "pndm": PNDM,
    "lms": LMS,
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


__all__ = ["DDIM", "DDPM", "DPMSolverPP", "Euler", "EulerAncestral", "Heun", "LMS", "PNDM", "SCHEDULERS",
           "Sampler", "UniPC", "randn", "sampler_from_config"]
