"""Cityscapes, 19 evaluation classes (train ids), MMSegmentation layout.

Labels are `*_gtFine_labelTrainIds.png` (MMSegmentation's cityscapes.py converter); where only
the official `*_gtFine_labelIds.png` exist they are mapped to train ids on the fly.
Sample ids are "<city>/<city>_<seq>_<frame>".
"""

from __future__ import annotations

from pathlib import Path

from ._classes import builtin_classes
from ._disk import DiskDataset, LabelCoding, list_images, lookup_table

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
#: official label id -> train id of the 19 evaluated classes (cityscapesScripts labels.py)
LABEL_ID_TO_TRAIN_ID = lookup_table({
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
})
LAYOUT = """\
<root>/                                           e.g. data/cityscapes
├── leftImg8bit/
│   ├── train/<city>/<name>_leftImg8bit.png
│   └── val/<city>/<name>_leftImg8bit.png
└── gtFine/
    ├── train/<city>/<name>_gtFine_labelTrainIds.png   (or the official _gtFine_labelIds.png)
    └── val/<city>/<name>_gtFine_labelTrainIds.png"""


class CityscapesDataset(DiskDataset):
    """Cityscapes-19: the 19 train-id classes, no background, 255 ignored."""

    name = "cityscapes"
    title = "Cityscapes"
    layout = LAYOUT
    subdirs = ("cityscapes",)
    classes = builtin_classes("cityscapes")
    lut = lookup_table({v: v for v in range(19)})

    @classmethod
    def looks_like(cls, path: Path) -> bool:
        return (path / "leftImg8bit").is_dir()

    def scan_splits(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for directory in sorted(p for p in (self.root / "leftImg8bit").iterdir() if p.is_dir()):
            name = directory.name
            found[name] = None if (self.root / "gtFine" / name).is_dir() else (
                f"leftImg8bit/{name} has no gtFine/{name}")
        return found

    def list_ids(self, split: str) -> list[str]:
        ids = []
        for city in sorted(p for p in (self.root / "leftImg8bit" / split).iterdir() if p.is_dir()):
            ids += [f"{city.name}/{stem}" for stem in list_images(city, suffix=IMAGE_SUFFIX)]
        return ids

    def image_path(self, split: str, sample_id: str) -> Path:
        return self.root / "leftImg8bit" / split / f"{sample_id}{IMAGE_SUFFIX}"

    def label_path(self, split: str, sample_id: str) -> Path:
        base = self.root / "gtFine" / split
        preferred = base / f"{sample_id}{TRAIN_IDS_SUFFIX}"
        official = base / f"{sample_id}{LABEL_IDS_SUFFIX}"
        return official if not preferred.is_file() and official.is_file() else preferred

    def label_coding(self, path: Path) -> LabelCoding:
        if path.name.endswith(TRAIN_IDS_SUFFIX):
            return LabelCoding.of(self.lut)
        return LabelCoding.of(LABEL_ID_TO_TRAIN_ID, ignored=range(34),
                              text="the official label ids 0..33 (those without a train id ignored)")
