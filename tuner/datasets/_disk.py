"""Datasets read from a directory in the layout MMSegmentation's data preparation produces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._base import CorruptImage, Dataset, LayoutError, MissingAnnotation, Sample
from ._classes import ClassList

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: how many missing annotation paths a survey lists
EXAMPLES = 3


def default_root(root: str | os.PathLike | None) -> Path:
    """The directory a dataset is looked for in: `root`, else $OVSS_DATA, else ./data."""
    return Path(root or os.environ.get("OVSS_DATA") or "data").expanduser()


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as [H, W, 3] uint8; missing: FileNotFoundError, undecodable: CorruptImage."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImage(path, _reason(err)) from None


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG of class indices (mode L, P or I;16) as [H, W] uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.array(im)
    except Exception as err:
        raise CorruptImage(path, _reason(err)) from None
    if mode in ("RGB", "RGBA") or array.ndim != 2:
        raise LayoutError(
            f"label file {path} is a colour image ({mode}): expected one class index a pixel "
            "(mode L or P, as MMSegmentation's converters write)"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise CorruptImage(path, f"label values {array.min()}..{array.max()} do not fit 0..255")
        array = array.astype(np.uint8)
    return array


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def lookup_table(mapping: dict[int, int], default: int = 255) -> np.ndarray:
    """A 256-entry lookup table raw value -> class id (others -> `default`)."""
    table = np.full(256, default, dtype=np.uint8)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table


def shifted_lut(classes: int, shift: int) -> np.ndarray:
    """Raw values shift..shift+classes-1 -> 0..classes-1; the rest (0 when shift=1, 255) ignored."""
    return lookup_table({v + shift: v for v in range(classes)})


def list_images(directory: Path, suffix: str = "") -> list[str]:
    """Sorted ids (file names minus `suffix` or the extension) of the images in a directory."""
    if not directory.is_dir():
        return []
    ids = []
    for entry in os.scandir(directory):
        name = entry.name
        if suffix:
            if name.endswith(suffix):
                ids.append(name[: -len(suffix)])
        elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith("."):
            ids.append(os.path.splitext(name)[0])
    return sorted(ids)


def read_id_list(path: Path) -> list[str]:
    """Ids of an ImageSets-style list file (one id a line; blank lines ignored)."""
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


@dataclass(frozen=True)
class SplitReport:
    """What `survey` found for one split."""

    split: str
    images: int
    labels: int  # images whose annotation file exists
    missing: tuple[str, ...]  # the first few expected annotation paths that do not exist


class DiskDataset(Dataset):
    """A benchmark in a directory: find the root, its splits, read images and label PNGs.

    Subclasses set `title`, `layout` (the expected tree), `subdirs` (where the dataset lives
    below a data root such as MMSegmentation's `data/`), `classes`, `lut` (raw label value ->
    class id), and implement `looks_like`, `scan_splits`, `list_ids`, `image_path`, `label_path`.
    """

    title: str = ""
    layout: str = ""
    subdirs: tuple[str, ...] = ()
    classes: ClassList
    lut: np.ndarray

    def __init__(self, root: str | os.PathLike | None = None, *, tune_fraction: float = 0.2,
                 split_seed: int = 0) -> None:
        if not 0.0 < float(tune_fraction) < 1.0:
            raise ValueError(f"tune_fraction must lie strictly between 0 and 1, got {tune_fraction}")
        self.tune_fraction, self.split_seed = float(tune_fraction), int(split_seed)
        self.root = self.find_root(root)
        self.split_notes: dict[str, str] = {}  # split -> why it is not usable
        found = self.scan_splits()
        self._splits = tuple(s for s, note in found.items() if note is None)
        self.split_notes = {s: note for s, note in found.items() if note is not None}
        if not self._splits:
            why = "; ".join(self.split_notes.values()) or "no split found"
            raise LayoutError(f"{self.title} at {self.root} has no usable split: {why}", self.layout)
        self._id_cache: dict[str, list[str]] = {}

    # -- layout -------------------------------------------------------------------------------------
    @classmethod
    def looks_like(cls, path: Path) -> bool:
        """True when `path` is this dataset's directory."""
        raise NotImplementedError

    def find_root(self, root) -> Path:
        given = default_root(root)
        for candidate in (given, *(given / s for s in self.subdirs)):
            if candidate.is_dir() and self.looks_like(candidate):
                return candidate
        if not given.exists():
            raise LayoutError(
                f"{self.title} directory not found: {given} does not exist "
                "(pass --data-root DIR or set OVSS_DATA)", self.layout,
            )
        where = f" (nor in {', '.join(self.subdirs)} below it)" if self.subdirs else ""
        raise LayoutError(
            f"{given} does not look like {self.title}{where}", self.layout,
            hint=f"`tune data check --dataset {self.name} --data-root {given}` shows the expected tree",
        )

    def scan_splits(self) -> dict[str, str | None]:
        """Split name -> None when usable, else a one-line reason."""
        raise NotImplementedError

    def list_ids(self, split: str) -> list[str]:
        raise NotImplementedError

    def image_path(self, split: str, sample_id: str) -> Path:
        raise NotImplementedError

    def label_path(self, split: str, sample_id: str) -> Path:
        """The annotation file of a sample (the expected path when it does not exist)."""
        raise NotImplementedError

    # -- Dataset --------------------------------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names

    @property
    def synonyms(self) -> tuple[tuple[str, ...], ...]:
        return self.classes.synonyms

    @property
    def splits(self) -> tuple[str, ...]:
        return self._splits

    def ids(self, split: str) -> list[str]:
        self.check_split(split)
        if split not in self._id_cache:
            self._id_cache[split] = self.list_ids(split)
        return list(self._id_cache[split])

    def load(self, split: str, sample_id: str) -> Sample:
        self.check_split(split)
        image = read_rgb(self.image_path(split, sample_id))
        labels = self.read_labels(split, sample_id)
        if labels.shape != image.shape[:2]:
            raise CorruptImage(
                self.label_path(split, sample_id),
                f"label map is {labels.shape[1]}x{labels.shape[0]} pixels, the image "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        return Sample(id=sample_id, image=image, labels=labels, image_classes=self.present_classes(labels))

    def read_labels(self, split: str, sample_id: str) -> np.ndarray:
        """[H, W] uint8 class ids, `ignore_index` where unlabelled."""
        path = self.label_path(split, sample_id)
        if not path.is_file():
            raise MissingAnnotation(self.name, sample_id, path)
        return self.lut[read_index_png(path)]

    # -- checks ---------------------------------------------------------------------------------------
    def label_exists(self, split: str, sample_id: str) -> bool:
        return self.label_path(split, sample_id).is_file()

    def survey(self) -> list[SplitReport]:
        """Per usable split: image count, how many have annotations, examples of missing ones."""
        reports = []
        for split in self.splits:
            ids = self.ids(split)
            missing = [i for i in ids if not self.label_exists(split, i)]
            examples = tuple(str(self.label_path(split, i)) for i in missing[:EXAMPLES])
            reports.append(SplitReport(split, len(ids), len(ids) - len(missing), examples))
        return reports
