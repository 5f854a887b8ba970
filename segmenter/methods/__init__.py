"""Segmentation methods beside PnP-OVSS: the dense CLIP family (MaskCLIP, SCLIP, ClearCLIP, NACLIP)."""

from __future__ import annotations

from .clip_dense import (
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
    "PUBLISHED", "VARIANTS", "ClipDense", "ClipDenseParams", "class_probabilities", "dense_last_layer",
    "gaussian_bias", "input_size", "prob_thd_background", "published_params", "window_boxes",
]
