"""Our sampler names and the diffusers 0.42.1 class (and the one from_config override) each one equals."""

from diffusers import (DDIMInverseScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler, UniPCMultistepScheduler)

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# our name -> the diffusers class and the one from_config override a user passes
REF = {
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, KARRAS),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "heun_karras": (HeunDiscreteScheduler, KARRAS),
    "lms_karras": (LMSDiscreteScheduler, KARRAS),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_karras": (KDPM2DiscreteScheduler, KARRAS),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm2_a_karras": (KDPM2AncestralDiscreteScheduler, KARRAS),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, KARRAS),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, SDE),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}),
    "dpmpp_2s_karras": (DPMSolverSinglestepScheduler, KARRAS),
    "dpmpp_2s_sde": (DPMSolverSinglestepScheduler, SDE),
    "dpmpp_2s_sde_karras": (DPMSolverSinglestepScheduler, {**SDE, **KARRAS}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc_karras": (UniPCMultistepScheduler, KARRAS),
    "deis": (DEISMultistepScheduler, {}),
    "deis_karras": (DEISMultistepScheduler, KARRAS),
    "ddim_inverse": (DDIMInverseScheduler, {}),
}
NEW = sorted(REF)
STOCHASTIC = {"ddpm", "euler_a", "dpm2_a", "dpm2_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2s_sde",
              "dpmpp_2s_sde_karras"}
