"""`clip_reward`: the paper's weak reward, a count of classes whose masked crop CLIP prefers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import ScoreInput
from ._clip import ClipObjective


class ClipReward(ClipObjective):
    """Number of candidate classes k with P(k | M_k * I) > P(k | black image) (PnP-OVSS reward).

    For each candidate class k the binarised map becomes a mask M_k on CLIP's input (resize to
    S x S, blur sigma = 0.04 S, re-binarise: at 0.5 by default, or by the authors' rule with
    `mask_rebinarize: official`; or the final label map's pixels, `mask_source`), and CLIP, with
    a softmax over the image's candidate names only (cosine similarity / 0.01, no prompt
    template), says how likely k is for the masked image M_k * I and for the black image; the
    image scores one point per class whose masked image wins. An empty mask is the black image
    itself and never wins.

    Rationale: a mask that covers its object makes CLIP name that class more confidently than it
    does on a blank input, while a mask on the wrong region or on nothing does not, so counting
    wins measures without labels whether the maps point at their classes; it is the paper's
    choice, the one its published hyperparameters were tuned with, so it is the default and the
    reference the other objectives are compared against. It is coarse: integer-valued,
    saturating once every class wins, blind to how much of the object a mask covers, and 0 for
    an image with a single candidate (P = 1 on every input), which is why `clip_margin` and
    `clip_contrastive` exist beside it.
    """

    name = "clip_reward"

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        return np.array([float(np.sum(np.exp(masked) > np.exp(black)))
                         for masked, black in self.class_log_probs(items)], dtype=np.float64)
