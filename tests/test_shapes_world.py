"""The shapes world's bundled models and the offline default `tune run` (no --dataset)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segmenter import build_prompt
from segmenter.backends._base import resolve_model_path
from segmenter.backends.blip import BlipBackend
from segmenter.clip import ClipScorer
from tuner.datasets.shapes import SHAPE_CLASSES, ShapesDataset, bundled_model_path
from tuner.spec import builtin_spec_path, load_spec

MODELS = Path(bundled_model_path("blip")).parent


def held_out(count: int):
    data = ShapesDataset(seed=0)
    return [data.load("test", sample_id) for sample_id in data.ids("test")[:count]]


def test_bundled_models_are_small_and_documented():
    size = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert size < 10 * 1024**2
    card = (MODELS / "MODEL_CARD.md").read_text()
    facts = ("python tools/train_shapes_models.py", "seed", "ITM accuracy", "zero-shot", "| layer | head |")
    for fact in facts:
        assert fact in card


def test_bundled_blip_tells_matching_from_hard_negative_captions():
    backend = BlipBackend(bundled_model_path("blip"), device="cpu")
    rng = np.random.default_rng(0)
    right = []
    for sample in held_out(40):
        present = list(sample.image_classes)
        absent = [c for c in SHAPE_CLASSES if c not in present]
        swapped = [*present[1:], str(rng.choice(absent))]
        texts = [build_prompt("a picture of ", names).text for names in (present, swapped)]
        scores = backend.itm_scores(backend.prepare_images([sample.image], 64), texts)[0]
        right += [bool(scores[0] > 0.5), bool(scores[1] < 0.5)]
    assert np.mean(right) >= 0.9


def test_bundled_clip_names_single_objects():
    clip = ClipScorer(bundled_model_path("clip"), device="cpu")
    singles = [s for s in held_out(200) if len(s.image_classes) == 1][:30]
    probs = clip.probabilities(clip.image_embeddings([s.image for s in singles]), list(SHAPE_CLASSES))
    predicted = [SHAPE_CLASSES[i] for i in probs.argmax(1).tolist()]
    assert np.mean([p == s.image_classes[0] for p, s in zip(predicted, singles)]) >= 0.9


def test_default_study_runs_the_unplanted_world_and_the_planted_one_is_named_apart():
    spec = load_spec(builtin_spec_path("shapes"))  # what `tune run` runs with no --dataset
    assert spec.dataset == "shapes" and spec.study_name == "shapes-clip_margin"
    assert spec.fixed.model == "pkg://tuner.datasets/shapes_models_unplanted/blip"
    assert spec.objective_options["clip_model"] == "pkg://tuner.datasets/shapes_models_unplanted/clip"
    planted = load_spec(builtin_spec_path("shapes_planted"))
    assert planted.fixed.model == "pkg://tuner.datasets/shapes_models/blip"
    assert planted.objective_options["clip_model"] == "pkg://tuner.datasets/shapes_models/clip"
    assert planted.study_name == "shapes_planted-clip_margin"  # beside the unplanted study in one storage
    assert planted.replace(objective="clip_reward", objective_options={}).study_name == \
        "shapes_planted-clip_reward"


def test_tune_run_without_dataset_runs_the_shapes_world_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", "--trials", "3", "--images", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "model: pkg://tuner.datasets/shapes_models_unplanted/blip" in out  # the best config, printed
    assert "best trial #" in out and "mIoU" in out
    assert "default config" in out
    assert (tmp_path / "runs" / "tune.db").is_file()  # the study, resumable


def test_the_planted_head_localises_and_the_others_do_not():
    """The search has something to find: GradCAM of the head planted in training
    (training_settings.json) covers the objects (the model card's rule: min-max normalise, keep
    >= 0.5, bilinear to 64 px), and it is the best head by a margin."""
    import json

    from segmenter.pipeline import threshold_maps, upsample

    settings = json.loads((MODELS / "blip" / "training_settings.json").read_text())["settings"]

    backend = BlipBackend(bundled_model_path("blip"), device="cpu")
    samples = held_out(60)
    layers = list(range(1, backend.num_layers))  # the last layer's maps are zero by construction
    prompts = [build_prompt("a picture of ", list(s.image_classes)) for s in samples]
    cams = backend.gradcam(backend.prepare_images([s.image for s in samples], 64), prompts, layers)
    iou = np.zeros((len(layers), backend.num_heads))
    pairs = 0
    for sample, prompt, cam in zip(samples, prompts, cams):  # cam [L, H, C, gh, gw]
        for c, name in enumerate(prompt.class_names):
            truth = sample.labels == SHAPE_CLASSES.index(name) + 1
            maps = cam[:, :, c].reshape(-1, *cam.shape[-2:]).numpy()
            pred = upsample(threshold_maps(maps, 0.5), truth.shape) >= 0.5  # [L*H, 64, 64]
            iou += ((pred & truth).sum((1, 2)) / np.maximum((pred | truth).sum((1, 2)), 1)).reshape(iou.shape)
            pairs += 1
    iou /= pairs
    planted = (settings["blip_cam_layer"] - 1, settings["blip_cam_head"])
    assert np.unravel_index(iou.argmax(), iou.shape) == planted
    assert iou[planted] >= 0.6
    assert np.sort(iou.ravel())[-2] <= iou[planted] - 0.15  # the runner-up is clearly worse


# --- the unplanted world: no head was trained with the masks ----------------------------------------
UNPLANTED = Path(bundled_model_path("blip", world="unplanted")).parent


def test_bundled_worlds_are_reachable_by_name_and_say_which_is_planted():
    assert Path(bundled_model_path("clip", world="planted")) == MODELS / "clip"
    assert Path(bundled_model_path("clip", world="unplanted")) == UNPLANTED / "clip"
    assert resolve_model_path("pkg://tuner.datasets/shapes_models_unplanted/blip") == str(UNPLANTED / "blip")
    with pytest.raises(ValueError, match="planted, unplanted"):
        bundled_model_path("blip", world="planted-ish")
    assert "**Planted world**" in (MODELS / "MODEL_CARD.md").read_text()
    assert "**Unplanted world**" in (UNPLANTED / "MODEL_CARD.md").read_text()


def test_unplanted_world_is_small_loads_and_no_head_was_planted():
    import json

    assert sum(f.stat().st_size for f in UNPLANTED.rglob("*") if f.is_file()) < 10 * 1024**2
    for kind in ("blip", "clip"):
        info = json.loads((UNPLANTED / kind / "training_settings.json").read_text())
        assert info["settings"]["blip_cam_layer"] == 0, f"{kind}: a head was planted"
        assert "--blip-cam-layer 0" in info["command"]
    planted = json.loads((MODELS / "blip" / "training_settings.json").read_text())["settings"]
    assert planted["blip_cam_layer"] > 0  # the planted world is the other one
    backend = BlipBackend(bundled_model_path("blip", world="unplanted"), device="cpu")
    sample = held_out(1)[0]
    absent = next(c for c in SHAPE_CLASSES if c not in sample.image_classes)
    texts = [build_prompt("a picture of ", names).text for names in (list(sample.image_classes), [absent])]
    scores = backend.itm_scores(backend.prepare_images([sample.image], 64), texts)[0]
    assert scores[0] > 0.5 > scores[1]
    clip = ClipScorer(bundled_model_path("clip", world="unplanted"), device="cpu")
    assert clip.image_embeddings([sample.image]).shape[0] == 1


@pytest.mark.slow
def test_unplanted_world_best_gradcam_head_localises_as_its_card_says():
    """The card's best (layer, head) and its IoU, recomputed by the card's own rule on the same
    held-out scenes; and it localises (well above the median head and the whole-image baseline)."""
    import re

    card_tool = load_card_tool()
    card = (UNPLANTED / "MODEL_CARD.md").read_text()
    said = re.search(r"best \(layer, head\) = \*\*\((\d+), (\d+)\)\*\* with IoU \*\*([0-9.]+)\*\*", card)
    layer, head, said_iou = int(said[1]), int(said[2]), float(said[3])

    scenes = card_tool.held_out(0, ["val", "test"])
    iou, _ = card_tool.localisation_iou(BlipBackend(str(UNPLANTED / "blip"), device="cpu"), scenes)
    ranked = iou[..., card_tool.THRESHOLDS.index(card_tool.THRESHOLD)][:-1]  # last layer: zero maps
    assert np.unravel_index(ranked.argmax(), ranked.shape) == (layer - 1, head)
    assert abs(ranked[layer - 1, head] - said_iou) < 0.01
    assert said_iou >= 0.35  # the shipped CPU-trained world: 0.392 (MODEL_CARD.md)
    assert said_iou >= np.median(ranked) + 0.15


def load_card_tool():
    import importlib.util

    tool = Path(__file__).parents[1] / "tools" / "shapes_model_card.py"
    spec = importlib.util.spec_from_file_location("shapes_model_card", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worlds_summary_lists_each_world_with_a_cpu_retrain_command(tmp_path):
    import shutil

    world = tmp_path / "p4-copy"
    shutil.copytree(UNPLANTED, world)
    text = load_card_tool().collect([world])
    assert "| `p4-copy` (bundled as `unplanted`) | no | cpu |" in text  # shipped?, planted?, device
    assert ("    python tools/train_shapes_models.py --blip-cam-layer 0 "
            "--out /work/worlds/p4-copy") in text  # the recorded command, --out to the world's folder
    assert "### GradCAM localisation IoU per (layer, head)" in text  # the card, one level down


def test_the_default_study_runs_offline_under_another_objective(tmp_path):
    """`--objective` drops the spec's CLIP options; the tie-break objective still has its own CLIP."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", "--objective", "itm_match", "--trials", "2",
         "--images", "4", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best trial #" in proc.stdout and "confidence check" in proc.stdout
