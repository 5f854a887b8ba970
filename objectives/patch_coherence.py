"""`patch_coherence`: do the label map's regions group the backbone's own patch features? (silhouette)"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.images import image_digest

from ._base import Objective, ScoreInput

#: patch-feature arrays kept per objective (one [gh*gw, D] array per image)
FEATURE_MEMO_SIZE = 2048


class PatchCoherence(Objective):
    """Mean silhouette of the label map's regions in the segmenter's own ViT patch features.

    The segmenter's vision encoder (the tuner passes its backend; no second model) embeds the
    image once; each patch takes the label that covers most of it in the final label map
    (background included). For every patch, a = mean cosine distance to the patches of its own
    label, b = the smallest mean distance to the patches of another label, and its silhouette is
    (b - a) / max(a, b) (Rousseeuw, J. Comput. Appl. Math. 1987); the image scores the mean over
    patches, in [-1, 1]. A label map with a single label, or labels with one patch, scores 0
    there (silhouette undefined: no grouping to judge).

    Rationale: a region that holds one object's patches is tight and far from the others; a mask
    that spills over background, a background that swallows part of an object, or labels from a
    head that does not localise mix dissimilar patches, whatever a crop classifier says of the
    mask. Unlike the CLIP and ITM objectives it sees over-segmentation. Known failure modes: it
    rewards grouping by appearance, not by class (two objects of one class that look different,
    or a textured background split in two, cost silhouette); it judges on the patch grid, so
    edges finer than a patch (blur, CRF detail) move it little; background patches of mixed
    texture lower every config alike.
    """

    name = "patch_coherence"
    models = ("segmenter",)

    def __init__(self, backend=None, *, device: str | None = None, image_size: int | None = None) -> None:
        if backend is None or not hasattr(backend, "patch_features"):
            raise ValueError("objective patch_coherence needs the segmenter's backend (the tuner passes "
                             "it; from Python: get_objective('patch_coherence', backend=...))")
        self.backend = backend
        self.image_size = int(image_size or backend.model.config.vision_config.image_size)
        self.grid = backend.patch_grid(self.image_size)
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _distances(self, item: ScoreInput) -> torch.Tensor:
        """Cosine distances between the image's patches, memoised by content. # [N, N]"""
        key = item.image_digest or image_digest(item.image)
        if key not in self._memo:
            pixels = self.backend.prepare_images([item.image], self.image_size)
            feats = F.normalize(self.backend.patch_features(pixels)[0], dim=-1).cpu()  # [N, D]
            self._memo[key] = (1.0 - feats @ feats.T).clamp_(min=0.0)
            while len(self._memo) > FEATURE_MEMO_SIZE:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return self._memo[key]

    def patch_labels(self, label_map: np.ndarray, classes: int) -> np.ndarray:
        """The label covering most of each patch (ties: the lower label). # [gh*gw]"""
        labels = torch.from_numpy(np.ascontiguousarray(label_map, dtype=np.int64))
        onehot = F.one_hot(labels, classes + 1).permute(2, 0, 1)[None].float()  # [1, C+1, H, W]
        share = F.interpolate(onehot, size=self.grid, mode="area")[0]  # [C+1, gh, gw]
        return share.argmax(0).flatten().numpy()

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        out = []
        for item in items:
            dist = self._distances(item)
            labels = torch.from_numpy(self.patch_labels(item.label_map, len(item.class_names)))
            used = torch.unique(labels)
            if used.numel() < 2:
                out.append(0.0)
                continue
            member = (labels[None] == used[:, None]).float()  # [L, N]
            sizes = member.sum(1)  # [L]
            mean_to = (dist @ member.T) / sizes  # [N, L]: mean distance of each patch to each label
            own = (labels[:, None] == used[None]).float()  # [N, L]
            own_size = (own * sizes).sum(1)  # [N]
            a = (dist @ member.T * own).sum(1) / (own_size - 1).clamp(min=1)  # leaves itself out
            b = mean_to.masked_fill(own.bool(), float("inf")).min(1).values
            sil = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
            sil = torch.where(own_size > 1, sil, torch.zeros_like(sil))  # a singleton: 0
            out.append(float(sil.mean()))
        return np.asarray(out, dtype=np.float64)
