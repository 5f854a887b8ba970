"""The shapes world's BridgeTower: the training tool's `--only bridgetower`, the bundled model, its study."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from segmenter import build_prompt
from segmenter.backends._base import resolve_model_path
from segmenter.backends.bridgetower import BridgeTowerBackend
from tuner.datasets.shapes import SHAPE_CLASSES, ShapesDataset
from tuner.spec import builtin_spec_path, load_spec

REPO = Path(__file__).parents[1]
SPEC = REPO / "studies" / "bridgetower_shapes.yaml"


def load_train_tool():
    tool = REPO / "tools" / "train_shapes_models.py"
    spec = importlib.util.spec_from_file_location("train_shapes_models", tool)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_bridgetower_training_tool_saves_a_model_the_backend_loads(tmp_path):
    """Two steps of the recipe on 8 scenes: what it saves is a BridgeTower ITM checkpoint with a fast
    tokenizer that spells every shape name as one piece, and the settings that made it."""
    tool = load_train_tool()
    settings = tool.TrainSettings(scenes=8, bt_steps=2, bt_batch=4)
    images, masks = tool.training_scenes(settings.seed, settings.scenes)
    logged = []
    model, processor, seconds = tool.train_bridgetower(settings, images, masks, logged.append)
    tool.save(model, processor, tmp_path / "bridgetower", settings, seconds)
    assert "step 2/2" in logged[-1]

    backend = BridgeTowerBackend(str(tmp_path / "bridgetower"), device="cpu", dtype="float32")
    assert (backend.num_layers, backend.num_heads) == (settings.bt_layers, settings.bt_heads)
    assert backend.patch_grid(64) == (64 // settings.bt_patch,) * 2
    text = build_prompt(tool.PREFIX, list(SHAPE_CLASSES)).text
    assert backend.tokenizer.tokenize(text) == ["a", "Ġpicture", "Ġof", *(f"Ġ{n}" for n in SHAPE_CLASSES)]
    scores = backend.itm_scores(backend.prepare_images(list(images[:2]), 64), [text, "a picture of zebra"])
    assert scores.shape == (2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    info = json.loads((tmp_path / "bridgetower" / "training_settings.json").read_text())
    assert info["settings"]["bt_steps"] == 2 and info["device"] == "cpu"


def test_bundled_bridgetower_tells_matching_from_hard_negative_captions():
    path = resolve_model_path("pkg://tuner.datasets/shapes_models_unplanted/bridgetower")
    backend = BridgeTowerBackend(path, device="cpu", dtype="float32")
    data, rng, right = ShapesDataset(seed=0), np.random.default_rng(0), []
    for sample_id in data.ids("test")[:40]:
        sample = data.load("test", sample_id)
        present = list(sample.image_classes)
        absent = [c for c in SHAPE_CLASSES if c not in present]
        swapped = [*present[1:], str(rng.choice(absent))]
        texts = [build_prompt("a picture of ", names).text for names in (present, swapped)]
        scores = backend.itm_scores(backend.prepare_images([sample.image], 64), texts)[0]
        right += [bool(scores[0] > 0.5), bool(scores[1] < 0.5)]
    assert np.mean(right) >= 0.85


def test_bridgetower_shapes_study_is_named_apart_from_the_blip_one():
    """A study of pnp_ovss on BridgeTower must not resume the BLIP study of the same dataset."""
    spec = load_spec(SPEC)
    assert spec.fixed.backend == "bridgetower"
    assert spec.study_name == "shapes-bridgetower-clip_margin"
    assert load_spec(builtin_spec_path("shapes")).study_name == "shapes-clip_margin"
    assert Path(resolve_model_path(spec.fixed.model), "config.json").is_file()



def test_bridgetower_shapes_study_runs_exports_and_reevaluates(tmp_path):
    """The shipped study on the bundled BridgeTower, cut to 3 trials on 4 images: each trial's config
    is BridgeTower's, and the export re-evaluates on val."""
    import optuna
    import yaml

    from tuner.cli import main

    storage, cache = f"sqlite:///{tmp_path}/tune.db", str(tmp_path / "cache")
    assert main(["run", "--study-file", str(SPEC), "--storage", storage, "--cache-dir", cache,
                 "--trials", "3", "--images", "4", "--device", "cpu", "--no-progress"]) == 0
    study = optuna.load_study(study_name="shapes-bridgetower-clip_margin", storage=storage)
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) >= 3 and all(t.user_attrs["config"]["backend"] == "bridgetower" for t in trials)
    best = tmp_path / "best.yaml"
    assert main(["export", "--study", "shapes-bridgetower-clip_margin", "--storage", storage, "--cache-dir",
                 cache, "--force", "-o", str(best)]) == 0
    assert yaml.safe_load(best.read_text())["backend"] == "bridgetower"
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(best), "--dataset", "shapes", "--images", "8", "--cache-dir", cache,
                 "--no-progress", "-o", str(out)]) == 0
    assert 0.0 < json.loads(out.read_text())["miou"] <= 1.0
