"""Our sampler names and the diffusers 0.42.1 class (and the one from_config override) each one equals; the stand-in
model the sampler tests run them on, and diffusers' loop over it."""

import torch

from diffusers import (DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DEISMultistepScheduler,
                       DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

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
# every name: the new ones and the original three, each the class as it is (no override)
EVERY = {**REF, "ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}), "lms": (LMSDiscreteScheduler, {})}
STOCHASTIC = {"ddpm", "euler_a", "dpm2_a", "dpm2_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2s_sde",
              "dpmpp_2s_sde_karras"}


def fake_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap smooth nonlinear stand-in for the UNet, depending on both x and t."""
    return 0.1 * x * torch.cos(t.to(x.dtype) / 100) + 0.05 * torch.sin(x)


def reference_run(sched, x, n, generator=None):
    """diffusers' pipeline loop over `fake_eps`: every (t, model input) and every x after a step."""
    sched.set_timesteps(n)
    x = x * sched.init_noise_sigma
    calls, xs = [], []
    kw = {"generator": generator} if generator is not None else {}
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        calls.append((t, inp))
        x = sched.step(fake_eps(inp, t), t, x, **kw).prev_sample
        xs.append(x)
    return calls, xs
