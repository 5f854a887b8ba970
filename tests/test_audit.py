"""`tune audit` end to end on a tiny study, and its arithmetic on hand-made studies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import write_spec
from optuna.distributions import FloatDistribution, IntDistribution

import tuner.cli as cli
from objectives import confusion_matrix, miou
from tuner import _audit_stats as S
from tuner.selection import choose

STUDY = "shapes-clip_margin"


def run_args(tmp: Path, spec: Path) -> list[str]:
    return ["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp}/tune.db",
            "--cache-dir", str(tmp / "cache"), "--device", "cpu", "--no-progress"]


@pytest.fixture
def tune():
    """`tuner.cli.main`, where `audit` is a subcommand."""
    return cli.main


@pytest.fixture(scope="module")
def labelled_study(tmp_path_factory, tiny_blip, tiny_clip) -> Path:
    """A 6-trial study on 4 shapes images whose trials record mIoU (fixed settings fit the model)."""
    tmp = tmp_path_factory.mktemp("audit-study")
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [1], "dropout_rounds": 1,
             "crf_iterations": 2}  # settings the tiny model has, so the default config can be evaluated
    spec = write_spec(tmp, tiny_blip, tiny_clip, images=4, trials=6, fixed=fixed)
    assert cli.main(run_args(tmp, spec)) == 0
    return tmp


def audit_args(tmp: Path, out: Path, *more: str, study: str = STUDY) -> list[str]:
    return ["audit", "--study", study, "--storage", f"sqlite:///{tmp}/tune.db", "--cache-dir",
            str(tmp / "cache"), "--device", "cpu", "--no-progress", "-o", str(out), *more]


def check_html(path: Path) -> str:
    text = path.read_text()
    assert "data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link)\b", text)  # nothing to fetch
    return text


def test_audit_of_a_labelled_study(labelled_study, tmp_path, tune, capsys):
    out = tmp_path / "audit"
    assert tune(audit_args(labelled_study, out, "--bootstrap", "200")) == 0
    printed = capsys.readouterr().out
    assert "regret" in printed and "leakage ledger" in printed and "audit.html" in printed
    report = json.loads((out / "audit.json").read_text())
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{labelled_study}/tune.db")
    stored = {t.number: t.user_attrs["miou"] for t in study.trials if "repeat_of" not in t.user_attrs}

    agreement = report["agreement"]
    for key in ("spearman", "kendall", "weighted_tau"):
        assert -1.0 <= agreement[key]["value"] <= 1.0
        lo, hi = agreement["bootstrap"][key]["ci95"]
        assert -1.0 <= lo <= hi <= 1.0
    assert agreement["bootstrap"]["images_miou"] == 4 and agreement["bootstrap"]["trials"] == 6
    regret = report["regret"]
    assert regret["regret"] >= 0
    assert regret["labelled_optimum"]["miou"] == max(stored.values())
    choice = choose(study).trial.number  # the best value, ties broken by tuner.selection
    assert regret["label_free_choice"]["trial"] == choice
    assert regret["label_free_choice"]["miou"] == stored[choice]
    assert regret["regret_ci95"][0] >= 0
    default = regret["vs_default"]
    assert default["source"] == "evaluated" and 0 <= default["miou"] <= 1  # no trial ran the fixed settings
    assert [row["k"] for row in report["top_k"]] == [1, 3, 5]

    ledger = report["ledger"]
    assert "pixel" in ledger["labels_touched"] and ledger["tuning"]["images"] == 4
    assert ledger["choice_is_label_free"] is True
    assert ledger["miou_images"]["overlap"] == 4  # mIoU measured on the tuning images, and said so
    assert ledger["declared_eval"]["split"] == "val" and ledger["declared_eval"]["overlap"] == 0

    # the re-evaluation through the map cache reproduces what the study stored
    assert report["consistency"]["reproduced"] is True and report["trials"]["re_evaluated"] == 6
    goodhart = report["goodhart"]
    assert goodhart["pairs"] == 15 and 0 <= goodhart["discordant"] <= 15
    assert -1 <= goodhart["mask_area"]["spearman_objective_foreground"] <= 1
    assert goodhart["per_class"]["classes"][0]["class"] == "background"
    assert report["importances"]["objective"] and report["importances"]["miou"]
    check_html(out / "audit.html")


def test_audit_fills_miou_in_on_a_labelled_split(labelled_study, tmp_path, tune):
    out = tmp_path / "audit"
    args = audit_args(labelled_study, out, "--split", "val", "--images", "3", "--bootstrap", "50",
                      "--max-trials", "4")
    assert tune(args) == 0
    report = json.loads((out / "audit.json").read_text())
    src = report["miou_source"]
    assert src["kind"] == "evaluated" and src["split"] == "val" and src["images"] == 3
    rows = report["trials_table"]
    evaluated = [r for r in rows if r["evaluated"]]
    assert len(evaluated) == 4 and all(r["miou"] is not None for r in evaluated)
    assert all(r["miou"] is None for r in rows if not r["evaluated"])  # stored tuning mIoU is not mixed in
    choice = next(r for r in rows if r["label_free_choice"])
    assert choice["evaluated"]
    assert report["agreement"]["trials"] == 4
    assert "independently" in report["agreement"]["bootstrap"]["resampling"]
    assert report["regret"]["labelled_optimum"]["miou"] == max(r["miou"] for r in evaluated)
    assert report["ledger"]["miou_images"]["overlap"] == 0
    # stored per-image objective values are rounded: where they lose the trials, the audit re-scores
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{labelled_study}/tune.db")
    trials = [study.trials[r["trial"]] for r in evaluated]
    stored = np.array([t.user_attrs["objective_per_image"] for t in trials])
    if not S.resolves(stored, np.array([t.value for t in trials])):
        assert any("re-evaluated on the tuning images" in w for w in report["warnings"])
    spearman = report["agreement"]["bootstrap"]["spearman"]
    assert spearman["valid"] == 50 and spearman["ci95"][0] <= spearman["ci95"][1]
    check_html(out / "audit.html")


def test_audit_under_the_paper_protocol_re_evaluates_stored_miou(labelled_study, tmp_path, tune, capsys):
    out = tmp_path / "audit"
    assert tune(audit_args(labelled_study, out, "--protocol", "paper", "--bootstrap", "0")) == 0
    report = json.loads((out / "audit.json").read_text())
    src = report["miou_source"]
    assert src["kind"] == "study" and src["protocol"] == "paper" and "paper protocol" in src["description"]
    assert src["paper_rule"].startswith("as standard")
    rows = report["trials_table"]
    # the study stored standard-protocol mIoU, so every trial is measured again; on the shapes world
    # (background is a class, no pixel unlabelled) the paper protocol scores what the standard one did
    assert all(r["evaluated"] for r in rows)
    assert all(r["miou"] == pytest.approx(r["stored_miou"], abs=1e-9) for r in rows)
    assert report["consistency"]["miou_max_abs_diff"] is None  # not compared across protocols
    capsys.readouterr()

    assert tune(audit_args(labelled_study, out, "--protocol", "paper", "--no-reevaluate")) == 2
    err = capsys.readouterr().err
    assert "drop --no-reevaluate" in err and len(err.strip().splitlines()) == 1


def test_audit_under_the_paper_protocol_on_a_labelled_split_agrees_with_tune_eval(labelled_study, tmp_path,
                                                                                 tune):
    from segmenter import SegmenterConfig
    from tuner.datasets import load_dataset
    from tuner.datasets.shapes_writers import write_voc_layout
    from tuner.evaluate import evaluate_config

    root = write_voc_layout(tmp_path / "VOC2012", 3, splits=("val",))  # 255 borders: protocols differ
    out = tmp_path / "audit"
    args = audit_args(labelled_study, out, "--dataset", "voc", "--split", "val", "--data-root", str(root),
                      "--images", "3", "--max-trials", "2", "--bootstrap", "0", "--protocol", "paper")
    assert tune(args) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["miou_source"]["protocol"] == "paper" and report["miou_source"]["images"] == 3
    choice = next(r for r in report["trials_table"] if r["label_free_choice"])
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{labelled_study}/tune.db")
    config = SegmenterConfig.from_dict(study.trials[choice["trial"]].user_attrs["config"])
    result = evaluate_config(config, load_dataset("voc", root=root), "val", device="cpu", batch_size=8,
                             cache_dir=labelled_study / "cache", protocol="both")
    assert result["paper"]["miou"] != pytest.approx(result["miou"])  # the test tells the protocols apart
    assert choice["miou"] == pytest.approx(result["paper"]["miou"], abs=1e-12)


def _hand_made_study(storage: str, name: str, n: int = 8, with_miou: bool = True) -> optuna.Study:
    """Trials whose objective falls exactly as their mIoU rises; per-image counts stored with them."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("labels_touched", ["none", "pixel"])
    study.set_user_attr("objective_labels", "none")
    study.set_user_attr("tuning_split", "train")
    study.set_user_attr("tuning_ids", [f"train-{i}" for i in range(4)])
    study.set_user_attr("eval_split", "val")
    study.set_user_attr("fixed", {"threshold": 0.15, "layer": 3})  # what trial 3 ran
    noise = [0.01, -0.02, 0.03, -0.02]  # per image, shared by every trial
    dists = {"x": FloatDistribution(0.0, 1.0), "k": IntDistribution(1, 4)}
    for i in range(n):
        rows, cms = [], []
        for j in range(4):  # 3 classes, 100 pixels per image; class 1 gets better with i
            cm = np.array([[50, 5, 5], [10 - i, 20 + i, 0], [3, 2 + j, 15 - j]])
            cms.append(cm)
            tp, gt, pred = S.counts_from_confusion(cm)
            rows.append([[c, int(tp[c]), int(gt[c]), int(pred[c])] for c in range(3)])
        scores = miou(sum(cms))
        attrs = {"objective_per_image": [1.0 - 0.05 * i + d for d in noise],
                 "foreground_per_image": [0.3 + 0.01 * i] * 4, "labels_used": "none",
                 "config": {"threshold": 0.15, "layer": i}}
        if with_miou:
            attrs.update(miou=scores.miou, class_counts_per_image=rows,
                         iou_per_class=dict(zip(("background", "a", "b"), scores.per_class_iou.tolist())))
        study.add_trial(optuna.trial.create_trial(
            params={"x": i / n, "k": 1 + i % 4}, distributions=dists,
            value=float(np.mean(attrs["objective_per_image"])), user_attrs=attrs))
    return study


def test_anti_correlated_study_gives_minus_one_and_all_pairs_discordant(tmp_path, tune):
    _hand_made_study(f"sqlite:///{tmp_path}/tune.db", "anti")
    out = tmp_path / "audit"
    assert tune(audit_args(tmp_path, out, "--bootstrap", "100", study="anti")) == 0
    report = json.loads((out / "audit.json").read_text())
    agreement = report["agreement"]
    assert agreement["spearman"]["value"] == pytest.approx(-1.0)
    assert agreement["kendall"]["value"] == pytest.approx(-1.0)
    assert agreement["weighted_tau"]["value"] == pytest.approx(-1.0)
    goodhart = report["goodhart"]
    assert goodhart["pairs"] == 28 and goodhart["discordant"] == 28 and goodhart["fraction"] == 1.0
    mious = [r["miou"] for r in report["trials_table"]]
    worst = goodhart["worst"][0]  # from the lowest objective (trial 7) to the highest (trial 0)
    assert (worst["from_trial"], worst["to_trial"]) == (7, 0)
    assert worst["objective_gain"] == pytest.approx(0.35)
    assert worst["miou_drop"] == pytest.approx(mious[7] - mious[0])
    regret = report["regret"]
    assert regret["label_free_choice"]["trial"] == 0 and regret["labelled_optimum"]["trial"] == 7
    assert regret["regret"] == pytest.approx(max(mious) - min(mious))
    assert regret["choice_rank_by_miou"] == 8
    assert [row["hit"] for row in report["top_k"]] == [False, False, False]
    default = regret["vs_default"]  # a trial ran the fixed settings: no model needed
    assert default["source"] == "trial #3" and default["gain"] == pytest.approx(mious[0] - mious[3])
    # stored per-image counts: intervals without any model; every replicate keeps the order
    boot = agreement["bootstrap"]
    assert boot["spearman"]["ci95"] == pytest.approx([-1.0, -1.0])
    assert report["goodhart"]["mask_area"]["spearman_objective_foreground"] == pytest.approx(-1.0)
    assert report["importances"]["trials"] == 8 and set(report["importances"]["miou"]) == {"x", "k"}
    assert report["ledger"]["declared_eval"]["overlap"] == 0
    check_html(out / "audit.html")


def test_study_without_miou_explains_what_to_pass(tmp_path, tune, capsys):
    _hand_made_study(f"sqlite:///{tmp_path}/tune.db", "blind", n=5, with_miou=False)
    out = tmp_path / "audit"
    assert tune(audit_args(tmp_path, out, study="blind")) == 0
    report = json.loads((out / "audit.json").read_text())
    assert "--dataset/--split" in report["agreement"]["unavailable"]
    assert report["importances"]["miou"] is None and set(report["importances"]["objective"]) == {"x", "k"}
    assert "--dataset/--split" in capsys.readouterr().out
    assert "<h1>Audit of study blind</h1>" in (out / "audit.html").read_text()


def test_one_line_errors(tmp_path, tune, capsys):
    _hand_made_study(f"sqlite:///{tmp_path}/tune.db", "lonely", n=1)
    assert tune(audit_args(tmp_path, tmp_path / "a", study="nope")) == 2
    err = capsys.readouterr().err
    assert "no study 'nope'" in err and len(err.strip().splitlines()) == 1
    assert tune(audit_args(tmp_path, tmp_path / "b", study="lonely")) == 2
    err = capsys.readouterr().err
    assert "1 completed trial(s)" in err and "at least 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_rounded_per_image_values_that_lose_the_trials_are_not_resampled():
    values = np.array([3e-20, 1e-20, 2e-20])
    per_image = np.round(np.tile(values[:, None], (1, 4)), 6)  # all zeros
    assert not S.resolves(per_image, values)
    assert S.resolves(np.array([[0.1, 0.3], [0.5, 0.5]]), np.array([0.2, 0.5]))


def test_miou_from_counts_matches_the_confusion_matrix_protocol(rng):
    for _ in range(5):
        gt = rng.integers(0, 5, size=(3, 20, 20))
        gt[:, :2] = 255
        pred = rng.integers(0, 6, size=(3, 20, 20))
        cms = [confusion_matrix(p, g, 6) for p, g in zip(pred, gt)]
        counts = np.stack([S.counts_from_confusion(cm) for cm in cms])
        assert S.miou_from_counts(counts.sum(0)) == pytest.approx(miou(sum(cms)).miou)


def test_unwritable_output_fails_before_the_audit_runs(tmp_path, tune, capsys, monkeypatch):
    _hand_made_study(f"sqlite:///{tmp_path}/tune.db", "blocked", n=5)
    (tmp_path / "taken").write_text("a file where the output directory should go")

    def must_not_run(options):
        raise AssertionError("the audit ran before its output path was checked")

    monkeypatch.setattr("tuner._audit.run_audit", must_not_run)
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert tune(audit_args(tmp_path, out, study="blocked")) == 2
        err = capsys.readouterr().err
        assert "cannot write to audit output directory" in err and len(err.strip().splitlines()) == 1
