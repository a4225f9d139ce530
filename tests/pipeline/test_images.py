"""Input pictures in every PIL mode become a meaningful 8-bit RGB picture or a clear error, never a silently
wrong one (PIL's own convert("RGB") clips 16-bit and float pixels to white); unreadable files and decompression
bombs are one ValueError naming the file."""

import numpy as np
import PIL.Image
import pytest

from vd import checks
from vd.images import open_image, to_rgb

GREY = np.random.RandomState(0).randint(0, 256, (12, 10)).astype(np.uint8)


def _grey_rgb() -> np.ndarray:
    return np.repeat(GREY[..., None], 3, axis=2)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_file_is_rescaled_not_white(tmp_path, fmt):
    path = tmp_path / f"grey16.{fmt.lower()}"
    PIL.Image.fromarray(GREY.astype(np.uint16) * 257).save(path, format=fmt)  # 16-bit greyscale, full range
    with PIL.Image.open(path) as img:
        assert img.mode.startswith("I")  # what PIL opens it as ("I;16" or "I")
    assert np.array_equal(np.asarray(open_image(path)), _grey_rgb())


def test_every_mode_converts_meaningfully_or_is_refused():
    """Each mode PIL converts an RGB picture into comes back close to that picture (or to its grey, for the
    grey modes, or its thresholding for "1"); modes whose range is unknown are refused with the mode named."""
    rgb = PIL.Image.fromarray(np.random.RandomState(1).randint(0, 256, (6, 5, 3)).astype(np.uint8))
    grey = np.asarray(rgb.convert("L"), dtype=np.int16)
    for mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "L", "LA", "La", "1",
                 "I", "I;16", "I;16B", "I;16L", "F"):
        try:
            img = rgb.convert(mode)
        except ValueError:
            img = rgb.convert("L").convert(mode)  # modes PIL reaches only from greyscale
        if mode in ("I", "I;16", "I;16B", "I;16L"):  # integer modes hold 16-bit pixels: make it a 16-bit picture
            dtype = {"I": "<i4", "I;16": "<u2", "I;16B": ">u2", "I;16L": "<u2"}[mode]
            img = PIL.Image.frombytes(mode, (5, 6), (grey.astype(dtype) * 257).tobytes())
        if mode == "F":
            img = PIL.Image.fromarray(grey.astype(np.float32) / 255)
        out = np.asarray(to_rgb(img), dtype=np.int16)
        assert out.shape == (6, 5, 3), mode
        if mode in ("1",):
            assert set(np.unique(out)) <= {0, 255}
        elif mode in ("L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"):
            assert np.abs(out - grey[..., None]).max() <= 1, mode
        elif mode in ("P", "PA"):  # dithered to a 216-colour palette: the palette's colours
            assert np.array_equal(out, np.asarray(img.convert("RGBA").convert("RGB"), dtype=np.int16)), mode
        else:  # 8-bit LAB and HSV lose a little in saturated colours (measured: up to 21 steps in LAB)
            tol = 24 if mode in ("LAB", "HSV") else 8
            assert np.abs(out - np.asarray(rgb, dtype=np.int16)).max() <= tol, mode


@pytest.mark.parametrize("img,words", [
    (PIL.Image.fromarray(np.full((4, 4), 300.0, np.float32)), ["mode F", "[0, 1]", "300"]),
    (PIL.Image.fromarray(np.full((4, 4), np.nan, np.float32)), ["mode F", "nan"]),
    (PIL.Image.fromarray(np.full((4, 4), 70000, np.int32)), ["mode I", "70000", "16 bits"]),
    (PIL.Image.fromarray(np.full((4, 4), -5, np.int32)), ["mode I", "-5"]),
])
def test_unknown_range_is_refused(img, words):
    with pytest.raises(ValueError) as info:
        to_rgb(img, "image")
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_transparent_pixels_are_seen_over_white():
    """RGBA, LA, PA and a palette's transparent colour: over white, as transformers' convert_to_rgb (the
    reference's CLIP preprocessing); premultiplied RGBa as PIL converts it, also as there."""
    from transformers.image_transforms import convert_to_rgb
    rng = np.random.RandomState(1)
    rgba = PIL.Image.fromarray(rng.randint(0, 256, (12, 10, 4)).astype(np.uint8), "RGBA")
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    keyed = rgba.convert("RGB")  # an RGB picture with a transparent colour (a PNG's tRNS chunk)
    keyed.info["transparency"] = tuple(int(v) for v in np.asarray(keyed)[0, 0])
    for img in (rgba, rgba.convert("LA"), rgba.convert("PA"), rgba.convert("RGBa"), palette, keyed):
        out = np.asarray(to_rgb(img))
        assert np.array_equal(out, convert_to_rgb(img, return_numpy=True)), img.mode
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == np.asarray(to_rgb(keyed))[0, 0].tolist() == [255, 255, 255]


def test_the_facade_check_converts_sixteen_bit_images():
    """checks.images, which every image-taking call runs first, hands RGB pictures on (not clipped ones)."""
    img16 = PIL.Image.fromarray(GREY.astype(np.uint16) * 257)
    [out] = checks.images("image", img16)
    assert np.array_equal(np.asarray(out), _grey_rgb())
    keep16, keep8 = checks.keep_masks([img16, PIL.Image.fromarray(GREY)], 2)
    assert (keep16 - keep8).abs().max() <= 1 / 255 + 1e-6  # one 8-bit level from the 8-bit mask, not white


def test_unreadable_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not an image")
    for path, words in [(tmp_path / "missing.png", ["missing.png", "image"]),
                        (tmp_path / "notes.txt", ["notes.txt", "cannot read"])]:
        with pytest.raises(ValueError) as info:
            open_image(path, "image")
        for w in words:
            assert w in str(info.value)
    # a decompression bomb: more pixels than PIL's limit (lowered here so the test file stays small)
    PIL.Image.fromarray(_grey_rgb()).save(tmp_path / "bomb.png")
    for limit in (50, 100):  # above twice the limit PIL raises; between once and twice it only warns
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError, match=r"image: cannot read image .*bomb\.png.*DecompressionBomb"):
            open_image(tmp_path / "bomb.png", "image")
