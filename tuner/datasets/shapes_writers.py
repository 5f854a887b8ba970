"""Shapes-world scenes written in benchmark layouts (COCO-Stuff-164k, PASCAL VOC 2012).

Test fixtures and demos: `tune run --dataset coco --data-root DIR` runs on what
`write_coco_layout(DIR, ...)` writes. The 8 shapes stand for real classes of the benchmark
(`COCO_CLASS_OF_SHAPE`, `VOC_CLASS_OF_SHAPE`); COCO backgrounds are a stuff class per image.
Unlabelled pixels (255) are placed as in each benchmark: in VOC a one-pixel border along the
inside of every object; in COCO-Stuff a one-pixel ring of the background around every object
(the maps' thing pixels are the instance masks, unlabelled pixels are never thing pixels).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion

from ._classes import builtin_classes
from .coco import SPLITS as COCO_SPLITS
from .coco import THINGS, TRAIN_IDS_SUFFIX, USED_CATEGORY_IDS
from .shapes import SHAPE_CLASSES, render_shapes

COCO_CLASS_OF_SHAPE = {
    "circle": "sports ball", "square": "tv", "triangle": "kite", "star": "frisbee", "ring": "donut",
    "cross": "airplane", "diamond": "umbrella", "hexagon": "stop sign",
}
COCO_BACKGROUNDS = ("sky", "grass", "wall", "road")  # stuff classes behind the shapes
VOC_CLASS_OF_SHAPE = {
    "circle": "bottle", "square": "television monitor", "triangle": "boat", "star": "bird",
    "ring": "bicycle", "cross": "aeroplane", "diamond": "potted plant", "hexagon": "bus",
}
IGNORE = 255


def _scene(seed: int, split: str, index: int, size: int, outside: bool = False):
    """(image, mask, unlabelled border): inside each object, or with `outside` around it."""
    image, mask = render_shapes(zlib.crc32(f"{seed}/{split}/{index}".encode()), size)
    border = np.zeros(mask.shape, dtype=bool)  # [S, S]
    for value in np.unique(mask[mask > 0]):
        region = mask == value
        border |= (binary_dilation(region) & (mask == 0)) if outside else (region & ~binary_erosion(region))
    return image, mask, border


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def write_coco_layout(root: str | Path, count: int, seed: int = 0, *, splits=("train", "val"),
                      size: int = 64, raw_maps: bool = False, instances: bool = False) -> Path:
    """Write `count` scenes per split as COCO-Stuff-164k (MMSegmentation layout); returns `root`.

    images/<split>2017/<id>.jpg and annotations/<split>2017/<id>_labelTrainIds.png (train ids),
    or with `raw_maps` the raw stuff-thing maps <id>.png (COCO category id - 1). `instances`
    also writes annotations/instances_<split>2017.json (RLE masks; needs pycocotools).
    """
    from PIL import Image

    root = Path(root)
    names = builtin_classes("coco_stuff").names
    shape_ids = np.array([0, *(names.index(COCO_CLASS_OF_SHAPE[s]) for s in SHAPE_CLASSES)])
    for s, split in enumerate(splits):
        folder = COCO_SPLITS[split]
        annotations: list[dict] = []
        images: list[dict] = []
        for i in range(count):
            image, mask, border = _scene(seed, split, i, size, outside=True)
            rng = np.random.default_rng(zlib.crc32(f"{seed}/{split}/{i}/stuff".encode()))
            stuff = names.index(COCO_BACKGROUNDS[rng.integers(len(COCO_BACKGROUNDS))])
            train_ids = np.where(mask > 0, shape_ids[mask], stuff).astype(np.uint8)  # [S, S]
            train_ids[border] = IGNORE
            number = 1 + s * 100000 + i
            stem = f"{number:012d}"
            _save_jpeg(root / "images" / folder / f"{stem}.jpg", image)
            labels_dir = root / "annotations" / folder
            labels_dir.mkdir(parents=True, exist_ok=True)
            if raw_maps:
                raw = np.where(train_ids == IGNORE, IGNORE,
                               np.array(USED_CATEGORY_IDS + (0,) * 85)[train_ids] - 1).astype(np.uint8)
                Image.fromarray(raw, mode="L").save(labels_dir / f"{stem}.png")
            else:
                Image.fromarray(train_ids, mode="L").save(labels_dir / f"{stem}{TRAIN_IDS_SUFFIX}")
            images.append({"id": number, "file_name": f"{stem}.jpg", "height": size, "width": size})
            if instances:
                annotations += _instance_records(mask, shape_ids, number, len(annotations))
        if instances:
            categories = [{"id": cat, "name": names[i], "supercategory": "thing"}
                          for i, cat in enumerate(USED_CATEGORY_IDS[:THINGS])]
            payload = {"images": images, "annotations": annotations, "categories": categories}
            (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(payload))
    return root


def _instance_records(mask: np.ndarray, shape_ids: np.ndarray, image_id: int, start: int) -> list[dict]:
    from pycocotools import mask as mask_utils

    records = []
    for value in np.unique(mask[mask > 0]):
        region = np.asfortranarray((mask == value).astype(np.uint8))
        rle = mask_utils.encode(region)
        rle["counts"] = rle["counts"].decode("ascii")
        records.append({
            "id": start + len(records) + 1, "image_id": image_id, "iscrowd": 0,
            "category_id": USED_CATEGORY_IDS[int(shape_ids[value])], "segmentation": rle,
            "area": float(region.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })
    return records


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened) of its palette PNGs."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc_layout(root: str | Path, count: int, seed: int = 0, *, splits=("train", "val"),
                     size: int = 64) -> Path:
    """Write `count` scenes per split as PASCAL VOC 2012 (JPEGImages, palette SegmentationClass
    PNGs with 255 borders, ImageSets/Segmentation/<split>.txt); returns `root` (the VOC2012 dir)."""
    from PIL import Image

    root = Path(root)
    names = builtin_classes("voc").names
    class_ids = np.array([0, *(names.index(VOC_CLASS_OF_SHAPE[s]) for s in SHAPE_CLASSES)], dtype=np.uint8)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for s, split in enumerate(splits):
        ids = []
        for i in range(count):
            image, mask, border = _scene(seed, f"voc-{split}", i, size)
            labels = class_ids[mask]
            labels[border] = IGNORE
            sample_id = f"{2007 + s}_{i:06d}"
            _save_jpeg(root / "JPEGImages" / f"{sample_id}.jpg", image)
            png = Image.fromarray(labels, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{sample_id}.png")
            ids.append(sample_id)
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root
