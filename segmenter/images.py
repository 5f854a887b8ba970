"""Image input: whatever a user hands us becomes an HxWx3 uint8 RGB array.

One decoder for every image the package reads (`read_image`: user images, the folder dataset,
benchmark images): 16-bit and float images are scaled to 8 bits, palette and alpha images lose
their alpha, any mode Pillow opens becomes RGB.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

#: Pillow modes that hold 16-bit unsigned samples
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Pillow modes with an alpha channel (dropped: the colour values are kept as stored)
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _scale_to_uint8(array: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Samples in 0..full_scale (or, when None, their own min..max) as uint8 0..255."""
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        array, full_scale = array - low, max(high - low, 1e-12)
    return np.clip(np.round(array * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _wide_to_uint8(array: np.ndarray, integer: bool) -> np.ndarray:
    """One-channel 32-bit samples (Pillow modes I and F) as uint8 by the range they use.

    Integers: 0..255 are kept, 0..65535 scaled as 16-bit; floats: 0..1 scaled by 255, 0..255 kept;
    anything else (negative values, wider ranges) is stretched from its min..max.
    """
    finite = array[np.isfinite(array)] if not integer else array
    low = float(finite.min(initial=0.0))
    high = float(finite.max(initial=0.0))
    if low >= 0 and high <= (255 if integer else 1.0):
        return _scale_to_uint8(array, 255.0 if integer else 1.0)
    if low >= 0 and high <= (65535 if integer else 255.0):
        return _scale_to_uint8(array, 65535.0 if integer else 255.0)
    return _scale_to_uint8(array, None)


def pil_to_rgb(image) -> np.ndarray:
    """A PIL image of any mode as [H, W, 3] uint8 RGB.

    16-bit modes (I;16, I;16B, ...) are scaled by 255/65535, so that distinct levels stay
    distinct; modes I and F by the range their values use (`_wide_to_uint8`); alpha (LA, PA,
    RGBA, P or L/RGB with a transparency key) is dropped; 1, P, CMYK, YCbCr, LAB, HSV are
    converted by Pillow. ValueError for a mode Pillow cannot convert.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode.startswith("I;16"):
        grey = _scale_to_uint8(np.asarray(image).astype(np.float64), 65535.0)
    elif mode in ("I", "I;32", "I;32L", "I;32B"):
        grey = _wide_to_uint8(np.asarray(image.convert("I")), integer=True)
    elif mode == "F":
        grey = _wide_to_uint8(np.asarray(image), integer=False)
    else:
        try:
            if mode in ALPHA_MODES or "transparency" in image.info:
                rgba = image.convert("LA").convert("RGBA") if mode == "La" else image.convert("RGBA")
                return np.ascontiguousarray(np.asarray(rgba, dtype=np.uint8)[..., :3])
            return np.array(image.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as err:
            raise ValueError(f"image mode {mode} cannot be converted to RGB: {err}") from None
    if grey.ndim != 2:
        raise ValueError(f"image mode {mode} with shape {grey.shape} is not a one-channel image")
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def as_rgb_uint8(image) -> np.ndarray:
    """PIL images (any mode, see `pil_to_rgb`), grayscale [H, W], [H, W, 1], RGB and RGBA arrays
    -> [H, W, 3] uint8.

    Float arrays are read as values in [0, 1]; uint16 arrays as 16-bit (scaled by 255/65535).
    The alpha channel of RGBA input is dropped.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image
        return pil_to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got {tuple(array.shape)}"
        )
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
        elif array.dtype == np.uint16:
            array = _scale_to_uint8(array, 65535.0)
        elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            if array.dtype != bool and (array.min() < 0 or array.max() > 255):
                raise ValueError("integer image values must lie in 0..255: convert it to uint8")
            array = array.astype(np.uint8) * (255 if array.dtype == bool else 1)
        else:
            raise ValueError(f"unsupported image dtype {array.dtype}: give uint8 RGB")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[..., :3]
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()  # torch and pydensecrf write-lock


def image_digest(image: np.ndarray) -> str:
    """Content hash of an image array (shape and bytes): the map cache's and the CLIP crop memo's
    key for an image."""
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class UnreadableImage(ValueError):
    """An image file exists but cannot be decoded; `path` and `reason` say which and why."""

    what = "image "  # the message's word for the file

    def __init__(self, path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read {self.what}{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.path, self.reason)


def read_image(path: str | Path, *, exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as [H, W, 3] uint8 (the first frame of an animation).

    With `exif_orientation` (the default, for photos a user hands us) the pixels are turned as
    a viewer shows them (EXIF Orientation tag, `PIL.ImageOps.exif_transpose`); benchmark loaders
    pass False, because their label maps are stored in the raw pixel order. Every mode Pillow
    opens is converted (`pil_to_rgb`: 16-bit scaled, alpha dropped).
    Missing file: FileNotFoundError; undecodable: `UnreadableImage` (a ValueError).
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            return pil_to_rgb(im)
    except Exception as err:  # OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        lines = str(err).strip().splitlines()
        raise UnreadableImage(path, lines[0] if lines else type(err).__name__) from None
