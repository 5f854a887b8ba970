"""PASCAL-Context (`context`: 59 classes, background ignored; `context60`: 60 with background).

Layout (MMSegmentation, data/VOCdevkit/VOC2010): JPEGImages/<id>.jpg, SegmentationClassContext/
<id>.png with 0 = background and 1..59 the classes (written by MMSegmentation's
pascal_context.py converter from trainval_merged.json), split lists
ImageSets/SegmentationContext/<split>.txt.
"""

from __future__ import annotations

from pathlib import Path

from ._classes import builtin_classes
from ._disk import DiskDataset, lookup_table, read_id_list, shifted_lut

LAYOUT = """\
<root>/                                  e.g. data/VOCdevkit/VOC2010
├── JPEGImages/<id>.jpg
├── SegmentationClassContext/<id>.png    0 background, 1..59 classes, 255 ignore
└── ImageSets/SegmentationContext/
    ├── train.txt                        one image id a line
    └── val.txt"""


class PascalContext59Dataset(DiskDataset):
    """PASCAL-Context-59: the 59 classes, background pixels ignored (255)."""

    name = "context"
    title = "PASCAL-Context"
    layout = LAYOUT
    subdirs = ("VOC2010", "VOCdevkit/VOC2010")
    classes = builtin_classes("context59")
    lut = shifted_lut(59, 1)
    raw_ignored = (0, 255)  # background pixels are not scored
    paper_rule = "background counted as class 0; 60 classes (255 not scored)"
    paper_lut = lookup_table({v: v for v in range(60)})

    @classmethod
    def looks_like(cls, path: Path) -> bool:
        return (path / "JPEGImages").is_dir() and (path / "ImageSets" / "SegmentationContext").is_dir()

    def scan_splits(self) -> dict[str, str | None]:
        lists = sorted((self.root / "ImageSets" / "SegmentationContext").glob("*.txt"))
        labels = self.root / "SegmentationClassContext"
        note = None if labels.is_dir() else "no SegmentationClassContext/ directory (run MMSeg's converter)"
        return {p.stem: note for p in lists}

    def list_ids(self, split: str) -> list[str]:
        return read_id_list(self.root / "ImageSets" / "SegmentationContext" / f"{split}.txt")

    def image_path(self, split: str, sample_id: str) -> Path:
        return self.root / "JPEGImages" / f"{sample_id}.jpg"

    def label_path(self, split: str, sample_id: str) -> Path:
        return self.root / "SegmentationClassContext" / f"{sample_id}.png"


class PascalContext60Dataset(PascalContext59Dataset):
    """PASCAL-Context-60: background + the 59 classes."""

    name = "context60"
    has_background = True
    classes = builtin_classes("context59").with_background()
    lut = lookup_table({v: v for v in range(60)})
    paper_rule = "as standard: background counted as class 0; 60 classes (255 not scored)"
