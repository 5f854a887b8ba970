"""COCO-Stuff-164k (171 classes) and COCO-Object (80 things + background), MMSegmentation layout.

Label maps are the stuff-thing maps: MMSegmentation's `*_labelTrainIds.png` (train ids 0..170,
255 unlabelled) or the raw `stuffthingmaps_trainval2017.zip` PNGs (`<id>.png`, COCO category
id - 1 in 0..181), read through a lookup table so that no conversion step is needed.
COCO-Object keeps the 80 things (train ids 0..79 -> 1..80) and makes every other pixel
background 0, stuff and unlabelled (255) alike: the public conversion of the SCLIP / NACLIP /
GroupViT evaluation harness (`convert_coco_object.py`, whose `<id>_instanceTrainIds.png` output
is read too), so that nothing is ignored. Without stuff-thing maps it paints the non-crowd
instance masks of `annotations/instances_<split>2017.json` (pycocotools) in annotation order,
a later one on top (the COCO-Stuff API's rule for the maps' thing pixels); every other pixel is
background, so both sources give the same ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._base import LayoutError, MissingAnnotation, Sample
from ._classes import builtin_classes
from ._disk import DiskDataset, LabelCoding, LabelValueError, list_images, lookup_table, read_index_png

SPLITS = {"train": "train2017", "val": "val2017"}
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"
#: output of the public COCO-Object conversion: 0 background (stuff and unlabelled), 1..80 things
INSTANCE_TRAIN_IDS_SUFFIX = "_instanceTrainIds.png"
#: COCO category ids (1-based) that have pixels in COCO-Stuff: 80 things, then 91 stuff (92..182)
USED_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
    *range(84, 91), *range(92, 183),
)
THINGS = 80
#: raw stuffthingmaps value (category id - 1) -> train id 0..170
RAW_TO_TRAIN_ID = lookup_table({cat - 1: i for i, cat in enumerate(USED_CATEGORY_IDS)})
#: *_labelTrainIds.png value -> train id (values past 170 are not classes: ignored)
TRAIN_IDS = lookup_table({i: i for i in range(len(USED_CATEGORY_IDS))})

LAYOUT = """\
<root>/                              e.g. data/coco_stuff164k (MMSegmentation)
├── images/
│   ├── train2017/<id>.jpg           optional: a train split
│   └── val2017/<id>.jpg             `tune data download coco` fetches val2017
└── annotations/
    ├── train2017/<id>_labelTrainIds.png
    └── val2017/<id>_labelTrainIds.png    or the raw stuff-thing maps <id>.png
                                          (COCO-Object also reads instances_val2017.json)"""


class _CocoLayout(DiskDataset):
    title = "COCO-Stuff-164k"
    layout = LAYOUT
    subdirs = ("coco_stuff164k", "coco")

    @classmethod
    def looks_like(cls, path: Path) -> bool:
        return any(cls._image_dir_of(path, d) is not None for d in SPLITS.values())

    @staticmethod
    def _image_dir_of(root: Path, folder: str) -> Path | None:
        for candidate in (root / "images" / folder, root / folder):  # MMSeg layout, COCO's own
            if candidate.is_dir():
                return candidate
        return None

    def image_dir(self, split: str) -> Path:
        return self._image_dir_of(self.root, SPLITS[split]) or self.root / "images" / SPLITS[split]

    def map_dir(self, split: str) -> Path:
        return self.root / "annotations" / SPLITS[split]

    def scan_splits(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for split, folder in SPLITS.items():
            if self._image_dir_of(self.root, folder) is None:
                continue
            found[split] = self._missing_labels_note(split)
        return found

    def _missing_labels_note(self, split: str) -> str | None:
        if self.map_dir(split).is_dir():
            return None
        return f"images/{SPLITS[split]} has no stuff-thing maps in annotations/{SPLITS[split]}"

    def list_ids(self, split: str) -> list[str]:
        return list_images(self.image_dir(split))

    def image_path(self, split: str, sample_id: str) -> Path:
        directory = self.image_dir(split)
        path = directory / f"{sample_id}.jpg"
        if path.is_file():
            return path
        for suffix in (".jpeg", ".png", ".JPG"):
            if (directory / f"{sample_id}{suffix}").is_file():
                return directory / f"{sample_id}{suffix}"
        return path

    def label_path(self, split: str, sample_id: str) -> Path:
        preferred = self.map_dir(split) / f"{sample_id}{TRAIN_IDS_SUFFIX}"
        raw = self.map_dir(split) / f"{sample_id}.png"
        return raw if not preferred.is_file() and raw.is_file() else preferred

    def train_ids(self, split: str, sample_id: str) -> np.ndarray:
        """The stuff-thing map of a sample as train ids 0..170 (255 unlabelled); LabelValueError
        when it holds a value that is no COCO-Stuff class."""
        path = self.label_path(split, sample_id)
        if not path.is_file():
            raise MissingAnnotation(self.name, sample_id, path)
        coding = LabelCoding.of(TRAIN_IDS if path.name.endswith(TRAIN_IDS_SUFFIX) else RAW_TO_TRAIN_ID)
        return coding.decode(read_index_png(path), path, self.name)


#: train id -> class id under the paper protocol: 0..170 -> 1..170+1, unlabelled (255) -> background 0
TRAIN_ID_TO_PAPER = lookup_table({**{i: i + 1 for i in range(len(USED_CATEGORY_IDS))}, 255: 0})


class CocoStuffDataset(_CocoLayout):
    """COCO-Stuff-164k: 171 classes (80 things, 91 stuff), no background, 255 ignored."""

    name = "coco_stuff"
    classes = builtin_classes("coco_stuff")
    lut = TRAIN_IDS
    paper_rule = "unlabelled pixels (255) counted as background (class 0); 172 classes"

    def read_labels(self, split: str, sample_id: str) -> np.ndarray:
        return self.train_ids(split, sample_id)

    def paper_labels(self, split: str, sample: Sample) -> np.ndarray:
        return TRAIN_ID_TO_PAPER[sample.labels]


#: train id -> COCO-Object class id: things 0..79 -> 1..80; stuff and unlabelled (255) -> 0
TRAIN_ID_TO_OBJECT = lookup_table({**{i: i + 1 for i in range(THINGS)},
                                   **dict.fromkeys(range(THINGS, len(USED_CATEGORY_IDS)), 0), 255: 0})
#: an `_instanceTrainIds.png` value -> class id (0..80 kept; 255, never written by it, -> 0)
INSTANCE_TRAIN_IDS = LabelCoding.of(lookup_table({**{i: i for i in range(THINGS + 1)}, 255: 0}))
#: COCO category id of each thing class id 1..80
THING_CLASS_OF_CATEGORY = {cat: i + 1 for i, cat in enumerate(USED_CATEGORY_IDS[:THINGS])}


class CocoObjectDataset(_CocoLayout):
    """COCO-Object: background + the 80 COCO things; stuff and unlabelled pixels are background
    (the public conversion's ground truth, the same from stuff-thing maps and instance JSON).

    `source`: "auto" (stuff-thing maps where a split has them, else the instance JSON),
    "stuffthingmaps" or "instances".
    """

    name = "coco"
    title = "COCO (COCO-Object)"
    has_background = True
    classes = builtin_classes("coco_stuff").take(0, THINGS).with_background()
    lut = TRAIN_ID_TO_OBJECT
    paper_rule = ("as standard: stuff and unlabelled pixels are background (class 0); 81 classes "
                  "(the authors paint instance masks first on top, crowd ones included: not reproduced)")

    def __init__(self, root=None, *, source: str = "auto", tune_fraction: float = 0.2,
                 split_seed: int = 0) -> None:
        if source not in ("auto", "stuffthingmaps", "instances"):
            raise ValueError(f"unknown COCO-Object source {source!r}: use auto, stuffthingmaps or instances")
        self.source = source
        self._coco: dict[str, object] = {}
        super().__init__(root, tune_fraction=tune_fraction, split_seed=split_seed)

    def instances_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{SPLITS[split]}.json"

    def uses_instances(self, split: str) -> bool:
        if self.source == "instances":
            return True
        return (self.source == "auto" and not self.map_dir(split).is_dir()
                and self.instances_file(split).is_file())

    def _missing_labels_note(self, split: str) -> str | None:
        folder = SPLITS[split]
        if self.source != "instances" and self.map_dir(split).is_dir():
            return None
        if self.source != "stuffthingmaps" and self.instances_file(split).is_file():
            return None
        maps, instances = f"annotations/{folder}/", f"annotations/instances_{folder}.json"
        wants = {"stuffthingmaps": maps, "instances": instances,
                 "auto": f"{maps} (stuff-thing maps) or {instances}"}
        return f"images/{folder} has no labels: expected {wants[self.source]}"

    def label_path(self, split: str, sample_id: str) -> Path:
        if self.uses_instances(split):
            return self.instances_file(split)
        path = super().label_path(split, sample_id)
        converted = self.map_dir(split) / f"{sample_id}{INSTANCE_TRAIN_IDS_SUFFIX}"
        return converted if not path.is_file() and converted.is_file() else path

    def paper_labels(self, split: str, sample: Sample) -> np.ndarray:
        return sample.labels

    def label_exists(self, split: str, sample_id: str) -> bool:
        if self.uses_instances(split):
            return self._image_record(split, sample_id) is not None
        return super().label_exists(split, sample_id)

    def read_labels(self, split: str, sample_id: str) -> np.ndarray:
        if self.uses_instances(split):
            return self._paint_instances(split, sample_id)
        path = self.label_path(split, sample_id)
        if path.name.endswith(INSTANCE_TRAIN_IDS_SUFFIX):
            return INSTANCE_TRAIN_IDS.decode(read_index_png(path), path, self.name)
        return TRAIN_ID_TO_OBJECT[self.train_ids(split, sample_id)]

    # -- instance annotations -------------------------------------------------------------------------
    def _api(self, split: str):
        if split not in self._coco:
            try:
                from pycocotools.coco import COCO
            except ImportError:
                raise LayoutError(
                    f"reading {self.instances_file(split)} needs pycocotools: pip install pycocotools"
                ) from None
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
                api = COCO(str(self.instances_file(split)))
            unknown = sorted(set(api.getCatIds()) - set(THING_CLASS_OF_CATEGORY))
            if unknown:
                raise LayoutError(
                    f"{self.instances_file(split)} declares categories that are not COCO things: "
                    f"ids {', '.join(map(str, unknown[:6]))}: use COCO's own instances_{SPLITS[split]}.json")
            api.by_stem = {Path(img["file_name"]).stem: img for img in api.dataset.get("images", [])}
            self._coco[split] = api
        return self._coco[split]

    def _image_record(self, split: str, sample_id: str) -> dict | None:
        return self._api(split).by_stem.get(sample_id)

    def _paint_instances(self, split: str, sample_id: str) -> np.ndarray:
        api = self._api(split)
        record = self._image_record(split, sample_id)
        if record is None:
            raise MissingAnnotation(self.name, sample_id, f"{self.instances_file(split)} (image {sample_id})")
        labels = np.zeros((record["height"], record["width"]), dtype=np.uint8)  # [H, W]
        anns = api.loadAnns(api.getAnnIds(imgIds=[record["id"]], iscrowd=False))
        unknown: dict[int, int] = {}
        for ann in anns:  # annotation order, a later mask on top
            if ann["category_id"] not in THING_CLASS_OF_CATEGORY:
                unknown[ann["category_id"]] = unknown.get(ann["category_id"], 0) + 1
                continue
            labels[api.annToMask(ann).astype(bool)] = THING_CLASS_OF_CATEGORY[ann["category_id"]]
        if unknown:
            raise LabelValueError(
                f"{self.instances_file(split)} (image {sample_id})",
                [(f"category_id {c}", n) for c, n in sorted(unknown.items())],
                "the 80 COCO thing category ids", self.name, unit="annotations")
        return labels
