"""Datasets read from a directory in the layout MMSegmentation's data preparation produces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._base import CorruptImage, Dataset, LayoutError, MissingAnnotation, Sample, split_parts
from ._classes import ClassList

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: how many missing annotation paths a survey lists
EXAMPLES = 3


def default_root(root: str | os.PathLike | None) -> Path:
    """The directory a dataset is looked for in: `root`, else $OVSS_DATA, else ./data."""
    return Path(root or os.environ.get("OVSS_DATA") or "data").expanduser()


def read_rgb(path: str | Path, *, exif_orientation: bool = False) -> np.ndarray:
    """An image file as [H, W, 3] uint8 through `segmenter.images.read_image`, the one decoder.

    Benchmark images keep their stored pixel order (the default: their label maps are stored
    that way); the folder dataset passes `exif_orientation=True` (photos as viewed).
    Missing: FileNotFoundError, undecodable: CorruptImage."""
    from segmenter.images import UnreadableImage, read_image

    try:
        return read_image(path, exif_orientation=exif_orientation)
    except UnreadableImage as err:
        raise CorruptImage(err.path, err.reason) from None


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG of class indices (mode L, P, I or I;16) as [H, W] integers, as stored."""
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
    return array


class LabelValueError(ValueError):
    """A label file holds values that are neither class ids nor the ignore value of its dataset.

    `values` is ((raw value, pixel count), ...), most frequent first. Never skipped: scoring
    such a file would silently count its pixels as ignored (or as the wrong class).
    """

    def __init__(self, path, values, expected: str, dataset: str = "", unit: str = "px") -> None:
        self.path, self.values, self.expected, self.dataset = str(path), tuple(values), expected, dataset
        self.unit = unit
        shown = ", ".join(f"{v} ({c} {unit})" for v, c in self.values[:6])
        more = f" and {len(self.values) - 6} more" if len(self.values) > 6 else ""
        of = f" of dataset {dataset!r}" if dataset else ""
        super().__init__(
            f"label file {self.path} holds values that are not class ids{of}: {shown}{more}; "
            f"valid values are {expected}: re-create it with the dataset's converter (class indices, "
            "mode L or P; a re-saved or colour-mapped PNG does not keep them)"
        )

    def __reduce__(self):
        return type(self), (self.path, self.values, self.expected, self.dataset, self.unit)


def describe_values(valid: np.ndarray, ignore: np.ndarray) -> str:
    """"0..20 (classes), 255 (ignored)" for boolean tables over raw values 0..255."""
    def runs(mask: np.ndarray) -> str:
        values, parts = np.flatnonzero(mask).tolist(), []
        for v in values:
            if parts and parts[-1][1] == v - 1:
                parts[-1][1] = v
            else:
                parts.append([v, v])
        return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in parts)

    text = runs(valid & ~ignore) + " (classes)"
    return text + (f", {runs(ignore)} (ignored)" if ignore.any() else "")


@dataclass(frozen=True)
class LabelCoding:
    """How one kind of label file stores classes: `lut` raw value -> class id (255 ignored),
    `valid` which raw values occur legitimately (class values and declared ignore values)."""

    lut: np.ndarray  # [256] uint8
    valid: np.ndarray  # [256] bool
    text: str = ""  # how error messages name the valid values (default: their ranges)

    @classmethod
    def of(cls, lut: np.ndarray, ignored=(255,), text: str = "") -> LabelCoding:
        """A coding whose valid values are those `lut` maps to a class, plus `ignored`."""
        valid = lut != 255
        valid[list(ignored)] = True
        return cls(lut, valid, text)

    def describe(self) -> str:
        return self.text or describe_values(self.valid, self.valid & (self.lut == 255))

    def decode(self, raw: np.ndarray, path, dataset: str = "") -> np.ndarray:
        """Class ids [H, W] uint8 of a raw label array; LabelValueError on any value not valid."""
        flat = raw.ravel()
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            values, counts = np.unique(flat, return_counts=True)
            keep = (values < 0) | (values > 255)
            keep[~keep] = ~self.valid[values[~keep]]
            bad = sorted(zip(values[keep].tolist(), counts[keep].tolist()), key=lambda vc: -vc[1])
            raise LabelValueError(path, bad, self.describe(), dataset)
        raw = raw.astype(np.uint8, copy=False)
        counts = np.bincount(raw.ravel(), minlength=256)
        invalid = (counts > 0) & ~self.valid
        if invalid.any():
            bad = sorted(((int(v), int(counts[v])) for v in np.flatnonzero(invalid)), key=lambda vc: -vc[1])
            raise LabelValueError(path, bad, self.describe(), dataset)
        return self.lut[raw]


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
    A benchmark the paper protocol scores sets `paper_rule` and `paper_lut` (raw label value ->
    class id of `scored_class_names("paper")`, 255 not scored).
    """

    title: str = ""
    layout: str = ""
    subdirs: tuple[str, ...] = ()
    classes: ClassList
    lut: np.ndarray
    #: raw label values that mean "not labelled" besides those `lut` maps to a class
    raw_ignored: tuple[int, ...] = (255,)
    #: raw label value -> class id under the paper protocol (None: no paper rule)
    paper_lut: np.ndarray | None = None

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
        """[H, W] uint8 class ids, `ignore_index` where unlabelled; LabelValueError when the file
        holds a value that is neither a class nor an ignore value of the dataset."""
        path = self.label_path(split, sample_id)
        if not path.is_file():
            raise MissingAnnotation(self.name, sample_id, path)
        return self.label_coding(path).decode(read_index_png(path), path, self.name)

    def label_coding(self, path: Path) -> LabelCoding:
        """The coding of a label file (one per dataset unless it reads several kinds of file)."""
        return LabelCoding.of(self.lut, self.raw_ignored)

    def paper_labels(self, split: str, sample: Sample) -> np.ndarray:
        """The sample's label file read again through `paper_lut` (the same values are valid)."""
        if self.paper_lut is None:
            return super().paper_labels(split, sample)
        base = split_parts(split)[0]
        path = self.label_path(base, sample.id)
        if not path.is_file():
            raise MissingAnnotation(self.name, sample.id, path)
        coding = LabelCoding(self.paper_lut, self.label_coding(path).valid)
        return coding.decode(read_index_png(path), path, self.name)

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
