"""Input pictures as 8-bit RGB, whatever PIL mode they come in: `to_rgb` for images handed to the library,
`open_image` for files named by the applications (the CLI and `vd batch`).

PIL's own `convert("RGB")` clips 16-bit and float pixels to 255, so a 16-bit greyscale PNG would become pure
white; those modes are rescaled here instead, or refused when their range cannot be known.
"""

import warnings
from pathlib import Path

import numpy as np
import PIL.Image

_SIXTEEN_BIT = 65535


def to_rgb(img: PIL.Image.Image, name: str = "image") -> PIL.Image.Image:
    """An 8-bit RGB copy of `img`, transparent parts over white. Integer modes ("I;16*", "I") are 16-bit pixels
    (0..65535, what a 16-bit PNG or TIFF holds); "F" must hold values in [0, 1]; other ranges are refused with a
    ValueError naming `name`."""
    mode = img.mode
    if mode == "RGB" and img.info.get("transparency") is None:
        return img
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        a = np.asarray(img).astype(np.float64)
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            if not (np.isfinite(a).all() and low >= 0 and high <= 1):
                raise ValueError(f"{name}: a float (mode F) image needs values in [0, 1], got [{low:.4g}, {high:.4g}]")
            scale = 255.0
        else:
            if low < 0 or high > _SIXTEEN_BIT:
                raise ValueError(f"{name}: a 32-bit integer (mode {mode}) image is read as 16-bit pixels, but its "
                                 f"values are in [{low:.0f}, {high:.0f}]; save it with 8 or 16 bits per channel")
            scale = 255.0 / _SIXTEEN_BIT
        grey = np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # transparent pixels (RGBA, LA, PA, a transparent colour) over white, as the reference's CLIP preprocessing
        # (transformers' convert_to_rgb, from 5.21 on; earlier releases drop the alpha channel) shows them
        white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, _converted(img, "RGBA", name)).convert("RGB")
    return _converted(img, "RGB", name)


def _converted(img: PIL.Image.Image, mode: str, name: str) -> PIL.Image.Image:
    for route in ((mode,), ("RGBA", mode), ("LA", mode)):  # some modes (e.g. "La") reach RGB only via another
        try:
            out = img
            for m in route:
                out = out.convert(m)
            return out
        except (ValueError, OSError):
            continue
    raise ValueError(f"{name}: images of PIL mode {img.mode!r} cannot be converted to RGB")


def open_image(path: str | Path, name: str = "image", *, as_is: bool = False) -> PIL.Image.Image:
    """The picture in a file as 8-bit RGB; ValueError naming `name` and the path if it cannot be read, is not an
    image, is larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), or has a mode with no
    meaningful RGB (see `to_rgb`). as_is: in the file's own mode (a blend mask, read as `checks.keep_masks` reads
    it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(path)
            img.load()
    except MemoryError:
        raise ValueError(f"{name}: cannot read image {str(path)!r} (too large to decode in memory)") from None
    except Exception as e:  # OSError, DecompressionBomb*, and what damaged files make decoders raise
        raise ValueError(f"{name}: cannot read image {str(path)!r} ({type(e).__name__}: {e})") from None
    with img:
        return img.copy() if as_is else to_rgb(img, f"{name} {str(path)!r}")
