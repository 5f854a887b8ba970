"""PnP-OVSS, top to bottom in the order of ALGORITHM.md's numbered steps.

1-3  the backend (BLIP ITM) turns an image and a prompt listing its classes into GradCAM maps
4    `salience_dropout` runs rounds of that, dropping the most salient patches between rounds
     (before 1-4, `candidates.py` picks which of the caller's class names the prompt lists)
5-10 `postprocess`: threshold, upsample, background, blur, dense CRF, argmax

Another method (`SegmenterConfig.method`, segmenter/methods/) replaces steps 1-4 with its own
maps; the dense CLIP methods' maps are cosine similarities, and their steps 5-7 are the methods'
own (`similarity_channels`: softmax over classes, background by `prob_thd`); blur, CRF and argmax
are shared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .backends import Backend, Prompt, build_prompt
from .candidates import candidate_indices
from .clip import ClipScorer
from .config import SegmenterConfig
from .images import as_rgb_uint8
from .methods import Method, load_method, maps_kind
from .methods.clip_dense import class_probabilities
from .refine import conv_crf, torch_gaussian_blur

log = logging.getLogger("ovss_tune.segmenter")


@dataclass(frozen=True)
class SegmentationResult:
    """What `Segmenter.segment` returns for one image.

    `class_names` is the caller's class list; `candidates` the names the prompt listed (all of
    them under the candidate rule `all`). Classes that were not candidates have zero maps and
    never appear in `label_map`.
    """

    label_map: np.ndarray  # [H, W] int64: 0 = background, i = class_names[i - 1]
    maps: np.ndarray  # [classes, gh, gw] float32 relevance, before thresholding
    class_names: tuple[str, ...]
    candidates: tuple[str, ...] | None = None  # None: every class of class_names

    def __post_init__(self) -> None:
        if self.candidates is None:
            object.__setattr__(self, "candidates", tuple(self.class_names))


def prompt_for(config: SegmenterConfig, class_names: Sequence[str]) -> Prompt:
    """Step 2 under `config`: its prefix, class spelling and prompt aliases."""
    return build_prompt(config.prompt_prefix, class_names, config.class_spelling,
                        dict(config.prompt_aliases))


# --- step 4: Salience Dropout ----------------------------------------------------------------------
def select_patches(salience: torch.Tensor, dropped: torch.Tensor, schedule: str, k: int) -> torch.Tensor:
    """The patches to drop after a round: the most salient ones not dropped yet.

    `salience` [N] is the sum of the round's class maps; `dropped` [N] bool. Schedule `topk` takes
    `k` patches, `halving` half of those still in place. Returns a bool mask [N] of new drops.
    """
    available = int((~dropped).sum())
    count = min(k, available) if schedule == "topk" else available // 2
    new = torch.zeros_like(dropped)
    if count > 0:
        scores = salience.float().masked_fill(dropped, float("-inf"))
        new[torch.topk(scores, count).indices] = True
    return new


def salience_dropout(
    backend: Backend, pixels: torch.Tensor, prompts: Sequence[Prompt], config: SegmenterConfig
) -> list[torch.Tensor]:
    """Steps 3-4 for a batch: per image the summed class maps of all rounds. # [C, gh, gw]

    Round 1 counts twice with `dropout_count_first_twice` (the authors' aggregate). The patches
    dropped after a round are the most salient by `dropout_salience`: "classes" sums the round's
    class maps, "tokens" the maps of every class word piece plus [SEP] for the captions shorter
    than the batch's longest (`Backend.gradcam(token_salience=True)`, the authors' rule). Already
    dropped patches are 0 in every later map.
    """
    batch, n_heads = len(prompts), list(config.heads)
    gh, gw = backend.patch_grid(pixels.shape[-1])
    dropped = torch.zeros(batch, gh * gw, dtype=torch.bool, device=pixels.device)
    totals = [torch.zeros(len(p.class_names), gh, gw, device=pixels.device) for p in prompts]
    tokens = config.dropout_salience == "tokens" and config.dropout_rounds > 1
    extra = {"itm_token": config.itm_token} | ({"token_salience": True} if tokens else {})
    for round_index in range(config.dropout_rounds):
        cams = backend.gradcam(pixels, prompts, [config.layer], dropped if round_index else None, **extra)
        weight = 2.0 if round_index == 0 and config.dropout_count_first_twice else 1.0
        for b in range(batch):
            maps = cams[b][0, n_heads].mean(0)  # [C (+1), gh, gw], heads averaged
            maps = maps.masked_fill(dropped[b].view(gh, gw), 0.0)
            classes = len(prompts[b].class_names)
            totals[b] += weight * maps[:classes]
            if round_index < config.dropout_rounds - 1:
                salience = (maps[classes] if tokens else maps.sum(0)).flatten()  # [gh*gw]
                dropped[b] |= select_patches(
                    salience, dropped[b], config.dropout_schedule, config.dropout_k
                )
    return totals


# --- steps 5-10: post-processing ---------------------------------------------------------------------
def threshold_maps(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Step 5: min-max normalise each class map to [0, 1], zero values below `threshold`."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    norm = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(norm >= threshold, norm, 0.0).astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int], align_corners: bool = False) -> np.ndarray:
    """Step 6: bilinear upsampling of [C, gh, gw] maps to the image's [C, H, W].

    `align_corners=True` puts the grid's corner cells on the image's corner pixels (the authors'
    code); False aligns cell and pixel edges, the way image resizing does.
    """
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)[0].numpy()


def add_background(maps: np.ndarray, rule: str, min_classes: int) -> tuple[np.ndarray, bool]:
    """Step 7: prepend a channel equal to 1 where no class survives (per the background rule).

    `auto` adds it only when the image has fewer than `min_classes` candidate classes.
    """
    if rule == "never" or (rule == "auto" and maps.shape[0] >= min_classes):
        return maps, False
    background = (maps.max(axis=0, keepdims=True) <= 0).astype(np.float32)
    return np.concatenate([background, maps]), True


def similarity_channels(
    maps: np.ndarray, logit_scale: float, prob_thd: float, size: tuple[int, int]
) -> np.ndarray:
    """Steps 5-7 of a dense CLIP method: cosine similarities [C, gh, gw] -> [1 + C, H, W].

    Bilinear upsampling to `size`, softmax over classes of `logit_scale` x similarity, and a
    background channel first that is 1 where the top probability is below `prob_thd` (0 never),
    else 0; normalised to sum 1, argmax then gives the methods' own label map.
    """
    probs = class_probabilities(maps, logit_scale, size).numpy()  # [C, H, W]
    background = (probs.max(axis=0, keepdims=True) < prob_thd).astype(np.float32)
    channels = np.concatenate([background, probs])
    return (channels / channels.sum(axis=0, keepdims=True)).astype(np.float32)


def gaussian_blur(
    channels: np.ndarray, sigma_factor: float, backend: str = "scipy", device=None, rescale: bool = True
) -> np.ndarray:
    """Step 8: blur every channel with sigma = factor x max(H, W), then min-max per channel
    (`rescale=False`: probabilities stay probabilities, the blur alone)."""
    if sigma_factor > 0:
        sigma = sigma_factor * max(channels.shape[1:])
        if backend == "torch":
            x = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32)).to(device or "cpu")
            channels = torch_gaussian_blur(x, sigma).cpu().numpy()
        else:
            channels = gaussian_filter(channels, sigma=(0, sigma, sigma), mode="nearest")
    if not rescale:
        return channels.astype(np.float32)
    lo = channels.min(axis=(1, 2), keepdims=True)
    span = channels.max(axis=(1, 2), keepdims=True) - lo
    # a constant channel (all background, say) keeps its value instead of collapsing to 0
    return np.where(span > 1e-12, (channels - lo) / np.where(span > 1e-12, span, 1.0),
                    np.clip(channels, 0.0, 1.0)).astype(np.float32)


def softmax(channels: np.ndarray) -> np.ndarray:
    shifted = np.exp(channels - channels.max(axis=0, keepdims=True))
    return (shifted / shifted.sum(axis=0, keepdims=True)).astype(np.float32)


def dense_crf(image: np.ndarray, probs: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """Step 9: fully connected CRF (pydensecrf) on softmax probabilities [C, H, W]."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    n, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=config.crf_gaussian_sxy, compat=config.crf_gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.crf_bilateral_sxy, srgb=config.crf_bilateral_srgb,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=config.crf_bilateral_compat,
    )
    return np.asarray(crf.inference(config.crf_iterations), dtype=np.float32).reshape(n, h, w)


#: photos above this many pixels, post-processed at full resolution, get a note (once a process)
LARGE_IMAGE_PIXELS = 4_000_000
_noted: set[str] = set()


def _note_once(kind: str, message: str) -> None:
    if kind not in _noted:
        _noted.add(kind)
        log.warning(message)


def postprocess_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The (h, w) steps 5-10 run at: the image's own size, or scaled down (aspect kept) so that
    the longer side is `max_side` pixels when it is longer than that."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def postprocess(image: np.ndarray, maps: np.ndarray, config: SegmenterConfig, device=None) -> np.ndarray:
    """Steps 5-10 for one image: relevance maps [C, gh, gw] -> label map [H, W].

    `device` serves the torch blur and the conv CRF (a GPU when there is one). With
    `config.postprocess_max_side` set and a longer image side, steps 5-10 run on the image scaled
    down to that side (the CRF's pixel ranges scaled with it, so they keep their meaning in the
    original image) and the label map is scaled back to [H, W] by nearest neighbour.
    """
    full = image.shape[:2]
    if maps.shape[0] == 0:  # no candidate class (oracle, file): everything is background
        return np.zeros(full, dtype=np.int64)
    size = postprocess_size(*full, config.postprocess_max_side)
    if size != full:
        _note_once("cap", f"post-processing images larger than {config.postprocess_max_side} px at "
                   f"{config.postprocess_max_side} px on their longer side (first: {full[1]}x{full[0]} "
                   f"-> {size[1]}x{size[0]}); label maps are scaled back by nearest neighbour "
                   "(postprocess_max_side: null for full resolution)")
        from PIL import Image

        small = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        scale = max(size) / max(full)
        scaled = config.replace(crf_gaussian_sxy=config.crf_gaussian_sxy * scale,
                                crf_bilateral_sxy=config.crf_bilateral_sxy * scale,
                                postprocess_max_side=None)
        labels = postprocess(small, maps, scaled, device)  # [h, w]
        rows = np.minimum((np.arange(full[0]) + 0.5) * size[0] / full[0], size[0] - 1).astype(np.intp)
        cols = np.minimum((np.arange(full[1]) + 0.5) * size[1] / full[1], size[1] - 1).astype(np.intp)
        return labels[np.ix_(rows, cols)]
    if full[0] * full[1] > LARGE_IMAGE_PIXELS and (config.crf or config.blur_sigma > 0):
        _note_once("large", f"post-processing a {full[1]}x{full[0]} image at full resolution (blur and "
                   "CRF take about a minute per 12 MP image on a CPU); set postprocess_max_side "
                   "(e.g. 1024) in the config to cap it")
    height, width = full
    if maps_kind(config.method) == "similarity":  # steps 5-7 of a dense CLIP method
        channels = similarity_channels(maps, config.logit_scale, config.prob_thd, (height, width))
        channels = gaussian_blur(channels, config.blur_sigma, config.blur_backend, device, rescale=False)
        probs, has_background = channels / channels.sum(axis=0, keepdims=True), True
    else:
        channels = upsample(threshold_maps(maps, config.threshold), (height, width),
                            config.align_corners)  # [C, H, W]
        channels, has_background = add_background(
            channels, config.background, config.background_min_classes
        )
        channels = gaussian_blur(channels, config.blur_sigma, config.blur_backend, device)
        probs = softmax(channels)
    if config.crf and probs.shape[0] > 1:
        if config.crf_backend == "conv":
            probs = conv_crf(image, probs, config, device)
        else:
            probs = dense_crf(image, probs, config)
    labels = probs.argmax(axis=0).astype(np.int64)  # step 10
    return labels if has_background else labels + 1


# --- the public segmenter ---------------------------------------------------------------------------
class Segmenter:
    """A segmentation method with one `SegmenterConfig`: `Segmenter(config).segment(image, class_names)`.

    `config.method` picks the method (PnP-OVSS by default); `backend` (pnp_ovss) or `method` shares
    an already loaded model.
    """

    def __init__(
        self,
        config: SegmenterConfig | None = None,
        *,
        device: str | torch.device | None = None,
        backend: Backend | None = None,
        batch_size: int | str = "auto",
        clip: ClipScorer | None = None,
        dtype: str | torch.dtype | None = None,
        method: Method | None = None,
    ) -> None:
        self.config = config or SegmenterConfig()
        self.method = method or load_method(self.config, device=device, dtype=dtype, backend=backend)
        self.method.check(self.config)
        self.method.grid(self.config.image_size, self.config.image_size, self.config)  # the input fits
        self.backend = self.method.backend  # the ITM model of pnp_ovss; None for the CLIP methods
        self.batch_size = self.method.batch_size(batch_size, self.config)
        self._clip = clip

    @classmethod
    def from_config(cls, path: str | Path, **kwargs) -> Segmenter:
        """A segmenter for a YAML config file (as written by `tune export`)."""
        return cls(SegmenterConfig.from_yaml(Path(path)), **kwargs)

    def relevance_maps(
        self, images: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """Steps 1-4 (the method's maps): per image one map per class on the patch grid. # [C, gh, gw]"""
        if len(images) != len(class_lists):
            raise ValueError(f"{len(images)} images but {len(class_lists)} class lists")
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [as_rgb_uint8(im) for im in images[start : start + self.batch_size]]
            out.extend(self.method.relevance_maps(chunk, class_lists[start : start + self.batch_size],
                                                  self.config))
        return out

    @property
    def clip(self) -> ClipScorer:
        """The CLIP model of the `clip_topk` candidate rule, loaded on first use."""
        if self._clip is None:
            shared = getattr(self.method, "scorer", None)  # the CLIP method's own model, when the same
            model = self.config.candidates_model
            self._clip = shared if shared is not None and shared.model_id == model \
                else ClipScorer(model, device=self.method.device, dtype=self.config.dtype)
        return self._clip

    def candidate_indices(
        self,
        images: Sequence[np.ndarray],
        class_lists: Sequence[Sequence[str]],
        image_classes: Sequence[Sequence[str] | None] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """Per image the indices of its class list that the prompt will name (config.candidates)."""
        rule = self.config.candidates
        return candidate_indices(
            rule, images, class_lists, image_classes=image_classes, backend=self.backend,
            clip=self.clip if rule == "clip_topk" else None, topk=self.config.candidates_topk,
            threshold=self.config.candidates_threshold, prompt_prefix=self.config.prompt_prefix,
            image_size=self.config.image_size, image_ids=image_ids,
            candidates_file=self.config.candidates_file,
        )

    def segment_batch(
        self,
        images: Sequence,
        class_lists: Sequence[Sequence[str]],
        image_classes: Sequence[Sequence[str] | None] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> list[SegmentationResult]:
        """Segment several images, each with its own class list (batched through the model).

        Under a candidate rule other than `all`, each class list is the vocabulary the rule
        chooses from; `image_classes` (ground-truth image-level labels) only serves `oracle`,
        `image_ids` (keys of `candidates_file`) only `file`.
        """
        if len(images) != len(class_lists):
            raise ValueError(f"{len(images)} images but {len(class_lists)} class lists")
        if image_classes is not None and len(image_classes) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_classes)} image_classes lists")
        if image_ids is not None and len(image_ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image_ids")
        results: list[SegmentationResult] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            arrays = [as_rgb_uint8(im) for im in images[start:stop]]
            names = [prompt_for(self.config, c).class_names for c in class_lists[start:stop]]
            chosen = self.candidate_indices(
                arrays, names, None if image_classes is None else image_classes[start:stop],
                None if image_ids is None else image_ids[start:stop],
            )
            todo = [b for b, idx in enumerate(chosen) if idx]  # oracle, file may leave an image with none
            maps = dict(zip(todo, self.relevance_maps(
                [arrays[b] for b in todo], [[names[b][i] for i in chosen[b]] for b in todo]
            )))
            for b, (image, idx) in enumerate(zip(arrays, chosen)):
                results.append(self._result(image, names[b], idx, maps.get(b)))
        return results

    def _result(
        self, image: np.ndarray, names: tuple[str, ...], chosen: list[int], maps: np.ndarray | None
    ) -> SegmentationResult:
        """Post-process the candidates' maps; index label map and maps by the full class list."""
        candidates = tuple(names[i] for i in chosen)
        if maps is None:  # no candidate: everything is background
            grid = self.method.grid(*image.shape[:2], self.config)
            return SegmentationResult(np.zeros(image.shape[:2], dtype=np.int64),
                                      np.zeros((len(names), *grid), dtype=np.float32), names, ())
        # [H, W]: 0 = background, j = candidates[j - 1]
        labels = postprocess(image, maps, self.config, self.method.device)
        if len(chosen) == len(names):
            return SegmentationResult(labels, maps, names, candidates)
        to_class = np.array([0, *(i + 1 for i in chosen)], dtype=np.int64)
        full = np.zeros((len(names), *maps.shape[1:]), dtype=np.float32)  # [classes, gh, gw]
        full[chosen] = maps
        return SegmentationResult(to_class[labels], full, names, candidates)

    def segment(
        self, image, class_names: Sequence[str], image_classes: Sequence[str] | None = None,
        image_id: str | None = None,
    ) -> SegmentationResult:
        """Label every pixel of `image` (HxWx3 uint8 array or PIL image) with one of `class_names`.

        `label_map` holds 0 for background and i for `class_names[i - 1]`. `image_classes` are
        the image's ground-truth class names, read only by the `oracle` candidate rule;
        `image_id` is its key in `candidates_file`, read only by the `file` rule.
        """
        if isinstance(class_names, str):
            class_names = [n for n in class_names.split(",")]
        return self.segment_batch(
            [image], [list(class_names)], None if image_classes is None else [list(image_classes)],
            None if image_id is None else [image_id],
        )[0]
