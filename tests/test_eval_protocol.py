"""Evaluation protocols: `standard` (MMSeg harness) and `paper` (the authors' own scoring).

The scoring tests fix the segmenter's label map (0 = background, i = the i-th candidate; the
candidate rule `all` makes candidate i the dataset's class of raw label value i) and check the
mIoU against a hand computation written beside it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segmenter import SegmenterConfig
from tuner.cli import main
from tuner.datasets import dataset_class, load_dataset
from tuner.evaluate import evaluate_config

#: a segmenter label map: 0 background, else the index of the class among the candidates (1-based)
PREDICTION = np.array([
    [0, 15, 15, 15],
    [0, 0, 15, 15],
    [0, 0, 15, 15],
    [12, 12, 0, 0],
], dtype=np.uint8)
#: VOC ground truth: 0 background, 15 person, 12 dog, 255 the unlabelled band (as object borders)
VOC_TRUTH = np.array([
    [0, 0, 15, 15],
    [0, 0, 15, 15],
    [255, 255, 255, 255],
    [12, 12, 12, 12],
], dtype=np.uint8)
#: ADE20K / PASCAL-Context ground truth: raw 0 = "other" / background, then classes 1 and 2
ZERO_TRUTH = np.array([
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 2, 2],
    [2, 2, 2, 2],
], dtype=np.uint8)
ZERO_PREDICTION = np.array([
    [0, 1, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 2, 2],
    [2, 2, 0, 0],
], dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _rgb(shape) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def write_voc(root: Path, truth: np.ndarray) -> Path:
    _save(root / "JPEGImages" / "2007_000001.jpg", _rgb(truth.shape), "RGB")
    _save(root / "SegmentationClass" / "2007_000001.png", truth)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    return root


def write_ade(root: Path, truth: np.ndarray) -> Path:
    _save(root / "images" / "validation" / "ADE_val_00000001.jpg", _rgb(truth.shape), "RGB")
    _save(root / "annotations" / "validation" / "ADE_val_00000001.png", truth)
    return root


def write_context(root: Path, truth: np.ndarray) -> Path:
    _save(root / "JPEGImages" / "2008_000001.jpg", _rgb(truth.shape), "RGB")
    _save(root / "SegmentationClassContext" / "2008_000001.png", truth)
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    return root


@pytest.fixture
def fixed_prediction(monkeypatch):
    """evaluate_config with a stub model whose label map is the one given (no model runs)."""

    class NoMaps:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def maps(self, config, images, candidates):
            return [np.zeros((len(c), 2, 2), dtype=np.float32) for c in candidates]

    monkeypatch.setattr("tuner.evaluate.MapProvider", NoMaps)
    backend = SimpleNamespace(check_layer_heads=lambda layer, heads: None, device="cpu")

    def evaluate(dataset, label_map, protocol):
        monkeypatch.setattr("tuner.evaluate.postprocess", lambda *args, **kwargs: label_map)
        config = SegmenterConfig(candidates="all")  # candidate i = vocabulary[i - 1]
        return evaluate_config(config, dataset, "val", backend=backend, batch_size=1, protocol=protocol)

    return evaluate


def test_paper_protocol_counts_voc_borders_as_background(tmp_path, fixed_prediction):
    voc = load_dataset("voc", root=write_voc(tmp_path / "VOC2012", VOC_TRUTH))
    # standard (21 classes, 255 not scored): the 12 pixels of rows 0, 1 and 3
    #   background: gt 4, predicted 5 (row 0: 1, row 1: 2, row 3: 2), tp 3 -> 3 / (4 + 5 - 3) = 1/2
    #   person:     gt 4, predicted 5 (row 0: 3, row 1: 2),           tp 4 -> 4 / (4 + 5 - 4) = 4/5
    #   dog:        gt 4, predicted 2,                                tp 2 -> 2 / (4 + 2 - 2) = 1/2
    #   mIoU (1/2 + 4/5 + 1/2) / 3 = 3/5, pixel accuracy (3 + 4 + 2) / 12 = 3/4
    # paper (255 -> background, counted): all 16 pixels, row 2 is background
    #   background: gt 8, predicted 7 (row 2 adds 2), tp 5 -> 5 / (8 + 7 - 5) = 1/2
    #   person:     gt 4, predicted 7 (row 2 adds 2), tp 4 -> 4 / (4 + 7 - 4) = 4/7
    #   dog:        1/2 as before
    #   mIoU (1/2 + 4/7 + 1/2) / 3 = 11/21, pixel accuracy (5 + 4 + 2) / 16 = 11/16
    standard_miou, standard_acc = Fraction(3, 5), Fraction(3, 4)
    paper_miou, paper_acc = Fraction(11, 21), Fraction(11, 16)

    both = fixed_prediction(voc, PREDICTION, "both")
    assert both["protocol"] == "both"
    assert both["miou"] == pytest.approx(float(standard_miou))
    assert both["pixel_accuracy"] == pytest.approx(float(standard_acc))
    assert both["paper"]["miou"] == pytest.approx(float(paper_miou))
    assert both["paper"]["pixel_accuracy"] == pytest.approx(float(paper_acc))
    assert both["paper"]["iou_per_class"]["person"] == pytest.approx(4 / 7)
    assert both["paper"]["iou_per_class"]["background"] == pytest.approx(0.5)
    assert "255" in both["paper"]["rule"]

    standard = fixed_prediction(voc, PREDICTION, "standard")  # the default: the keys as they always were
    assert standard["protocol"] == "standard" and "paper" not in standard
    assert standard["miou"] == both["miou"] and standard["iou_per_class"] == both["iou_per_class"]
    paper = fixed_prediction(voc, PREDICTION, "paper")
    assert paper["paper"] == both["paper"]
    assert "miou" not in paper  # a reader of the standard keys fails instead of reading paper numbers

    # voc20 scores the 20 objects only under the standard protocol; the paper's VOC is the same
    #   person: the 4 person pixels are all predicted person, and (0, 1) is background, not scored -> 1
    #   dog: 1/2 -> mIoU 3/4
    voc20 = load_dataset("voc20", root=tmp_path / "VOC2012")
    result = fixed_prediction(voc20, PREDICTION, "both")
    assert result["miou"] == pytest.approx(0.75) and "background" not in result["iou_per_class"]
    assert result["paper"]["miou"] == pytest.approx(float(paper_miou))


@pytest.mark.parametrize("name, write", [("ade20k", write_ade), ("context", write_context)])
def test_paper_protocol_counts_label_zero_as_class_zero(tmp_path, fixed_prediction, name, write):
    dataset = load_dataset(name, root=write(tmp_path / name, ZERO_TRUTH))
    # standard: raw 0 is not scored (ADE "other", Context background), 12 pixels
    #   class 1: gt 4, predicted 4 among them ((0, 1) has gt 0), tp 4 -> 1
    #   class 2: gt 8, predicted 6, tp 6 -> 6/8; mIoU (1 + 3/4) / 2 = 7/8, pixel accuracy 10/12
    # paper: raw 0 is class 0 ("background"), predicted background matches it; 16 pixels
    #   class 0: gt 4, predicted 5 ((0,0), (1,0), (1,1), (3,2), (3,3)), tp 3 -> 3 / 6 = 1/2
    #   class 1: gt 4, predicted 5, tp 4 -> 4/5; class 2: 3/4
    #   mIoU (1/2 + 4/5 + 3/4) / 3 = 41/60, pixel accuracy (3 + 4 + 6) / 16 = 13/16
    result = fixed_prediction(dataset, ZERO_PREDICTION, "both")
    assert result["miou"] == pytest.approx(7 / 8)
    assert result["pixel_accuracy"] == pytest.approx(10 / 12)
    assert "background" not in result["iou_per_class"]
    assert result["paper"]["miou"] == pytest.approx(41 / 60)
    assert result["paper"]["pixel_accuracy"] == pytest.approx(13 / 16)
    assert result["paper"]["iou_per_class"]["background"] == pytest.approx(0.5)
    assert len(result["paper"]["iou_per_class"]) == len(dataset.vocabulary) + 1  # 151 / 60 classes


def test_paper_protocol_counts_coco_stuff_unlabelled_pixels_as_background(tmp_path):
    from tuner.datasets.shapes_writers import write_coco_layout

    stuff = load_dataset("coco_stuff", root=write_coco_layout(tmp_path / "coco", 1, splits=("val",)))
    sample = stuff.load("val", stuff.ids("val")[0])
    assert (sample.labels == 255).any()  # the writer leaves an unlabelled ring around each object
    paper = stuff.scored_labels("paper", "val", sample)
    names = stuff.scored_class_names("paper")
    assert len(names) == 172 and names[0] == "background"
    unlabelled = sample.labels == 255
    assert (paper[unlabelled] == 0).all()
    labelled = sample.labels[~unlabelled]
    assert [names[v] for v in paper[~unlabelled]] == [stuff.class_names[v] for v in labelled]


def test_datasets_without_a_paper_rule_refuse_it_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="no paper-protocol rule") as err:
        dataset_class("cityscapes").check_protocol("paper")
    assert "\n" not in str(err.value) and "--protocol standard" in str(err.value)
    dataset_class("cityscapes").check_protocol("standard")
    shapes = load_dataset("shapes")  # background is already a class: the paper protocol changes nothing
    sample = shapes.load("val", "val-00000")
    assert shapes.scored_class_names("paper") == shapes.class_names
    assert (shapes.scored_labels("paper", "val", sample) == sample.labels).all()


def test_tune_eval_prints_both_protocols(tmp_path, tiny_blip, capsys):
    from tuner.datasets.shapes_writers import write_voc_layout

    root = write_voc_layout(tmp_path / "VOC2012", 3, splits=("val",))
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=1, crf=False,
                             candidates="oracle")
    config_file = tmp_path / "best.yaml"
    config_file.write_text(config.to_yaml(provenance={"study": "s"}))
    base = ["eval", "--config", str(config_file), "--dataset", "voc", "--data-root", str(root),
            "--split", "val", "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    results = {}
    for protocol in ("both", "standard", "paper"):
        out = tmp_path / f"{protocol}.json"
        assert main([*base, "--protocol", protocol, "-o", str(out)]) == 0
        results[protocol] = json.loads(out.read_text())
        printed = capsys.readouterr().out
        if protocol == "both":
            assert "IoU standard" in printed and "IoU paper" in printed
            assert "side by side" in printed and "pixel accuracy" in printed
            assert "paper protocol on voc: object borders (255) counted as background" in printed
    both = results["both"]
    assert both["protocol"] == "both" and both["images"] == 3
    assert both["miou"] == results["standard"]["miou"]  # the standard keys keep their meaning
    assert both["iou_per_class"] == results["standard"]["iou_per_class"]
    assert both["paper"] == results["paper"]["paper"] and "miou" not in results["paper"]
    assert 0 <= both["paper"]["miou"] <= 1
