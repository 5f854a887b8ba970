"""ADE20K SceneParsing (ADEChallengeData2016), 150 classes, MMSegmentation layout.

Annotation PNGs hold 0 = "other" (ignored) and 1..150 = the classes, read as class ids 0..149
(MMSegmentation's reduce_zero_label), 255 ignored. The paper protocol counts "other" as class 0.
"""

from __future__ import annotations

from pathlib import Path

from ._classes import builtin_classes
from ._disk import DiskDataset, list_images, lookup_table, shifted_lut

SPLITS = {"train": "training", "val": "validation"}
LAYOUT = """\
<root>/                                  e.g. data/ade/ADEChallengeData2016
├── images/
│   ├── training/<id>.jpg
│   └── validation/<id>.jpg
└── annotations/
    ├── training/<id>.png                0 other (ignored), 1..150 classes
    └── validation/<id>.png"""


class ADE20KDataset(DiskDataset):
    """ADE20K-150: 150 classes, no background, label 0 ignored."""

    name = "ade20k"
    title = "ADE20K"
    layout = LAYOUT
    subdirs = ("ADEChallengeData2016", "ade/ADEChallengeData2016")
    classes = builtin_classes("ade20k")
    lut = shifted_lut(150, 1)
    raw_ignored = (0, 255)
    paper_rule = "label 0 ('other') counted as class 0 (background); 151 classes (255 not scored)"
    paper_lut = lookup_table({v: v for v in range(151)})

    @classmethod
    def looks_like(cls, path: Path) -> bool:
        return any((path / "images" / folder).is_dir() for folder in SPLITS.values())

    def scan_splits(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for split, folder in SPLITS.items():
            if (self.root / "images" / folder).is_dir():
                has = (self.root / "annotations" / folder).is_dir()
                found[split] = None if has else f"images/{folder} has no annotations/{folder}"
        return found

    def list_ids(self, split: str) -> list[str]:
        return list_images(self.root / "images" / SPLITS[split])

    def image_path(self, split: str, sample_id: str) -> Path:
        return self.root / "images" / SPLITS[split] / f"{sample_id}.jpg"

    def label_path(self, split: str, sample_id: str) -> Path:
        return self.root / "annotations" / SPLITS[split] / f"{sample_id}.png"
