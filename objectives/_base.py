"""The `Objective` seam: an annotation-free score per image, and a registry by name."""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LABEL_USE = ("none", "image-level", "pixel")
#: image transforms the tuner can segment and map back for objectives that ask (`Objective.views`):
#: "hflip" mirrors the image left to right
VIEWS = ("hflip",)
#: objective options that make a CLIP objective (one taking `mask_rebinarize`) score the authors'
#: reward: masks cut from the thresholded maps under the authors' mask rule (objectives._clip)
OFFICIAL_REWARD_OPTIONS = {"mask_source": "threshold", "mask_rebinarize": "official"}


@dataclass(frozen=True)
class ScoreInput:
    """Everything an objective may look at for one segmented image."""

    image: np.ndarray  # [H, W, 3] uint8
    class_names: tuple[str, ...]  # the image's candidate classes, in prompt order
    maps: np.ndarray  # [C, gh, gw] relevance maps before thresholding
    label_map: np.ndarray  # [H, W] int: 0 = background, i = class_names[i - 1]
    threshold: float  # the segmenter's threshold (step 5)
    vocabulary: tuple[str, ...] = ()  # every class name of the dataset
    image_classes: tuple[str, ...] | None = None  # ground-truth image-level labels, when known
    labels: np.ndarray | None = None  # [H, W] ground-truth dataset class ids, when known
    #: the dataset's class names by id (what the ids in `labels` mean), "background" first when
    #: the benchmark has one; empty: `vocabulary` is read that way (see metrics.to_class_ids)
    label_names: tuple[str, ...] = ()
    #: a content hash of `image` when the caller has one (the tuner does); objectives that memoise
    #: per image use it instead of hashing the pixels again
    image_digest: str | None = None
    #: label maps of transformed copies of the image mapped back onto it, by view name (VIEWS),
    #: for objectives that declare `views`; each [H, W] in the convention of `label_map`
    views: Mapping[str, np.ndarray] | None = None

    @classmethod
    def from_result(
        cls,
        image: np.ndarray,
        result: Any,
        threshold: float,
        **context: Any,
    ) -> ScoreInput:
        """The input for a `segmenter.SegmentationResult`, restricted to its candidate classes.

        A result indexes the caller's whole class list (zero maps for classes the candidate
        rule left out); objectives score the candidates only, so maps and label map are
        re-indexed to them. `context`: vocabulary, image_classes, labels, label_names.
        """
        names = tuple(result.class_names)
        candidates = tuple(result.candidates)
        chosen = [names.index(c) for c in candidates]
        to_candidate = np.zeros(len(names) + 1, dtype=np.int64)  # 0 stays background
        to_candidate[[i + 1 for i in chosen]] = np.arange(1, len(chosen) + 1)
        return cls(
            image=image, class_names=candidates, maps=np.asarray(result.maps)[chosen],
            label_map=to_candidate[result.label_map], threshold=float(threshold), **context,
        )


class Objective(abc.ABC):
    """A per-image score a study optimises; the study's value is the mean over images."""

    name: str = ""
    direction: str = "maximize"
    #: models the objective uses: "clip" (loads its own), "segmenter" (the segmenter's backend,
    #: passed by the tuner as the `backend` option)
    models: tuple[str, ...] = ()
    #: which labels it reads: "none", "image-level" or "pixel"
    labels: str = "none"
    #: views (VIEWS) whose label maps the tuner must add to each ScoreInput
    views: tuple[str, ...] = ()

    @abc.abstractmethod
    def score(self, items: Sequence[ScoreInput]) -> np.ndarray:
        """One float per item. # [len(items)]"""

    @classmethod
    def options_problem(cls, options: Mapping[str, Any]) -> tuple[str, str] | None:
        """(option, what is wrong) for the first option value the objective would refuse, or None.

        Study specs call it when they are read, so a bad value fails before any model loads;
        the constructor refuses the same values. Names and simple types are checked elsewhere
        (tuner.spec.option_problem); this checks values.
        """
        return None

    def describe(self) -> str:
        """First line of the docstring."""
        return (self.__doc__ or "").strip().splitlines()[0] if self.__doc__ else ""


# name -> "module:Class"; modules are imported only when the objective is asked for
OBJECTIVES: dict[str, str] = {}


def register_objective(name: str, target: str) -> None:
    """Make `objective: NAME` in a study spec construct `target` ("package.module:Class")."""
    OBJECTIVES[name] = target


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {name!r}: registered objectives are {', '.join(sorted(OBJECTIVES))}"
        )
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def official_reward_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` of objective `name` with the authors' reward (OFFICIAL_REWARD_OPTIONS) filled in.

    What a study whose fixed config is the `official` preset scores: for an objective that takes
    `mask_rebinarize` (clip_reward, clip_margin, clip_contrastive) a missing `mask_source`
    becomes "threshold" and, with threshold masks, a missing `mask_rebinarize` "official". Options
    the spec gives win (`mask_source: final` keeps the final label map's masks); other objectives
    (and an unknown name, which the spec check reports) keep their options unchanged.
    """
    out = dict(options)
    try:
        params = inspect.signature(objective_class(name).__init__).parameters
    except (ValueError, TypeError):
        return out
    if "mask_rebinarize" not in params:
        return out
    out.setdefault("mask_source", OFFICIAL_REWARD_OPTIONS["mask_source"])
    if out["mask_source"] == OFFICIAL_REWARD_OPTIONS["mask_source"]:
        out.setdefault("mask_rebinarize", OFFICIAL_REWARD_OPTIONS["mask_rebinarize"])
    return out


#: the options the caller (the tuner) passes, not the user
PASSED_BY_CALLER = ("device", "backend", "clip", "dtype")


def get_objective(name: str, *, backend: Any = None, dtype: str | None = None, **options: Any) -> Objective:
    """Construct the objective registered as `name` (options: model paths, device, ...).

    `backend` (the segmenter's) reaches only objectives whose `models` name "segmenter", `dtype`
    (the segmenter config's precision, which its CLIP follows) only those that take it; an
    option the objective does not take is a one-line error naming it.
    """
    cls = objective_class(name)
    if backend is not None and "segmenter" in cls.models:
        options["backend"] = backend
    if dtype is not None and "dtype" in inspect.signature(cls.__init__).parameters:
        options["dtype"] = dtype
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        signature = None
    if signature is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    ):
        accepted = [n for n in signature.parameters if n != "self"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"objective {name!r} has no option {unknown[0]!r}: its options are "
                f"{', '.join(n for n in accepted if n not in PASSED_BY_CALLER) or 'none'}"
            )
    return cls(**options)
