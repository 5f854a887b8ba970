"""`tune run` / export / show / studies end to end on tiny models and shapes-world images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import kill_mid_trial, write_spec

from segmenter import SegmenterConfig
from segmenter.config import read_provenance
from tuner.cli import main
from tuner.selection import choose
from tuner.spec import load_spec
from tuner.study import RunOptions, StudyRunner

ROOT = Path(__file__).resolve().parents[1]


def run_args(tmp_path: Path, spec: Path, *more: str) -> list[str]:
    return ["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp_path}/tune.db",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress", *more]


def load(tmp_path: Path, name: str = "shapes-clip_margin") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/tune.db")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials, one per config (repeats of an evaluated config left out)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if "repeat_of" not in t.user_attrs]


def test_run_records_miou_and_export_round_trips(tmp_path, tiny_blip, tiny_clip, capsys):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip)
    assert main(run_args(tmp_path, spec)) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "mIoU" in out
    study = load(tmp_path)
    trials = finished(study)
    assert len(trials) == 3
    for t in trials:
        assert 0.0 <= t.user_attrs["miou"] <= 1.0
        assert t.user_attrs["labels_used"] == "none" and len(t.user_attrs["objective_per_image"]) == 4
        assert "miou" not in t.params  # never shown to the sampler
    attrs = study.user_attrs
    assert attrs["seed"] == 0 and len(attrs["tuning_ids"]) == 4 and attrs["dataset"] == "shapes"
    assert attrs["models"]["model"] == tiny_blip and "pixel" in attrs["labels_touched"]

    best_file = tmp_path / "best.yaml"
    args = ["export", "--study", "shapes-clip_margin", "--storage", f"sqlite:///{tmp_path}/tune.db"]
    assert main([*args, "-o", str(best_file), "--force"]) == 0  # the choice, whatever the check says
    chosen = choose(study).trial
    config = SegmenterConfig.from_yaml(best_file)
    assert config == SegmenterConfig.from_dict(chosen.user_attrs["config"])
    assert config.layer == chosen.params["layer"]
    provenance = read_provenance(best_file)
    assert provenance["study"] == "shapes-clip_margin" and provenance["trial"] == chosen.number

    assert main(["show", "--study", "shapes-clip_margin", "--storage", f"sqlite:///{tmp_path}/tune.db"]) == 0
    assert main(["studies", "--storage", f"sqlite:///{tmp_path}/tune.db"]) == 0
    shown = capsys.readouterr().out
    assert "shapes-clip_margin" in shown and "3 complete" in shown
    assert main(["show", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/tune.db"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_rerun_continues_the_study_and_a_finished_study_does_nothing(tmp_path, tiny_blip, tiny_clip, capsys):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip)
    assert main(run_args(tmp_path, spec, "--trials", "2")) == 0
    first = {t.number: t.value for t in finished(load(tmp_path))}
    assert main(run_args(tmp_path, spec, "--trials", "4")) == 0
    study = load(tmp_path)
    assert sorted(t.number for t in finished(study)) == [0, 1, 2, 3]
    assert all(study.trials[n].value == v for n, v in first.items())
    capsys.readouterr()
    assert main(run_args(tmp_path, spec, "--trials", "4")) == 0
    assert "(0 run now)" in capsys.readouterr().out
    assert len(load(tmp_path).trials) == 4
    # a different seed would change the recorded study: refused with a one-line error
    assert main(run_args(tmp_path, spec, "--trials", "5", "--seed", "9")) == 2


def test_killed_run_loses_no_finished_trial(tmp_path, tiny_blip, tiny_clip):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=40)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    storage = f"sqlite:///{tmp_path}/tune.db"
    for _attempt in range(5):  # until the kill lands inside a trial, not between two
        proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", *run_args(tmp_path, spec)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if kill_mid_trial(proc, storage, "shapes-clip_margin"):
                break
        finally:
            if proc.poll() is None:
                proc.kill()
    else:
        pytest.fail("the worker was never killed inside a trial")
    before = {t.number: t.value for t in finished(load(tmp_path))}
    assert len(before) >= 2
    spec_small = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=len(before) + 2)
    # heartbeats every second: the killed worker's trial is failed after 3 s and retried
    assert main(run_args(tmp_path, spec_small, "--heartbeat", "1")) == 0
    study = load(tmp_path)
    after = {t.number: t.value for t in finished(study)}
    assert len(after) == len(before) + 2
    killed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1  # the trial running when the worker died
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and killed[0].params.items() <= retried[0].params.items()
    assert all(after[n] == v for n, v in before.items())
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


def _runner(tmp_path, spec_path, cache: bool, name: str) -> StudyRunner:
    options = RunOptions(storage=f"sqlite:///{tmp_path}/tune.db", study_name=name, device="cpu",
                         cache_dir=str(tmp_path / "cache") if cache else None, progress=False)
    return StudyRunner(load_spec(spec_path), options)


def test_postprocessing_only_trials_run_no_model_and_cache_is_transparent(tmp_path, tiny_blip, tiny_clip):
    space = {
        "head": {"type": "int", "low": 0, "high": 3},
        "threshold": {"type": "float", "low": 0.05, "high": 0.85},
        "blur_sigma": {"type": "float", "low": 0.0, "high": 0.1},
    }
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, space=space, images=5, trials=4)
    warm = _runner(tmp_path, spec, cache=True, name="warm")
    warm.trials = 1
    warm.run()
    calls = warm.backend.forward_calls
    assert calls >= 1
    warm.trials = 4
    warm.run()
    assert warm.backend.forward_calls == calls  # heads, threshold, blur: no model run at all
    cold = _runner(tmp_path, spec, cache=False, name="cold")
    cold.run()
    assert cold.backend.forward_calls == 4 * calls
    values = [t.value for t in warm.study.trials]
    assert values == [t.value for t in cold.study.trials]

    for entry in (tmp_path / "cache").rglob("*.safetensors"):  # damage every entry
        entry.write_bytes(entry.read_bytes()[:40])
    again = _runner(tmp_path, spec, cache=True, name="again")
    again.run()
    assert again.cache.corrupt >= 1
    assert [t.value for t in again.study.trials] == values


def test_bad_input_gives_one_line_errors(tmp_path, tiny_blip, tiny_clip, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: shapes\nsearch_space: {layer: {type: int, low: 1}}\n")
    assert main(["run", "--study-file", str(bad), "--storage", f"sqlite:///{tmp_path}/t.db"]) == 2
    err = capsys.readouterr().err
    assert "search_space.layer.high" in err and "Traceback" not in err
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, space={
        "layer": {"type": "int", "low": 1, "high": 9}, "head": {"type": "int", "low": 0, "high": 3}})
    assert main(run_args(tmp_path, spec)) == 2
    assert "valid layers are 1..3" in capsys.readouterr().err
    assert main(["export", "--study", "x", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no study 'x'" in capsys.readouterr().err
    assert main(["run", "--study-file", str(tmp_path / "missing.yaml")]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_worker_processes_give_the_same_trials(tmp_path, tiny_blip, tiny_clip):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=2)
    values = {}
    for workers in (0, 2):
        options = RunOptions(storage=f"sqlite:///{tmp_path}/tune.db", study_name=f"w{workers}", device="cpu",
                             cache_dir=str(tmp_path / "cache"), progress=False, workers=workers)
        runner = StudyRunner(load_spec(spec), options)
        try:
            runner.run()
        finally:
            runner.close()
        values[workers] = [(t.value, t.user_attrs["miou"]) for t in runner.study.trials]
    assert values[0] == values[2]
