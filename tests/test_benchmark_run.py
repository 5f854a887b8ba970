"""`tune run --dataset coco --data-root FIXTURE` with the shipped coco spec, on a COCO-layout fixture."""

from __future__ import annotations

import optuna
from conftest import save_tiny_blip

from tuner.cli import main
from tuner.datasets.shapes_writers import write_coco_layout


def test_tune_run_dataset_coco_on_a_coco_layout_fixture(tmp_path, tiny_clip, capsys):
    # a BLIP as deep and wide as BLIP-large's text encoder (12 layers x 12 heads), tiny otherwise
    blip = save_tiny_blip(tmp_path / "blip", text_layers=12, heads=12, hidden=48, image_size=48, patch=16)
    root = write_coco_layout(tmp_path / "coco", 6, seed=1)
    storage = f"sqlite:///{tmp_path}/tune.db"
    code = main(["run", "--dataset", "coco", "--data-root", str(root), "--model", blip, "--clip-model",
                 tiny_clip, "--trials", "2", "--images", "3", "--storage", storage, "--device", "cpu",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="coco-clip_margin", storage=storage)
    attrs = study.user_attrs
    assert attrs["dataset"] == "coco" and attrs["tuning_split"] == "train" and attrs["eval_split"] == "val"
    assert attrs["candidate_rule"] == "clip_topk"
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and all(0.0 <= t.user_attrs["miou"] <= 1.0 for t in trials)
    assert 1 <= trials[0].params["layer"] <= 11
