"""Segmentation methods, registered by name: `SegmenterConfig.method` picks one.

A method turns (images, class names) into per-class maps on a patch grid (`Method`); the shared
post-processing (`segmenter.pipeline.postprocess`) turns those into label maps. `MAPS_KIND` says
which step 5 a method's maps get:

- "relevance" (pnp_ovss): min-max normalised per class, zeroed below `threshold`, background
  where no class survives;
- "similarity" (the dense CLIP methods): cosine similarities, softmax over classes of
  `logit_scale` x them, background where the top probability is below `prob_thd`.

maskclip, sclip, clearclip and naclip share one class (`clip_method.ClipMethod`): they differ only
in what CLIP's last vision layer computes, which `clip_dense.dense_last_layer` writes out per
variant, and they read the same fields.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class", imported only when asked for (a config names its method)
METHODS: dict[str, str] = {
    "pnp_ovss": "segmenter.methods.pnp_ovss:PnpOvss",
    "maskclip": "segmenter.methods.clip_method:ClipMethod",
    "sclip": "segmenter.methods.clip_method:ClipMethod",
    "clearclip": "segmenter.methods.clip_method:ClipMethod",
    "naclip": "segmenter.methods.clip_method:ClipMethod",
}
#: what a method's maps are, which decides post-processing step 5 (see the module docstring)
MAPS_KIND: dict[str, str] = {"pnp_ovss": "relevance", "maskclip": "similarity", "sclip": "similarity",
                             "clearclip": "similarity", "naclip": "similarity"}
KINDS = ("relevance", "similarity")


def register_method(name: str, target: str, maps: str = "relevance") -> None:
    """Make `method: NAME` in a config load `target` ("package.module:Class", a `Method`) whose
    maps are of kind `maps` ("relevance" or "similarity")."""
    if maps not in KINDS:
        raise ValueError(f"maps kind {maps!r} is unknown: use {' or '.join(KINDS)}")
    METHODS[name] = target
    MAPS_KIND[name] = maps


def maps_kind(name: str) -> str:
    """"relevance" or "similarity": how the post-processing reads method `name`'s maps."""
    return MAPS_KIND.get(name, "relevance")


def load_method(config, **kwargs: Any):
    """The `Method` registered as `config.method`, constructed for `config` (`kwargs`: device,
    dtype, and backend for pnp_ovss or clip for the CLIP methods, to share loaded models)."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}: registered methods are {', '.join(METHODS)}")
    module, cls = METHODS[config.method].split(":")
    # a shared model that is not given is not passed: a method written as `Cls(config, device=...,
    # dtype=...)` (README, "How to add a method") need not take the built-in methods' sharing keywords
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("device", "dtype")}
    return getattr(importlib.import_module(module), cls)(config, **kwargs)


from ._base import Method  # noqa: E402
from .clip_dense import (  # noqa: E402
    PUBLISHED,
    VARIANTS,
    ClipDense,
    ClipDenseParams,
    class_probabilities,
    dense_last_layer,
    gaussian_bias,
    input_size,
    prob_thd_background,
    published_params,
    window_boxes,
)

__all__ = [
    "KINDS", "MAPS_KIND", "METHODS", "PUBLISHED", "VARIANTS", "ClipDense", "ClipDenseParams", "Method",
    "class_probabilities", "dense_last_layer", "gaussian_bias", "input_size", "load_method", "maps_kind",
    "prob_thd_background", "published_params", "register_method", "window_boxes",
]
