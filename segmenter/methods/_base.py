"""The `Method` seam: what every segmentation method gives the segmenter and the tuner."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch


class Method(abc.ABC):
    """(images, class names) -> per-class maps on the method's patch grid, for one config.

    Loaded models stay with the object; the config passed per call may differ from the one it
    was built with in every field that `map_key` and `check` accept (a study's trials).
    """

    name: str
    device: torch.device
    dtype: torch.dtype
    model_id: str  # the checkpoint the maps come from (hub id or directory)
    revision: str | None
    #: the VLM with an ITM head where the method has one (pnp_ovss), else None: the candidate
    #: rule itm_threshold and objectives on the segmenter's model (itm_match, patch_coherence) need it
    backend = None

    @abc.abstractmethod
    def check(self, config) -> None:
        """Raise a one-line ValueError when `config` asks for something this method or its model
        cannot do (a layer it lacks, a window off its patch grid, itm_threshold without ITM head)."""

    @abc.abstractmethod
    def relevance_maps(self, images: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]],
                       config) -> list[np.ndarray]:
        """Per image one map per class of its list on the patch grid. # [C, gh, gw] float32"""

    @abc.abstractmethod
    def grid(self, height: int, width: int, config) -> tuple[int, int]:
        """The (gh, gw) patch grid of the maps of a height x width image."""

    @abc.abstractmethod
    def map_key(self, config) -> dict:
        """The config fields that shape the maps (for the map cache), beside the model's identity."""

    def batch_size(self, value: str | int, config) -> int:
        """Images per model call for `value` (a positive integer or "auto")."""
        return 8 if value == "auto" else int(value)
