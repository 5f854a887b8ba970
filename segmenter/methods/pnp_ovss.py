"""`pnp_ovss`: PnP-OVSS (GradCAM of a VLM's ITM score with Salience Dropout, steps 1-4) on a backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends import Backend, load_backend, resolve_batch_size
from ._base import Method


class PnpOvss(Method):
    """PnP-OVSS on `config.backend` (blip, ...) with `config.model`; `backend` shares a loaded one."""

    name = "pnp_ovss"

    def __init__(self, config, *, device=None, dtype=None, backend: Backend | None = None,
                 **_ignored) -> None:
        self.backend = backend or load_backend(
            config.backend, config.model, config.revision, device=device,
            dtype=config.dtype if dtype is None else dtype,
        )
        self.backend.itm_token = config.itm_token
        self.device = self.backend.device
        # the model's identity (MapProvider keys pnp_ovss maps on the backend's own attributes)
        self.dtype = getattr(self.backend, "dtype", None)
        self.model_id = getattr(self.backend, "model_id", None)
        self.revision = getattr(self.backend, "revision", None)

    def check(self, config) -> None:
        """The config's layer and heads exist in the model (the input size: `grid`)."""
        self.backend.check_layer_heads(config.layer, config.heads)

    def relevance_maps(self, images: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]],
                       config) -> list[np.ndarray]:
        from ..pipeline import prompt_for, salience_dropout

        pixels = self.backend.prepare_images(list(images), config.image_size)
        prompts = [prompt_for(config, names) for names in class_lists]
        return [m.float().cpu().numpy() for m in salience_dropout(self.backend, pixels, prompts, config)]

    def grid(self, height: int, width: int, config) -> tuple[int, int]:
        return self.backend.patch_grid(config.image_size)

    def map_key(self, config) -> dict:  # the tuner's MapProvider keys pnp_ovss maps itself
        return {"backend": config.backend, "image_size": config.image_size, "layer": config.layer}

    def batch_size(self, value: str | int, config) -> int:
        return resolve_batch_size(value, self.backend, config.image_size)
