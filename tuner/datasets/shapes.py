"""The shapes world: a procedural benchmark, deterministic by seed, that needs no download.

RGB images with 1-4 coloured shapes of 8 named classes on textured, noisy backgrounds, with
pixel masks (0 = background) and image-level labels. Like real categories, each class has a
typical look: its geometry and a typical hue (jittered in hue, saturation and value), on
low-saturation backgrounds. Objects do not overlap, so every object named is fully visible.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from skimage.color import hsv2rgb
from skimage.draw import disk, polygon

from ._base import Dataset, Sample

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
#: typical hue of each class, in degrees (red, blue, yellow, green, purple, orange, cyan, pink)
CLASS_HUES = (0.0, 225.0, 55.0, 120.0, 275.0, 28.0, 185.0, 320.0)
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
BUNDLED_MODELS = ("blip", "clip")
#: the bundled worlds by name -> their folder in this package: "planted" (one head was trained with
#: the masks to localise: a test with a known answer) and "unplanted" (no head was: the honest test)
BUNDLED_WORLDS = {"planted": "shapes_models", "unplanted": "shapes_models_unplanted"}
TRAIN_COMMAND = "python tools/train_shapes_models.py && python tools/shapes_model_card.py"


def _regular_polygon(cy, cx, radius, sides, phase, inner=None):
    angles = phase + np.arange(sides * (2 if inner else 1)) * np.pi / (sides if inner else sides / 2)
    radii = np.full(angles.shape, float(radius))
    if inner:
        radii[1::2] = radius * inner
    return cy + radii * np.sin(angles), cx + radii * np.cos(angles)


def shape_mask(name: str, size: int, center: tuple[float, float], radius: float, phase: float):
    """Boolean [size, size] mask of one shape."""
    mask = np.zeros((size, size), dtype=bool)
    cy, cx = center
    shape = (size, size)
    if name == "circle":
        mask[disk((cy, cx), radius, shape=shape)] = True
    elif name == "ring":
        mask[disk((cy, cx), radius, shape=shape)] = True
        mask[disk((cy, cx), radius * 0.55, shape=shape)] = False
    elif name == "square":
        r, c = _regular_polygon(cy, cx, radius * 1.15, 4, np.pi / 4 + phase * 0.3)
        mask[polygon(r, c, shape)] = True
    elif name == "diamond":
        r, c = _regular_polygon(cy, cx, radius * 1.2, 4, 0.0)
        r = cy + (r - cy) * 1.0
        c = cx + (c - cx) * 0.65
        mask[polygon(r, c, shape)] = True
    elif name == "triangle":
        r, c = _regular_polygon(cy, cx, radius * 1.2, 3, -np.pi / 2 + phase * 0.3)
        mask[polygon(r, c, shape)] = True
    elif name == "hexagon":
        r, c = _regular_polygon(cy, cx, radius * 1.05, 6, phase)
        mask[polygon(r, c, shape)] = True
    elif name == "star":
        r, c = _regular_polygon(cy, cx, radius * 1.25, 5, -np.pi / 2 + phase * 0.3, inner=0.45)
        mask[polygon(r, c, shape)] = True
    elif name == "cross":
        w = radius * 0.38
        yy, xx = np.mgrid[:size, :size]
        mask |= (np.abs(yy - cy) <= w) & (np.abs(xx - cx) <= radius)
        mask |= (np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= radius)
    else:
        raise ValueError(f"unknown shape {name!r}: shapes are {', '.join(SHAPE_CLASSES)}")
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, noisy, low-saturation background: a gradient, stripes or checks, pixel noise."""
    yy, xx = np.mgrid[:size, :size] / size
    hsv = np.array([rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.25, 0.75)])
    base = hsv2rgb(hsv[None, None])[0, 0] * 255
    slope = rng.uniform(-40, 40, size=(2, 1)) + rng.uniform(-10, 10, size=(2, 3))
    image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    kind = rng.integers(3)
    period = rng.uniform(4, 12)
    angle = rng.uniform(0, np.pi)
    if kind == 0:  # stripes
        wave = np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * size * 2 * np.pi / period)
        image += wave[..., None] * rng.uniform(8, 25)
    elif kind == 1:  # checks
        check = ((yy * size // period + xx * size // period) % 2) * 2 - 1
        image += check[..., None] * rng.uniform(8, 20)
    image += rng.normal(0, rng.uniform(4, 14), size=image.shape)
    return image


def class_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (0-255) of class `cls`: its typical hue +-10 degrees, saturated, fairly bright."""
    hue = (CLASS_HUES[cls] + rng.uniform(-10, 10)) % 360 / 360
    return hsv2rgb(np.array([[[hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)]]]))[0, 0] * 255


def render_shapes(seed: int, size: int = 64, max_objects: int = 4):
    """One scene: (image [S, S, 3] uint8, mask [S, S] class ids with 0 = background).

    1 to `max_objects` objects of distinct classes, placed without overlap (an object that finds
    no free place in 30 tries is left out, but the first always fits).
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    count = int(rng.integers(1, max_objects + 1))
    classes = rng.choice(len(SHAPE_CLASSES), size=count, replace=False)
    for cls in classes:
        for _ in range(30):
            radius = rng.uniform(0.12, 0.24) * size
            center = rng.uniform(radius, size - radius, size=2)
            region = shape_mask(SHAPE_CLASSES[cls], size, tuple(center), radius, rng.uniform(0, np.pi))
            if region.any() and not mask[region].any():
                break
        else:
            continue
        colour = class_colour(int(cls), rng)
        image[region] = colour + rng.normal(0, 6, size=(int(region.sum()), 3))
        mask[region] = cls + 1
    return np.clip(image, 0, 255).astype(np.uint8), mask


class ShapesDataset(Dataset):
    """The procedural shapes world (splits train/val/test, images generated on demand)."""

    name = "shapes"
    has_background = True
    paper_rule = "as standard: background is class 0 and every pixel is labelled"

    def __init__(self, seed: int = 0, size: int = 64, split_sizes: dict[str, int] | None = None):
        self.seed, self.size = int(seed), int(size)
        self.split_sizes = dict(split_sizes or SPLIT_SIZES)

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *SHAPE_CLASSES)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_sizes)

    def ids(self, split: str) -> list[str]:
        self.check_split(split)
        return [f"{split}-{i:05d}" for i in range(self.split_sizes[split])]

    def scene_seed(self, split: str, index: int) -> int:
        return zlib.crc32(f"{self.seed}/{split}/{index}".encode())

    def paper_labels(self, split: str, sample: Sample) -> np.ndarray:
        return sample.labels

    def load(self, split: str, sample_id: str) -> Sample:
        self.check_split(split)
        index = int(sample_id.rsplit("-", 1)[-1])
        image, mask = render_shapes(self.scene_seed(split, index), self.size)
        present = tuple(SHAPE_CLASSES[c - 1] for c in np.unique(mask) if c > 0)
        return Sample(id=sample_id, image=image, labels=mask, image_classes=present)


def bundled_model_path(kind: str, world: str = "planted") -> str:
    """Directory of a tiny shapes-world model shipped in the package: `kind` "blip" (ITM) or "clip",
    of the bundled `world` "planted" (shapes_models/) or "unplanted" (shapes_models_unplanted/).

    It loads with `from_pretrained(path)` offline; each world's MODEL_CARD.md says how it was made.
    Raises ValueError for an unknown kind or world, FileNotFoundError when the files are missing.
    """
    if kind not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {kind!r}: choose one of {', '.join(BUNDLED_MODELS)}")
    if world not in BUNDLED_WORLDS:
        raise ValueError(f"unknown bundled world {world!r}: choose one of {', '.join(BUNDLED_WORLDS)}")
    folder = Path(__file__).resolve().parent / BUNDLED_WORLDS[world]
    path = folder / kind
    if not (path / "config.json").is_file():
        hint = TRAIN_COMMAND if world == "planted" else f"the command in {folder / 'MODEL_CARD.md'}"
        raise FileNotFoundError(f"the bundled {world} {kind} model is missing at {path}: run {hint}")
    return str(path)
