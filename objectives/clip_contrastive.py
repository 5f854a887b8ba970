"""`clip_contrastive`: CLIP's log-probability gain of each masked crop over the whole vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import ScoreInput
from ._clip import ClipObjective, mean_or_zero, vocabulary_names


class ClipContrastive(ClipObjective):
    """Mean over candidates of log P(k | M_k * I) - log P(k | black), softmax over the vocabulary.

    The masks are those of `clip_reward`; the softmax runs over every class name of the dataset
    (`ScoreInput.vocabulary`, the candidates when it is empty, "background" left out unless it
    is a candidate) instead of the image's few candidates. An empty mask contributes 0.

    Rationale: over the candidates alone the probabilities are relative to a handful of names,
    so a mask showing none of them can still "win" because the other candidates are absent too,
    and an image with a single candidate has P = 1 everywhere and carries no signal; against the
    whole vocabulary a masked crop must look like its class rather than like any class the
    dataset knows, which also makes the score comparable across candidate rules that pick
    different numbers of names. The log-ratio against the black image removes CLIP's prior
    preference for some names (what it says about an empty picture) and, unlike a difference of
    probabilities that are all small over a large vocabulary, stays informative; it is
    continuous and does not saturate.
    """

    name = "clip_contrastive"

    def softmax_names(self, item: ScoreInput) -> tuple[str, ...]:
        return vocabulary_names(item)

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        return np.array([mean_or_zero(masked - black) for masked, black in self.class_log_probs(items)],
                        dtype=np.float64)
