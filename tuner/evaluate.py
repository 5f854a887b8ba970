"""`tune eval`: the mIoU of one config on a labelled split, streamed in chunks of images.

Each label map is scored under one or both evaluation protocols (`PROTOCOL_CHOICES`; see
`tuner.datasets.PROTOCOLS`): the model and post-processing run once whatever the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from objectives import confusion_matrix, miou, num_label_classes, to_class_ids
from segmenter import Backend, SegmenterConfig, postprocess
from segmenter.candidate_file import load_candidate_file
from segmenter.images import image_digest
from segmenter.methods import load_method

from .cache import MapCache
from .datasets import PROTOCOLS, Dataset, iter_samples
from .study import config_hash, pick_tuning_ids
from .trial import CandidatePicker, MapProvider, TuningImage, _metrics_dict

CHUNK = 64  # images held in memory at once
#: what `--protocol` accepts: one protocol, or "both" (standard and paper from the same label maps)
PROTOCOL_CHOICES = (*PROTOCOLS, "both")


def protocols_of(choice: str) -> tuple[str, ...]:
    """The protocols a `--protocol` choice scores: ("standard", "paper") for "both"."""
    if choice not in PROTOCOL_CHOICES:
        raise ValueError(f"unknown evaluation protocol {choice!r}: use one of {', '.join(PROTOCOL_CHOICES)}")
    return PROTOCOLS if choice == "both" else (choice,)


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
    protocol: str = "standard",
) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `config` on `split` (a seeded subset of `images`).

    `protocol` "standard" (the default), "paper" or "both". The standard protocol's numbers are
    the keys "miou", "pixel_accuracy" and "iou_per_class"; the paper protocol's are under
    "paper" (the same keys plus "rule", what it did to this dataset's ground truth); "protocol"
    records the choice. A dataset without a paper rule raises ValueError before any image is read.

    A corrupt image is skipped and listed under "skipped" ({"id", "reason"}), "images" counts
    the images scored (`strict=True`: the first corrupt image raises CorruptImage instead).
    ValueError when no image could be read. `on_image(n)`: n images done (skipped ones included).
    """
    if not dataset.has_labels:
        raise ValueError(f"dataset {dataset.name!r} has no labels: evaluation needs a labelled dataset")
    scored = protocols_of(protocol)
    for name in scored:
        dataset.check_protocol(name)
    dataset.check_split(split)
    ids = pick_tuning_ids(dataset, split, images, seed) if images else dataset.ids(split)
    lists = load_candidate_file(config.candidates_file) if config.candidates == "file" else None
    if lists is not None:  # every image has a list of known names, before the model loads
        lists.check(ids, dataset.vocabulary, dataset.vocabulary_synonyms, f"images of {dataset.name}/{split}")
    method = load_method(config, device=device, backend=backend)
    method.check(config)
    batch_size = method.batch_size(batch_size, config)
    provider = MapProvider(method, MapCache(cache_dir), batch_size)
    picker = CandidatePicker(dataset.vocabulary, method.backend, synonyms=dataset.vocabulary_synonyms,
                             device=method.device)
    names = {p: dataset.scored_class_names(p) for p in scored}
    confusion = {p: np.zeros((num_label_classes(names[p]),) * 2, dtype=np.int64) for p in scored}
    stream = iter_samples(dataset, split, ids, strict=strict)
    scored_images = 0

    def run(chunk: Sequence[TuningImage]) -> None:  # as TrialRunner.evaluate, every protocol at once
        nonlocal scored_images
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start : start + batch_size]
            candidates = [picker(config, im) for im in batch]
            for im, cands, maps in zip(batch, candidates, provider.maps(config, batch, candidates)):
                label_map = postprocess(im.sample.image, maps, config, method.device)  # [H, W] 0 = bg
                for p in scored:
                    pred = to_class_ids(label_map, cands, names[p])
                    truth = dataset.scored_labels(p, split, im.sample)
                    confusion[p] += confusion_matrix(pred, truth, len(confusion[p]), dataset.ignore_index)
                scored_images += 1
                if on_image is not None:
                    on_image(scored_images + len(stream.skipped))

    chunk: list[TuningImage] = []
    for sample in stream:
        chunk.append(TuningImage(sample, image_digest(sample.image)))
        if len(chunk) == CHUNK:
            run(chunk)
            chunk = []
    if chunk:
        run(chunk)
    if not scored_images:
        raise ValueError(f"none of the {len(ids)} images of {dataset.name}/{split} could be read "
                         f"(first: {stream.skipped[0][1] if stream.skipped else 'no images'})")
    result = {
        "dataset": dataset.name, "split": split, "images": scored_images, "images_requested": images or None,
        "seed": seed,
        "skipped": [{"id": sid, "reason": why} for sid, why in stream.skipped],
        "config_hash": config_hash(config), "candidate_rule": config.candidates,
        "labels_used": "image-level" if config.uses_image_labels else "none",
        "external_sources": [lists.source()] if lists is not None else [],
        "protocol": protocol,
    }
    if "standard" in scored:
        result.update(_metrics_dict(miou(confusion["standard"]), names["standard"]))
    if "paper" in scored:
        result["paper"] = {"rule": dataset.paper_rule,
                           **_metrics_dict(miou(confusion["paper"]), names["paper"])}
    return result


def print_scores(result: dict, title: str, console) -> None:
    """IoU per class, mIoU and pixel accuracy of an `evaluate_config` result, a column per protocol."""
    from rich.table import Table

    chosen = protocols_of(result.get("protocol", "standard"))
    scores = {p: result if p == "standard" else result["paper"] for p in chosen}
    table = Table(title=title)
    table.add_column("class")
    for p in scores:
        table.add_column("IoU" if len(scores) == 1 else f"IoU {p}", justify="right")
    # rows: the paper protocol's classes first (background leads them), then any only standard scores
    order = [p for p in ("paper", "standard") if p in scores]
    classes = dict.fromkeys(n for p in order for n in scores[p]["iou_per_class"])
    for name in classes:
        cells = [scores[p]["iou_per_class"].get(name, "") for p in scores]
        table.add_row(name, *("" if v == "" else "-" if v is None else f"{v:.4f}" for v in cells))
    console.print(table)
    if len(scores) == 1:
        paper = "   (paper protocol)" if "paper" in scores else ""
        s = next(iter(scores.values()))
        console.print(f"mIoU {s['miou']:.4f}   pixel accuracy {s['pixel_accuracy']:.4f}{paper}")
    else:
        summary = Table(title="evaluation protocols side by side")
        summary.add_column("")
        for p in scores:
            summary.add_column(p, justify="right")
        for key, label in (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")):
            summary.add_row(label, *(f"{s[key]:.4f}" for s in scores.values()))
        console.print(summary)
    if "paper" in scores:
        console.print(f"paper protocol on {result['dataset']}: {result['paper']['rule']}", highlight=False,
                      soft_wrap=True)
