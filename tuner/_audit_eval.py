"""Re-evaluating a recorded study's configs image by image, for `tune audit`.

A study stores each trial's objective per image but only the summed segmentation metrics, and
an audit needs per-image counts (to resample images) and predicted mask areas. This rebuilds
what `tune run` built (dataset, backend, objective, map cache) from the study's own records and
runs the same steps as `TrialRunner.evaluate`, keeping every image's result. With a warm map
cache no vision-language model runs: only post-processing, the objective and the counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from objectives import ScoreInput, confusion_matrix, get_objective, num_label_classes, to_class_ids
from segmenter import SegmenterConfig, postprocess
from segmenter.images import image_digest
from segmenter.methods import load_method
from segmenter.yaml_input import YamlInputError, load_yaml

from ._audit_stats import counts_from_confusion
from .cache import MapCache
from .datasets import Dataset, dataset_class, iter_samples, load_dataset
from .trial import CandidatePicker, MapProvider, TuningImage, ground_truth_candidates, view_label_maps

#: keys of the study attr "models" that describe the segmenter; the rest are objective options
_MODEL_KEYS = ("backend", "model", "revision", "method", "clip_model")


@dataclass(frozen=True)
class ImageSet:
    """Images of one dataset split, loaded once, in a fixed order."""

    dataset: Dataset
    split: str
    images: list[TuningImage]
    skipped: tuple[tuple[str, str], ...] = ()  # (id, reason) of corrupt images left out
    _scored: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ids(self) -> list[str]:
        return [im.sample.id for im in self.images]

    @property
    def labelled(self) -> bool:
        return self.dataset.has_labels and all(im.sample.labels is not None for im in self.images)

    def scored_labels(self, protocol: str) -> list[np.ndarray]:
        """Each image's ground truth as `protocol` scores it, made once. # each [H, W]"""
        if protocol not in self._scored:
            self._scored[protocol] = [self.dataset.scored_labels(protocol, self.split, im.sample)
                                      for im in self.images]
        return self._scored[protocol]

    def true_foreground(self, protocol: str = "standard") -> float | None:
        """Share of scored pixels that are not background under `protocol` (None without a
        background class: the paper protocol always has one)."""
        if not self.labelled or not (self.dataset.has_background or protocol == "paper"):
            return None
        labelled = fg = 0
        for truth in self.scored_labels(protocol):
            keep = truth != self.dataset.ignore_index
            labelled += int(keep.sum())
            fg += int((keep & (truth != 0)).sum())
        return fg / labelled if labelled else None


@dataclass(frozen=True)
class PerImage:
    """One config on one image set, image by image."""

    objective: np.ndarray  # [n] objective per image
    foreground: np.ndarray  # [n] share of pixels given a class (not background)
    counts: np.ndarray | None  # [n, 3, K] tp, gt, pred pixels per class id; None without labels


def recorded_objective_options(attrs: dict[str, Any]) -> dict[str, Any]:
    """The objective's options as the study recorded them (strings in "models", typed back by YAML)."""
    if isinstance(attrs.get("objective_options"), dict):  # stored as they were, when a study has them
        return dict(attrs["objective_options"])
    return {k: _typed(v) for k, v in (attrs.get("models") or {}).items() if k not in _MODEL_KEYS}


def _takes_root(dataset: str) -> bool:
    """Does the dataset registered as `dataset` read a directory (a `root` option)?"""
    import inspect

    return "root" in inspect.signature(dataset_class(dataset).__init__).parameters


def _typed(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value == "None":
        return None
    try:
        return load_yaml(value, "a recorded objective option")
    except YamlInputError:
        return value


class Reevaluator:
    """The models, datasets and map cache of a recorded study, to evaluate configs image by image."""

    def __init__(
        self,
        attrs: dict[str, Any],
        *,
        device: str | None = None,
        cache_dir: str | None = "runs/cache",
        batch_size: int = 8,
        data_root: str | None = None,
        protocol: str = "standard",
    ) -> None:
        missing = [k for k in ("dataset", "fixed", "objective") if k not in attrs]
        if missing:
            raise ValueError(f"the study records no {missing[0]!r} (not made by `tune run`): its configs "
                             "cannot be re-evaluated")
        self.attrs, self.data_root, self.batch_size = attrs, data_root, batch_size
        self.protocol = protocol  # the evaluation protocol the counts are made under
        self.fixed = SegmenterConfig.from_dict(attrs["fixed"])
        self.method = load_method(self.fixed, device=device)
        self.backend = self.method.backend  # the ITM model of pnp_ovss; None for the CLIP methods
        self.objective = get_objective(attrs["objective"], device=str(self.method.device),
                                       dtype=self.fixed.dtype, backend=self.backend,
                                       **recorded_objective_options(attrs))
        self.cache = MapCache(cache_dir)
        self.provider = MapProvider(self.method, self.cache, batch_size)
        self._datasets: dict[str, Dataset] = {}
        self._pickers: dict[str, Callable[[SegmenterConfig, TuningImage], tuple[str, ...]]] = {}

    def dataset(self, name: str) -> Dataset:
        if name not in self._datasets:
            options: dict[str, Any] = {}
            if name == self.attrs["dataset"]:
                options = {k: _typed(v) for k, v in (self.attrs.get("dataset_options") or {}).items()}
            if self.data_root and _takes_root(name):  # the shapes world has no directory
                options["root"] = self.data_root
            self._datasets[name] = load_dataset(name, **options)
        return self._datasets[name]

    def image_set(self, dataset: str, split: str, ids: Sequence[str]) -> ImageSet:
        ds = self.dataset(dataset)
        ds.check_split(split)
        stream = iter_samples(ds, split, ids)  # corrupt images are skipped, as `tune run` does
        images = [TuningImage(sample, image_digest(sample.image)) for sample in stream]
        skipped = list(stream.skipped)
        if self.paper:  # as `tune run` under protocol paper: an image without a class has no map
            picker = ground_truth_candidates(ds.vocabulary)
            skipped += [(im.sample.id, "no ground-truth class (protocol paper)") for im in images
                        if not picker(self.fixed, im)]
            images = [im for im in images if picker(self.fixed, im)]
        if not images:
            raise ValueError(f"none of the {len(ids)} images of {dataset}/{split} could be read")
        return ImageSet(ds, split, images, tuple(skipped))

    @property
    def paper(self) -> bool:
        """True for a study searched under protocol paper (tuner.spec.PROTOCOLS)."""
        return self.attrs.get("protocol") == "paper"

    def candidates(self, images: ImageSet) -> Callable[[SegmenterConfig, TuningImage], tuple[str, ...]]:
        """The candidate picker `tune run` uses (the objective's CLIP), one per dataset vocabulary;
        under protocol paper each image's ground-truth classes, as the study's trials had them."""
        name = images.dataset.name
        if name not in self._pickers:
            clip = getattr(self.objective, "clip", None)
            self._pickers[name] = (ground_truth_candidates(images.dataset.vocabulary) if self.paper
                                   else CandidatePicker(images.dataset.vocabulary, self.backend, clip,
                                                        images.dataset.vocabulary_synonyms,
                                                        device=self.method.device))
        return self._pickers[name]

    def evaluate(self, config: SegmenterConfig, images: ImageSet,
                 on_image: Callable[[], None] | None = None) -> PerImage:
        """Steps of `TrialRunner.evaluate`, keeping each image's objective, mask area and counts
        (under `self.protocol`)."""
        ds = images.dataset
        labelled = images.labelled
        scored_names = ds.scored_class_names(self.protocol) if labelled else ds.class_names
        truths = images.scored_labels(self.protocol) if labelled else [None] * len(images.images)
        n_classes = num_label_classes(scored_names)
        pixel_labels = self.objective.labels == "pixel"
        scores: list[float] = []
        foreground: list[float] = []
        counts: list[np.ndarray] = []
        for start in range(0, len(images.images), self.batch_size):
            batch = images.images[start : start + self.batch_size]
            cands = [self.candidates(images)(config, im) for im in batch]
            caption = ds.vocabulary if self.paper else None  # protocol paper: the whole vocabulary
            maps = self.provider.maps(config, batch, cands, caption)
            views = tuple(self.objective.views)
            seen_views = (view_label_maps(views, config, batch, cands, self.provider, caption) if views
                          else [None] * len(batch))
            items = []
            for im, names, m, seen, truth in zip(batch, cands, maps, seen_views,
                                                 truths[start : start + self.batch_size]):
                label_map = postprocess(im.sample.image, m, config, self.method.device)  # [H, W] 0 = bg
                items.append(ScoreInput(
                    image=im.sample.image, class_names=tuple(names), maps=m, label_map=label_map,
                    threshold=config.threshold, vocabulary=ds.vocabulary,
                    image_classes=im.sample.image_classes, label_names=ds.class_names,
                    labels=im.sample.labels if pixel_labels else None, image_digest=im.digest, views=seen,
                ))
                foreground.append(float((label_map > 0).mean()))
                if labelled:
                    pred = to_class_ids(label_map, names, scored_names)
                    cm = confusion_matrix(pred, truth, n_classes, ds.ignore_index)
                    counts.append(counts_from_confusion(cm))
                if on_image is not None:
                    on_image()
            scores.extend(float(s) for s in np.asarray(self.objective.score(items), dtype=np.float64))
        return PerImage(
            objective=np.asarray(scores), foreground=np.asarray(foreground),
            counts=np.stack(counts).astype(np.int64) if labelled else None,
        )
