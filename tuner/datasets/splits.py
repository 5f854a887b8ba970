"""Which split a study tunes on, given the split it is evaluated on: never the same images."""

from __future__ import annotations

from ._base import Dataset, split_parts

#: a split -> the disjoint split to tune on when evaluating on it (in order of preference)
DISJOINT = {"val": ("train",), "test": ("train", "val"), "train": ("val",)}


def tuning_split(dataset: Dataset, eval_split: str) -> str:
    """A split to tune on whose images are disjoint from `eval_split`'s.

    The train split for val (and test), val for train; otherwise, and for datasets with only
    one split (an image folder, COCO with only val2017 on disk), the "<split>:tune" part of
    the seeded held-out partition: evaluate on "<split>:eval" then (`disjoint_splits`).
    Splits such as "trainval" are never picked for val: they hold its images.
    """
    dataset.check_split(eval_split)
    base, part = split_parts(eval_split)
    if part is not None:  # already a partition: tune on the other part
        return f"{base}:tune" if part == "eval" else f"{base}:eval"
    for candidate in DISJOINT.get(base, ()):
        if candidate in dataset.splits:
            return candidate
    return f"{base}:tune"


def disjoint_splits(dataset: Dataset, eval_split: str) -> tuple[str, str]:
    """(tuning split, evaluation split) with disjoint images: "val:eval" when tuning on "val:tune"."""
    tune = tuning_split(dataset, eval_split)
    base, part = split_parts(tune)
    if part is not None and split_parts(eval_split)[1] is None:
        return tune, f"{base}:eval"
    return tune, eval_split
