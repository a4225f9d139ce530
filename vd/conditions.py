"""A flow's conditions as context tokens: its prompts and images, or their tokens given as tensors (`*_embeds`),
checked and encoded into the [uncond; cond] batch that classifier-free guidance runs (vd.sampling.guided_tokens).

Text: CLIP's 77 token states per prompt (vd.conditioning.encode_text); "no text" is the empty prompt or a negative.
Image: CLIP's 257 token states per image, focus-adjusted (vd.focus); "no image" is a negative image, a grey or
black image, or zeros (UNCOND_IMAGES). Each method says what it returns; none runs a model before its checks.
"""

import PIL.Image
import torch
from torch import Tensor

from vd import checks
from vd.conditioning import (encode_image, encode_text, mask_token_weights, pixel_values, squashed_pixel_values,
                             uncond_pixel_values)
from vd.focus import adjust_focus
from vd.loading import Components
from vd.sampling import Generator, Sampling, blend_tokens, guided_tokens


class Conditions:
    """Checks and encodes conditions with the loaded CLIP towers, on `device` in `dtype`."""

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype):
        self.components, self.device, self.dtype = components, device, dtype

    def text_arg(self, name: str, prompt: object, embeds: object, batch: int | None = None) -> list[str] | Tensor:
        """Prompts as a list of strings, or their tokens [B, 77, D] as given in `{name}_embeds`."""
        if embeds is None:
            if prompt is None:
                checks.fail(name, prompt, f"a string, a list of strings, or {name}_embeds", TypeError)
            return checks.prompts(name, prompt)
        if prompt is not None:
            checks.fail(f"{name}_embeds", embeds, f"None when {name} is given (one or the other)")
        return checks.tokens(f"{name}_embeds", embeds, self.text_token_shape, self.device, batch=batch)

    def image_arg(self, name: str, image: object, embeds: object) -> list[PIL.Image.Image] | Tensor:
        """Images (a list of PIL images or a [B, 3, H, W] tensor), or their tokens [B, 257, D] from image_embeds."""
        if embeds is None:
            if image is None:
                checks.fail(name, image, "a PIL image, a list of them, a [B, 3, H, W] tensor, or image_embeds",
                            TypeError)
            return checks.images(name, image)
        if image is not None:
            checks.fail("image_embeds", embeds, f"None when {name} is given (one or the other)")
        return checks.tokens("image_embeds", embeds, self.image_token_shape, self.device)

    def negative_text(self, negative: object, embeds: object, batch: int) -> list[str] | Tensor | None:
        if embeds is None:
            return checks.negative("negative_prompt", negative, batch, "text")
        if negative is not None:
            checks.fail("negative_prompt_embeds", embeds, "None when negative_prompt is given (one or the other)")
        return checks.tokens("negative_prompt_embeds", embeds, self.text_token_shape, self.device, batch=(1, batch))

    def negative_image(self, negative: object, embeds: object, batch: int) -> list | Tensor | None:
        if embeds is None:
            return checks.negative("negative_prompt", negative, batch, "image")
        if negative is not None:
            checks.fail("negative_image_embeds", embeds, "None when negative_prompt is given (one or the other)")
        return checks.tokens("negative_image_embeds", embeds, self.image_token_shape, self.device, batch=(1, batch))

    @property
    def text_token_shape(self) -> tuple[int, int]:
        """(tokens, width) of a prompt's context: the tokenizer's padded length (CLIP's 77), the text UNet's context
        width."""
        length = self.components.tokenizer.model_max_length
        return length, self.components.text_unet.config.context_dim[0]

    @property
    def image_token_shape(self) -> tuple[int, int]:
        cfg = self.components.image_encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1, self.components.image_unet.config.context_dim[0]

    def text_tokens(self, cond: list[str] | Tensor, negative: list[str] | Tensor | None, per_prompt: int,
                    s: Sampling) -> Tensor:
        """Text tokens of a call: [uncond; cond], each repeated for the samples of its prompt (cond alone when
        unguided); "no text" is `negative`, or else the empty prompt."""
        cond = self.text_embeds(cond).repeat_interleave(per_prompt, dim=0)
        if not s.guided:
            return cond
        n = len(cond) // per_prompt
        uncond = self.text_embeds([""] if negative is None else negative)  # one row serves every prompt
        uncond = uncond.expand(n, -1, -1) if len(uncond) == 1 else uncond
        return guided_tokens(cond, uncond.repeat_interleave(per_prompt, dim=0), s.guidance_scale)

    def text_embeds(self, texts: list[str] | Tensor) -> Tensor:
        if isinstance(texts, Tensor):
            return texts.to(self.device)
        return encode_text(self.components.text_encoder, self.components.tokenizer, texts, self.device)

    def image_tokens(self, cond: list | Tensor, negative: list | Tensor | None, mode: str, per_prompt: int,
                     s: Sampling, focus: float = 0.5, squash: bool = False) -> Tensor:
        """Image tokens of a call: [uncond; cond] per sample (cond alone when unguided); "no image" is `negative`,
        or else by `mode` (UNCOND_IMAGES, or "black"). Focus draws from the generator of each image's first sample.
        squash: the whole pictures squashed as the original app shows them to CLIP (`squashed_pixel_values`), not
        centre-cropped."""
        n = len(cond)
        given = isinstance(cond, Tensor) and cond.dim() == 3
        cond = cond.to(self.device) if given else self.encode_images(cond, squash)
        cond = self.focused(cond, focus, s.generator, per_prompt)
        cond = cond.repeat_interleave(per_prompt, dim=0)
        if not s.guided:
            return cond
        if isinstance(negative, Tensor) and negative.dim() == 3:
            uncond = negative.to(self.device).expand(n, -1, -1)
        elif negative is not None:
            uncond = self.encode_images(negative)
        elif mode == "zeros":
            uncond = torch.zeros_like(cond[::per_prompt])
        else:
            pixels = uncond_pixel_values(self.components.image_processor, mode)
            uncond = encode_image(self.components.image_encoder, pixels.to(self.device, self.dtype)).expand(n, -1, -1)
        return guided_tokens(cond, uncond.repeat_interleave(per_prompt, dim=0), s.guidance_scale)

    def encode_images(self, imgs: list | Tensor, squash: bool = False) -> Tensor:
        """CLIP tokens [B, 257, D] of images (PIL images or a [B, 3, H, W] tensor in [0, 1])."""
        prepare = squashed_pixel_values if squash else pixel_values
        pixels = prepare(self.components.image_processor, imgs).to(self.device, self.dtype)
        return encode_image(self.components.image_encoder, pixels)

    def focused(self, tokens: Tensor, focus: float, generator: Generator, stride: int = 1) -> Tensor:
        """Images' tokens [B, 257, D], each focus-adjusted with generator[i * stride] (the first of its samples)."""
        if focus == 0.5:
            return tokens
        return torch.cat([self.focus(tokens[i:i + 1], focus, generator, i * stride) for i in range(len(tokens))])

    def focus(self, tokens: Tensor, focus: float, generator: Generator, index: int) -> Tensor:
        """Focus-adjust one image's tokens [1, 257, D] on the generator's device (so a CPU seed gives the same
        result on every device), with generator[index] of a list."""
        if focus == 0.5:
            return tokens
        g = generator[index] if isinstance(generator, list) else generator
        where = g.device if g is not None else tokens.device
        return adjust_focus(tokens.to(where), focus, generator=g).to(tokens.device, tokens.dtype)

    def blend_tokens(self, imgs: list | Tensor, keep: list[Tensor | None], focus: list[float], weights: list[float],
                     per_prompt: int, s: Sampling) -> Tensor:
        """blend's image tokens: each image squashed to CLIP's square input (so its keep-mask lines up with the
        patches) and encoded with its mask, focus-adjusted (all from the first sample's generator: they serve one
        prompt), weighted and put side by side (vd.sampling.blend_tokens); "no image" is all zeros."""
        per_image = []
        for i in range(len(imgs)):
            pixels = squashed_pixel_values(self.components.image_processor, imgs[i:i + 1]).to(self.device, self.dtype)
            weights_of_tokens = None
            if keep[i] is not None:
                patch = self.components.image_encoder.config.patch_size
                weights_of_tokens = mask_token_weights(keep[i].to(self.device), patch, pixels.shape[-1])
            tokens = encode_image(self.components.image_encoder, pixels, token_weights=weights_of_tokens)
            per_image.append(self.focus(tokens, focus[i], s.generator, index=0))
        cond = blend_tokens(per_image, weights).repeat_interleave(per_prompt, dim=0)
        return guided_tokens(cond, torch.zeros_like(cond), s.guidance_scale)
