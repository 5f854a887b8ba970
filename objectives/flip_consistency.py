"""`flip_consistency`: agreement of the label map with that of the mirrored image, mirrored back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import Objective, ScoreInput


class FlipConsistency(Objective):
    """Mean IoU, over the labels either map uses, of the label map and the mirrored image's one.

    The tuner segments the image mirrored left to right with the same config (maps through the
    same cache) and mirrors the label map back (`ScoreInput.views["hflip"]`); this objective
    compares the two maps label by label (background included) and averages the IoUs. A config
    whose maps follow the image's content gives the same answer both ways; one that reads noise
    (a head that does not localise, a threshold that keeps speckle) does not, because the model's
    position embeddings see the mirrored image as a new one.

    Rationale: consistency under a transform that should not change the answer is a label-free
    sign of a stable segmentation (test-time augmentation agreement). Known failure modes: a
    constant label map (all background, or one class everywhere) is perfectly consistent and
    scores 1; consistent but wrong maps score high; it doubles the model and post-processing
    work of a trial. Use it inside `combination`, beside an objective that judges content.
    """

    name = "flip_consistency"
    views = ("hflip",)

    def __init__(self, device: str | None = None) -> None:
        pass  # nothing to load; `device` is accepted like every objective's

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        out = []
        for item in items:
            if not item.views or "hflip" not in item.views:
                raise ValueError("flip_consistency needs the label map of the mirrored image "
                                 "(ScoreInput.views['hflip']): score it through the tuner")
            a = np.asarray(item.label_map).ravel()
            b = np.asarray(item.views["hflip"]).ravel()
            n = int(max(a.max(), b.max())) + 1
            joint = np.bincount(a * n + b, minlength=n * n).reshape(n, n)
            inter = np.diag(joint).astype(np.float64)
            union = joint.sum(0) + joint.sum(1) - inter
            used = union > 0
            out.append(float((inter[used] / union[used]).mean()))
        return np.asarray(out, dtype=np.float64)
