"""The reproduction kit: tools/gpt4o_lists.py and tools/reproduce_paper.py on tiny fixtures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.datasets import iter_samples, load_dataset
from tuner.datasets.shapes_writers import write_coco_layout, write_voc_layout

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- the authors' GPT-4o answers ----------------------------------------------------------------------
@pytest.mark.parametrize("answer, names", [
    ("[2: 'bicycle', 15: 'person'], [100, 100]", ["bicycle", "person"]),
    ("[19: train], [100%]", ["train"]),
    ("[20: 'tvmonitor', 15: 'person'], [90, 10]", ["tvmonitor"]),  # 10 is not above 70
    ("[13: 'horse', 15: 'person'], [horse: 95%, person: 70%]", ["horse"]),  # 70 is not above 70
    ("[9: chair, 11: table,\n16: pottedplant], [90, 80, 75]", ["chair", "table", "pottedplant"]),
    ("[15: 'door;double;door', 1: 'wall'], [80%, 90%]", ["door", "wall"]),
    ("", []),
])
def test_gpt4o_answers_keep_the_classes_above_70(answer, names):
    assert tool("gpt4o_lists").parse_answer(answer) == names


@pytest.mark.parametrize("answer", ["1: aeroplane, 100%", "aeroplane", "I cannot tell."])
def test_gpt4o_answer_without_a_class_list_is_an_error_not_background(answer):
    with pytest.raises(ValueError, match="no \\[id: name"):
        tool("gpt4o_lists").parse_answer(answer)


def test_gpt4o_converter_writes_a_candidates_file_and_names_a_bad_answer(tmp_path, capsys):
    lists = tool("gpt4o_lists")
    source = tmp_path / "voc_classification_noboundary.json"
    source.write_text(json.dumps({"2007_000033": "[1: 'aeroplane'], [100%]",
                                  "2007_000129": "[2: 'bicycle', 15: 'person'], [100, 60]"}))
    out = tmp_path / "voc_lists.json"
    assert lists.main([str(source), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == {"2007_000033": ["aeroplane"], "2007_000129": ["bicycle"]}
    source.write_text(json.dumps({"2007_000033": "[1: 'aeroplane', 2: 'bicycle'], [100%]"}))
    assert lists.main([str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2007_000033" in err and "2 classes but 1 confidences" in err
    assert len(err.strip().splitlines()) == 1


# -- the five benchmarks on tiny fixtures -------------------------------------------------------------
def _save(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _pictures(rng, count: int):
    for i in range(count):
        labels = np.zeros((24, 32), dtype=np.uint8)
        labels[4:16, 6:20] = 1 + i
        labels[16:, 20:] = 3 + i
        yield i, rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), labels


def write_data_root(root: Path) -> Path:
    """VOC, COCO (Object and Stuff), PASCAL Context and ADE20K layouts under their usual names."""
    rng = np.random.default_rng(0)
    write_voc_layout(root / "VOCdevkit" / "VOC2012", 3, seed=2)
    write_coco_layout(root / "coco_stuff164k", 3, seed=1, splits=("val",))
    context = root / "VOCdevkit" / "VOC2010"
    for i, image, labels in _pictures(rng, 2):
        _save(context / "JPEGImages" / f"2008_00000{i}.jpg", image, "RGB")
        _save(context / "SegmentationClassContext" / f"2008_00000{i}.png", labels, "L")
    (context / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (context / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000000\n2008_000001\n")
    ade = root / "ade" / "ADEChallengeData2016"
    for i, image, labels in _pictures(rng, 2):
        _save(ade / "images" / "validation" / f"ADE_val_0000000{i + 1}.jpg", image, "RGB")
        _save(ade / "annotations" / "validation" / f"ADE_val_0000000{i + 1}.png", labels, "L")
    return root


def ground_truth_lists(root: Path, name: str, path: Path) -> Path:
    """A candidates_file listing each image's ground-truth classes (as a perfect tagger would)."""
    dataset = load_dataset(name, root=str(root))
    lists = {s.id: [c for c in s.image_classes if c != "background"]
             for s in iter_samples(dataset, "val", dataset.ids("val"))}
    path.write_text(json.dumps(lists))
    return path


def test_reproduce_paper_runs_the_five_benchmarks_on_cpu(tmp_path, tiny_blip, capsys):
    root = write_data_root(tmp_path / "data")
    names = ("voc", "coco", "context", "coco_stuff", "ade20k")
    lists = [f"{n}={ground_truth_lists(root, n, tmp_path / f'{n}.json')}" for n in names]
    out = tmp_path / "reproduce.json"
    code = tool("reproduce_paper").main([
        "--data-root", str(root), "--model", tiny_blip, "--image-size", "32", "--layer", "2",
        "--heads", "1", "--device", "cpu", "--batch-size", "2", "--no-progress", "-o", str(out),
        *[arg for pair in lists for arg in ("--lists", pair)],
    ])
    printed = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["dataset"] for r in rows] == list(names)
    assert [r["paper_miou"] for r in rows] == [51.3, 36.2, 28.0, 17.9, 14.2]
    for row in rows:
        assert row["images"] > 0 and row["candidates"].startswith("file")
        for key in ("miou_paper_protocol", "miou_standard"):
            assert 0 <= row[key] <= 100 and math.isfinite(row[key])
        assert row["benchmark"] in printed
    # the paper protocol counts background in ADE20K (label 0) where the standard one ignores it
    ade = rows[-1]
    assert ade["miou_paper_protocol"] != ade["miou_standard"]


def test_reproduce_paper_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    reproduce = tool("reproduce_paper")
    root = write_data_root(tmp_path / "data")
    assert reproduce.main(["--data-root", str(root), "--datasets", "voc,kitti"]) == 2
    assert "kitti" in capsys.readouterr().err
    assert reproduce.main(["--data-root", str(root), "--datasets", "voc", "--lists", "ade20k=x.json"]) == 2
    assert "not among the benchmarks" in capsys.readouterr().err
    assert reproduce.main(["--data-root", str(tmp_path / "nowhere"), "--datasets", "voc"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- the authors' search: studies/paper_coco.yaml ---------------------------------------------------------
def test_paper_coco_spec_is_the_official_search():
    from tuner.spec import load_spec

    spec = load_spec(ROOT / "studies" / "paper_coco.yaml")
    assert spec.dataset == "coco_stuff" and spec.protocol == "paper" and spec.trials == 34
    assert spec.sampler["type"] == "random" and spec.tuning_seed == 1164005944
    assert spec.tuning_split == "val" and spec.pruner["type"] == "none"
    space = {p.name: p for p in spec.search_space}
    assert (space["layer"].low, space["layer"].high, space["head"].low, space["head"].high) == (1, 11, 0, 11)
    assert space["threshold"].choices == (0.05, 0.15, 0.25, 0.35, 0.45)
    assert spec.fixed.itm_token == "enc" and spec.fixed.dtype == "float32" and spec.fixed.dropout_rounds == 1
    assert spec.objective == "clip_reward"
    assert spec.objective_options["mask_rebinarize"] == "official"
    assert spec.objective_options["mask_source"] == "threshold"


def test_paper_coco_search_runs_on_a_tiny_coco_layout(tmp_path, tiny_clip, capsys):
    """The shipped spec, with tiny models and a 4-image COCO fixture: the whole-vocabulary
    caption (171 names) runs, and the study records that it read image-level labels."""
    import optuna
    import yaml
    from conftest import save_tiny_blip

    from tuner.cli import main

    root = tmp_path / "data"
    write_coco_layout(root / "coco_stuff164k", 4, seed=1, splits=("val",))
    blip = save_tiny_blip(tmp_path / "blip", max_positions=256)
    data = yaml.safe_load((ROOT / "studies" / "paper_coco.yaml").read_text())
    data["tuning"]["images"] = 4
    data["trials"] = 3
    data["objective_options"]["clip_model"] = tiny_clip
    data["fixed"].update(model=blip, image_size=32, layer=2, heads=[1], crf_iterations=2)
    data["search_space"].update(layer={"type": "int", "low": 1, "high": 2},
                                head={"type": "int", "low": 0, "high": 3})
    spec = tmp_path / "paper.yaml"
    spec.write_text(yaml.safe_dump(data))
    storage = f"sqlite:///{tmp_path}/t.db"
    code = main(["run", "--study-file", str(spec), "--data-root", str(root), "--storage", storage,
                 "--device", "cpu", "--no-cache", "--no-progress"])
    assert code == 0, capsys.readouterr()
    study = optuna.load_study(study_name="paper_coco-clip_reward", storage=storage)
    assert study.user_attrs["protocol"] == "paper" and "image-level" in study.user_attrs["labels_touched"]
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2


def test_reproduce_paper_checks_output_and_lists_first_and_keeps_finished_benchmarks(tmp_path, capsys):
    """-o and every --lists file are checked before the model loads; a benchmark that fails after
    others finished names itself, and the finished rows are printed and written."""
    from conftest import save_tiny_blip

    reproduce = tool("reproduce_paper")
    root = write_data_root(tmp_path / "data")
    blip = save_tiny_blip(tmp_path / "blip")  # 64 positions: a 100-name caption does not fit
    voc = ground_truth_lists(root, "voc", tmp_path / "voc.json")
    base = ["--data-root", str(root), "--model", blip, "--image-size", "32", "--layer", "2", "--heads", "1",
            "--device", "cpu", "--batch-size", "2", "--no-progress", "--datasets", "voc,ade20k",
            "--lists", f"voc={voc}"]
    assert reproduce.main([*base, "-o", str(tmp_path / "missing" / "r.json")]) == 2
    assert "-o" in capsys.readouterr().err
    bad = tmp_path / "ade_bad.json"
    bad.write_text(json.dumps({"ADE_val_00000001": ["wall", "skyy"], "ADE_val_00000002": ["floor"]}))
    assert reproduce.main([*base, "--lists", f"ade20k={bad}"]) == 2
    captured = capsys.readouterr()
    assert "'skyy'" in captured.err and "VOC" not in captured.out  # refused before VOC was evaluated
    names = [c for c in load_dataset("ade20k", root=str(root)).class_names if c != "background"][:100]
    long = tmp_path / "ade_long.json"
    long.write_text(json.dumps({"ADE_val_00000001": names, "ADE_val_00000002": names}))
    out = tmp_path / "r.json"
    assert reproduce.main([*base, "--lists", f"ade20k={long}", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]  # after transformers' loading bar and the [ENC] note
    assert error.startswith("error: ADE20K (ade20k): ") and error.endswith(": VOC)")
    assert "VOC" in captured.out
    assert [r["dataset"] for r in json.loads(out.read_text())["rows"]] == ["voc"]


def test_gpt4o_fractions_are_refused_not_read_as_percents():
    with pytest.raises(ValueError, match="look like fractions"):
        tool("gpt4o_lists").parse_answer("[1: 'aeroplane', 15: 'person'], [0.9, 0.8]")
