"""`itm_match`: the segmenter's own BLIP ITM head on each final mask, inside against outside."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from segmenter.backends import build_prompt
from segmenter.images import image_digest

from ._base import Objective, ScoreInput

#: ITM probabilities an objective keeps, keyed by (image, mask, side, text)
ITM_MEMO_SIZE = 50000


class ItmMatch(Objective):
    """Mean over candidates of P_itm(k | M_k * I) - P_itm(k | (1 - M_k) * I), BLIP's own ITM head.

    M_k is the set of pixels the final label map gives class k. The segmenter's BLIP (the
    tuner passes its backend; no second model) reads the image with everything outside the mask
    blacked out, and the image with the mask blacked out, each against the caption
    `prompt_prefix + k`; the class scores the difference of the two ITM match probabilities.
    A mask that holds the whole object and nothing else makes the first near 1 and the second
    near 0; a mask that misses part of the object leaves it matched outside; an empty mask
    scores P(k | black) - P(k | I), below zero for a class the image shows.

    Rationale: CLIP scores masked crops poorly and is a second model to load; the ITM head is the
    score the segmenter's maps come from, it judges the mask the user gets, and the outside term
    punishes under-segmentation, which a crop-only score cannot see. Known failure modes: a mask
    that spills onto background still matches inside (over-segmentation is punished only
    through other classes' masks); BLIP's ITM head accepts a caption when the object is partly
    visible, so masks that cover a recognisable part already score well; and it costs two ITM
    passes (a vision forward each) per class and image, memoised per mask.
    """

    name = "itm_match"
    models = ("segmenter",)

    def __init__(
        self,
        backend=None,
        *,
        device: str | None = None,
        image_size: int | None = None,
        prompt_prefix: str = "a picture of ",
        batch_size: int = 32,
    ) -> None:
        if backend is None or not hasattr(backend, "itm_pair_scores"):
            raise ValueError("objective itm_match needs the segmenter's backend with an ITM head "
                             "(the tuner passes it; from Python: get_objective('itm_match', backend=...))")
        self.backend, self.prompt_prefix, self.batch_size = backend, str(prompt_prefix), int(batch_size)
        native = int(backend.model.config.vision_config.image_size)
        self.image_size = int(image_size or native)
        backend.patch_grid(self.image_size)
        self._memo: OrderedDict[bytes, float] = OrderedDict()
        self.crops_scored = 0  # masked images the ITM head has read (memo hits not counted)

    def _caption(self, name: str) -> str:
        return build_prompt(self.prompt_prefix, [name]).text

    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        jobs: dict[bytes, tuple[int, np.ndarray, str]] = {}  # key -> (item, keep mask, caption)
        plan: list[list[tuple[bytes, bytes]]] = []  # per item, per class: (inside key, outside key)
        for i, item in enumerate(items):
            digest = (item.image_digest or image_digest(item.image)).encode()
            labels = np.asarray(item.label_map)
            rows = []
            for k, name in enumerate(item.class_names, start=1):
                caption = self._caption(name)
                inside = labels == k
                keys = []
                for keep in (inside, ~inside):
                    key = hashlib.blake2b(digest + np.packbits(keep).tobytes() + caption.encode(),
                                          digest_size=16).digest()
                    if key not in self._memo and key not in jobs:
                        jobs[key] = (i, keep, caption)
                    keys.append(key)
                rows.append((keys[0], keys[1]))
            plan.append(rows)
        self._run(items, jobs)
        out = []
        for rows in plan:
            gains = [self._memo[a] - self._memo[b] for a, b in rows]
            out.append(float(np.mean(gains)) if gains else 0.0)
        for rows in plan:  # keep what this call used, drop the least recently used beyond the cap
            for a, b in rows:
                self._memo.move_to_end(a)
                self._memo.move_to_end(b)
        while len(self._memo) > ITM_MEMO_SIZE:
            self._memo.popitem(last=False)
        return np.asarray(out, dtype=np.float64)

    @torch.inference_mode()
    def _run(self, items: Sequence[ScoreInput], jobs: dict) -> None:
        todo = list(jobs.items())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            crops = [items[i].image * keep[..., None].astype(np.uint8) for _, (i, keep, _) in chunk]
            pixels = self.backend.prepare_images(crops, self.image_size)  # [b, 3, S, S]
            probs = self.backend.itm_pair_scores(pixels, [c for _, (_, _, c) in chunk])  # [b]
            self.crops_scored += len(chunk)
            for (key, _), p in zip(chunk, probs.float().cpu().numpy()):
                self._memo[key] = float(p)
