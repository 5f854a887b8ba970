"""`region_agreement`: how well the label map follows the image's own regions (superpixels)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from segmenter.images import image_digest

from ._base import Objective, ScoreInput

#: superpixel maps kept per objective (one int32 [H, W] array per image)
SUPERPIXEL_MEMO_SIZE = 512


class RegionAgreement(Objective):
    """Pixel share of each SLIC superpixel that carries the superpixel's majority label.

    The image is cut into about `segments` class-agnostic regions by SLIC (scikit-image,
    `compactness`, on the image's own colours; Achanta et al., TPAMI 2012), once per image. A
    label map that follows those regions (object boundaries where colour changes, one label per
    uniform patch) scores 1; labels that cut through uniform regions, blocky patch-grid edges and
    speckle score lower. Needs no model and no label.

    Rationale: the CLIP and ITM objectives judge what a mask shows, not where its edge runs; blur
    and CRF settings mostly move edges, so this term lets a study see them. Known failure mode:
    a label map with one label everywhere (everything background, or one class) agrees with any
    regions and scores 1, so on its own it prefers segmenting nothing; use it as a small-weight
    part of `combination`, never alone.
    """

    name = "region_agreement"

    def __init__(self, segments: int = 100, compactness: float = 10.0, device: str | None = None) -> None:
        if int(segments) < 2 or not compactness > 0:
            raise ValueError("region_agreement needs segments >= 2 and compactness > 0")
        self.segments, self.compactness = int(segments), float(compactness)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()

    def superpixels(self, item: ScoreInput) -> np.ndarray:
        """SLIC regions of the image, memoised by content. # [H, W] int, 0..n-1"""
        from skimage.segmentation import slic

        key = item.image_digest or image_digest(item.image)
        if key not in self._memo:
            regions = slic(item.image, n_segments=self.segments, compactness=self.compactness,
                           start_label=0, channel_axis=-1)
            self._memo[key] = np.asarray(regions, dtype=np.int64)
            while len(self._memo) > SUPERPIXEL_MEMO_SIZE:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return self._memo[key]

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        out = []
        for item in items:
            regions = self.superpixels(item).ravel()
            labels = np.asarray(item.label_map, dtype=np.int64).ravel()
            n_labels = int(labels.max()) + 1
            counts = np.bincount(regions * n_labels + labels,
                                 minlength=(int(regions.max()) + 1) * n_labels)
            counts = counts.reshape(-1, n_labels)  # [regions, labels]
            out.append(float(counts.max(axis=1).sum() / max(labels.size, 1)))
        return np.asarray(out, dtype=np.float64)
