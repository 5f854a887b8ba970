"""The `Dataset` seam: samples (image, id, optional labels), class names, ignore index, splits."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its labels where the dataset has them."""

    id: str
    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray | None = None  # [H, W] dataset class ids, ignore_index where unlabelled
    image_classes: tuple[str, ...] | None = None  # names of the classes present (image-level)


class Dataset(abc.ABC):
    """A benchmark or image folder. Class id i is `class_names[i]`."""

    name: str = ""
    ignore_index: int = 255
    #: True when class id 0 is a real "background" class of the benchmark
    has_background: bool = False

    @property
    @abc.abstractmethod
    def class_names(self) -> tuple[str, ...]:
        """Names by class id (background first when `has_background`)."""

    @property
    @abc.abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The splits this dataset has on disk."""

    @property
    def has_labels(self) -> bool:
        return True

    @abc.abstractmethod
    def ids(self, split: str) -> list[str]:
        """Sample ids of a split, in a stable order."""

    @abc.abstractmethod
    def load(self, split: str, sample_id: str) -> Sample:
        """Read one sample."""

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The names a prompt may list: every class except the background."""
        names = self.class_names
        return names[1:] if self.has_background else names

    def class_id(self, name: str) -> int:
        return self.class_names.index(name)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"dataset {self.name!r} has no split {split!r}: available splits are "
                f"{', '.join(self.splits)}"
            )
