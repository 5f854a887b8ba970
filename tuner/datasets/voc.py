"""PASCAL VOC 2012 (`voc`: 21 classes with background; `voc20`: 20, background ignored).

Layout (MMSegmentation, data/VOCdevkit/VOC2012): JPEGImages/<id>.jpg, SegmentationClass/<id>.png
palette PNGs whose indices are the class ids (255 on object borders = ignore), split lists
ImageSets/Segmentation/<split>.txt. `labels_dir="SegmentationClassAug"` reads the augmented set.
"""

from __future__ import annotations

from pathlib import Path

from ._classes import builtin_classes
from ._disk import DiskDataset, lookup_table, read_id_list, shifted_lut

LAYOUT = """\
<root>/                                  e.g. data/VOCdevkit/VOC2012
├── JPEGImages/<id>.jpg
├── SegmentationClass/<id>.png           palette PNG: 0 background, 1..20 classes, 255 ignore
└── ImageSets/Segmentation/
    ├── train.txt                        one image id a line
    └── val.txt"""


class VocDataset(DiskDataset):
    """PASCAL VOC 2012 segmentation, 21 classes: background + 20 objects, 255 ignored."""

    name = "voc"
    title = "PASCAL VOC 2012"
    layout = LAYOUT
    subdirs = ("VOC2012", "VOCdevkit/VOC2012")
    has_background = True
    classes = builtin_classes("voc")
    lut = lookup_table({v: v for v in range(21)})
    paper_rule = "object borders (255) counted as background (class 0); 21 classes"
    paper_lut = lookup_table({**{v: v for v in range(21)}, 255: 0})

    def __init__(self, root=None, *, labels_dir: str = "SegmentationClass", tune_fraction: float = 0.2,
                 split_seed: int = 0) -> None:
        self.labels_dir = labels_dir
        super().__init__(root, tune_fraction=tune_fraction, split_seed=split_seed)

    @classmethod
    def looks_like(cls, path: Path) -> bool:
        return (path / "JPEGImages").is_dir() and (path / "ImageSets" / "Segmentation").is_dir()

    def scan_splits(self) -> dict[str, str | None]:
        lists = sorted((self.root / "ImageSets" / "Segmentation").glob("*.txt"))
        note = None if (self.root / self.labels_dir).is_dir() else f"no {self.labels_dir}/ directory"
        return {p.stem: note for p in lists}

    def list_ids(self, split: str) -> list[str]:
        return read_id_list(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")

    def image_path(self, split: str, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def label_path(self, split: str, sample_id: str) -> Path:
        return self.root / self.labels_dir / f"{sample_id}.png"


class Voc20Dataset(VocDataset):
    """PASCAL VOC 2012 without background: 20 classes, background pixels ignored (255)."""

    name = "voc20"
    has_background = False
    classes = builtin_classes("voc").take(1)
    lut = shifted_lut(20, 1)
    raw_ignored = (0, 255)  # background pixels are not scored
    paper_rule = "background and object borders (255) counted as background (class 0); 21 classes"
