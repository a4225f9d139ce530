"""Which checkpoint parts each task needs (the original's per-application weights, in our terms): the facade's
knowledge, handed to `weights_convert` as a list of parts, so that a task opens, checks and reads nothing else.

Text-to-image never touches the 1.44 B data parameters of the text UNet; only the text flows need them and the
Optimus decoder.
"""

from collections.abc import Iterable

from weights_convert.checkpoint import ALL_PARTS

_DUAL = ("image_unet.global", "image_unet.data", "image_unet.context", "text_unet.context", "vae.encoder",
         "vae.decoder", "text_encoder", "image_encoder")
TASK_PARTS = {  # the image flows take the VAE encoder (34 M) for init images and fidelity
    "text_to_image": ("image_unet.global", "image_unet.data", "text_unet.context", "vae.encoder", "vae.decoder",
                      "text_encoder"),
    "image_variation": ("image_unet.global", "image_unet.data", "image_unet.context", "vae.encoder", "vae.decoder",
                        "image_encoder"),
    "dual_guided": _DUAL,
    "blend": _DUAL,
    "image_to_text": ("image_unet.global", "image_unet.context", "text_unet.data", "image_encoder",
                      "optimus.decoder"),
    "text_variation": ("image_unet.global", "text_unet.data", "text_unet.context", "text_encoder",
                       "optimus.decoder"),
    "encode_text_latents": ("optimus.encoder",),  # not a flow: Optimus' encoder, for vd's encode_text_latents
}
TASKS = tuple(TASK_PARTS)


def parts_for(tasks: Iterable[str]) -> tuple[str, ...]:
    """The parts the given tasks need, in canonical order."""
    tasks = list(tasks)
    for t in tasks:
        if t not in TASK_PARTS:
            raise ValueError(f"tasks: unknown task {t!r}; expected some of {list(TASKS)}")
    need = {p for t in tasks for p in TASK_PARTS[t]}
    return tuple(p for p in ALL_PARTS if p in need)
