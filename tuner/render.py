"""Pictures of label maps: palette PNGs and overlays with a legend of class names."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
    """The Pascal VOC colour map: n distinct RGB colours, 0 = black (background). # [n, 3]"""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def label_png(label_map: np.ndarray, num_labels: int) -> Image.Image:
    """A palette ('P' mode) PNG of a label map, one colour per label id."""
    if num_labels > 256:
        raise ValueError(f"{num_labels} labels do not fit an 8-bit palette PNG")
    image = Image.fromarray(label_map.astype(np.uint8), mode="P")
    image.putpalette(palette(256).flatten().tolist())
    return image


def overlay(
    image: np.ndarray, label_map: np.ndarray, names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """The image with coloured masks (background left clear) and a legend of the classes shown.

    `names[i - 1]` is the name of label i.
    """
    colours = palette(len(names) + 1)
    mask = label_map > 0
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[label_map[mask]]
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    shown = [int(i) for i in np.unique(label_map) if i > 0]
    if not shown:
        return picture
    font = ImageFont.load_default()
    line = 12
    width = max(ImageDraw.Draw(picture).textlength(names[i - 1], font=font) for i in shown) + 22
    legend = Image.new("RGB", (int(width), line * len(shown) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for row, i in enumerate(shown):
        y = 3 + row * line
        draw.rectangle([3, y + 1, 13, y + 10], fill=tuple(int(v) for v in colours[i]), outline=(0, 0, 0))
        draw.text((18, y), names[i - 1], fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (picture.width + legend.width, max(picture.height, legend.height)),
                       (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (picture.width, 0))
    return canvas
