"""CLIP context embeddings, the way VD conditions its UNets (vd-reference.md D.1).

Text: all 77 token states are projected and divided by the norm of the pooled (EOS) embedding of their prompt.
Image: all 257 token states go through post_layernorm and the projection, divided by the norm of the class token.
"""

import warnings

import numpy as np
import PIL.Image
import torch
from torch import Tensor

UNCOND_IMAGES = ("grey", "zeros", "diffusers")


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> Tensor:
    """[B, 77, D] context tokens for B prompts; warns once, naming what was cut, if a prompt is too long."""
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
    if full.shape[-1] > max_len:
        dropped = [d for d in tokenizer.batch_decode(full[:, max_len - 1:-1]) if d.strip()]
        warnings.warn(f"prompt longer than CLIP's {max_len} tokens; this part was dropped: {dropped}", stacklevel=3)
    mask = ids.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    out = text_encoder(ids.input_ids.to(device), attention_mask=mask)
    tokens = text_encoder.text_projection(out.last_hidden_state)  # (B, 77, D)
    return tokens / out.text_embeds.unsqueeze(1).norm(dim=-1, keepdim=True)


@torch.no_grad()
def encode_image(image_encoder, pixel_values: Tensor) -> Tensor:
    """[B, 257, D] context tokens for preprocessed images [B, 3, 224, 224]."""
    hidden = image_encoder(pixel_values).last_hidden_state  # (B, 257, hidden)
    tokens = image_encoder.visual_projection(image_encoder.vision_model.post_layernorm(hidden))
    return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)


def to_pil(images: Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB images (rounded), so a tensor and the same image file agree."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in arr]


def pixel_values(processor, images: list[PIL.Image.Image] | Tensor) -> Tensor:
    """CLIP preprocessing (shortest side to 224, centre crop, normalise) of PIL images or a [B, 3, H, W] tensor
    in [0, 1]."""
    return processor(images=to_pil(images) if isinstance(images, Tensor) else images, return_tensors="pt").pixel_values


def uncond_pixel_values(processor, mode: str, batch: int) -> Tensor | None:
    """Pixels of the "no image" condition for classifier-free guidance.

    grey: a mid-grey image: the reference's own input, float 0.5, scaled once (as the 2022 feature extractor
      did; it becomes 127/255 on the way through PIL). This is what the reference means to do.
    diffusers: exactly what diffusers 0.42.1 computes: the processor rescales the float 0.5 by 1/255 a second
      time, so CLIP sees a near-black image (vd-reference.md D.7 #5).
    zeros: no pixels; the original SHI-Labs app uses an all-zero embedding instead.
    """
    if mode == "zeros":
        return None
    grey = [np.zeros((512, 512, 3)) + 0.5] * batch
    return processor(images=grey, do_rescale=mode == "diffusers", return_tensors="pt").pixel_values
