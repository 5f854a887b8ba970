"""Shared machinery of the CLIP objectives: masked crops M_k * I and their class probabilities."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.clip import DEFAULT_CLIP, ClipScorer, resize_square
from segmenter.images import image_digest
from segmenter.pipeline import threshold_maps

from ._base import OFFICIAL_REWARD_OPTIONS, Objective, ScoreInput
from .metrics import BACKGROUND

#: the paper's blur of the resized mask: sigma = 0.04 x CLIP's input side
MASK_BLUR = 0.04
#: the blurred mask is binarised again at this level [ours; 0.5 keeps the mask's extent, rounds its
#: corners and fills one-patch gaps, but erodes a small mask: a one-patch mask vanishes]
MASK_REBINARIZE = 0.5
#: `mask_rebinarize` value of the authors' rule [official]: resize the 0/1 map by a cubic spline,
#: blur, min-max the blurred mask and binarise it again at the segmenter's threshold t (> t): the
#: mask grows by an amount t controls, and a one-patch mask survives
REBINARIZE_OFFICIAL = OFFICIAL_REWARD_OPTIONS["mask_rebinarize"]
#: where M_k comes from: "final" = the pixels the final label map gives class k (after background,
#: blur and CRF: what the user gets, so every searched setting can move the objective);
#: "threshold" = the paper's masks cut from the thresholded relevance maps (see reward_masks)
MASK_SOURCES = ("final", "threshold")
#: masked-crop embeddings an objective keeps (about 3 KB each for CLIP-L): M_k * I depends only on
#: the image and the mask, so a study that meets a mask again (the same layer and head, another
#: threshold that keeps the same patches, a post-processing change) embeds it once
CROP_MEMO_SIZE = 20000


def rebinarize_problem(value: object) -> str | None:
    """What is wrong with a `rebinarize` / `mask_rebinarize` value, or None when it is valid."""
    if value == REBINARIZE_OFFICIAL and isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return (f"{value!r} is not a mask rule: use {REBINARIZE_OFFICIAL!r} (the authors' rule) or a "
                "level in [0, 1) for the blurred mask")
    return None


def reward_masks(
    maps: np.ndarray,
    threshold: float,
    size: int,
    blur: float = MASK_BLUR,
    rebinarize: float | str = MASK_REBINARIZE,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The paper's masks M_k on CLIP's input, one per class of `maps` [C, gh, gw]. # [C, S, S] bool

    Each map is binarised at the segmenter's threshold t (min-max per class, >= t; exactly the
    pixels `threshold_maps` keeps above 0), then, by `rebinarize`:

    - a level r in [0, 1) [ours]: resize to S x S by nearest neighbour (each patch a block),
      Gaussian blur with sigma = blur x S (edges replicated, kernel truncated at 4 sigma like
      scipy), keep > r. The mask keeps its extent or shrinks; a one-patch mask vanishes.
    - "official" [the authors' code]: resize the 0/1 map to S x S by a cubic spline with zeros
      outside (scikit-image `resize(order=3, mode="constant")`), blur with sigma = blur x S
      (scipy, edges reflected), min-max the blurred mask to [0, 1] and keep > t. The mask grows
      (more for a low t); a one-patch mask on a 21 x 21 grid becomes about 2,800 px at S = 336.

    An empty binary map gives an empty mask. Raises ValueError for another `rebinarize` value.
    """
    problem = rebinarize_problem(rebinarize)
    if problem:
        raise ValueError(f"rebinarize: {problem}")
    binary = threshold_maps(np.asarray(maps, dtype=np.float32), threshold) > 0  # [C, gh, gw]
    if binary.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.bool, device=device)
    if rebinarize == REBINARIZE_OFFICIAL:
        out = np.stack([_official_mask(b, float(threshold), size, blur) for b in binary])  # [C, S, S]
        return torch.from_numpy(out).to(device)
    masks = torch.from_numpy(binary).to(device).float()[:, None]  # [C, 1, gh, gw]
    masks = F.interpolate(masks, size=(size, size), mode="nearest")  # [C, 1, S, S]
    return gaussian_blur(masks, blur * size)[:, 0] > float(rebinarize)


def _official_mask(binary: np.ndarray, threshold: float, size: int, blur: float) -> np.ndarray:
    """The authors' mask rule for one [gh, gw] bool map. # [S, S] bool"""
    from scipy.ndimage import gaussian_filter
    from skimage.transform import resize

    if not binary.any():
        return np.zeros((size, size), dtype=bool)
    up = resize(binary.astype(np.float64), (size, size), order=3, mode="constant")  # [S, S]
    soft = gaussian_filter(up, blur * size, mode="reflect") if blur > 0 else up
    low, high = float(soft.min()), float(soft.max())
    if high <= low:  # a constant blurred mask: nothing to normalise
        return np.full((size, size), high > 0)
    return (soft - low) / (high - low) > threshold


def final_masks(label_map: np.ndarray, classes: int, size: int,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Masks M_k of the final label map on CLIP's input. # [C, S, S] bool

    `label_map` [H, W] holds 0 for background and k for the k-th class (ScoreInput convention);
    each class's pixels are squashed to S x S the way the image is (antialiased bilinear, so a
    pixel of the input keeps its share) and kept where they cover at least half of a pixel.
    """
    labels = torch.from_numpy(np.ascontiguousarray(label_map)).to(device)
    if classes == 0:
        return torch.zeros(0, size, size, dtype=torch.bool, device=device)
    ids = torch.arange(1, classes + 1, device=device).view(-1, 1, 1)
    masks = (labels[None] == ids).float()[:, None]  # [C, 1, H, W]
    if tuple(masks.shape[-2:]) != (size, size):
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
    return masks[:, 0] >= 0.5


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with replicated edges (scipy mode="nearest")."""
    if sigma <= 0:
        return x
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)  # [2r + 1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


class ClipObjective(Objective):
    """Base of the objectives that compare CLIP's view of M_k * I with its view of a black image.

    Options: `clip_model` (hub id or local directory), `revision`, `device`, `batch_size`
    (CLIP images per forward), `logit_scale` ("paper" = 100, i.e. cosine / 0.01; "model" =
    CLIP's learned scale; or a number), `mask_source` ("final", the default: M_k from the final
    label map, so blur, CRF and background settings change the score; "threshold": the paper's
    masks from the thresholded maps, which those settings cannot move), `mask_blur` and
    `mask_rebinarize` (the mask rule of "threshold" masks, see `reward_masks`: a level in [0, 1),
    0.5 by default, or "official"; refused with "final", whose masks it cannot change); `clip`
    shares an already loaded `ClipScorer` (then the model options are not used).
    """

    models = ("clip",)
    labels = "none"

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        logit_scale: float | str = "paper",
        mask_blur: float = MASK_BLUR,
        mask_rebinarize: float | str | None = None,
        mask_source: str = "final",
        clip: ClipScorer | None = None,
        dtype: str | None = "auto",
    ) -> None:
        problem = self.options_problem({"mask_blur": mask_blur, "mask_rebinarize": mask_rebinarize,
                                        "mask_source": mask_source})
        if problem:
            raise ValueError(f"{problem[0]} {problem[1]}")
        self.mask_source = mask_source
        self.clip = clip or ClipScorer(clip_model, revision=revision, device=device, batch_size=batch_size,
                                       dtype=dtype)
        self.logit_scale = self.clip.logit_scale(logit_scale)
        self.mask_blur = float(mask_blur)
        self.mask_rebinarize: float | str = (
            MASK_REBINARIZE if mask_rebinarize is None
            else mask_rebinarize if mask_rebinarize == REBINARIZE_OFFICIAL else float(mask_rebinarize))
        self._crops: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self.crops_embedded = 0  # masked crops CLIP has run on (memo hits not counted)

    @classmethod
    def options_problem(cls, options: Mapping[str, Any]) -> tuple[str, str] | None:
        """(option, what is wrong) for the first invalid mask option value, or None."""
        source = options.get("mask_source", "final")
        if source not in MASK_SOURCES:
            return "mask_source", f"{source!r} is unknown: use {' or '.join(MASK_SOURCES)}"
        blur = options.get("mask_blur", MASK_BLUR)
        if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not blur >= 0:
            return "mask_blur", f"{blur!r} is not a blur: use a number >= 0 (sigma as a share of CLIP's side)"
        rebinarize = options.get("mask_rebinarize")
        if rebinarize is None:
            return None
        problem = rebinarize_problem(rebinarize)
        if problem:
            return "mask_rebinarize", problem
        if source == "final":
            return "mask_rebinarize", ("applies to mask_source: threshold only (final masks are the label "
                                       "map's pixels): remove it, or set mask_source: threshold")
        return None

    def forget_crops(self) -> None:
        """Empty the masked-crop memo (benchmarks time CLIP's work with it cold)."""
        self._crops.clear()

    def softmax_names(self, item: ScoreInput) -> tuple[str, ...]:
        """The names the CLIP softmax runs over: the image's candidate classes."""
        return tuple(item.class_names)

    def masks(self, item: ScoreInput, size: int) -> torch.Tensor:
        """M_k of each candidate class of `item` on CLIP's S x S input. # [C, S, S] bool"""
        if self.mask_source == "final":
            return final_masks(item.label_map, len(item.class_names), size, self.clip.device)
        return reward_masks(item.maps, item.threshold, size, self.mask_blur, self.mask_rebinarize,
                            self.clip.device)

    @torch.inference_mode()
    def class_log_probs(self, items: Sequence[ScoreInput]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per item (log P(k | M_k * I), log P(k | black)) for its classes k. # ([C], [C])

        The softmax runs over `softmax_names(item)`. Masked images of all items are embedded
        together, `batch_size` per forward, each distinct (image, mask) once per objective (see
        CROP_MEMO_SIZE); an empty mask is the black image itself.
        """
        clip, size = self.clip, self.clip.input_size
        masks = [self.masks(it, size) for it in items]  # each [C, S, S] bool
        black = clip.black_embedding  # [D]
        embeds = [black.expand(m.shape[0], -1).clone() for m in masks]  # each [C, D]
        pending: dict[bytes, list[tuple[int, int]]] = {}  # memo key -> (item, class) of new crops
        for i, (item, m) in enumerate(zip(items, masks)):
            image_key = (item.image_digest or image_digest(item.image)).encode()
            packed = np.packbits(m.cpu().numpy(), axis=-1)  # [C, S, S / 8]
            for k in range(m.shape[0]):
                if not packed[k].any():
                    continue
                key = hashlib.blake2b(image_key + packed[k].tobytes(), digest_size=16).digest()
                if key in self._crops:
                    self._crops.move_to_end(key)
                    embeds[i][k] = self._crops[key]
                else:  # the same crop twice in one call is embedded once too
                    pending.setdefault(key, []).append((i, k))
        jobs = list(pending.items())
        resized: dict[int, torch.Tensor] = {}
        for start in range(0, len(jobs), clip.batch_size):
            chunk = jobs[start : start + clip.batch_size]
            crops = []
            for _, [(i, k), *_] in chunk:
                if i not in resized:
                    resized[i] = _image_tensor(items[i].image, size, clip.device)  # [3, S, S]
                crops.append(resized[i] * masks[i][k])  # M_k * I: [3, S, S]
            out = clip.image_embeddings(torch.stack(crops))  # [chunk, D]
            self.crops_embedded += len(chunk)
            for (key, places), row in zip(chunk, out):
                for i, k in places:
                    embeds[i][k] = row
                self._crops[key] = row.clone()
        while len(self._crops) > CROP_MEMO_SIZE:
            self._crops.popitem(last=False)
        results = []
        for item, emb, mask in zip(items, embeds, masks):
            names = self.softmax_names(item)
            where = [names.index(n) for n in item.class_names]
            text = clip.text_embeddings(names)  # [V, D]
            logits = self.logit_scale * torch.cat([emb, black[None]]) @ text.T  # [C + 1, V]
            logp = logits.float().log_softmax(-1)
            rows = torch.arange(len(where), device=logp.device)
            masked = logp[rows, where] if where else logp.new_zeros(0)  # [C]
            on_black = logp[-1, where] if where else logp.new_zeros(0)  # [C]
            empty = ~mask.flatten(1).any(1)  # [C]: M_k * I is the black image, an exact tie
            masked = torch.where(empty, on_black, masked)
            results.append((masked.cpu().numpy().astype(np.float64),
                            on_black.cpu().numpy().astype(np.float64)))
        return results


def vocabulary_names(item: ScoreInput) -> tuple[str, ...]:
    """The dataset vocabulary (class_names when empty), candidates added, "background" left out."""
    names = [n for n in (item.vocabulary or item.class_names)
             if n != BACKGROUND or n in item.class_names]
    return tuple(dict.fromkeys([*names, *item.class_names]))


def _image_tensor(image: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 -> [3, S, S] float RGB in [0, 1] (antialiased bicubic when resized)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
    return resize_square(x, size)[0]


def mean_or_zero(values: np.ndarray) -> float:
    """The mean, 0.0 for an image without classes."""
    return float(values.mean()) if values.size else 0.0


__all__ = ["ClipObjective", "reward_masks", "final_masks", "gaussian_blur", "vocabulary_names",
           "mean_or_zero", "rebinarize_problem", "MASK_BLUR", "MASK_REBINARIZE",
           "MASK_SOURCES", "REBINARIZE_OFFICIAL"]
