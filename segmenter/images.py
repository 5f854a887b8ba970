"""Image input: whatever a user hands us becomes an HxWx3 uint8 RGB array."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def as_rgb_uint8(image) -> np.ndarray:
    """PIL images, grayscale [H, W], [H, W, 1], RGB and RGBA arrays -> [H, W, 3] uint8.

    Float arrays are read as values in [0, 1]. The alpha channel of RGBA input is dropped.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image
        return np.array(image.convert("RGB"), dtype=np.uint8)
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


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as [H, W, 3] uint8; a missing or unreadable file is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return as_rgb_uint8(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
