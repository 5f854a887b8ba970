"""Supervised segmentation metrics: confusion matrix and mean IoU (audits and evaluation only).

Confusion matrices have ground truth in rows and prediction in columns; they accumulate over
images by addition, and `miou` is computed once on the sum (the standard protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BACKGROUND = "background"


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Pixel counts cm[g, p] of ground-truth class g predicted as p. # [num_classes, num_classes]

    Pixels whose ground truth is `ignore_index` are skipped. Any other value of `gt` or `pred`
    outside 0..num_classes-1 raises a ValueError (a wrong id mapping would skew every IoU).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    keep = gt != ignore_index
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)  # [pixels]
    for what, values in (("predicted", p), ("ground-truth", g)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = int(values[(values < 0) | (values >= num_classes)][0])
            raise ValueError(
                f"{what} class id {bad} is outside 0..{num_classes - 1}: map labels to dataset class "
                f"ids first or raise num_classes"
            )
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """IoU per class, mean IoU and pixel accuracy of one confusion matrix."""

    per_class_iou: np.ndarray  # [num_classes] float64; NaN where a class is in neither gt nor pred
    miou: float  # mean IoU over the classes present in the ground truth (NaN if none)
    pixel_accuracy: float  # correct / labelled pixels (NaN if none)


def miou(cm: np.ndarray) -> SegmentationScores:
    """Scores of a confusion matrix (ground truth in rows, prediction in columns)."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    tp = np.diag(cm)
    gt_count, pred_count = cm.sum(axis=1), cm.sum(axis=0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    present = gt_count > 0
    total = cm.sum()
    return SegmentationScores(
        per_class_iou=iou,
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
    )


def to_class_ids(
    label_map: np.ndarray, class_names: Sequence[str], label_names: Sequence[str]
) -> np.ndarray:
    """A segmenter label map (0 = background, i = class_names[i - 1]) as dataset class ids.

    Class id of a name = its index in `label_names` (the dataset's class names by id). Predicted
    background becomes the id of "background" when `label_names` starts with it, else the
    "no class" id len(label_names): never in the ground truth, so it counts only as a miss
    (use `num_label_classes(label_names)` as the confusion matrix size).
    """
    names = [str(n) for n in label_names]
    missing = [n for n in class_names if n not in names]
    if missing:
        raise ValueError(
            f"class {missing[0]!r} is not among the dataset's class names: use names of the vocabulary"
        )
    none = 0 if names and names[0] == BACKGROUND else len(names)
    lookup = np.array([none, *(names.index(n) for n in class_names)], dtype=np.int64)
    return lookup[np.asarray(label_map, dtype=np.int64)]


def num_label_classes(label_names: Sequence[str]) -> int:
    """Confusion matrix size for `to_class_ids`: the classes, plus "no class" without background."""
    return len(label_names) + (0 if len(label_names) and label_names[0] == BACKGROUND else 1)
