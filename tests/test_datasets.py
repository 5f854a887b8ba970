"""Benchmark loaders on small on-disk fixtures in each layout, splits, `tune data check`, specs."""

from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tuner.data_cli import add_data_commands, cmd_data
from tuner.datasets import (
    DATASETS,
    CorruptImage,
    LayoutError,
    MissingAnnotation,
    SkippedImageWarning,
    builtin_classes,
    disjoint_splits,
    iter_samples,
    load_dataset,
    read_class_file,
    tuning_split,
)
from tuner.datasets.shapes_writers import (
    COCO_CLASS_OF_SHAPE,
    VOC_CLASS_OF_SHAPE,
    write_coco_layout,
    write_voc_layout,
)
from tuner.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("coco", "coco_stuff", "voc", "voc20", "context", "context60", "ade20k", "cityscapes")


# --- helpers -----------------------------------------------------------------------------------------
def save_image(path: Path, height: int = 12, width: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def save_labels(path: Path, values, height: int = 12, width: int = 16) -> np.ndarray:
    """A label PNG (mode L) whose rows cycle through `values`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.array(values, dtype=np.uint8)[np.arange(height) % len(values)][:, None].repeat(width, 1)
    Image.fromarray(labels, mode="L").save(path)
    return labels


def data_check(capsys, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="tune")
    add_data_commands(parser.add_subparsers(dest="command"))
    code = cmd_data(parser.parse_args(["data", "check", *argv]))
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """A data root holding coco_stuff164k/ with 4 train and 6 val shapes scenes."""
    root = tmp_path_factory.mktemp("data")
    write_coco_layout(root / "coco_stuff164k", 4, seed=1, splits=("train",))
    write_coco_layout(root / "coco_stuff164k", 6, seed=1, splits=("val",))
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc-data")
    write_voc_layout(root / "VOCdevkit" / "VOC2012", 3, seed=2)
    return root


# --- class lists -------------------------------------------------------------------------------------
def test_shipped_class_lists_have_the_standard_sizes_and_canonical_names_first():
    sizes = {"coco_stuff": 171, "voc": 21, "context59": 59, "ade20k": 150, "cityscapes": 19}
    for name, size in sizes.items():
        classes = builtin_classes(name)
        assert len(classes) == size and len(set(classes.names)) == size
    voc = builtin_classes("voc")
    tv = voc.names.index("television monitor")
    assert voc.names[0] == "background" and "tvmonitor" in voc.synonyms[tv]
    assert "person in shirt" in voc.synonyms[voc.names.index("person")]
    assert "building-other" in builtin_classes("coco_stuff").synonyms[84]


def test_class_file_format_comments_synonyms_and_duplicates(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat, kitty\n\ndog   # a comment\n")
    classes = read_class_file(path)
    assert classes.names == ("cat", "dog") and classes.synonyms == (("kitty",), ())
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"classes.txt:3: class 'cat' is listed twice"):
        read_class_file(path)
    path.write_text("cat, dog\ndog\n")
    with pytest.raises(ValueError, match="synonym 'dog' of class 'cat' is itself a class name"):
        read_class_file(path)


# --- COCO ----------------------------------------------------------------------------------------------
def test_coco_object_keeps_things_and_makes_stuff_and_unlabelled_background(coco_root):
    coco = load_dataset("coco", root=coco_root)  # a data root: coco_stuff164k/ is found below it
    assert coco.root == coco_root / "coco_stuff164k"
    assert coco.splits == ("train", "val") and len(coco.ids("val")) == 6
    assert len(coco.class_names) == 81 and coco.has_background and coco.class_names[0] == "background"
    assert coco.vocabulary == coco.class_names[1:] and "sky" not in coco.class_names
    shape_classes = {coco.class_id(n) for n in COCO_CLASS_OF_SHAPE.values()}
    for sample_id in coco.ids("val"):
        sample = coco.load("val", sample_id)
        values = set(np.unique(sample.labels).tolist())
        assert values <= {0} | shape_classes and 0 in values  # stuff and unlabelled (255) -> 0
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert set(sample.image_classes) == {coco.class_names[v] for v in values - {0, 255}}


def test_coco_stuff_has_171_classes_and_no_background(coco_root):
    stuff = load_dataset("coco_stuff", root=coco_root / "coco_stuff164k")
    assert len(stuff.class_names) == 171 and not stuff.has_background
    assert stuff.vocabulary == stuff.class_names
    coco = load_dataset("coco", root=coco_root)
    for sample_id in stuff.ids("val"):
        labels, objects = stuff.load("val", sample_id).labels, coco.load("val", sample_id).labels
        things = labels < 80
        assert np.array_equal(objects[things], labels[things] + 1)  # train id i -> object class i + 1
        assert (objects[(labels >= 80) & (labels != 255)] == 0).all()
        assert (labels == 255).any() and (objects[labels == 255] == 0).all()  # the public conversion
        assert {stuff.class_names[v] for v in np.unique(labels) if 80 <= v < 171} <= {"sky", "grass", "wall",
                                                                                        "road"}


def test_raw_stuffthingmaps_read_like_mmseg_train_ids(tmp_path, coco_root):
    write_coco_layout(tmp_path, 6, seed=1, splits=("val",), raw_maps=True)
    assert not list((tmp_path / "annotations" / "val2017").glob("*_labelTrainIds.png"))
    raw, converted = load_dataset("coco_stuff", root=tmp_path), load_dataset("coco_stuff", root=coco_root)
    for sample_id in raw.ids("val"):
        assert np.array_equal(raw.load("val", sample_id).labels, converted.load("val", sample_id).labels)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_coco_object_from_instance_annotations(tmp_path, coco_root):
    pytest.importorskip("pycocotools")
    write_coco_layout(tmp_path, 6, seed=1, splits=("val",), instances=True)
    for path in (tmp_path / "annotations" / "val2017").iterdir():
        path.unlink()
    (tmp_path / "annotations" / "val2017").rmdir()  # no stuff-thing maps: the JSON is read
    from_json, from_maps = load_dataset("coco", root=tmp_path), load_dataset("coco", root=coco_root)
    assert from_json.uses_instances("val")
    for sample_id in from_json.ids("val"):
        a, b = from_json.load("val", sample_id).labels, from_maps.load("val", sample_id).labels
        assert np.array_equal(a, b)  # one ground truth from both sources


# --- PASCAL VOC --------------------------------------------------------------------------------------
def test_voc21_and_voc20_label_mapping(voc_root):
    voc, voc20 = load_dataset("voc", root=voc_root), load_dataset("voc20", root=voc_root / "VOCdevkit")
    assert voc.root == voc20.root == voc_root / "VOCdevkit" / "VOC2012"
    assert len(voc.class_names) == 21 and voc.has_background
    assert len(voc20.class_names) == 20 and not voc20.has_background and voc20.class_names == voc.vocabulary
    assert voc.splits == ("train", "val") and voc.ids("val") == ["2008_000000", "2008_000001", "2008_000002"]
    shapes = {voc.class_id(n) for n in VOC_CLASS_OF_SHAPE.values()}
    for sample_id in voc.ids("val"):
        full, reduced = voc.load("val", sample_id).labels, voc20.load("val", sample_id).labels
        assert set(np.unique(full).tolist()) <= {0, 255} | shapes and (full == 255).any()
        assert (reduced[full == 0] == 255).all()  # background is ignored in VOC-20
        objects = (full > 0) & (full != 255)
        assert np.array_equal(reduced[objects], full[objects] - 1)
        assert voc20.load("val", sample_id).image_classes == voc.load("val", sample_id).image_classes


def test_voc_palette_png_is_read_as_indices(voc_root):
    path = next((voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass").iterdir())
    assert Image.open(path).mode == "P"


# --- PASCAL-Context, ADE20K, Cityscapes --------------------------------------------------------------
def test_pascal_context_59_and_60(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    for split, ids in {"train": ["2008_000001"], "val": ["2008_000002", "2008_000003"]}.items():
        (base / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            save_image(base / "JPEGImages" / f"{i}.jpg")
            save_labels(base / "SegmentationClassContext" / f"{i}.png", [0, 1, 37, 59, 255])
    c59, c60 = load_dataset("context", root=tmp_path), load_dataset("context60", root=tmp_path)
    assert (len(c59.class_names), c59.has_background) == (59, False)
    assert (len(c60.class_names), c60.has_background, c60.class_names[1:]) == (60, True, c59.class_names)
    a, b = c59.load("val", "2008_000002").labels, c60.load("val", "2008_000002").labels
    assert a[:5, 0].tolist() == [255, 0, 36, 58, 255] and b[:5, 0].tolist() == [0, 1, 37, 59, 255]
    assert c59.class_names[36] == "person" and c59.class_names[58] == "wood"


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path):
    root = tmp_path / "ade" / "ADEChallengeData2016"
    for folder in ("training", "validation"):
        save_image(root / "images" / folder / f"ADE_{folder}_00000001.jpg")
        save_labels(root / "annotations" / folder / f"ADE_{folder}_00000001.png", [0, 1, 13, 150])
    ade = load_dataset("ade20k", root=tmp_path)
    assert ade.splits == ("train", "val") and len(ade.class_names) == 150 and not ade.has_background
    labels = ade.load("val", "ADE_validation_00000001").labels
    assert labels[:4, 0].tolist() == [255, 0, 12, 149] and ade.class_names[12] == "person"
    assert tuning_split(ade, "val") == "train"


def test_cityscapes_train_ids_and_official_label_ids(tmp_path):
    root = tmp_path / "cityscapes"
    save_image(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    save_labels(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png",
                [0, 13, 18, 255])
    save_image(root / "leftImg8bit" / "val" / "munster" / "munster_000000_000019_leftImg8bit.png")
    save_labels(root / "gtFine" / "val" / "munster" / "munster_000000_000019_gtFine_labelIds.png",
                [7, 26, 33, 0, 4])  # official ids: road, car, bicycle, unlabeled, static
    city = load_dataset("cityscapes", root=tmp_path)
    assert city.ids("val") == ["lindau/lindau_000000_000019", "munster/munster_000000_000019"]
    assert len(city.class_names) == 19 and not city.has_background
    assert city.load("val", "lindau/lindau_000000_000019").labels[:4, 0].tolist() == [0, 13, 18, 255]
    official = city.load("val", "munster/munster_000000_000019")
    assert official.labels[:5, 0].tolist() == [0, 13, 18, 255, 255]
    assert official.image_classes == ("road", "car", "bicycle")


# --- folder --------------------------------------------------------------------------------------------
def test_folder_of_images_has_no_labels_and_partitions_its_one_split(tmp_path):
    for i in range(12):
        save_image(tmp_path / f"photo{i:02d}.jpg", seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(LayoutError, match="write .*classes.txt"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "classes.txt").write_text("background\ncat\ndog, puppy\n")
    folder = load_dataset("folder", root=tmp_path)
    assert folder.splits == ("all",) and not folder.has_labels and len(folder.ids("all")) == 12
    assert folder.has_background and folder.vocabulary == ("cat", "dog") and folder.synonyms[2] == ("puppy",)
    sample = folder.load("all", "photo03.jpg")
    assert sample.labels is None and sample.image.shape == (12, 16, 3)
    tune, evaluate = disjoint_splits(folder, "all")
    assert (tune, evaluate) == ("all:tune", "all:eval")
    a, b = folder.ids(tune), folder.ids(evaluate)
    assert a and b and not set(a) & set(b) and sorted(a + b) == folder.ids("all")
    assert folder.load(tune, a[0]).id == a[0]
    assert load_dataset("folder", root=tmp_path, classes="cat,bird").class_names == ("cat", "bird")


# --- splits --------------------------------------------------------------------------------------------
def test_tuning_split_is_disjoint_from_the_evaluated_split(coco_root, voc_root, tmp_path):
    voc = load_dataset("voc", root=voc_root)
    assert tuning_split(voc, "val") == "train" and tuning_split(voc, "train") == "val"
    assert not set(voc.ids("train")) & set(voc.ids("val"))
    lists = voc.root / "ImageSets" / "Segmentation"
    (lists / "trainval.txt").write_text((lists / "train.txt").read_text() + (lists / "val.txt").read_text())
    (lists / "train.txt").rename(tmp_path / "train.txt")
    try:  # only val and trainval: trainval holds val's images, so val is partitioned instead
        voc = load_dataset("voc", root=voc_root)
        assert voc.splits == ("trainval", "val") and disjoint_splits(voc, "val") == ("val:tune", "val:eval")
    finally:
        (tmp_path / "train.txt").rename(lists / "train.txt")
        (lists / "trainval.txt").unlink()

    only_val = tmp_path / "only-val"
    write_coco_layout(only_val, 10, seed=3, splits=("val",))
    coco = load_dataset("coco", root=only_val)
    assert coco.splits == ("val",) and disjoint_splits(coco, "val") == ("val:tune", "val:eval")
    tune, evaluate = coco.ids("val:tune"), coco.ids("val:eval")
    assert tune and not set(tune) & set(evaluate) and sorted(tune + evaluate) == coco.ids("val")
    coco.check_split("val:tune")
    with pytest.raises(ValueError, match="has no split 'train'"):
        coco.check_split("train")
    # membership depends on the id alone: more images never move an id to the other side
    write_coco_layout(only_val, 14, seed=3, splits=("val",))
    grown = load_dataset("coco", root=only_val)
    assert set(tune) <= set(grown.ids("val:tune")) and set(evaluate) <= set(grown.ids("val:eval"))
    reseeded = load_dataset("coco", root=only_val, split_seed=5)
    assert reseeded.ids("val:tune") != grown.ids("val:tune")


# --- errors: corrupt images, missing annotations ------------------------------------------------------
def test_corrupt_image_is_skipped_with_a_warning_or_fails_when_strict(tmp_path):
    write_coco_layout(tmp_path, 4, seed=4, splits=("val",))
    images = sorted((tmp_path / "images" / "val2017").iterdir())
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated JPEG
    coco = load_dataset("coco", root=tmp_path)
    ids = coco.ids("val")
    stream = iter_samples(coco, "val", ids)
    with pytest.warns(SkippedImageWarning, match=ids[1]):
        loaded = [s.id for s in stream]
    assert loaded == [ids[0], ids[2], ids[3]] and stream.loaded == 3
    assert [sid for sid, _ in stream.skipped] == [ids[1]] and images[1].name in stream.skipped[0][1]
    with pytest.raises(CorruptImage, match=images[1].name):
        list(iter_samples(coco, "val", ids, strict=True))


def test_missing_annotation_is_a_one_line_error_naming_the_expected_path(tmp_path):
    write_coco_layout(tmp_path, 3, seed=5, splits=("val",))
    coco = load_dataset("coco_stuff", root=tmp_path)
    sample_id = coco.ids("val")[2]
    expected = tmp_path / "annotations" / "val2017" / f"{sample_id}_labelTrainIds.png"
    expected.unlink()
    with pytest.raises(MissingAnnotation) as err:
        coco.load("val", sample_id)
    assert str(err.value).count("\n") == 0 and str(expected) in str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses worker processes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing annotation is not skipped: it always raises
        with pytest.raises(MissingAnnotation):
            list(iter_samples(coco, "val", coco.ids("val")))


# --- tune data check -------------------------------------------------------------------------------------
def test_data_check_reports_a_good_tree(capsys, coco_root):
    code, out = data_check(capsys, "--dataset", "coco", "--data-root", str(coco_root))
    assert code == 0, out
    assert "81 classes (background + 80)" in out and "ignore index 255" in out
    assert [ln.split() for ln in out.splitlines() if ln.startswith(("train ", "val "))] == [
        ["train", "4", "4"], ["val", "6", "6"]]
    assert "studies evaluated on val tune on train" in out and out.rstrip().endswith("ok")


def test_data_check_prints_the_expected_tree_for_a_broken_one(capsys, tmp_path):
    (tmp_path / "JPEGImages").mkdir()  # VOC images but no split lists
    code, out = data_check(capsys, "--dataset", "voc", "--data-root", str(tmp_path))
    assert code == 1 and "does not look like PASCAL VOC 2012" in out
    assert "expected layout:" in out and "ImageSets/Segmentation/" in out
    assert "SegmentationClass/<id>.png" in out

    write_coco_layout(tmp_path / "coco", 3, seed=6, splits=("val",))
    missing = sorted((tmp_path / "coco" / "annotations" / "val2017").iterdir())[0]
    missing.unlink()
    code, out = data_check(capsys, "--dataset", "coco_stuff", "--data-root", str(tmp_path / "coco"))
    assert code == 1 and "1 of 3 images have no annotation" in out and missing.name in out
    code, out = data_check(capsys, "--dataset", "ade20k", "--data-root", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in out and "annotations/" in out


def test_every_benchmark_is_registered_and_has_a_study_spec():
    assert set(BENCHMARKS) | {"folder", "shapes"} <= set(DATASETS)
    for name in BENCHMARKS:
        spec = load_spec(ROOT / "studies" / f"{name}.yaml")
        assert spec.dataset == name and spec.trials == 34 and spec.fixed.dropout_rounds == 1
        space = {p.name: p for p in spec.search_space}
        layer, head = space["layer"], space["head"]
        assert (layer.low, layer.high, head.low, head.high) == (1, 11, 0, 11)
        assert space["threshold"].choices == (0.05, 0.15, 0.25, 0.35, 0.45)
        assert spec.objective_options["clip_model"] == "openai/clip-vit-large-patch14-336"
        assert spec.tuning_split == "auto" and spec.eval_split == "val"
        # the commented-out Salience Dropout search is a valid spec too
        text = (ROOT / "studies" / f"{name}.yaml").read_text().replace("  # dropout_", "  dropout_")
        data = yaml.safe_load(text)
        assert {"dropout_rounds", "dropout_k"} <= set(data["search_space"])
    rules = {n: load_spec(ROOT / "studies" / f"{n}.yaml").fixed.background for n in BENCHMARKS}
    assert rules == {"coco": "always", "voc": "always", "voc20": "always", "coco_stuff": "auto",
                     "context": "auto", "context60": "auto", "ade20k": "auto", "cityscapes": "never"}


def test_dropout_search_variant_parses(tmp_path):
    text = (ROOT / "studies" / "coco.yaml").read_text().replace("  # dropout_", "  dropout_")
    (tmp_path / "coco.yaml").write_text(text)
    spec = load_spec(tmp_path / "coco.yaml")
    assert [p.name for p in spec.search_space][-2:] == ["dropout_rounds", "dropout_k"]


# --- a study on a COCO-layout fixture --------------------------------------------------------------------
def test_tune_run_on_a_coco_layout_fixture(tmp_path, tiny_blip, tiny_clip, capsys):
    from tuner.cli import main

    write_coco_layout(tmp_path / "data" / "coco_stuff164k", 12, seed=7, splits=("val",))
    spec = {
        "dataset": "coco",
        "tuning": {"split": "val:tune", "images": 2, "seed": 0},
        "eval_split": "val:eval",
        "objective": "clip_margin",
        "objective_options": {"clip_model": tiny_clip},
        "fixed": {"model": tiny_blip, "image_size": 32, "layer": 2, "dropout_rounds": 1, "crf_iterations": 2,
                  "candidates": "clip_topk", "candidates_topk": 3, "candidates_model": tiny_clip},
        "search_space": {"head": {"type": "int", "low": 0, "high": 3}},
        "pruner": {"type": "none"},
        "trials": 2,
    }
    (tmp_path / "coco.yaml").write_text(yaml.safe_dump(spec))
    code = main(["run", "--dataset", "coco", "--data-root", str(tmp_path / "data"),
                 "--study-file", str(tmp_path / "coco.yaml"), "--storage", f"sqlite:///{tmp_path}/t.db",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "mIoU" in captured.out
    import optuna

    study = optuna.load_study(study_name="coco-clip_margin", storage=f"sqlite:///{tmp_path}/t.db")
    tuning_ids = study.user_attrs["tuning_ids"]
    coco = load_dataset("coco", root=tmp_path / "data")
    assert set(tuning_ids) <= set(coco.ids("val:tune")) and not set(tuning_ids) & set(coco.ids("val:eval"))
    assert all(0.0 <= t.user_attrs["miou"] <= 1.0 for t in study.trials)


# --- COCO-Object ground truth: the public conversion, equal from every source -----------------------------
def public_coco_object(raw: np.ndarray) -> np.ndarray:
    """The public COCO-Object rule, written out here from its description: a raw stuff-thing value
    (category id - 1) of a thing becomes its thing index + 1, stuff and 255 become 0."""
    from tuner.datasets.coco import USED_CATEGORY_IDS

    things = {cat - 1: i + 1 for i, cat in enumerate(USED_CATEGORY_IDS[:80])}
    return np.vectorize(lambda v: things.get(int(v), 0), otypes=[np.uint8])(raw)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_coco_object_ground_truth_is_the_public_conversion_from_every_source(tmp_path):
    pytest.importorskip("pycocotools")
    write_coco_layout(tmp_path / "raw", 3, seed=11, splits=("val",), raw_maps=True, instances=True)
    write_coco_layout(tmp_path / "mmseg", 3, seed=11, splits=("val",))
    maps = tmp_path / "raw" / "annotations" / "val2017"
    # the public tool's own output files, next to the raw maps in a third tree
    converted = tmp_path / "converted"
    write_coco_layout(converted, 3, seed=11, splits=("val",), raw_maps=True)
    for path in sorted((converted / "annotations" / "val2017").glob("*.png")):
        Image.fromarray(public_coco_object(np.asarray(Image.open(path)))).save(
            path.with_name(path.stem + "_instanceTrainIds.png"))
        path.unlink()
    sources = {
        "raw maps": load_dataset("coco", root=tmp_path / "raw", source="stuffthingmaps"),
        "train-id maps": load_dataset("coco", root=tmp_path / "mmseg"),
        "instances": load_dataset("coco", root=tmp_path / "raw", source="instances"),
        "public output": load_dataset("coco", root=converted),
    }
    for sample_id in sources["raw maps"].ids("val"):
        raw = np.asarray(Image.open(maps / f"{sample_id}.png"))
        assert (raw == 255).any()  # unlabelled pixels are there, and the rule makes them background
        expected = public_coco_object(raw)
        for name, dataset in sources.items():
            assert np.array_equal(dataset.load("val", sample_id).labels, expected), name


# --- label values that are not class ids ----------------------------------------------------------------
def test_greyscale_resaved_voc_labels_are_refused_with_file_value_and_count(tmp_path, capsys):
    from tuner.datasets import LabelValueError

    root = write_voc_layout(tmp_path / "VOCdevkit" / "VOC2012", 2, seed=12)
    labels_dir = root / "SegmentationClass"
    path = sorted(labels_dir.iterdir())[0]
    palette = Image.open(path)
    indices = np.asarray(palette)
    grey = np.asarray(palette.convert("RGB").convert("L"))  # what an image editor's re-save keeps
    Image.fromarray(grey, mode="L").save(path)
    voc = load_dataset("voc", root=tmp_path)
    sample_id = path.stem
    with pytest.raises(LabelValueError) as err:
        voc.load("val" if sample_id in voc.ids("val") else "train", sample_id)
    # the values reported are the grey levels of the objects, with their pixel counts
    bad = {v: c for v, c in err.value.values}
    objects = indices[(indices > 0) & (indices != 255)]
    expected = {int(v): int(c) for v, c in zip(*np.unique(grey[(indices > 0) & (indices != 255)],
                                                          return_counts=True)) if v > 20 and v != 255}
    assert objects.size and bad and set(bad) <= set(expected) | set(np.unique(grey).tolist())
    assert all(bad[v] == int((grey == v).sum()) for v in bad)  # the count is the file's pixel count
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "0..20 (classes), 255 (ignored)" in message
    assert str(pickle.loads(pickle.dumps(err.value))) == message
    # `tune data check` reports it (file, value, count) instead of `ok`
    code, out = data_check(capsys, "--dataset", "voc", "--data-root", str(tmp_path), "--read", "10")
    value, count = err.value.values[0]
    assert code == 1 and path.name in out and f"{value} ({count} px)" in out
    assert not out.rstrip().endswith("ok")
    split = "val" if sample_id in voc.ids("val") else "train"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never skipped like a corrupt image: it always raises
        with pytest.raises(LabelValueError):
            list(iter_samples(voc, split, voc.ids(split)))


@pytest.mark.parametrize("name, valid, invalid", [
    ("voc", [0, 20, 255], [21, 254]), ("voc20", [0, 20, 255], [21]), ("context", [0, 59, 255], [60]),
    ("context60", [0, 59, 255], [60]), ("ade20k", [0, 150], [151, 255 - 1]),
    ("cityscapes", [0, 18, 255], [19, 33]), ("coco_stuff", [0, 170, 255], [171, 200]),
    ("coco", [0, 170, 255], [171]),
])
def test_every_loader_refuses_values_outside_its_ids(tmp_path, name, valid, invalid):
    from tuner.datasets import LabelValueError

    dataset = _one_image_dataset(tmp_path, name, valid)
    split, sample_id = dataset.splits[-1], dataset.ids(dataset.splits[-1])[0]
    dataset.load(split, sample_id)  # the valid values load
    for value in invalid:
        _one_image_dataset(tmp_path, name, [*valid, value])
        with pytest.raises(LabelValueError, match=rf": {value} \(\d+ px\)"):
            dataset.load(split, sample_id)


def test_sixteen_bit_label_values_past_255_are_reported_not_wrapped(tmp_path):
    from tuner.datasets import LabelValueError

    dataset = _one_image_dataset(tmp_path, "ade20k", [0, 1])
    path = dataset.label_path("val", dataset.ids("val")[0])
    Image.fromarray(np.array([[1, 257] * 8] * 12, dtype=np.uint16)).save(path)  # 257 would wrap to 1
    with pytest.raises(LabelValueError, match=r": 257 \(96 px\)"):
        dataset.load("val", dataset.ids("val")[0])


def test_cityscapes_official_label_ids_past_33_are_refused(tmp_path):
    from tuner.datasets import LabelValueError

    root = tmp_path / "cityscapes"
    save_image(root / "leftImg8bit" / "val" / "a" / "a_0_1_leftImg8bit.png")
    save_labels(root / "gtFine" / "val" / "a" / "a_0_1_gtFine_labelIds.png", [7, 0, 33, 40])
    with pytest.raises(LabelValueError, match=r": 40 \(48 px\).*0\.\.33"):
        load_dataset("cityscapes", root=tmp_path).load("val", "a/a_0_1")


def _one_image_dataset(tmp_path: Path, name: str, values):
    """A one-image tree of benchmark `name` whose label file's rows cycle through `values`."""
    if name in ("voc", "voc20"):
        base = tmp_path / "VOCdevkit" / "VOC2012"
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000001\n")
        save_image(base / "JPEGImages" / "2008_000001.jpg")
        save_labels(base / "SegmentationClass" / "2008_000001.png", values)
    elif name in ("context", "context60"):
        base = tmp_path / "VOCdevkit" / "VOC2010"
        (base / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
        save_image(base / "JPEGImages" / "2008_000001.jpg")
        save_labels(base / "SegmentationClassContext" / "2008_000001.png", values)
    elif name == "ade20k":
        base = tmp_path / "ade" / "ADEChallengeData2016"
        save_image(base / "images" / "validation" / "ADE_val_1.jpg")
        save_labels(base / "annotations" / "validation" / "ADE_val_1.png", values)
    elif name == "cityscapes":
        base = tmp_path / "cityscapes"
        save_image(base / "leftImg8bit" / "val" / "a" / "a_0_1_leftImg8bit.png")
        save_labels(base / "gtFine" / "val" / "a" / "a_0_1_gtFine_labelTrainIds.png", values)
    else:
        base = tmp_path / "coco_stuff164k"
        save_image(base / "images" / "val2017" / "000000000001.jpg")
        save_labels(base / "annotations" / "val2017" / "000000000001_labelTrainIds.png", values)
    return load_dataset(name, root=tmp_path)


# --- images: every mode Pillow opens, EXIF orientation --------------------------------------------------
def test_sixteen_bit_and_other_modes_read_as_distinct_8_bit_levels(tmp_path):
    from segmenter.images import read_image

    levels = np.array([[8000, 30000, 60000]] * 4, dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    grey = read_image(tmp_path / "grey16.png")
    assert grey.dtype == np.uint8 and grey.shape == (4, 3, 3)
    assert grey[0, :, 0].tolist() == [31, 117, 233]  # level * 255 / 65535, distinct, not all 255
    # the folder and the benchmark readers use the same decoder
    (tmp_path / "classes.txt").write_text("cat\n")
    folder = load_dataset("folder", root=tmp_path)
    assert np.array_equal(folder.load("all", "grey16.png").image, grey)
    from tuner.datasets._disk import read_rgb

    assert np.array_equal(read_rgb(tmp_path / "grey16.png"), grey)
    # big-endian 16-bit, 32-bit integer and float images
    Image.frombytes("I;16B", (3, 1), levels[:1].astype(">u2").tobytes()).save(tmp_path / "be.tif")
    assert read_image(tmp_path / "be.tif")[0, :, 0].tolist() == [31, 117, 233]
    Image.fromarray(levels.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    assert read_image(tmp_path / "i32.tif")[0, :, 0].tolist() == [31, 117, 233]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    # alpha, palette transparency, CMYK, bilevel: colours kept, alpha dropped
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    la = Image.fromarray(np.stack([np.full((2, 2), 90, np.uint8), np.full((2, 2), 10, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png")[0, 0].tolist() == [90, 90, 90]
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    assert read_image(tmp_path / "p.png")[0, 0].tolist() == [10, 200, 30]
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg")[0, 0, 0] > 200 > read_image(tmp_path / "cmyk.jpg")[0, 0, 1]
    Image.new("1", (2, 2), 1).save(tmp_path / "bw.png")
    assert read_image(tmp_path / "bw.png")[0, 0].tolist() == [255, 255, 255]
    from segmenter.images import as_rgb_uint8

    assert as_rgb_uint8(levels)[0, :, 0].tolist() == [31, 117, 233]  # uint16 arrays as 16-bit too


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 64 wide x 128 high with Orientation 6 (viewed 128 wide x 64 high)."""
    stored = np.zeros((128, 64, 3), dtype=np.uint8)
    stored[:32] = 255  # a white band at the stored top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return stored


def test_user_images_are_read_as_viewed_benchmark_images_as_stored(tmp_path):
    from segmenter.images import read_image

    exif_rotated_jpeg(tmp_path / "phone.jpg")
    viewed = read_image(tmp_path / "phone.jpg")
    assert viewed.shape == (64, 128, 3)
    assert viewed[:, -16:].mean() > 200 and viewed[:, :16].mean() < 50  # rotated 90 degrees clockwise
    (tmp_path / "classes.txt").write_text("cat\n")
    assert load_dataset("folder", root=tmp_path).load("all", "phone.jpg").image.shape == (64, 128, 3)
    # a benchmark image keeps its stored order, the one its label map has
    base = tmp_path / "ade" / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    exif_rotated_jpeg(base / "images" / "validation" / "ADE_val_1.jpg")
    save_labels(base / "annotations" / "validation" / "ADE_val_1.png", [0, 1], height=128, width=64)
    sample = load_dataset("ade20k", root=tmp_path).load("val", "ADE_val_1")
    assert sample.image.shape == (128, 64, 3) and sample.labels.shape == (128, 64)
