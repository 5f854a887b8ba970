"""`miou_supervised`: per-image mIoU against pixel labels. SUPERVISED: for audits only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import Objective, ScoreInput
from .metrics import BACKGROUND, confusion_matrix, miou, num_label_classes, to_class_ids


class MiouSupervised(Objective):
    """SUPERVISED per-image mIoU of the label map against the pixel labels (audits only).

    Reads `ScoreInput.labels`, ids of the dataset's classes named by `label_names` (by default
    the `vocabulary`; without either, ("background", *class_names), the label map's own
    convention). Segmenter labels are mapped with `metrics.to_class_ids`: class name -> its
    index in those names, predicted background -> the "background" id when the names start
    with it, else a "no class" id that only counts as a miss. An image without labelled pixels
    scores NaN.

    Rationale: a study that maximises this is no longer label-free; it exists so an audit can
    ask what labels would have chosen (the upper bound the label-free objectives are measured
    against) through the same study machinery, and every study that uses it records
    labels = "pixel". Per-image mIoU averages differently from the dataset mIoU (computed once
    on the summed confusion matrix), which the tuner reports separately.
    """

    name = "miou_supervised"
    labels = "pixel"

    def __init__(self, device: str | None = None, ignore_index: int = 255) -> None:
        # `device` is accepted so every objective takes the same options; nothing runs on it
        self.ignore_index = int(ignore_index)

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        out = []
        for item in items:
            if item.labels is None:
                raise ValueError(
                    "objective miou_supervised needs pixel labels (ScoreInput.labels): use a dataset "
                    "with masks, or a label-free objective such as clip_reward"
                )
            names = item.label_names or item.vocabulary or (BACKGROUND, *item.class_names)
            pred = to_class_ids(item.label_map, item.class_names, names)
            cm = confusion_matrix(pred, item.labels, num_label_classes(names), self.ignore_index)
            out.append(miou(cm).miou)
        return np.array(out, dtype=np.float64)
