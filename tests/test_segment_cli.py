"""`tune segment`: label PNGs, overlays and maps for a folder of images, bad files listed."""

from __future__ import annotations

import numpy as np
from conftest import random_image
from PIL import Image

from segmenter import Segmenter, SegmenterConfig
from tuner.cli import main


def test_segment_folder_writes_labels_overlays_and_lists_bad_files(tmp_path, tiny_blip, rng, capsys):
    images = tmp_path / "in"
    images.mkdir()
    shapes = {"a.png": (37, 45), "b.jpg": (20, 33), "c.png": (50, 50)}
    for name, (h, w) in shapes.items():
        Image.fromarray(random_image(rng, h, w)).save(images / name)
    Image.fromarray(random_image(rng, 16, 16)[..., 0]).save(images / "gray.png")
    (images / "broken.png").write_bytes(b"not a png")
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=2,
                             dropout_k=2, threshold=0.3)
    config_file = tmp_path / "best.yaml"
    config_file.write_text(config.to_yaml(provenance={"study": "s"}))
    out = tmp_path / "out"
    code = main(["segment", "--config", str(config_file), "--classes", "cat, dog,person",
                 str(images), "--out", str(out), "--save-maps", "--device", "cpu", "--no-progress",
                 "--batch-size", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 4" in printed and "broken.png" in printed
    for name, (h, w) in {**shapes, "gray.png": (16, 16)}.items():
        stem = out / name  # the input's name, suffix kept
        labels = Image.open(f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (w, h)
        assert set(np.unique(np.asarray(labels))) <= {0, 1, 2, 3}
        assert Image.open(f"{stem}_overlay.png").height >= h
        maps = np.load(f"{stem}_maps.npz")
        assert maps["maps"].shape == (3, 4, 4) and list(maps["class_names"]) == ["cat", "dog", "person"]
    # the same config through the Python API gives the same label map
    seg = Segmenter.from_config(config_file, device="cpu")
    direct = seg.segment(np.asarray(Image.open(images / "a.png").convert("RGB")), ["cat", "dog", "person"])
    np.testing.assert_array_equal(direct.label_map, np.asarray(Image.open(out / "a.png_labels.png")))


def test_segment_errors_are_one_line(tmp_path, tiny_blip, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,)).to_yaml())
    base = ["segment", "--config", str(config_file), "--out", str(tmp_path / "o")]
    assert main([*base, "--classes", " , ", str(tmp_path)]) == 2
    assert "class list is empty" in capsys.readouterr().err
    assert main([*base, "--classes", "cat", str(tmp_path / "missing.jpg")]) == 2
    assert "no such image" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("layer: [2\n")
    assert main(["segment", "--config", str(tmp_path / "bad.yaml"), "--classes", "cat", "--out", "o",
                 str(tmp_path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_eval_matches_the_study_trials_miou(tmp_path, tiny_blip, tiny_clip, capsys):
    """`tune eval` on the tuning images reproduces the mIoU the study recorded for its best trial."""
    import json

    import optuna
    from conftest import write_spec

    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=5, trials=2,
                      tuning={"split": "val", "images": 5, "seed": 0}, dataset_options={})
    storage = f"sqlite:///{tmp_path}/tune.db"
    assert main(["run", "--study-file", str(spec), "--storage", storage, "--device", "cpu", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(["export", "--study", "shapes-clip_margin", "--storage", storage,
                 "-o", str(tmp_path / "best.yaml"), "--force"]) == 0
    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(tmp_path / "best.yaml"), "--dataset", "shapes", "--split", "val",
                 "--images", "5", "--device", "cpu", "--no-progress", "-o", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 5 and set(result["iou_per_class"]) >= {"background", "circle"}
    from tuner.selection import choose

    assert abs(result["miou"] - choose(study).trial.user_attrs["miou"]) < 1e-9
    assert "mIoU" in capsys.readouterr().out


def test_inputs_sharing_a_stem_never_share_an_output(tmp_path, tiny_blip, rng, capsys):
    root = tmp_path / "in"
    for name in ("cam1/0001.jpg", "cam2/0001.jpg", "a.jpg", "a.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, 20, 24)).save(root / name)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,),
                                           dropout_rounds=1, crf=False).to_yaml())
    out = tmp_path / "out"
    inputs = [str(root / "cam1"), str(root / "cam2"), str(root / "a.jpg"), str(root / "a.png"),
              str(root / "a.png")]  # the same file twice is segmented once
    assert main(["segment", "--config", str(config_file), "--classes", "cat,dog", *inputs, "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labels.png"))
    assert written == ["a.jpg_labels.png", "a.png_labels.png", "cam1/0001.jpg_labels.png",
                       "cam2/0001.jpg_labels.png"]
    assert "wrote 4 label maps" in capsys.readouterr().out  # the count is what is on disk
    assert len(list(out.rglob("*_overlay.png"))) == 4


def test_output_names_mirror_the_input_tree(tmp_path):
    from tuner.apply import plan_outputs

    for name in ("x/cam1/0001.jpg", "x/cam2/0001.jpg", "x/cam2/0001.JPG", "x/a.jpg", "x/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = [n for _, n in plan_outputs([str(tmp_path / "x" / "cam1"), str(tmp_path / "x" / "cam2")])]
    assert names == ["cam1/0001.jpg", "cam2/0001.JPG", "cam2/0001.jpg~2"]  # names equal but for case
    assert [n for _, n in plan_outputs([str(tmp_path / "x" / "a.jpg"), str(tmp_path / "x" / "a.png")])] == \
        ["a.jpg", "a.png"]
    assert [n for _, n in plan_outputs([str(tmp_path / "x" / "cam1")])] == ["0001.jpg"]
    single = plan_outputs([str(tmp_path / "x" / "a.jpg"), str(tmp_path / "x" / "cam1" / "0001.jpg")])
    assert [n for _, n in single] == ["a.jpg", "cam1/0001.jpg"]
    # a directory is searched through its subdirectories, hidden ones left out
    (tmp_path / "x" / ".thumbs").mkdir()
    (tmp_path / "x" / ".thumbs" / "t.jpg").write_bytes(b"")
    assert [n for _, n in plan_outputs([str(tmp_path / "x")])] == \
        ["a.jpg", "a.png", "cam1/0001.jpg", "cam2/0001.JPG", "cam2/0001.jpg~2"]


def test_segment_refuses_inputs_without_images_before_loading(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image here")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(SegmenterConfig(model=str(tmp_path / "no-model"), image_size=32).to_yaml())
    assert main(["segment", "--config", str(config_file), "--classes", "cat", "--out", str(tmp_path / "o"),
                 str(tmp_path / "empty")]) == 2  # the model (which does not exist) is never loaded
    assert "no image found in" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_segment_reads_photos_as_viewed_and_checks_out_before_loading(tmp_path, tiny_blip, capsys):
    stored = np.zeros((128, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: 128 wide x 64 high
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,),
                                           dropout_rounds=1, crf=False).to_yaml())
    base = ["segment", "--config", str(config_file), "--classes", "cat", str(tmp_path / "phone.jpg"),
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "phone.jpg_labels.png").size == (128, 64)
    capsys.readouterr()
    (tmp_path / "taken").write_text("a file where the output directory should go")
    assert main([*base, "--out", str(tmp_path / "taken")]) == 2
    assert "cannot write to --out directory" in capsys.readouterr().err


def test_eval_defaults_to_the_held_out_part_skips_corrupt_images_and_checks_output_first(
        tmp_path, tiny_blip, capsys, monkeypatch):
    import json

    from tuner.datasets import load_dataset
    from tuner.datasets.shapes_writers import write_coco_layout

    write_coco_layout(tmp_path / "coco", 10, seed=21, splits=("val",))  # only val on disk
    coco = load_dataset("coco", root=tmp_path / "coco")
    tune_ids, eval_ids = coco.ids("val:tune"), coco.ids("val:eval")
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=1, crf=False,
                             candidates="oracle")  # the image's own classes: a prompt the tiny model fits
    config_file = tmp_path / "best.yaml"  # exported from a study that tuned on val:tune
    config_file.write_text(config.to_yaml(provenance={"study": "s", "dataset": "coco",
                                                      "tuning_split": "val:tune"}))
    base = ["eval", "--config", str(config_file), "--dataset", "coco", "--data-root", str(tmp_path / "coco"),
            "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]

    out = tmp_path / "default.json"
    assert main([*base, "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "val:eval" and result["images"] == len(eval_ids)
    assert result["tuning_images_evaluated"] == 0 and "evaluating val:eval" in capsys.readouterr().out

    out = tmp_path / "all.json"
    assert main([*base, "--split", "val", "-o", str(out)]) == 0  # asked for: said how many were tuned on
    result = json.loads(out.read_text())
    assert result["images"] == 10 and result["tuning_images_evaluated"] == len(tune_ids) > 0
    assert f"{len(tune_ids)} of the 10 evaluated images lie in val:tune" in capsys.readouterr().out

    # one corrupt image is skipped and counted, as README says, not an abort
    broken = tmp_path / "coco" / "images" / "val2017" / f"{eval_ids[0]}.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    out = tmp_path / "skipped.json"
    assert main([*base, "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == len(eval_ids) - 1 and [s["id"] for s in result["skipped"]] == [eval_ids[0]]
    assert "1 corrupt images skipped" in capsys.readouterr().out
    assert main([*base, "--strict", "-o", str(out)]) == 2

    # an output path that cannot be written fails before any image is evaluated
    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before the output path was checked")

    monkeypatch.setattr("tuner.evaluate.evaluate_config", must_not_run)
    (tmp_path / "taken").write_text("a file")
    capsys.readouterr()
    for target in (tmp_path / "taken" / "eval.json", tmp_path):
        assert main([*base, "-o", str(target)]) == 2
        assert "cannot write" in capsys.readouterr().err
