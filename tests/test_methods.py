"""The method seam: every CLIP method through `Segmenter`, `tune run`, export, eval and audit; the
config's `method`; the map cache keys of a CLIP method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from segmenter import Segmenter, SegmenterConfig
from segmenter.config import CLIP_METHODS
from segmenter.methods import ClipDense, Method, load_method
from tuner.cache import MapCache
from tuner.cli import main
from tuner.datasets import load_dataset
from tuner.trial import MapProvider, TuningImage

SHAPES_CLIP = "pkg://tuner.datasets/shapes_models_unplanted/clip"  # 64 px input, 8 px patches


def shapes_config(method: str, **changes) -> SegmenterConfig:
    """The method's preset on the shapes world's CLIP, one 64 px pass (8 x 8 patch grid)."""
    return SegmenterConfig.preset(method, clip_model=SHAPES_CLIP, short_side=64, slide_crop=0, **changes)


@pytest.fixture(scope="module")
def shapes():
    dataset = load_dataset("shapes")
    return dataset, [dataset.load("val", i) for i in dataset.ids("val")[:3]]


@pytest.fixture(scope="module")
def shared_clip():
    return ClipDense(SHAPES_CLIP, device="cpu").scorer


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_every_clip_method_segments_a_shapes_image_as_its_own_postprocessing(method, shapes, shared_clip):
    dataset, samples = shapes
    image, names = samples[0].image, list(dataset.vocabulary)
    config = shapes_config(method, prob_thd=0.2)
    seg = Segmenter(config, clip=shared_clip, method=load_method(config, clip=shared_clip))
    result = seg.segment(image, names)
    assert result.label_map.shape == image.shape[:2] and result.maps.shape == (len(names), 8, 8)
    # the preset's shared post-processing (no blur, no CRF) is the method's own: softmax, prob_thd
    own = seg.method.dense.label_map(image, names, config.clip_params())
    np.testing.assert_array_equal(result.label_map, own)
    assert 0 < (result.label_map > 0).mean()
    # a higher prob_thd turns more pixels into background, never fewer
    higher = Segmenter(config.replace(prob_thd=0.9), method=seg.method).segment(image, names)
    assert (higher.label_map == 0).sum() >= (result.label_map == 0).sum()


def test_published_windows_and_blur_crf_on_a_clip_method(shapes, shared_clip):
    dataset, samples = shapes
    config = SegmenterConfig.preset("sclip", clip_model=SHAPES_CLIP)  # published: 336 px, 224/112 windows
    method = load_method(config, clip=shared_clip)
    result = Segmenter(config, method=method).segment(samples[1].image, list(dataset.vocabulary))
    assert result.maps.shape == (8, 42, 42)  # 64 px scaled to 336 px, 8 px patches
    blurred = Segmenter(config.replace(blur_sigma=0.05, crf=True, crf_iterations=2, prob_thd=0.3),
                        method=method).segment(samples[1].image, list(dataset.vocabulary))
    assert blurred.label_map.shape == samples[1].image.shape[:2]
    assert set(np.unique(blurred.label_map)) <= set(range(len(dataset.vocabulary) + 1))


def test_candidate_rules_on_a_clip_method(shapes, shared_clip, tmp_path):
    dataset, samples = shapes
    config = shapes_config("naclip")
    method = load_method(config, clip=shared_clip)
    names, image = list(dataset.vocabulary), samples[0].image
    present = [n for n in samples[0].image_classes if n in names]
    oracle = Segmenter(config.replace(candidates="oracle"), method=method).segment(image, names, present)
    assert set(oracle.candidates) == set(present)
    assert set(np.unique(oracle.label_map)) <= {0, *(names.index(n) + 1 for n in present)}
    topk = Segmenter(config.replace(candidates="clip_topk", candidates_topk=2, candidates_model=SHAPES_CLIP),
                     method=method)
    assert topk.clip is shared_clip  # the method's own CLIP serves the candidate rule
    assert len(topk.segment(image, names).candidates) == 2
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps({"a": ["circle"], "b": []}))
    seg = Segmenter(config.replace(candidates="file", candidates_file=str(lists)), method=method)
    assert seg.segment(image, names, image_id="a").candidates == ("circle",)
    empty = seg.segment(image, names, image_id="b")
    assert not empty.label_map.any() and empty.maps.shape == (len(names), 8, 8)
    with pytest.raises(ValueError, match="itm_threshold needs an ITM head.*use all, clip_topk"):
        Segmenter(config.replace(candidates="itm_threshold"), method=method)


def test_old_config_without_method_loads_as_pnp_ovss_on_blip(tmp_path, tiny_blip):
    path = tmp_path / "old.yaml"
    path.write_text(f"model: {tiny_blip}\nimage_size: 32\nlayer: 2\nheads: [1]\n")
    config = SegmenterConfig.from_yaml(path)
    assert config.method == "pnp_ovss" and config.backend == "blip"
    seg = Segmenter(config)
    assert seg.method.name == "pnp_ovss" and seg.backend is seg.method.backend
    assert SegmenterConfig.from_yaml(config.to_yaml()) == config
    clip = SegmenterConfig.preset("clearclip")
    assert SegmenterConfig.from_yaml(clip.to_yaml()) == clip and clip.method == "clearclip"
    published = (clip.logit_scale, clip.slide_crop, clip.short_side, clip.blur_sigma, clip.crf)
    assert published == (50.0, 448, 448, 0.0, False)


def test_a_bad_method_or_clip_field_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^SegmenterConfig.method='clipseg': is unknown: use one of") as err:
        SegmenterConfig(method="clipseg")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^SegmenterConfig.backend='BridgeTower': is unknown: use one"):
        SegmenterConfig(backend="BridgeTower")  # refused where it is read, not when the model loads
    with pytest.raises(ValueError, match="prob_thd 1.5 must be a probability"):
        SegmenterConfig(method="sclip", prob_thd=1.5)
    with pytest.raises(ValueError, match="slide_stride 300 is larger than slide_crop 224"):
        SegmenterConfig.preset("naclip", slide_stride=300)
    with pytest.raises(ValueError, match="unknown preset 'nope'.*naclip"):
        SegmenterConfig.preset("nope")
    assert main(["run", "--method", "clipseg", "--storage", f"sqlite:///{tmp_path}/t.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown method 'clipseg'" in err and len(err.splitlines()) == 1


def test_map_cache_keys_on_map_shaping_fields_not_on_prob_thd(shapes, shared_clip, tmp_path):
    dataset, samples = shapes
    images = [TuningImage(s, str(i)) for i, s in enumerate(samples[:2])]
    cands = [list(dataset.vocabulary)[:3]] * 2

    def runs(config: SegmenterConfig) -> int:
        provider = MapProvider(load_method(config, clip=shared_clip), MapCache(tmp_path / "cache"))
        maps = provider.maps(config, images, cands)
        side = config.short_side // 8
        assert [m.shape for m in maps] == [(3, side, side)] * 2
        return provider.model_runs

    base = shapes_config("sclip")
    assert runs(base) == 1
    for same in (dict(prob_thd=0.4), dict(logit_scale=90.0), dict(blur_sigma=0.1), dict(naclip_sigma=2.0)):
        assert runs(base.replace(**same)) == 0, same  # cache hits: these act after the maps
    for other in (dict(templates="single"), dict(short_side=128), dict(method="naclip")):
        assert runs(base.replace(**other)) == 1, other
    naclip = shapes_config("naclip")
    assert runs(naclip.replace(naclip_sigma=2.0)) == 1  # sigma shapes NACLIP's maps only
    with pytest.raises(ValueError, match="runs method sclip, not naclip"):
        MapProvider(load_method(base, clip=shared_clip), MapCache(None)).maps(naclip, images, cands)


def clip_spec(tmp_path: Path, method: str, **extra) -> Path:
    spec = {
        "dataset": "shapes",
        "tuning": {"split": "train", "images": 2, "seed": 0},
        "objective": "clip_margin",
        "objective_options": {"clip_model": SHAPES_CLIP},
        "fixed": {"clip_model": SHAPES_CLIP, "short_side": 64, "slide_crop": 0, "templates": "single"},
        "search_space": {
            "logit_scale": {"type": "categorical", "choices": [20.0, 60.0]},
            "prob_thd": {"type": "categorical", "choices": [0.0, 0.3]},
        },
        "pruner": {"type": "none"},
        "trials": 2,
        **extra,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_tune_run_on_every_clip_method(method, tmp_path):
    storage = f"sqlite:///{tmp_path}/tune.db"
    spec = clip_spec(tmp_path, method)
    assert main(["run", "--method", method, "--study-file", str(spec), "--storage", storage,
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]) == 0
    import optuna

    study = optuna.load_study(study_name=f"shapes-{method}-clip_margin", storage=storage)
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == 2 and all(t.user_attrs["config"]["method"] == method for t in trials)
    assert all(0.0 <= t.user_attrs["miou"] <= 1.0 for t in trials)
    assert study.user_attrs["models"]["method"] == method
    assert study.user_attrs["models"]["clip_model"] == SHAPES_CLIP


def test_a_clip_method_study_exports_reevaluates_and_audits(tmp_path, capsys):
    storage, cache = f"sqlite:///{tmp_path}/tune.db", str(tmp_path / "cache")
    space = {"logit_scale": {"type": "categorical", "choices": [20.0, 60.0]},
             "prob_thd": {"type": "categorical", "choices": [0.1, 0.4]},
             "templates": {"type": "categorical", "choices": ["single", "imagenet"]},
             "crf": {"type": "categorical", "choices": [False, True]}}
    spec = clip_spec(tmp_path, "naclip", search_space=space, trials=3, preset="naclip")
    assert main(["run", "--study-file", str(spec), "--storage", storage, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress"]) == 0
    best = tmp_path / "best.yaml"
    assert main(["export", "--study", "shapes-naclip-clip_margin", "--storage", storage, "-o", str(best),
                 "--force"]) == 0
    config = SegmenterConfig.from_yaml(best)
    assert config.method == "naclip" and config.clip_model == SHAPES_CLIP
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(best), "--dataset", "shapes", "--images", "4", "--cache-dir", cache,
                 "--device", "cpu", "--no-progress", "-o", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["miou"] <= 1.0
    assert main(["audit", "--study", "shapes-naclip-clip_margin", "--storage", storage, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress", "-o", str(tmp_path / "audit")]) == 0
    assert (tmp_path / "audit" / "audit.json").is_file()


def test_a_search_over_a_setting_the_method_never_reads_is_refused(tmp_path, capsys):
    from tuner.spec import SpecError, parse_spec

    def spec(preset, space):
        fixed = {"preset": preset, "clip_model": SHAPES_CLIP, "candidates": "all"}
        return {"dataset": "shapes", "objective": "clip_margin", "fixed": fixed, "search_space": space}

    int_range = {"type": "int", "low": 1, "high": 3}
    for preset, name in (("sclip", "layer"), ("naclip", "head"), ("maskclip", "threshold"),
                         ("clearclip", "naclip_sigma"), ("default", "logit_scale")):
        raw = int_range if name in ("layer", "head") else {"type": "categorical", "choices": [1.0, 5.0]}
        with pytest.raises(SpecError, match=rf"search_space.{name}: method \w+ never reads {name}"):
            parse_spec(spec(preset, {name: raw, "crf": {"type": "categorical", "choices": [False, True]}}))
    # what each method reads stays searchable: naclip's sigma, a CLIP method's logit_scale
    assert parse_spec(spec("naclip", {"naclip_sigma": {"type": "categorical", "choices": [3.0, 5.0]},
                                      "logit_scale": {"type": "categorical", "choices": [10.0, 40.0]}}))
    # through tune run --method on a spec written for pnp_ovss: refused before any trial, one line
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(spec("default", {"layer": int_range})))
    assert main(["run", "--method", "sclip", "--study-file", str(plain), "--storage",
                 f"sqlite:///{tmp_path}/t.db", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "method sclip never reads layer" in err and len(err.splitlines()) == 1


def test_method_pnp_ovss_takes_a_preset_and_refuses_a_clip_spec_or_a_backend_name(tmp_path, capsys):
    from argparse import Namespace

    from tuner.cli import _method_spec

    def args(method, preset=None, study_file=None):
        return Namespace(method=method, preset=preset, dataset=None, study_file=study_file)

    # pnp_ovss has no preset of its own: --preset official applies to the spec it runs
    spec = _method_spec(args("pnp_ovss", preset="official"))
    assert spec.fixed.method == "pnp_ovss" and spec.fixed.itm_token == "enc"
    assert _method_spec(args("pnp_ovss")).fixed.itm_token == "cls"
    with pytest.raises(ValueError, match="--method sclip starts from its own preset"):
        _method_spec(args("sclip", preset="official"))
    # a CLIP method's spec run as pnp_ovss would search logit_scale, which pnp_ovss never reads
    storage = ["--storage", f"sqlite:///{tmp_path}/t.db", "--device", "cpu", "--no-progress"]
    from tuner.spec import builtin_spec_path

    clip_spec_file = str(builtin_spec_path("sclip_shapes"))
    assert main(["run", "--method", "pnp_ovss", "--study-file", clip_spec_file, *storage]) == 2
    assert "method pnp_ovss never reads logit_scale" in capsys.readouterr().err
    # a backend given as a method says where a backend goes
    assert main(["run", "--method", "bridgetower", *storage]) == 2
    err = capsys.readouterr().err.strip()
    assert "bridgetower is a backend of pnp_ovss" in err and len(err.splitlines()) == 1


def test_an_objective_on_the_segmenters_itm_model_is_refused_for_a_clip_method(tmp_path, capsys):
    spec = clip_spec(tmp_path, "sclip", preset="sclip", objective="itm_match", objective_options=None)
    assert main(["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp_path}/t.db",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "objective itm_match reads the segmenter's ITM model, which method sclip has not" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_the_shipped_clip_method_study_fits_the_shapes_clip(method, shared_clip):
    from tuner.spec import builtin_spec_path, config_from_params, load_spec

    spec = load_spec(builtin_spec_path(f"{method}_shapes"))
    assert spec.fixed.method == method and spec.fixed.clip_model == SHAPES_CLIP
    assert spec.fixed.candidates != "itm_threshold" and spec.search_space
    loaded = load_method(spec.fixed, clip=shared_clip)
    for param in spec.search_space:  # every value the sampler can pick runs on this CLIP
        for value in param.choices:
            loaded.check(config_from_params(spec.fixed, {param.name: value}))


def test_tune_segment_with_a_clip_method_preset(shapes, tmp_path):
    from PIL import Image

    dataset, samples = shapes
    path = tmp_path / "scene.png"
    Image.fromarray(samples[0].image).save(path)
    out = tmp_path / "out"
    names = ",".join(dataset.vocabulary)
    assert main(["segment", "--preset", "sclip", "--model", SHAPES_CLIP, "--classes", names,
                 "--out", str(out), "--device", "cpu", "--no-progress", str(path)]) == 0
    labels = np.asarray(Image.open(out / "scene.png_labels.png"))
    assert labels.shape[:2] == samples[0].image.shape[:2] and labels.max() <= len(dataset.vocabulary)


def test_tune_run_pnp_ovss_on_bridgetower_through_the_method_seam(tmp_path, tiny_clip):
    """pnp_ovss on the BridgeTower backend: `tune run --method pnp_ovss` with a spec naming the backend."""
    import optuna
    from test_bridgetower import save_tiny_bridgetower

    model = save_tiny_bridgetower(tmp_path / "bt")
    spec = {
        "dataset": "shapes", "dataset_options": {"size": 40},
        "tuning": {"split": "train", "images": 2, "seed": 0},
        "objective": "clip_margin", "objective_options": {"clip_model": tiny_clip},
        "fixed": {"backend": "bridgetower", "model": model, "image_size": 40, "layer": 2, "heads": [0],
                  "dropout_rounds": 1, "crf": False, "dtype": "float32"},
        "search_space": {"head": {"type": "int", "low": 0, "high": 1}},
        "pruner": {"type": "none"}, "trials": 2,
    }
    path = tmp_path / "bt.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = f"sqlite:///{tmp_path}/tune.db"
    assert main(["run", "--method", "pnp_ovss", "--study-file", str(path), "--storage", storage,
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]) == 0
    study = optuna.load_study(study_name="shapes-bridgetower-clip_margin", storage=storage)
    assert study.user_attrs["models"]["backend"] == "bridgetower"
    assert len([t for t in study.trials if t.state.is_finished()]) == 2


class TopHalfMethod(Method):
    """A method written as README's "How to add a method" says: the first class's map is the
    image's top half, every other class's is zero."""

    def __init__(self, config, device=None, dtype=None):
        import torch

        self.name, self.device, self.dtype = config.method, torch.device("cpu"), torch.float32
        self.model_id, self.revision, self.backend = "top-half", None, None

    def check(self, config):
        pass

    def grid(self, height, width, config):
        return height // 8, width // 8

    def relevance_maps(self, images, class_lists, config):
        maps = []
        for image, names in zip(images, class_lists):
            gh, gw = self.grid(*image.shape[:2], config)
            cams = np.zeros((len(names), gh, gw), np.float32)
            cams[0, : gh // 2] = 1.0
            maps.append(cams)
        return maps

    def map_key(self, config):
        return {"method": self.name}


def test_a_method_added_as_the_readme_says_segments_and_runs_a_study(tmp_path, monkeypatch):
    from segmenter import methods

    monkeypatch.setitem(methods.METHODS, "top_half", "test_methods:TopHalfMethod")
    monkeypatch.setitem(methods.MAPS_KIND, "top_half", "relevance")
    config = SegmenterConfig(method="top_half", blur_sigma=0.0, crf=False)  # background: always
    labels = Segmenter(config).segment(np.zeros((64, 64, 3), np.uint8), ["circle", "square"]).label_map
    assert (labels[:28] == 1).all() and (labels[36:] == 0).all()  # bilinear upsampling between
    spec = {"dataset": "shapes", "tuning": {"split": "train", "images": 2, "seed": 0},
            "objective": "clip_margin", "objective_options": {"clip_model": SHAPES_CLIP},
            "fixed": {"method": "top_half", "candidates": "all"}, "pruner": {"type": "none"},
            "search_space": {"blur_sigma": {"type": "categorical", "choices": [0.0, 0.05]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", "--study-file", str(tmp_path / "s.yaml"), "--trials", "2", "--storage",
                 f"sqlite:///{tmp_path}/t.db", "--device", "cpu", "--no-progress"]) == 0
