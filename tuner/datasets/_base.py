"""The `Dataset` seam: samples (image, id, optional labels), class names, ignore index, splits.

Every dataset also answers two pseudo-splits per split, a seeded held-out partition of its ids:
`"<split>:tune"` (a share `tune_fraction` of them) and `"<split>:eval"` (the rest). Membership
of an id depends only on the id and `split_seed`, so it is stable when images are added, and
the two parts never overlap. `ids()` and `load()` of every subclass accept them.

Evaluation protocols (`PROTOCOLS`, `tune eval/audit --protocol`) say which classes a benchmark's
ground truth is scored as. "standard": `class_names` and `Sample.labels`, as the MMSegmentation
harness of the SCLIP/NACLIP family scores them. "paper": as PnP-OVSS's own evaluation code does,
where background is always class 0 (`scored_class_names`), and each dataset's `paper_rule` says
what becomes of its other label values (`paper_labels`).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from segmenter.images import UnreadableImage

from ._classes import BACKGROUND

#: suffixes of the pseudo-splits: "<split>:tune" and "<split>:eval"
PARTS = ("tune", "eval")
#: evaluation protocols: how ground truth becomes scored class ids (see the module docstring)
PROTOCOLS = ("standard", "paper")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its labels where the dataset has them."""

    id: str
    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray | None = None  # [H, W] dataset class ids, ignore_index where unlabelled
    image_classes: tuple[str, ...] | None = None  # names of the classes present (image-level)


class CorruptImage(UnreadableImage):
    """An image (or its annotation file) exists but cannot be decoded; `path` names the file."""

    what = ""


class MissingAnnotation(FileNotFoundError):
    """An image has no annotation file where the layout puts it."""

    def __init__(self, dataset: str, sample_id: str, expected) -> None:
        self.dataset, self.sample_id, self.expected = dataset, sample_id, str(expected)
        super().__init__(f"no annotation for image {sample_id!r} of dataset {dataset!r}: expected {expected}")

    def __reduce__(self):
        return type(self), (self.dataset, self.sample_id, self.expected)


class LayoutError(ValueError):
    """A dataset directory does not have the expected layout.

    `problem` says what is wrong, `hint` what to run (the message is both), `expected` is the
    tree the dataset needs (printed by `tune data check`).
    """

    def __init__(self, problem: str, expected: str = "", hint: str = "") -> None:
        self.problem, self.expected, self.hint = problem, expected, hint
        super().__init__(f"{problem}: {hint}" if hint else problem)

    def __reduce__(self):
        return type(self), (self.problem, self.expected, self.hint)


class SkippedImageWarning(UserWarning):
    """A corrupt image was skipped by `iter_samples`."""


def split_parts(split: str) -> tuple[str, str | None]:
    """("val", "tune") for "val:tune"; ("val", None) for a plain split."""
    base, sep, part = split.rpartition(":")
    return (base, part) if sep and part in PARTS else (split, None)


def partition_score(sample_id: str, seed: int) -> float:
    """A deterministic number in [0, 1) for an id: ids below `tune_fraction` are tuning ids."""
    digest = hashlib.blake2b(f"{seed}\0{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def partition_ids(ids: Sequence[str], part: str, fraction: float, seed: int) -> list[str]:
    """The ids of one part ("tune" or "eval") of a seeded held-out partition, in their order.

    With two or more ids neither part is empty: the id with the lowest score always tunes and
    the one with the highest always evaluates.
    """
    if part not in PARTS:
        raise ValueError(f"unknown partition {part!r}: use one of {', '.join(PARTS)}")
    scores = {i: partition_score(i, seed) for i in ids}
    tune = {i for i, s in scores.items() if s < fraction}
    if len(scores) >= 2:
        tune.add(min(scores, key=scores.get))
        tune.discard(max(scores, key=scores.get))
    return [i for i in ids if (i in tune) == (part == "tune")]


def _accepts_pseudo_splits(method, kind: str):
    """Wrap a subclass's `ids` / `load` so "<split>:tune|eval" resolve to the split's partition."""
    if getattr(method, "_pseudo_splits", False):
        return method

    if kind == "ids":
        @functools.wraps(method)
        def wrapper(self, split: str):
            base, part = split_parts(split)
            if part is None:
                return method(self, split)
            return partition_ids(method(self, base), part, self.tune_fraction, self.split_seed)
    else:
        @functools.wraps(method)
        def wrapper(self, split: str, sample_id: str):
            return method(self, split_parts(split)[0], sample_id)

    wrapper._pseudo_splits = True
    return wrapper


class Dataset(abc.ABC):
    """A benchmark or image folder. Class id i is `class_names[i]`."""

    name: str = ""
    ignore_index: int = 255
    #: True when class id 0 is a real "background" class of the benchmark
    has_background: bool = False
    #: share of a split's ids in its "<split>:tune" pseudo-split, and the partition's seed
    tune_fraction: float = 0.2
    split_seed: int = 0
    #: what the paper protocol does to this benchmark's ground truth, in one line; None where the
    #: protocol has no rule for it (`--protocol paper` is then refused)
    paper_rule: str | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for kind in ("ids", "load"):
            if kind in cls.__dict__ and not getattr(cls.__dict__[kind], "__isabstractmethod__", False):
                setattr(cls, kind, _accepts_pseudo_splits(cls.__dict__[kind], kind))

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

    @property
    def synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Other names of each class by class id (the dataset's own spelling, text expansions)."""
        return tuple(() for _ in self.class_names)

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

    @property
    def vocabulary_synonyms(self) -> tuple[tuple[str, ...], ...]:
        """`synonyms` of the `vocabulary` classes, one tuple per vocabulary name."""
        synonyms = tuple(self.synonyms)
        return synonyms[1:] if self.has_background else synonyms

    def class_id(self, name: str) -> int:
        return self.class_names.index(name)

    def check_split(self, split: str) -> None:
        """Fail unless `split` is one of `splits` or a pseudo-split "<split>:tune|eval" of one."""
        if split_parts(split)[0] not in self.splits:
            available = ", ".join(self.splits) if self.splits else "none"
            raise ValueError(
                f"dataset {self.name!r} has no split {split!r}: available splits are "
                f"{available} (or <split>:tune / <split>:eval, a held-out partition of one)"
            )

    # -- evaluation protocols ---------------------------------------------------------------------------
    @classmethod
    def check_protocol(cls, protocol: str) -> None:
        """ValueError (one line) unless `protocol` is one of PROTOCOLS and this dataset has a rule for it."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown evaluation protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if protocol == "paper" and cls.paper_rule is None:
            raise ValueError(f"dataset {cls.name!r} has no paper-protocol rule (the authors' code scores no "
                             "such benchmark): use --protocol standard")

    def scored_class_names(self, protocol: str) -> tuple[str, ...]:
        """Names by scored class id under `protocol`: `class_names` (standard), or "background" and
        then the vocabulary (paper: background is always class 0)."""
        self.check_protocol(protocol)
        return self.class_names if protocol == "standard" else (BACKGROUND, *self.vocabulary)

    def scored_labels(self, protocol: str, split: str, sample: Sample) -> np.ndarray:
        """Ground truth of `sample` (of `split`) as class ids of `scored_class_names(protocol)`,
        `ignore_index` where nothing is scored. # [H, W] uint8

        ValueError when the sample has no labels or the dataset no rule for `protocol`."""
        self.check_protocol(protocol)
        if sample.labels is None:
            raise ValueError(f"image {sample.id!r} of dataset {self.name!r} has no pixel labels to score")
        return sample.labels if protocol == "standard" else self.paper_labels(split, sample)

    def paper_labels(self, split: str, sample: Sample) -> np.ndarray:
        """Ground truth under the paper protocol (`paper_rule`). # [H, W] uint8, 255 not scored"""
        raise ValueError(f"dataset {self.name!r} has no paper-protocol rule: use --protocol standard")

    def present_classes(self, labels: np.ndarray) -> tuple[str, ...]:
        """Names of the non-background classes in a label map (image-level labels), by id."""
        values = np.unique(labels)
        first = 1 if self.has_background else 0
        names = self.class_names
        return tuple(names[v] for v in values if first <= v < len(names) and v != self.ignore_index)


class SampleStream:
    """Samples of some ids of a split; corrupt images are skipped and listed in `skipped`.

    With `strict=True` the first corrupt image raises its `CorruptImage` instead. A missing
    annotation or image file is a layout problem and always raises.
    """

    def __init__(self, dataset: Dataset, split: str, ids: Iterable[str], strict: bool = False) -> None:
        self.dataset, self.split, self.ids, self.strict = dataset, split, ids, strict
        self.skipped: list[tuple[str, str]] = []  # (sample id, reason)
        self.loaded = 0

    def __iter__(self) -> Iterator[Sample]:
        for sample_id in self.ids:
            try:
                sample = self.dataset.load(self.split, sample_id)
            except CorruptImage as err:
                if self.strict:
                    raise
                self.skipped.append((sample_id, str(err)))
                warnings.warn(f"skipped image {sample_id!r}: {err}", SkippedImageWarning, stacklevel=2)
                continue
            self.loaded += 1
            yield sample


def iter_samples(dataset: Dataset, split: str, ids: Iterable[str], strict: bool = False) -> SampleStream:
    """Iterate the samples of `ids`, skipping (and counting, with a warning) corrupt images."""
    return SampleStream(dataset, split, ids, strict=strict)
