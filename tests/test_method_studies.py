"""The shipped studies/<method>_<benchmark>.yaml: each dense CLIP method on each benchmark, label-free."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from segmenter import SegmenterConfig
from segmenter.config import CLIP_METHODS
from tuner.datasets import dataset_class
from tuner.spec import builtin_spec_path, config_from_params, load_spec

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("voc", "voc20", "context", "context60", "coco", "coco_stuff", "cityscapes", "ade20k")
#: benchmarks with a background class, where `prob_thd` (the CLIP methods' background rule) matters
WITH_BACKGROUND = {"voc", "context60", "coco"}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_method_studies_are_what_their_generator_writes():
    assert _tool("write_method_studies").main(["--check"]) == 0


@pytest.mark.parametrize("dataset", BENCHMARKS)
@pytest.mark.parametrize("method", CLIP_METHODS)
def test_every_method_benchmark_study_parses_and_searches_valid_configs(method, dataset):
    spec = load_spec(builtin_spec_path(f"{method}_{dataset}"))  # _check_space: every value a valid config
    assert spec.dataset == dataset and spec.fixed.method == method
    assert spec.tuning_split == "auto" and spec.eval_split == "val" and spec.tuning_images == 64
    assert spec.objective == "clip_margin" and spec.trials == 34
    assert spec.objective_options["clip_model"] == "openai/clip-vit-large-patch14-336"
    assert spec.fixed.clip_model == "openai/clip-vit-base-patch16"
    assert spec.fixed.candidates == "all"
    space = {p.name: p for p in spec.search_space}
    assert {"logit_scale", "short_side", "slide_crop", "templates"} <= set(space)
    assert ("naclip_sigma" in space) == (method == "naclip")
    # prob_thd only where a background class is scored; elsewhere background pixels are misses
    assert ("prob_thd" in space) == (dataset in WITH_BACKGROUND)
    assert dataset_class(dataset).has_background == (dataset in WITH_BACKGROUND)
    if dataset not in WITH_BACKGROUND:
        assert spec.fixed.prob_thd == 0.0
    for param in spec.search_space:
        # the published (fixed) value is one the search can pick: the study can return it
        assert getattr(spec.fixed, param.name) in param.choices, param.name
        for value in param.choices:  # every window fits CLIP ViT-B/16's 16 px patches
            config_from_params(spec.fixed, {param.name: value}).clip_params().check_patch(16)


@pytest.mark.parametrize(("method", "dataset", "released"), [
    ("sclip", "voc", {"logit_scale": 65.0, "prob_thd": 0.1, "short_side": 336}),
    ("sclip", "context60", {"logit_scale": 50.0, "prob_thd": 0.1}),
    ("sclip", "coco_stuff", {"logit_scale": 40.0, "short_side": 448}),
    ("sclip", "cityscapes", {"short_side": 560, "slide_crop": 224, "slide_stride": 112}),
    ("clearclip", "voc", {"prob_thd": 0.5, "short_side": 448, "slide_crop": 448, "slide_stride": 224}),
    ("clearclip", "context60", {"prob_thd": 0.15}),
    ("clearclip", "coco", {"prob_thd": 0.4}),
    ("clearclip", "cityscapes", {"slide_crop": 224}),
    ("naclip", "coco", {"prob_thd": 0.1, "logit_scale": 40.0, "naclip_sigma": 5.0}),
    ("naclip", "coco_stuff", {"short_side": 448}),
    ("maskclip", "voc", {"logit_scale": 40.0, "short_side": 336, "prob_thd": 0.0}),
])
def test_the_released_per_dataset_values_are_the_fixed_settings(method, dataset, released):
    fixed = load_spec(builtin_spec_path(f"{method}_{dataset}")).fixed
    assert {k: getattr(fixed, k) for k in released} == released
    preset = SegmenterConfig.preset(method)  # blur and CRF start off: the method's own post-processing
    assert (fixed.blur_sigma, fixed.crf) == (preset.blur_sigma, preset.crf) == (0.0, False)


def test_tune_run_method_sclip_dataset_voc_runs_studies_sclip_voc(tmp_path, tiny_clip, capsys):
    """`tune run --method sclip --dataset voc` picks studies/sclip_voc.yaml (its space, its fixed values)."""
    import optuna

    from tuner.cli import main
    from tuner.datasets.shapes_writers import write_voc_layout

    write_voc_layout(tmp_path / "data" / "VOCdevkit" / "VOC2012", 2, seed=3)
    storage = f"sqlite:///{tmp_path}/tune.db"
    assert main(["run", "--method", "sclip", "--dataset", "voc", "--data-root", str(tmp_path / "data"),
                 "--model", tiny_clip, "--clip-model", tiny_clip, "--images", "2", "--trials", "2",
                 "--storage", storage, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "studies/sclip_voc.yaml's fixed settings" in " ".join(capsys.readouterr().out.split())
    study = optuna.load_study(study_name="voc-sclip-clip_margin", storage=storage)
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == 2
    shipped = load_spec(builtin_spec_path("sclip_voc"))
    assert set(trials[0].params) == {p.name for p in shipped.search_space}
    config = trials[0].user_attrs["config"]
    assert config["method"] == "sclip" and config["clip_model"] == tiny_clip
    assert config["slide_stride"] == 112 and all(0.0 <= t.user_attrs["miou"] <= 1.0 for t in trials)
