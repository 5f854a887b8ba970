"""Study specs (errors name the file and key) and the map cache (atomic, checksummed)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from tuner.cache import MapCache, cache_key
from tuner.spec import SpecError, load_spec, parse_spec

SPEC = """
dataset: shapes
tuning: {split: train, images: 4, seed: 3}
objective: clip_reward
fixed: {model: some/model, image_size: 32, dropout_rounds: 1}
search_space:
  layer: {type: int, low: 1, high: 2}
  head: {type: int, low: 0, high: 3}
  threshold: {type: float, low: 0.05, high: 0.45, step: 0.1}
  dropout_rounds: {type: int, low: 1, high: 3}
  dropout_schedule: {type: categorical, choices: [topk, halving]}
  dropout_k: {type: int, low: 1, high: 4, condition: {dropout_schedule: topk}}
trials: 5
"""


def test_spec_suggests_valid_configs_with_conditional_parameters(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    spec = load_spec(path)
    assert spec.study_name == "shapes-clip_reward" and spec.tuning_images == 4
    study = optuna.create_study(direction="maximize", sampler=spec.make_sampler(0))
    configs = []
    for _ in range(12):
        trial = study.ask()
        config = spec.suggest(trial)
        configs.append(config)
        assert config.heads == (trial.params["head"],) and config.image_size == 32
        assert ("dropout_k" in trial.params) == (config.dropout_schedule == "topk")
        study.tell(trial, 0.0)
    assert {c.dropout_schedule for c in configs} == {"topk", "halving"}
    # the same seed gives the same trials
    again = optuna.create_study(direction="maximize", sampler=spec.make_sampler(0))
    repeat = []
    for _ in range(12):
        trial = again.ask()
        repeat.append(spec.suggest(trial))
        again.tell(trial, 0.0)
    assert repeat == configs


@pytest.mark.parametrize("bad,key", [
    ("dataset: shapes\nsearch_space: {layer: {type: int, low: 1}}\n", "search_space.layer.high"),
    ("dataset: shapes\nsearch_space: {lyer: {type: int, low: 1, high: 2}}\n", "search_space.lyer"),
    ("dataset: shapes\nfixed: {threshold: 3}\n", "fixed"),
    ("dataset: shapes\nsampler: {type: grid}\n", "sampler.type"),
    ("dataset: shapes\ntrials: 0\n", "trials"),
    ("objective: clip_reward\n", "dataset"),
    ("dataset: shapes\nsearch_space: {threshold: {type: categorical, choices: [0.1, 7]}}\n",
     "search_space.threshold"),
    ("dataset: shapes\ntunning: {}\n", "tunning"),
])
def test_malformed_spec_names_file_and_key(tmp_path, bad, key):
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message and key in message and "\n" not in message


def test_spec_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: [shapes\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="mapping"):
        parse_spec(["a"], "x.yaml")


def test_cache_round_trip_and_truncated_entry_is_recomputed(tmp_path, caplog):
    cache = MapCache(tmp_path)
    key = cache_key(image="abc", layer=3)
    maps = np.random.default_rng(0).random((4, 3, 5, 5)).astype(np.float32)
    assert cache.get(key) is None
    cache.put(key, maps)
    np.testing.assert_array_equal(cache.get(key), maps)
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic write leaves no temporary file
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-17])  # a half-written file
    with caplog.at_level("WARNING"):
        assert cache.get(key) is None
    assert cache.corrupt == 1 and "corrupt" in caplog.text and not path.exists()
    cache.put(key, maps)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit: the checksum catches it
    path.write_bytes(bytes(data))
    assert cache.get(key) is None and cache.corrupt == 2
    assert MapCache(None).get(key) is None  # disabled cache
