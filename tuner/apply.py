"""`tune segment`: an exported config applied to new images, streamed in batches."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segmenter import Segmenter, read_image

from .datasets._disk import IMAGE_SUFFIXES


def read_class_list(classes: str | None, classes_file: str | None) -> list[str]:
    """Class names from "a,b,c" or a file with one name a line (# comments allowed)."""
    if classes_file:
        path = Path(classes_file)
        if not path.is_file():
            raise FileNotFoundError(f"class file not found: {path}")
        names = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    elif classes:
        names = [n.strip() for n in classes.split(",")]
    else:
        raise ValueError("no classes given: pass --classes 'cat,dog' or --classes-file FILE")
    names = [n for n in names if n]
    if not names:
        raise ValueError("the class list is empty: give at least one class name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class {duplicates[0]!r} is listed twice: list each class once")
    return names


def _inputs_with_bases(inputs: Sequence[str]) -> Iterator[tuple[Path, Path]]:
    """(image file, the directory its output name is taken relative to) for every input."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # the whole tree below it, hidden files and folders left out
            for p in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in p.relative_to(path).parts)
                if p.suffix.lower() in IMAGE_SUFFIXES and not hidden and p.is_file():
                    yield p, path
        elif path.exists():
            yield path, path.parent
        else:
            raise FileNotFoundError(f"no such image or directory: {path}")


def plan_outputs(inputs: Sequence[str]) -> list[tuple[Path, str]]:
    """(image file, output name) for every distinct input image, in input order.

    The output name is the image's path relative to the deepest directory holding every input
    (the input tree mirrored), suffix kept: `cam1/0001.jpg` and `cam2/0001.jpg` give
    "cam1/0001.jpg" and "cam2/0001.jpg", `a.jpg` and `a.png` give "a.jpg" and "a.png". The
    same file given twice is segmented once; names that differ only in case get "~2", "~3".
    """
    entries, seen = [], set()
    for path, base in _inputs_with_bases(inputs):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            entries.append((path, base))
    if not entries:
        return []
    anchor = os.path.commonpath([os.path.abspath(base) for _, base in entries])
    planned, taken = [], set()
    for path, _ in entries:
        name = Path(os.path.relpath(os.path.abspath(path), anchor)).as_posix()
        unique, n = name, 1
        while unique.casefold() in taken:  # case-insensitive file systems
            n += 1
            unique = f"{name}~{n}"
        taken.add(unique.casefold())
        planned.append((path, unique))
    return planned


def image_id(name: str) -> str:
    """The id of a planned input (`plan_outputs` name): its path below the inputs' common folder,
    suffix kept (`cam1/0001.jpg`); the keys of a `candidates_file` (candidates: file) name it."""
    return re.sub(r"~\d+$", "", name)


@dataclass
class SegmentReport:
    written: list[Path] = field(default_factory=list)  # inputs whose outputs are on disk
    failed: list[tuple[Path, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # the label PNGs written, one per input


def segment_paths(
    segmenter: Segmenter,
    class_names: Sequence[str],
    inputs: Sequence[str] | list[tuple[Path, str]],
    out_dir: str | Path,
    save_maps: bool = False,
    progress=None,
) -> SegmentReport:
    """Segment every image; write <name>_labels.png, <name>_overlay.png (and <name>_maps.npz)
    below `out_dir`, where <name> is the image's path in the mirrored input tree with its suffix
    (`plan_outputs`): no two inputs share an output. Images are read as viewed (EXIF).
    `inputs` are paths, or the (image, name) list `plan_outputs` already made of them."""
    from .render import label_png, overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SegmentReport()
    planned = inputs if inputs and isinstance(inputs[0], tuple) else plan_outputs(inputs)
    names = dict(planned)
    batch: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        results = segmenter.segment_batch([im for _, im in batch], [list(class_names)] * len(batch),
                                          image_ids=[image_id(names[path]) for path, _ in batch])
        for (path, image), result in zip(batch, results):
            base = out / names[path]
            base.parent.mkdir(parents=True, exist_ok=True)
            label_png(result.label_map, len(class_names) + 1).save(f"{base}_labels.png")
            overlay(image, result.label_map, result.class_names).save(f"{base}_overlay.png")
            if save_maps:
                np.savez_compressed(f"{base}_maps.npz", maps=result.maps,
                                    class_names=np.array(result.class_names))
            report.written.append(path)
            report.outputs.append(Path(f"{base}_labels.png"))
            if progress is not None:
                progress()
        batch.clear()

    for path, image in prefetch_images([p for p, _ in planned], ahead=2 * segmenter.batch_size):
        if isinstance(image, Exception):
            report.failed.append((path, str(image)))
            if progress is not None:
                progress()
            continue
        batch.append((path, image))
        if len(batch) >= segmenter.batch_size:
            flush()
    if batch:
        flush()
    return report


def prefetch_images(paths: Sequence[Path], ahead: int = 16, threads: int = 2):
    """Yield (path, image or the error reading it), decoding up to `ahead` images in threads.

    Image decoding releases the GIL, so the next batch is decoded while the model runs on this one.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def load(path: Path):
        try:
            return read_image(path)
        except (ValueError, OSError) as err:
            return err

    with ThreadPoolExecutor(threads) as pool:
        queue: deque = deque()
        for path in paths:
            queue.append((path, pool.submit(load, path)))
            if len(queue) > ahead:
                done_path, future = queue.popleft()
                yield done_path, future.result()
        while queue:
            done_path, future = queue.popleft()
            yield done_path, future.result()
