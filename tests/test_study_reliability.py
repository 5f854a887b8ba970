"""Study reliability: draws of resumed and parallel studies, repeats, what defines a study, dead
and terminated workers on every storage, undefined objectives, storage creation races, the
post-processing pool (issue 15 points 6, 7, 9-12; issue 14 point 3)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import write_spec

from tuner.cli import main
from tuner.spec import load_spec, parse_spec
from tuner.study import (
    FINISHED,
    RunOptions,
    StudyRunner,
    TrialSeededSampler,
    enumerate_space,
    open_storage,
)
from tuner.trial import TuningImage

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_args(storage: str, tmp_path: Path, spec: Path, *more: str) -> list[str]:
    return ["run", "--study-file", str(spec), "--storage", storage, "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--no-progress", *more]


def params_of(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.get_trials(deepcopy=False)]


# --- 15.6: resumed and parallel studies draw as one uninterrupted run ---------------------------------
@pytest.mark.parametrize("kind", ["tpe", "random"])
def test_split_resumed_and_parallel_runs_draw_distinct_configs(kind):
    sampler = {"type": kind, **({"n_startup_trials": 3} if kind == "tpe" else {})}
    spec = parse_spec({"dataset": "shapes", "sampler": sampler, "search_space": {
        "threshold": {"type": "float", "low": 0.0, "high": 1.0},
        "layer": {"type": "int", "low": 1, "high": 12}}})

    def objective(trial):
        return -(trial.suggest_float("threshold", 0.0, 1.0) - 0.3) ** 2 - trial.suggest_int("layer", 1, 12)

    def study(storage, name):  # a new process: a new sampler made from the spec and the study seed
        return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                   direction="maximize", sampler=TrialSeededSampler(spec.make_sampler, 7))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study(storage, "one").optimize(objective, n_trials=8)
    one = params_of(study(storage, "one"))
    for part in (3, 5):  # 3 + 5 trials, as a rerun with a larger --trials does
        study(storage, "split").optimize(objective, n_trials=part)
    assert params_of(study(storage, "split")) == one  # not copies of the first three
    study(storage, "again").optimize(objective, n_trials=8)
    assert params_of(study(storage, "again")) == one  # the seed still makes a study reproducible

    workers = [study(storage, "parallel") for _ in range(2)]  # two workers, interleaved
    for _ in range(4):
        asked = [w.ask() for w in workers]
        for w, trial in zip(workers, asked):
            w.tell(trial, objective(trial))
    drawn = [tuple(sorted(p.items())) for p in params_of(workers[0])]
    assert len(drawn) == 8 and len(set(drawn)) == 8


def test_resumed_tune_run_draws_what_one_run_draws(tmp_path, tiny_blip, tiny_clip):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, sampler={"type": "random"})
    storage = f"sqlite:///{tmp_path}/tune.db"
    for trials in ("2", "4"):
        assert main(run_args(storage, tmp_path, spec, "--study", "split", "--trials", trials)) == 0
    assert main(run_args(storage, tmp_path, spec, "--study", "one", "--trials", "4")) == 0
    split, one = (optuna.load_study(study_name=n, storage=storage) for n in ("split", "one"))
    assert params_of(split) == params_of(one)
    assert params_of(split)[2:] != params_of(split)[:2]


# --- 14.3: repeats --------------------------------------------------------------------------------------
def test_enumerate_space_counts_distinct_configs_with_conditions():
    spec = parse_spec({"dataset": "shapes", "search_space": {
        "crf": {"type": "categorical", "choices": [True, False]},
        "crf_iterations": {"type": "int", "low": 1, "high": 3, "condition": {"crf": True}},
        "threshold": {"type": "float", "low": 0.05, "high": 0.25, "step": 0.1},
    }})
    assert len(enumerate_space(spec)) == (3 + 1) * 3  # crf off: one config whatever the iterations
    continuous = parse_spec({"dataset": "shapes", "search_space": {
        "threshold": {"type": "float", "low": 0.05, "high": 0.25}}})
    assert enumerate_space(continuous) is None


def test_a_repeated_config_is_not_evaluated_again_nor_counted(tmp_path, tiny_blip, tiny_clip, capsys):
    space = {"head": {"type": "categorical", "choices": [0, 1, 2]}}
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, space=space, sampler={"type": "random"})
    storage = f"sqlite:///{tmp_path}/tune.db"
    options = RunOptions(storage=storage, study_name="rep", device="cpu", cache_dir=None, progress=False,
                         trials=1)
    runner = StudyRunner(load_spec(spec), options)
    runner.run()
    first = runner.study.trials[0]
    runner.study.enqueue_trial(first.params)  # the sampler draws the evaluated config again
    runner.trials = 2
    evaluated = []
    evaluate = runner.runner.evaluate
    runner.runner.evaluate = lambda config, *a, **k: evaluated.append(config) or evaluate(config, *a, **k)
    runner.run()
    trials = runner.study.trials
    assert trials[1].user_attrs["repeat_of"] == 0 and trials[1].state == optuna.trial.TrialState.COMPLETE
    assert trials[1].value == first.value  # the sampler learns the earlier value ...
    assert "objective_per_image" not in trials[1].user_attrs  # ... which was not computed again
    assert len(trials) == 3 and "repeat_of" not in trials[2].user_attrs  # the budget went to a new config
    assert trials[2].params != first.params and len(evaluated) == 1
    assert runner.finished() == 2

    # --trials above the size of a finite space: every config once, then a message
    capsys.readouterr()
    assert main(run_args(storage, tmp_path, spec, "--study", "rep", "--trials", "10")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "holds 3 distinct configs and all are evaluated" in out
    study = optuna.load_study(study_name="rep", storage=storage)
    distinct = [t for t in study.get_trials(states=FINISHED) if "repeat_of" not in t.user_attrs]
    assert sorted(t.params["head"] for t in distinct) == [0, 1, 2]
    assert main(["show", "--study", "rep", "--storage", storage]) == 0
    assert re.search(r"\d+ repeats \(not shown\)", " ".join(capsys.readouterr().out.split()))
    best = tmp_path / "best.yaml"
    assert main(["export", "--study", "rep", "--storage", storage, "-o", str(best)]) == 0
    from segmenter.config import read_provenance

    assert "repeat_of" not in study.trials[read_provenance(best)["trial"]].user_attrs


# --- 15.7: a study remembers what defines it -------------------------------------------------------------
def test_a_study_refuses_trials_under_another_definition(tmp_path, tiny_blip, tiny_clip, capsys):
    storage = f"sqlite:///{tmp_path}/tune.db"
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, trials=1)
    assert main(run_args(storage, tmp_path, spec, "--study", "S")) == 0
    capsys.readouterr()
    assert main(run_args(storage, tmp_path, spec, "--study", "S", "--objective", "clip_reward")) == 2
    err = capsys.readouterr().err
    assert "objective (was \"clip_margin\", now \"clip_reward\")" in err and "new --study name" in err
    assert len(err.strip().splitlines()) == 1
    changed = write_spec(tmp_path, tiny_blip, tiny_clip, trials=2,
                         fixed={"model": tiny_blip, "image_size": 32, "layer": 2, "dropout_rounds": 1,
                                "crf_iterations": 3})
    assert main(run_args(storage, tmp_path, changed, "--study", "S")) == 2
    assert "fixed.crf_iterations (was 2, now 3)" in capsys.readouterr().err
    narrower = write_spec(tmp_path, tiny_blip, tiny_clip, trials=2,
                          space={"head": {"type": "int", "low": 0, "high": 1}})
    assert main(run_args(storage, tmp_path, narrower, "--study", "S")) == 2
    assert "search_space" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="S", storage=storage).trials) == 1  # nothing was added
    same = write_spec(tmp_path, tiny_blip, tiny_clip, trials=2)
    assert main(run_args(storage, tmp_path, same, "--study", "S")) == 0


# --- 15.9: dead and terminated workers on the journal storage ----------------------------------------
def test_journal_sigterm_ends_the_trial_and_a_dead_workers_trial_is_released(tmp_path, tiny_blip, tiny_clip):
    url = f"journal:{tmp_path}/tune.journal"
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=40)
    command = [sys.executable, "-m", "tuner.cli", *run_args(url, tmp_path, spec, "--study", "j")]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:  # SIGTERM once it runs its 2nd trial
            time.sleep(0.1)
            try:
                study = optuna.load_study(study_name="j", storage=open_storage(url))
            except KeyError:
                continue
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if len(study.trials) >= 2 and running:
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=60) == 143, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in proc.stderr.read().decode()
    study = optuna.load_study(study_name="j", storage=open_storage(url))
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # ended as Ctrl-C ends it

    with pytest.warns(UserWarning, match="Heartbeat"):
        stuck = study.ask()  # a worker killed inside a trial: RUNNING, and never beats again
    stuck_params = {"layer": stuck.suggest_int("layer", 1, 2), "head": stuck.suggest_int("head", 0, 3)}
    target = sum(1 for t in study.get_trials(states=FINISHED) if "repeat_of" not in t.user_attrs) + 1
    rerun = subprocess.run([*command, "--trials", str(target), "--heartbeat", "1"], env=ENV,
                           capture_output=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    study = optuna.load_study(study_name="j", storage=open_storage(url))
    assert study.trials[stuck.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stuck.number]
    assert len(retried) == 1 and stuck_params.items() <= retried[0].params.items()
    assert retried[0].state in FINISHED


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_released(tmp_path, kind):
    url = f"sqlite:///{tmp_path}/t.db" if kind == "sqlite" else f"journal:{tmp_path}/t.journal"
    study = optuna.create_study(storage=open_storage(url, heartbeat=1), study_name="s")
    with pytest.warns(UserWarning, match="Heartbeat"):
        dead = study.ask()  # RUNNING, and no heartbeat was ever recorded
    alive = optuna.create_study(storage=open_storage(url, heartbeat=1), study_name="s", load_if_exists=True)
    optuna.storages.fail_stale_trials(alive)
    assert alive.trials[dead.number].state == optuna.trial.TrialState.RUNNING  # within its grace period
    time.sleep(3.5)
    optuna.storages.fail_stale_trials(alive)
    trials = alive.get_trials()
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in trials[1:]] == [dead.number]  # retried


# --- 15.10: undefined objective values -------------------------------------------------------------------
def unlabel(runner: StudyRunner, index: int) -> None:
    """The tuning image keeps its pixels and loses every label (its mIoU is undefined)."""
    image = runner.runner.images[index]
    labels = np.full_like(image.sample.labels, runner.dataset.ignore_index)
    sample = dataclasses.replace(image.sample, labels=labels)
    runner.runner.images[index] = TuningImage(sample, image.digest)


def test_undefined_per_image_values_are_skipped_and_a_failing_study_stops(tmp_path, tiny_blip, tiny_clip):
    spec = load_spec(write_spec(tmp_path, tiny_blip, tiny_clip, objective="miou_supervised",
                                objective_options={}, trials=2))
    options = RunOptions(storage=f"sqlite:///{tmp_path}/tune.db", study_name="nan", device="cpu",
                         cache_dir=str(tmp_path / "cache"), progress=False)
    runner = StudyRunner(spec, options)

    unlabel(runner, 0)
    runner.run()
    done = runner.study.get_trials(states=FINISHED)
    assert len(done) == 2
    for t in done:
        per_image = t.user_attrs["objective_per_image"]
        assert per_image[0] != per_image[0] and t.user_attrs["undefined_images"] == 1  # NaN, counted
        assert t.value == pytest.approx(sum(per_image[1:]) / 3)

    for index in range(len(runner.runner.images)):  # no image has labelled pixels: every trial fails
        unlabel(runner, index)
    runner.trials = 10
    with pytest.raises(ValueError, match="5 trials in a row failed.*undefined"):
        runner.run()
    failed = runner.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 5 and all("undefined" in t.user_attrs["fail_reason"] for t in failed)


# --- 15.11: workers opening a fresh SQLite file together -------------------------------------------------
OPEN_TOGETHER = """
import sys, time, optuna
from tuner.study import open_storage
t0 = float(sys.argv[2])
while time.time() < t0:
    time.sleep(0.001)
optuna.create_study(storage=open_storage(sys.argv[1]), study_name="x", load_if_exists=True)
print("ok")
"""


def test_workers_creating_one_sqlite_file_together_all_start(tmp_path):
    script = tmp_path / "open.py"
    script.write_text(OPEN_TOGETHER)
    for round_ in range(2):
        url, start = f"sqlite:///{tmp_path}/fresh{round_}.db", str(time.time() + 8)
        procs = [subprocess.Popen([sys.executable, str(script), url, start], env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(6)]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and out.decode().strip() == "ok", err.decode()[-1000:]


# --- 15.12: the post-processing pool ----------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_pool_run_reports_and_its_processes_die_with_it(tmp_path, tiny_blip, tiny_clip, capsys):
    storage = f"sqlite:///{tmp_path}/tune.db"
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [0], "dropout_rounds": 1,
             "crf_iterations": 2}  # a default config the tiny model has, so the report evaluates it
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, trials=1, fixed=fixed)
    assert main(run_args(storage, tmp_path, spec, "--study", "pool", "--workers", "2")) == 0
    assert "default config" in capsys.readouterr().out  # evaluated through the pool, before it stops

    long = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=200)
    command = [sys.executable, "-m", "tuner.cli", *run_args(storage, tmp_path, long, "--study", "pool9",
                                                            "--workers", "2")]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, children = time.time() + 180, set()
        while len(children) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            children = {c for c in _children(proc.pid)
                        if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}
        assert len(children) >= 2, "the pool never started"
        time.sleep(2)  # the workers are up and initialised
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.2)
    left = [c for c in children if _alive(c)]
    for pid in left:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "pool processes outlived a kill -9 of their `tune run`"


def test_a_study_without_trials_takes_a_new_definition_and_the_last_layer_is_refused(
        tmp_path, tiny_blip, tiny_clip, capsys):
    storage = f"sqlite:///{tmp_path}/tune.db"
    run = ["run", "--device", "cpu", "--no-progress", "--storage", storage,
           "--cache-dir", str(tmp_path / "c")]
    # a first run that fails before any trial (here: the last text layer, whose maps are zero)
    last = write_spec(tmp_path, tiny_blip, tiny_clip, trials=2,
                      space={"layer": {"type": "int", "low": 1, "high": 3},
                             "head": {"type": "int", "low": 0, "high": 3}})
    assert main([*run, "--study-file", str(last)]) == 2
    assert "layer 3 is the last text layer" in capsys.readouterr().err
    # the fixed spec is not refused as "another definition": the study has no trial yet
    fixed = write_spec(tmp_path, tiny_blip, tiny_clip, trials=2)
    assert main([*run, "--study-file", str(fixed)]) == 0
    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    layer = [p for p in study.user_attrs["definition"]["search_space"] if p["name"] == "layer"]
    assert layer[0]["high"] == 2  # the definition the trials were made under


def test_a_second_objective_undefined_everywhere_stops_the_study_and_its_partial_nans_are_skipped(
        tmp_path, tiny_blip, tiny_clip):
    """The same fault as above through the other objectives of a multi-objective study."""
    spec = load_spec(write_spec(tmp_path, tiny_blip, tiny_clip, objective=None, objective_options=None,
                                objectives={"region_agreement": {}, "miou_supervised": {}}, trials=2))
    options = RunOptions(storage=f"sqlite:///{tmp_path}/tune.db", study_name="nan2", device="cpu",
                         cache_dir=str(tmp_path / "cache"), progress=False)
    runner = StudyRunner(spec, options)

    unlabel(runner, 0)
    runner.run()
    done = runner.study.get_trials(states=FINISHED)
    assert len(done) == 2 and all(np.isfinite(t.values[1]) for t in done)  # the NaN image left out
    for index in range(len(runner.runner.images)):
        unlabel(runner, index)
    runner.trials = 10
    with pytest.raises(ValueError, match="5 trials in a row failed.*miou_supervised is undefined"):
        runner.run()


def test_options_the_tuner_passes_itself_and_a_tie_break_beside_several_objectives_are_refused(
        tmp_path, tiny_blip, tiny_clip):
    from tuner.spec import SpecError

    with pytest.raises(SpecError, match="objective_options.backend"):
        load_spec(write_spec(tmp_path, tiny_blip, tiny_clip, objective_options={"backend": "x"}))
    with pytest.raises(SpecError, match="tie_break: a study with several objectives"):
        load_spec(write_spec(tmp_path, tiny_blip, tiny_clip, objective=None, objective_options=None,
                             objectives=["clip_margin", "region_agreement"], tie_break="clip_contrastive"))
