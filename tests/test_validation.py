"""Issue 15 points 13, 14, 15, 17, 19: bad input is a one-line error, nonsense is refused,
costly settings are bounded, a swapped cache entry is caught, YAML input is bounded."""

from __future__ import annotations

import errno
import logging
import shutil
import time

import numpy as np
import pytest
from conftest import save_tiny_blip, write_spec

from segmenter import SegmenterConfig
from segmenter.yaml_input import MAX_YAML_BYTES, YamlInputError, load_yaml
from tuner.cache import MapCache, cache_key
from tuner.cli import main
from tuner.spec import SpecError, load_spec


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """About 500 bytes of YAML that stand for width**levels values."""
    lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nheads: *a{levels - 1}\n"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# --- 15.19: YAML input is bounded ------------------------------------------------------------------
def test_alias_bomb_is_refused_fast_wherever_yaml_is_read(tmp_path, capsys):
    bomb = alias_bomb()
    assert len(bomb) < 1000
    started = time.perf_counter()
    with pytest.raises(YamlInputError, match=r"bomb.yaml: its aliases \(\*name\) expand to \d{9,} values"):
        load_yaml(bomb, "bomb.yaml")
    config_file, spec_file = tmp_path / "bomb.yaml", tmp_path / "spec.yaml"
    config_file.write_text(bomb)
    spec_file.write_text("dataset: shapes\n" + bomb.replace("heads:", "fixed:"))
    with pytest.raises(ValueError, match="aliases"):
        SegmenterConfig.from_yaml(config_file)
    with pytest.raises(ValueError, match="aliases"):
        SegmenterConfig.from_yaml(bomb)
    with pytest.raises(SpecError, match=f"{spec_file}: its aliases"):
        load_spec(spec_file)
    assert main(["eval", "--config", str(config_file), "--dataset", "shapes"]) == 2
    assert "aliases" in one_line_error(capsys)
    assert main(["run", "--study-file", str(spec_file)]) == 2
    assert "aliases" in one_line_error(capsys)
    assert time.perf_counter() - started < 10  # nothing expanded the document


def test_yaml_size_recursion_and_ordinary_aliases(tmp_path):
    with pytest.raises(YamlInputError, match="recursive YAML alias"):
        load_yaml("a: &a [1, *a]\n", "r.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_YAML_BYTES + "\nlayer: 3\n")
    with pytest.raises(ValueError, match=f"more than {MAX_YAML_BYTES} bytes"):
        SegmenterConfig.from_yaml(big)
    with pytest.raises(YamlInputError, match=r"line 1 column 6"):
        load_yaml("a: [1", "x.yaml")
    # a modest alias is fine, and shared values are built once
    assert load_yaml("base: &b {layer: 3}\nother: *b\n") == {"base": {"layer": 3}, "other": {"layer": 3}}


def test_error_messages_never_print_a_huge_value():
    heads = tuple(range(50_000)) + (0,)  # a head listed twice, in a very long list
    with pytest.raises(ValueError) as err:
        SegmenterConfig(heads=heads)
    assert "lists a head twice" in str(err.value) and len(str(err.value)) < 200


# --- 15.17: the cache verifies the key ------------------------------------------------------------
def test_cache_entry_swapped_for_another_valid_entry_is_detected(tmp_path, caplog):
    cache = MapCache(tmp_path)
    key_a, key_b = cache_key(image="a", layer=1), cache_key(image="b", layer=1)
    maps_a = np.full((2, 3, 4, 4), 1.75, dtype=np.float32)
    maps_b = np.full((2, 3, 4, 4), 1.5, dtype=np.float32)
    cache.put(key_a, maps_a)
    cache.put(key_b, maps_b)
    path_a, path_b = cache._path(key_a), cache._path(key_b)
    shutil.copyfile(path_a, path_b)  # b's file now holds a's valid entry
    with caplog.at_level("WARNING"):
        assert cache.get(key_b) is None  # not a's maps under b's key
    assert cache.corrupt == 1 and "another key" in caplog.text and not path_b.exists()
    np.testing.assert_array_equal(cache.get(key_a), maps_a)
    # the same array reshaped is another entry too: shape is part of the checksum
    cache.put(key_b, maps_b)
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path_b), framework="numpy") as f:
        meta = f.metadata()
    save_file({"maps": load_file(str(path_b))["maps"].reshape(3, 2, 4, 4)}, str(path_b), metadata=meta)
    assert cache.get(key_b) is None and cache.corrupt == 2


def test_cache_directory_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "cache"
    a_file.write_text("not a directory")
    with pytest.raises(OSError, match="is a file, not a directory: pass --cache-dir"):
        MapCache(a_file)
    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset: shapes\nsearch_space: {layer: {type: int, low: 1, high: 3}}\n")
    assert main(["run", "--study-file", str(spec), "--cache-dir", str(a_file),
                 "--storage", f"sqlite:///{tmp_path}/t.db"]) == 2
    assert "--no-cache" in one_line_error(capsys)


def test_read_only_cache_directory_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        writable = True
        try:
            (locked / "probe").write_text("x")
        except OSError:
            writable = False
        if writable:
            pytest.skip("running as a user who can write a read-only directory (root)")
        with pytest.raises(OSError, match="cannot be written"):
            MapCache(locked)
    finally:
        locked.chmod(0o700)


def test_full_disk_under_the_cache_is_reported_once_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    import safetensors.numpy

    cache = MapCache(tmp_path)
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    maps = np.zeros((1, 2, 3, 3), dtype=np.float32)
    with caplog.at_level("WARNING"):
        for i in range(3):
            cache.put(cache_key(i=i), maps)  # no exception: the maps are still returned to the trial
    assert cache.write_error == "No space left on device" and len(calls) == 1
    assert caplog.text.count("cannot store entries") == 1
    assert not list(tmp_path.rglob(".tmp-*"))


def test_full_disk_and_unexpected_errors_end_in_one_line(monkeypatch, capsys):
    import tuner.cli as cli

    def full(args, console):
        raise OSError(errno.ENOSPC, "No space left on device")

    def bug(args, console):
        raise TypeError("unsupported operand\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "objectives", full)
    assert main(["objectives"]) == 2
    assert "no space left on the device" in one_line_error(capsys)
    monkeypatch.setitem(cli.COMMANDS, "objectives", bug)
    assert main(["objectives"]) == 1
    assert "TypeError: unsupported operand (unexpected; set OVSS_DEBUG=1" in one_line_error(capsys)
    monkeypatch.setenv("OVSS_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["objectives"])


# --- 15.13 / 15.14: study specs ---------------------------------------------------------------------
SPACE = "search_space: {layer: {type: int, low: 1, high: 3}}\n"


@pytest.mark.parametrize("bad,key,says", [
    (SPACE + "sampler: {type: tpe, n_startup: 3}", "sampler.n_startup", "unknown option"),
    (SPACE + "sampler: {type: tpe, n_startup_trials: ten}", "sampler.n_startup_trials", "not of type int"),
    (SPACE + "pruner: {type: median, patience: 2}", "pruner.patience", "unknown option"),
    (SPACE + "pruner: {type: none, p_threshold: 0.1}", "pruner.p_threshold", "unknown option"),
    (SPACE + "dataset_options: {sise: 32}", "dataset_options.sise", "unknown option of 'shapes'"),
    (SPACE + "objective_options: {clip_modle: x}", "objective_options.clip_modle", "unknown option"),
    (SPACE + "objective_options: {device: cuda}", "objective_options.device", "set by the tuner"),
    (SPACE + "objective: miou_supervised\nobjective_options: {clip_model: x}", "objective_options.clip_model",
     "unknown option"),
    (SPACE + "objective: clip_rewrad", "objective", "unknown objective"),
    ("search_space: {threshold: {type: float, low: 0.1, high: 0.5, condition: {lyer: 2}}}",
     "search_space.threshold.condition.lyer", "names no setting"),
    ("search_space: {threshold: {type: float, low: 0.1, high: 0.5, condition: {layer: 2}},"
     " layer: {type: int, low: 1, high: 3}}", "search_space.threshold.condition.layer", "earlier"),
    ("search_space: {layer: {type: int, low: 1, high: 3}, threshold: {type: float, low: 0.1, high: 0.5,"
     " condition: {layer: 7}}}", "search_space.threshold.condition.layer", "never be sampled"),
    ("search_space: {dropout_k: {type: int, low: 1, high: 5, condition: {dropout_schedule: halving}}}",
     "search_space.dropout_k.condition.dropout_schedule", "fixed at 'topk'"),
    ("search_space: {layer: {type: float, low: 1, high: 3}}", "search_space.layer.type", "integer setting"),
    ("search_space: {layer: {type: int, low: 1.5, high: 3}}", "search_space.layer.low", "not an integer"),
    ("search_space: {threshold: {type: float, low: 0, high: 0.5, log: true}}", "search_space.threshold.log",
     "low > 0"),
    ("search_space: {threshold: {type: float, low: 0.1, high: 0.5, step: 0}}", "search_space.threshold.step",
     "positive"),
    ("search_space: {layer: {type: int, low: 1, high: 3, step: 0}}", "search_space.layer.step", "positive"),
    ("search_space: {threshold: {type: float, low: 0.1, high: 0.5, step: 0.15}}",
     "search_space.threshold.step", "not a multiple of step"),
    ("search_space: {threshold: {type: float, low: 0.1, high: 0.5, log: maybe}}",
     "search_space.threshold.log", "true or false"),
    ("search_space: {blur_sigma: {type: float, low: 0.0, high: 5.0}}", "search_space.blur_sigma",
     "[0, 0.25]"),
    (SPACE + "trials: true", "trials", "true/false are not numbers"),
    (SPACE + "tuning: {images: true}", "tuning.images", "true/false are not numbers"),
    (SPACE + "tuning: {images: 0}", "tuning.images", "at least 1"),
    (SPACE + "tuning: {seed: -1}", "tuning.seed", "at least 0"),
    ("search_space: {}", "search_space", "is empty"),
    ("trials: 5", "search_space", "is empty"),
    ("search_space: {threshold: {type: float, low: 0.2, high: 0.2},"
     " heads: {type: categorical, choices: [[1]]}}", "search_space", "more than one value"),
    (SPACE + "fixed: {crf_iterations: 1000}", "fixed", "crf_iterations"),
])
def test_spec_nonsense_is_a_one_line_error_naming_the_key(tmp_path, capsys, bad, key, says):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: shapes\n" + bad + "\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert f"{path}: {key}:" in message and says in message and "\n" not in message, message
    assert main(["run", "--study-file", str(path), "--storage", f"sqlite:///{tmp_path}/t.db"]) == 2
    assert key in one_line_error(capsys)


def test_int_step_is_honoured_and_tuning_runs_capped(tmp_path):
    import optuna

    path = tmp_path / "s.yaml"
    path.write_text("dataset: shapes\nsearch_space: {dropout_k: {type: int, low: 2, high: 10, step: 4}}\n")
    spec = load_spec(path)
    study = optuna.create_study(sampler=spec.make_sampler(0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        seen.add(spec.suggest(trial).dropout_k)
        study.tell(trial, 0.0)
    assert seen == {2, 6, 10}
    assert spec.fixed.postprocess_max_side == 1024  # the tuning default ...
    path.write_text("dataset: shapes\nfixed: {postprocess_max_side: null}\n"
                    "search_space: {layer: {type: int, low: 1, high: 2}}\n")
    assert load_spec(path).fixed.postprocess_max_side is None  # ... unless the spec says otherwise


def test_cli_numbers_zero_is_refused_not_reinterpreted(tmp_path, capsys):
    for argv in (["run", "--images", "0"], ["run", "--trials", "0"], ["eval", "--config", "c.yaml",
                 "--dataset", "shapes", "--images", "0"], ["run", "--seed", "-1"], ["show", "--study", "s",
                 "--top", "0"], ["audit", "--study", "s", "--images", "0"], ["run", "--heartbeat", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "is not an integer >=" in err and "Traceback" not in err, argv
    assert main(["run", "--workers", str(10_000)]) == 2
    assert "more than the" in one_line_error(capsys)


def test_objective_override_drops_options_the_new_objective_lacks(tmp_path, tiny_blip, tiny_clip, capsys):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, trials=1, images=2)
    code = main(["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp_path}/tune.db",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress",
                 "--objective", "miou_supervised"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "objective miou_supervised takes no clip_model" in out.out


# --- 15.14: empty configs and incomplete checkpoints ---------------------------------------------
def test_empty_config_file_is_refused_not_a_download(tmp_path, capsys):
    for text in ("", "# nothing\n", "provenance: {study: s}\n", "{}\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match="holds no settings"):
            SegmenterConfig.from_yaml(path)
    assert main(["segment", "--config", str(path), "--classes", "cat", "--out", str(tmp_path / "o"),
                 str(tmp_path)]) == 2
    assert "holds no settings" in one_line_error(capsys)
    assert SegmenterConfig.from_yaml("layer: 3\n").model == SegmenterConfig().model  # one setting is enough


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_clip):
    """A tiny BLIP, the same without its ITM head, and a CLIP."""
    import safetensors.torch

    root = tmp_path_factory.mktemp("ckpt")
    blip = save_tiny_blip(root / "blip")
    headless = root / "headless"
    shutil.copytree(blip, headless)
    weights = safetensors.torch.load_file(str(headless / "model.safetensors"))
    safetensors.torch.save_file({k: v for k, v in weights.items() if not k.startswith("itm_head.")},
                                str(headless / "model.safetensors"), metadata={"format": "pt"})
    return {"blip": blip, "headless": str(headless), "clip": tiny_clip}


def test_wrong_or_incomplete_checkpoints_are_refused(checkpoints, tmp_path, capsys):
    from segmenter import Segmenter
    from segmenter.clip import ClipScorer

    with pytest.raises(OSError, match=r"lacks 2 weights the BLIP ITM model needs \(itm_head\.bias"):
        Segmenter(SegmenterConfig(model=checkpoints["headless"], image_size=32, layer=1, heads=(0,)))
    with pytest.raises(OSError, match=r"CLIP model \(set it as `clip_model` of a CLIP method.* not the BLIP"):
        Segmenter(SegmenterConfig(model=checkpoints["clip"], image_size=32, layer=1, heads=(0,)))
    with pytest.raises(OSError, match="holds a BLIP model .* not the CLIP model"):
        ClipScorer(checkpoints["blip"], device="cpu")
    config = tmp_path / "c.yaml"
    wrong = SegmenterConfig(model=checkpoints["clip"], image_size=32, layer=1, heads=(0,))
    config.write_text(wrong.to_yaml())
    image = tmp_path / "im.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()  # transformers' load reports of the checkpoints refused above are not the CLI's
    assert main(["segment", "--config", str(config), "--classes", "cat", "--out", str(tmp_path / "o"),
                 "--device", "cpu", str(image)]) == 2
    assert "holds a CLIP model" in one_line_error(capsys)
    spec = write_spec(tmp_path, checkpoints["blip"], checkpoints["blip"])  # a BLIP as the objective's CLIP
    assert main(["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp_path}/t.db",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    assert "holds a BLIP model" in one_line_error(capsys)


# --- 15.15: bounded work ----------------------------------------------------------------------------
@pytest.mark.parametrize("setting,too_much,most", [
    ("blur_sigma", 0.3, 0.25), ("crf_iterations", 51, 50), ("image_size", 1040, 1024),
    ("dropout_rounds", 21, 20), ("crf_bilateral_sxy", 1e6, 1000.0),
])
def test_costly_settings_have_upper_bounds(setting, too_much, most):
    assert getattr(SegmenterConfig(**{setting: most}), setting) == most
    with pytest.raises(ValueError, match=f"SegmenterConfig.{setting}="):
        SegmenterConfig(**{setting: too_much})


def test_postprocess_cap_runs_small_and_upsamples_labels(caplog):
    from segmenter import pipeline

    height, width = 240, 360
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 3] = (200, 40, 40)
    image[:, width // 3 :] = (40, 40, 200)
    maps = np.zeros((2, 4, 6), dtype=np.float32)
    maps[0, :, :2], maps[1, :, 2:] = 1.0, 1.0  # class 1 left third, class 2 the rest
    base = SegmenterConfig(background="never", crf_iterations=5)
    full = pipeline.postprocess(image, maps, base)
    pipeline._noted.clear()
    with caplog.at_level(logging.WARNING, logger="ovss_tune.segmenter"):
        capped = pipeline.postprocess(image, maps, base.replace(postprocess_max_side=90))
        pipeline.postprocess(image, maps, base.replace(postprocess_max_side=90))
    assert capped.shape == (height, width) and set(np.unique(capped)) == {1, 2}
    assert (capped == full).mean() > 0.97  # same segmentation, edges within a few pixels
    assert caplog.text.count("post-processing images larger than 90 px") == 1  # a note, once
    assert "360x240 -> 90x60" in caplog.text
    # below the cap nothing changes
    same = pipeline.postprocess(image, maps, base.replace(postprocess_max_side=360))
    np.testing.assert_array_equal(same, full)
    # the upsampling is nearest neighbour: every label comes from the small map
    assert pipeline.postprocess_size(3000, 4000, 1024) == (768, 1024)
    assert pipeline.postprocess_size(100, 50, None) == (100, 50)


def test_capped_postprocessing_of_a_photo_sized_image_is_fast():
    from segmenter.pipeline import postprocess

    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((100, 100, 1), np.uint8))
    maps = rng.random((3, 21, 21)).astype(np.float32)  # [C, gh, gw]; image 3000 x 4000 (12 MP)
    started = time.perf_counter()
    labels = postprocess(image, maps, SegmenterConfig(postprocess_max_side=256))
    assert labels.shape == (3000, 4000)
    assert time.perf_counter() - started < 20  # uncapped: about a minute


# --- 15.17, the same kind: every input that shapes a cached map is in its key ---------------------
def test_cache_key_covers_every_input_of_the_cached_maps(tmp_path, tiny_blip, rng):
    """An entry computed under one setting is never served for another: first round counted twice
    (with Salience Dropout), and a checkpoint directory whose weights were replaced."""
    from conftest import random_image

    from segmenter.backends.blip import BlipBackend
    from tuner.datasets import Sample
    from tuner.trial import MapProvider, TuningImage

    images = [TuningImage(Sample("a", random_image(rng, 32, 32)), "digest-a")]
    base = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=2, dropout_k=3)
    cached = MapProvider(BlipBackend(tiny_blip, device="cpu"), MapCache(tmp_path / "cache"))
    fresh = MapProvider(cached.backend, MapCache(None))
    for config in (base, base.replace(dropout_count_first_twice=True), base):
        np.testing.assert_allclose(cached.maps(config, images, [["cat", "dog"]])[0],
                                   fresh.maps(config, images, [["cat", "dog"]])[0], rtol=1e-6)
    # the same directory, other weights: another key
    model_dir = tmp_path / "model"
    save_tiny_blip(model_dir, seed=1)
    first = MapProvider(BlipBackend(str(model_dir), device="cpu"), MapCache(tmp_path / "cache2"))
    config = base.replace(model=str(model_dir), dropout_rounds=1)
    before = first.maps(config, images, [["cat"]])[0]
    time.sleep(0.01)
    save_tiny_blip(model_dir, seed=2)
    second = MapProvider(BlipBackend(str(model_dir), device="cpu"), MapCache(tmp_path / "cache2"))
    after = second.maps(config, images, [["cat"]])[0]
    assert second.model_runs == 1 and not np.allclose(before, after)


def test_yaml_that_is_not_utf8_is_a_one_line_error_not_a_replaced_character():
    with pytest.raises(YamlInputError, match="not UTF-8 text"):
        load_yaml('prompt_prefix: "café"'.encode("latin-1"), "c.yaml")
    assert load_yaml('prompt_prefix: "café"'.encode()) == {"prompt_prefix": "café"}


def test_overrides_keep_a_multi_objective_specs_first_objective_and_clip_model_where_it_belongs(
        tmp_path, tiny_blip, tiny_clip, capsys):
    spec = load_spec(write_spec(tmp_path, tiny_blip, tiny_clip, objective=None, objective_options=None,
                                objectives={"clip_reward": {}, "region_agreement": {}}))
    changed = spec.replace(objective="clip_margin", objective_options={})
    assert [n for n, _ in changed.objectives] == ["clip_margin", "region_agreement"]
    # --clip-model with an objective that takes no CLIP: the candidate rule's CLIP changes, no error
    plain = write_spec(tmp_path, tiny_blip, tiny_clip, objective="region_agreement", objective_options={},
                       trials=1)
    assert main(["run", "--study-file", str(plain), "--clip-model", tiny_clip, "--device", "cpu",
                 "--no-progress", "--storage", f"sqlite:///{tmp_path}/t.db",
                 "--cache-dir", str(tmp_path / "c")]) == 0
