"""CLIP context embeddings, the way VD conditions its UNets.

Text: all 77 token states are projected and divided by the norm of the pooled (EOS) embedding of their prompt.
Image: all 257 token states go through post_layernorm and the projection, divided by the norm of the class token.
Masked image (G.6): per-token weights from a keep-mask scale the tower's input embeddings and its output tokens.
"""

import warnings

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

UNCOND_IMAGES = ("grey", "zeros", "diffusers")
APP_SIDE = 512  # the original app resizes the pictures of blend and image-to-text (and masks) to 512 x 512 first


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> Tensor:
    """[B, 77, D] context tokens for B prompts; warns once, naming what was cut, if a prompt is too long."""
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    # each prompt untruncated and unpadded: a batch may mix long and short prompts (the reference fails on that);
    # verbose=False: transformers would log its own too-long warning beside ours
    untruncated = tokenizer(prompts, verbose=False).input_ids
    dropped = [tokenizer.decode(full[max_len - 1:-1]) for full in untruncated if len(full) > max_len]
    if dropped:
        warnings.warn(f"prompt longer than CLIP's {max_len} tokens; this part was dropped: {dropped}", stacklevel=3)
    mask = ids.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    out = text_encoder(ids.input_ids.to(device), attention_mask=mask)
    tokens = text_encoder.text_projection(out.last_hidden_state)  # (B, 77, D)
    return tokens / out.text_embeds.unsqueeze(1).norm(dim=-1, keepdim=True)


def mask_token_weights(keep: Tensor, patch_size: int, image_size: int) -> Tensor:
    """[B, 1 + (image_size / patch_size)²] weights of CLIP's tokens for keep-masks [B, 1, H, W] in [0, 1] (1 = keep).

    The mask is clamped and resized (bilinear) to the encoder's input size; the class token gets the mean of the
    whole mask, each patch token the mean over its patch, as the original's `_encode_wmask`.
    """
    if keep.ndim != 4 or keep.shape[1] != 1:
        raise ValueError(f"keep must be [B, 1, H, W], got {tuple(keep.shape)}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    m = F.interpolate(keep.clamp(0, 1).float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    whole = m.mean(dim=(1, 2, 3)).unsqueeze(1)  # (B, 1)
    patches = F.avg_pool2d(m, patch_size).flatten(1)  # (B, (image_size / patch_size)²), row-major like CLIP
    return torch.cat([whole, patches], dim=1)


@torch.no_grad()
def encode_image(image_encoder, pixel_values: Tensor, *, token_weights: Tensor | None = None) -> Tensor:
    """[B, 257, D] context tokens for preprocessed images [B, 3, 224, 224].

    token_weights [B, 257] (from `mask_token_weights`) encode masked images: they scale the embeddings (class and
    patches, after the position embeddings, before pre_layrnorm) and again the output tokens. If every weight is 1
    (the whole batch unmasked) the plain path runs, as in the original.
    """
    tower = image_encoder.vision_model
    expected = (pixel_values.shape[0], tower.embeddings.num_positions)
    if token_weights is not None and tuple(token_weights.shape) != expected:
        raise ValueError(f"token_weights must be {expected}, got {tuple(token_weights.shape)}")
    if token_weights is None or bool((token_weights == 1).all()):
        hidden = image_encoder(pixel_values).last_hidden_state  # (B, 257, hidden)
        weights = None
    else:
        embeddings = tower.embeddings(pixel_values)  # (B, 257, hidden)
        weights = token_weights.unsqueeze(-1).to(embeddings)  # (B, 257, 1)
        embeddings = embeddings * weights
        hidden = tower.encoder(inputs_embeds=tower.pre_layrnorm(embeddings)).last_hidden_state
    tokens = image_encoder.visual_projection(tower.post_layernorm(hidden))
    tokens = tokens / tokens[:, :1].norm(dim=-1, keepdim=True)
    return tokens if weights is None else tokens * weights.to(tokens.dtype)


def to_pil(images: Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB images (rounded), so a tensor and the same image file agree."""
    # divergence: the original app converts with torchvision's ToPILImage, which truncates (mul(255).byte())
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in arr]


def pixel_values(processor, images: list[PIL.Image.Image] | Tensor, *, square: bool = False) -> Tensor:
    """CLIP preprocessing (shortest side to 224, centre crop, normalise) of PIL images or a [B, 3, H, W] tensor
    in [0, 1]. square: squash the whole image to 224 x 224 instead of cropping (what the original app does by
    resizing to 512 x 512 first), so that a mask of the whole image lines up with CLIP's patches."""
    pil = to_pil(images) if isinstance(images, Tensor) else images
    if not square:
        return processor(images=pil, return_tensors="pt").pixel_values
    side = processor.crop_size["height"]
    return processor(images=pil, size={"height": side, "width": side}, do_center_crop=False,
                     return_tensors="pt").pixel_values


def squashed_pixel_values(processor, images: list[PIL.Image.Image] | Tensor) -> Tensor:
    """CLIP pixels of images as the original app prepares them for blend and image-to-text: resized to 512 x 512
    (bicubic, on 8-bit pixels) and then to CLIP's square input, the whole picture (squashed, not cropped)."""
    pil = to_pil(images) if isinstance(images, Tensor) else images  # so a tensor and the same picture agree
    return pixel_values(processor, resized(pil, APP_SIDE, APP_SIDE), square=True)


def uncond_pixel_values(processor, mode: str) -> Tensor | None:
    """Pixels [1, 3, 224, 224] of the "no image" condition for classifier-free guidance (one image serves a batch).

    grey: a mid-grey image: the reference's own input, float 0.5, scaled once (as the 2022 feature extractor
      did; it becomes 127/255 on the way through PIL). This is what the reference means to do.
    diffusers: exactly what diffusers 0.42.1 computes: the processor, as its config says, rescales the float 0.5
      by 1/255 a second time (VD's does), so CLIP sees a near-black image.
    zeros: no pixels; the original SHI-Labs app uses an all-zero embedding instead.
    black: an all-black image, the original's "no image" for image-to-text.
    """
    if mode == "zeros":
        return None
    fill = 0.0 if mode == "black" else 0.5
    grey = np.zeros((512, 512, 3)) + fill
    rescale = {} if mode == "diffusers" else {"do_rescale": False}
    return processor(images=[grey], **rescale, return_tensors="pt").pixel_values


def resized(images: list[PIL.Image.Image] | Tensor, height: int, width: int) -> Tensor:
    """Images as a float tensor [B, 3, height, width] in [0, 1], resized bicubic (as the original, 8-bit
    PIL images are resized by PIL; tensors by torch)."""
    if isinstance(images, Tensor):
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images.float(), size=(height, width), mode="bicubic", antialias=True)
        return images.float().clamp(0, 1)
    arrays = [np.asarray(im.convert("RGB").resize((width, height), PIL.Image.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255
