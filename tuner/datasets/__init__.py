"""Datasets by name: `--dataset NAME` and `dataset: NAME` in a study spec."""

from __future__ import annotations

import importlib
from typing import Any

from ._base import Dataset, Sample

# name -> "module:Class", imported when asked for
DATASETS: dict[str, str] = {"shapes": "tuner.datasets.shapes:ShapesDataset"}


def register_dataset(name: str, target: str) -> None:
    """Make `--dataset NAME` construct `target` ("package.module:Class")."""
    DATASETS[name] = target


def load_dataset(name: str, **options: Any) -> Dataset:
    """Construct the dataset registered as `name` (options: root, seed, ...)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: available datasets are {', '.join(sorted(DATASETS))}")
    module, cls = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["DATASETS", "Dataset", "Sample", "load_dataset", "register_dataset"]
