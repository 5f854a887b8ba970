"""Backends: VLMs with text-to-image cross-attention and an ITM head, looked up by name."""

from __future__ import annotations

import importlib
from typing import Any

from ._base import (
    Backend,
    Prompt,
    batch_size_for_memory,
    build_prompt,
    parse_batch_size,
    resolve_batch_size,
    resolve_model_path,
)

# name -> "module:Class", imported only when asked for (a config file names its backend)
BACKENDS: dict[str, str] = {
    "blip": "segmenter.backends.blip:BlipBackend",
    "bridgetower": "segmenter.backends.bridgetower:BridgeTowerBackend",
}


def register_backend(name: str, target: str) -> None:
    """Make `backend: NAME` in a config load `target` ("package.module:Class")."""
    BACKENDS[name] = target


def load_backend(name: str, model: str, revision: str | None = None, **kwargs: Any) -> Backend:
    """Construct the backend registered as `name` for `model` (hub id or local directory)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: registered backends are {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, revision=revision, **kwargs)


__all__ = [
    "BACKENDS", "Backend", "Prompt", "batch_size_for_memory", "build_prompt", "load_backend",
    "parse_batch_size", "register_backend", "resolve_batch_size", "resolve_model_path",
]
