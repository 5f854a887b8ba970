"""The dense CLIP methods (maskclip, sclip, clearclip, naclip) as `Method`s: one class, the variant
being the config's method (clip_dense.py writes out what each variant's last layer computes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._base import Method
from .clip_dense import ClipDense


class ClipMethod(Method):
    """`config.method` on CLIP checkpoint `config.clip_model`: cosine similarity of every patch
    with every class name, on the patch grid of the image resized to `short_side`.

    `clip` (a ClipScorer of that checkpoint) shares a loaded model.
    """

    def __init__(self, config, *, device=None, dtype=None, clip=None, **_ignored) -> None:
        self.name = config.method
        self.dense = ClipDense(clip or config.clip_model, device=device,
                               dtype=config.dtype if dtype is None else dtype)
        self.device, self.dtype = self.dense.device, self.dense.dtype
        self.model_id, self.revision = self.dense.scorer.model_id, None

    @property
    def scorer(self):
        """The loaded CLIP (a ClipScorer), which the clip_topk rule may share."""
        return self.dense.scorer

    def check(self, config) -> None:
        if config.method != self.name:
            raise ValueError(f"this {self.name} model cannot run method {config.method!r}: load that method")
        if config.candidates == "itm_threshold":
            raise ValueError(f"candidates: itm_threshold needs an ITM head, which method {self.name} "
                             "has not: use all, clip_topk, oracle or file")
        config.clip_params().check_patch(self.dense.patch_size)

    def relevance_maps(self, images: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]],
                       config) -> list[np.ndarray]:
        """Per image the cosine similarity of every patch with every class. # [C, gh, gw] float32"""
        if len(images) != len(class_lists):
            raise ValueError(f"{len(images)} images but {len(class_lists)} class lists")
        params = config.clip_params()
        return [self.dense.logits(im, list(names), params).cpu().numpy()
                for im, names in zip(images, class_lists)]

    def grid(self, height: int, width: int, config) -> tuple[int, int]:
        return self.dense.grid_size(height, width, config.clip_params())

    def map_key(self, config) -> dict:
        """The method and its map-shaping fields (not logit_scale, prob_thd: they act after)."""
        return {"method": self.name, **config.clip_params().map_key()}
