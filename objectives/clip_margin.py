"""`clip_margin`: the continuous CLIP reward, mean of P(k | M_k * I) - P(k | black image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import ScoreInput
from ._clip import ClipObjective, mean_or_zero


class ClipMargin(ClipObjective):
    """Mean over candidate classes of P(k | M_k * I) - P(k | black image) (continuous reward).

    Same masks, softmax (over the image's candidate names, cosine similarity / 0.01, no
    template) and black-image baseline as `clip_reward`, but the margin itself is averaged
    instead of counting where it is positive. An empty mask contributes 0.

    Rationale: the count saturates once every class wins and cannot tell a mask that barely
    beats the black image from one that makes CLIP certain, so many settings tie and the sampler
    learns nothing from them; the margin keeps that information, grows as a mask covers more of
    its object and less of the others, and is bounded in [-1, 1] per image, so a few images
    cannot dominate the study's mean.
    """

    name = "clip_margin"

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        return np.array([mean_or_zero(np.exp(masked) - np.exp(black))
                         for masked, black in self.class_log_probs(items)], dtype=np.float64)
