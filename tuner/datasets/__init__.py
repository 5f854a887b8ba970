"""Datasets by name: `--dataset NAME` and `dataset: NAME` in a study spec.

Benchmarks read the layouts MMSegmentation's data preparation writes; `root` (the tuner's
`--data-root` / $OVSS_DATA) is the dataset's directory or a data directory holding it under its
usual name (coco_stuff164k, VOCdevkit/VOC2012, VOCdevkit/VOC2010, ade/ADEChallengeData2016,
cityscapes). `tune data check --dataset NAME` shows what was found and the expected tree.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._base import (
    PROTOCOLS,
    CorruptImage,
    Dataset,
    LayoutError,
    MissingAnnotation,
    Sample,
    SampleStream,
    SkippedImageWarning,
    iter_samples,
    partition_ids,
    split_parts,
)
from ._classes import ClassList, builtin_classes, read_class_file
from ._disk import LabelValueError
from .splits import disjoint_splits, tuning_split

# name -> "module:Class", imported when asked for
DATASETS: dict[str, str] = {
    "shapes": "tuner.datasets.shapes:ShapesDataset",
    "coco": "tuner.datasets.coco:CocoObjectDataset",
    "coco_stuff": "tuner.datasets.coco:CocoStuffDataset",
    "voc": "tuner.datasets.voc:VocDataset",
    "voc20": "tuner.datasets.voc:Voc20Dataset",
    "context": "tuner.datasets.context:PascalContext59Dataset",
    "context60": "tuner.datasets.context:PascalContext60Dataset",
    "ade20k": "tuner.datasets.ade20k:ADE20KDataset",
    "cityscapes": "tuner.datasets.cityscapes:CityscapesDataset",
    "folder": "tuner.datasets.folder:FolderDataset",
}


def register_dataset(name: str, target: str) -> None:
    """Make `--dataset NAME` construct `target` ("package.module:Class")."""
    DATASETS[name] = target


def dataset_class(name: str) -> type[Dataset]:
    """The class registered as `name` (imported now)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: available datasets are {', '.join(sorted(DATASETS))}")
    module, cls = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_dataset(name: str, **options: Any) -> Dataset:
    """Construct the dataset registered as `name` (options: root, seed, ...)."""
    return dataset_class(name)(**options)


__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "ClassList",
    "CorruptImage",
    "Dataset",
    "LabelValueError",
    "LayoutError",
    "MissingAnnotation",
    "Sample",
    "SampleStream",
    "SkippedImageWarning",
    "builtin_classes",
    "dataset_class",
    "disjoint_splits",
    "iter_samples",
    "load_dataset",
    "partition_ids",
    "read_class_file",
    "register_dataset",
    "split_parts",
    "tuning_split",
]
