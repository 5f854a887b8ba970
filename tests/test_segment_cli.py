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
        stem = out / name.rsplit(".", 1)[0]
        labels = Image.open(f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (w, h)
        assert set(np.unique(np.asarray(labels))) <= {0, 1, 2, 3}
        assert Image.open(f"{stem}_overlay.png").height >= h
        maps = np.load(f"{stem}_maps.npz")
        assert maps["maps"].shape == (3, 4, 4) and list(maps["class_names"]) == ["cat", "dog", "person"]
    # the same config through the Python API gives the same label map
    seg = Segmenter.from_config(config_file, device="cpu")
    direct = seg.segment(np.asarray(Image.open(images / "a.png").convert("RGB")), ["cat", "dog", "person"])
    np.testing.assert_array_equal(direct.label_map, np.asarray(Image.open(out / "a_labels.png")))


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
