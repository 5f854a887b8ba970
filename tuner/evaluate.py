"""`tune eval`: the mIoU of one config on a labelled split, streamed in chunks of images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from objectives import miou, num_label_classes
from segmenter import Backend, SegmenterConfig, load_backend
from segmenter.backends import resolve_batch_size
from segmenter.images import image_digest

from .cache import MapCache
from .datasets import Dataset, iter_samples
from .study import config_hash, pick_tuning_ids
from .trial import CandidatePicker, MapProvider, TrialRunner, TuningImage, _metrics_dict

CHUNK = 64  # images held in memory at once


def evaluate_config(
    config: SegmenterConfig,
    dataset: Dataset,
    split: str,
    *,
    images: int | None = None,
    seed: int = 0,
    backend: Backend | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | str = "auto",
    on_image: Callable[[int], None] | None = None,
    strict: bool = False,
) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `config` on `split` (a seeded subset of `images`).

    A corrupt image is skipped and listed under "skipped" ({"id", "reason"}), "images" counts
    the images scored (`strict=True`: the first corrupt image raises CorruptImage instead).
    ValueError when no image could be read. `on_image(n)`: n images done (skipped ones included).
    """
    if not dataset.has_labels:
        raise ValueError(f"dataset {dataset.name!r} has no labels: evaluation needs a labelled dataset")
    dataset.check_split(split)
    ids = pick_tuning_ids(dataset, split, images, seed) if images else dataset.ids(split)
    backend = backend or load_backend(config.backend, config.model, config.revision, device=device,
                                      dtype=config.dtype)
    backend.itm_token = config.itm_token
    backend.check_layer_heads(config.layer, config.heads)
    batch_size = resolve_batch_size(batch_size, backend, config.image_size)
    provider = MapProvider(backend, MapCache(cache_dir), batch_size)
    picker = CandidatePicker(dataset.vocabulary, backend)
    size = num_label_classes(dataset.class_names)
    confusion = np.zeros((size, size), dtype=np.int64)
    stream = iter_samples(dataset, split, ids, strict=strict)
    done = scored = 0  # images through (read or skipped), images scored

    def run(chunk: list[TuningImage]) -> None:
        nonlocal done, scored
        runner = TrialRunner(dataset, chunk, provider, None, picker, batch_size=batch_size)
        base = done + len(stream.skipped)
        outcome = runner.evaluate(config, on_image=None if on_image is None else
                                  (lambda n: on_image(base + n)))
        confusion[...] += outcome.confusion
        done += len(chunk)
        scored += len(chunk)

    chunk: list[TuningImage] = []
    for sample in stream:
        chunk.append(TuningImage(sample, image_digest(sample.image)))
        if len(chunk) == CHUNK:
            run(chunk)
            chunk = []
    if chunk:
        run(chunk)
    if not scored:
        raise ValueError(f"none of the {len(ids)} images of {dataset.name}/{split} could be read "
                         f"(first: {stream.skipped[0][1] if stream.skipped else 'no images'})")
    metrics = _metrics_dict(miou(confusion), dataset.class_names)
    return {
        "dataset": dataset.name, "split": split, "images": scored, "images_requested": images or None,
        "seed": seed,
        "skipped": [{"id": sid, "reason": why} for sid, why in stream.skipped],
        "config_hash": config_hash(config), "candidate_rule": config.candidates,
        "labels_used": "image-level" if config.uses_image_labels else "none",
        **metrics,
    }
