"""Samplers for VD, each a frozen config with `sample()`: DDIM (the shipped default), PNDM/PLMS, LMS, DDPM, Euler,
Euler ancestral, Heun, DPM-Solver-2 (also ancestral), DPM-Solver++ (2M and 2S, each also SDE), UniPC, DEIS; the
"_karras" ones use Karras et al.'s sigmas; and DDIM inversion (image latents to noise).

Words: a *sampler* is one of these classes, a loop over a noise schedule (`Schedule`, the fields they share with
scheduler_config.json). The user picks one by name with `scheduler=` / `--scheduler` (diffusers' word for the same
thing); `SCHEDULERS` maps those names to the classes."""

from collections.abc import Mapping
from typing import Any

from .common import stated
from .ddim import DDIM
from .ddim_inverse import DDIMInverse
from .ddpm import DDPM
from .deis import DEIS, DEISKarras
from .dpm2 import DPM2, DPM2Ancestral, DPM2AncestralKarras, DPM2Karras
from .dpmpp import DPMSolverPP, DPMSolverPPKarras, DPMSolverPPSDE, DPMSolverPPSDEKarras
from .dpmpp_singlestep import (DPMSolverPPSinglestep, DPMSolverPPSinglestepKarras, DPMSolverPPSinglestepSDE,
                               DPMSolverPPSinglestepSDEKarras)
from .euler import Euler, EulerAncestral, EulerKarras
from .heun import Heun, HeunKarras
from .lms import LMS, LMSKarras
from .noise import randn
from .pndm import PNDM
from .unipc import UniPC, UniPCKarras

Sampler = (DDIM | PNDM | LMS | DDPM | Euler | EulerAncestral | Heun | DPM2 | DPMSolverPP | DPMSolverPPSinglestep | UniPC
           | DEIS | DDIMInverse)

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
    "dpm2": DPM2,
    "dpm2_karras": DPM2Karras,
    "dpm2_a": DPM2Ancestral,
    "dpm2_a_karras": DPM2AncestralKarras,
    "dpmpp_2m": DPMSolverPP,
    "dpmpp_2m_karras": DPMSolverPPKarras,
    "dpmpp_2m_sde": DPMSolverPPSDE,
    "dpmpp_2m_sde_karras": DPMSolverPPSDEKarras,
    "dpmpp_2s": DPMSolverPPSinglestep,
    "dpmpp_2s_karras": DPMSolverPPSinglestepKarras,
    "dpmpp_2s_sde": DPMSolverPPSinglestepSDE,
    "dpmpp_2s_sde_karras": DPMSolverPPSinglestepSDEKarras,
    "unipc": UniPC,
    "unipc_karras": UniPCKarras,
    "deis": DEIS,
    "deis_karras": DEISKarras,
    "ddim_inverse": DDIMInverse,
}

# the names that run from noise to a picture or a text; "ddim_inverse" runs the other way, and what it makes (noise)
# is returned only by the Python API's output_type="latent": the command line and batch jobs refuse it
GENERATING = [name for name in SCHEDULERS if name != "ddim_inverse"]

# the form a config's own use_karras_sigmas=True or algorithm_type="sde-dpmsolver++" gives a name, as diffusers'
# class reads those keys (a config saved from a Karras or SDE pipeline)
KARRAS_FORM = {"euler": "euler_karras", "heun": "heun_karras", "lms": "lms_karras", "dpm2": "dpm2_karras",
               "dpm2_a": "dpm2_a_karras", "dpmpp_2m": "dpmpp_2m_karras",
               "dpmpp_2m_sde": "dpmpp_2m_sde_karras", "dpmpp_2s": "dpmpp_2s_karras",
               "dpmpp_2s_sde": "dpmpp_2s_sde_karras", "unipc": "unipc_karras", "deis": "deis_karras"}
SDE_FORM = {"dpmpp_2m": "dpmpp_2m_sde", "dpmpp_2m_karras": "dpmpp_2m_sde_karras", "dpmpp_2s": "dpmpp_2s_sde",
            "dpmpp_2s_karras": "dpmpp_2s_sde_karras"}

# diffusers' scheduler classes -> our names (a Karras or SDE form comes from the config's own keys, as above)
DIFFUSERS_CLASSES = {
    "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "LMSDiscreteScheduler": "lms", "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm2", "KDPM2AncestralDiscreteScheduler": "dpm2_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "UniPCMultistepScheduler": "unipc", "DEISMultistepScheduler": "deis", "DDIMInverseScheduler": "ddim_inverse",
}


def scheduler_of(config: Mapping[str, Any]) -> str:
    """The sampler a scheduler_config.json names by its diffusers `_class_name` ("ddim" if it names none: VD's), so
    that a folder saved from a pipeline with another scheduler runs that one, as diffusers loads it."""
    name = config.get("_class_name")
    if name is None:
        return "ddim"
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"the checkpoint's scheduler is {name!r}, which vd does not have; pass scheduler= one of "
                         f"{sorted(SCHEDULERS)}")
    return DIFFUSERS_CLASSES[name]


def sampler_from_config(name: str, config: Mapping[str, Any]) -> Sampler:
    """The sampler `name` built from a raw scheduler_config.json dict (any sampler from VD's DDIM config), as
    diffusers' `XScheduler.from_config(config)` with the name's one override (`use_karras_sigmas=True`, ...).
    A config that asks for Karras sigmas or the SDE form itself gets it."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    given = stated(config)
    if given.get("use_karras_sigmas") is True:
        name = KARRAS_FORM.get(name, name)
    if isinstance(given.get("algorithm_type"), str) and given["algorithm_type"] == "sde-dpmsolver++":
        name = SDE_FORM.get(name, name)
    return SCHEDULERS[name].from_config(config)


__all__ = ["DDIM", "DDIMInverse", "DDPM", "DEIS", "DPM2", "DPMSolverPP", "DPMSolverPPSinglestep", "Euler",
           "EulerAncestral", "GENERATING", "Heun", "LMS", "PNDM", "SCHEDULERS", "Sampler", "UniPC", "randn",
           "sampler_from_config", "scheduler_of"]
