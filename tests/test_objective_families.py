"""Objectives that see what they tune (issue 14): final-mask scoring, new families, combination,
ties, the label-free confidence check and multi-objective studies."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import random_image, write_spec
from optuna.distributions import IntDistribution

from objectives import ScoreInput, get_objective
from objectives._clip import final_masks
from segmenter import SegmenterConfig, load_backend
from segmenter.backends import resolve_model_path
from tuner.cache import MapCache
from tuner.cli import main
from tuner.confidence import paired_test
from tuner.datasets import load_dataset
from tuner.selection import choose
from tuner.trial import CandidatePicker, MapProvider, TrialRunner, TuningImage

PLANTED_BLIP = "pkg://tuner.datasets/shapes_models/blip"
PLANTED_CLIP = "pkg://tuner.datasets/shapes_models/clip"


def scored(image, names, label_map, **context) -> ScoreInput:
    maps = np.zeros((len(names), 4, 4), dtype=np.float32)
    return ScoreInput(image=image, class_names=tuple(names), maps=maps, label_map=label_map,
                      threshold=0.5, **context)


# --- mask_source -------------------------------------------------------------------------------------
def test_final_masks_are_the_label_maps_pixels_on_clips_input():
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[:32, :32] = 1
    labels[40:, 10:50] = 2
    masks = final_masks(labels, 2, 32)
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.bool
    expected = torch.zeros(2, 32, 32, dtype=torch.bool)
    expected[0, :16, :16] = True
    expected[1, 20:, 5:25] = True
    assert torch.equal(masks, expected)
    assert not final_masks(np.zeros((64, 64), dtype=np.int64), 1, 32).any()  # absent class: empty


def test_crf_on_and_off_get_different_values_with_final_masks_and_the_same_with_the_papers():
    """The reviewer's case: a study that tunes post-processing must see it."""
    dataset = load_dataset("shapes")
    blip = resolve_model_path(PLANTED_BLIP)
    backend = load_backend("blip", blip, device="cpu")
    samples = [dataset.load("val", j) for j in dataset.ids("val")[:6]]
    images = [TuningImage(s, str(i)) for i, s in enumerate(samples)]
    provider = MapProvider(backend, MapCache(None))
    final = get_objective("clip_margin", clip_model=resolve_model_path(PLANTED_CLIP), device="cpu")
    paper = get_objective("clip_margin", clip=final.clip, mask_source="threshold")
    base = SegmenterConfig(model=blip, image_size=64, layer=2, heads=(2,), threshold=0.15,
                           dropout_rounds=1, candidates="itm_threshold", candidates_threshold=0.5,
                           crf_iterations=5)
    picker = CandidatePicker(dataset.vocabulary, backend, final.clip)
    values = {}
    for objective, name in ((final, "final"), (paper, "threshold")):
        runner = TrialRunner(dataset, images, provider, objective, picker)
        values[name] = [runner.evaluate(base.replace(**change)).per_image
                        for change in ({}, {"crf": False}, {"background": "never"})]
    # the paper's masks are blind to the CRF and to the background rule; the final ones see both
    assert values["threshold"][0] == values["threshold"][1] == values["threshold"][2]
    assert values["final"][0] != values["final"][1] and values["final"][0] != values["final"][2]


def test_an_unknown_mask_source_or_option_is_a_one_line_error(tiny_clip):
    with pytest.raises(ValueError, match="mask_source 'crf' is unknown: use final or threshold"):
        get_objective("clip_margin", clip_model=tiny_clip, device="cpu", mask_source="crf")
    with pytest.raises(ValueError, match="objective 'clip_margin' has no option 'mask_sorce'"):
        get_objective("clip_margin", clip_model=tiny_clip, device="cpu", mask_sorce="final")


# --- the new families ----------------------------------------------------------------------------------
def halves_image() -> np.ndarray:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:, :20] = (220, 30, 30)
    image[:, 20:] = (30, 30, 220)
    return image


def test_region_agreement_rewards_labels_that_follow_the_images_regions():
    objective = get_objective("region_agreement", segments=20)
    image = halves_image()
    follows = np.zeros((40, 40), dtype=np.int64)
    follows[:, 20:] = 1
    cuts = np.zeros((40, 40), dtype=np.int64)
    cuts[:, 10:30] = 1  # the label edge runs through the middle of each uniform half
    constant = np.zeros((40, 40), dtype=np.int64)
    values = objective.score([scored(image, ["blue"], m) for m in (follows, cuts, constant)])
    regions = objective.superpixels(scored(image, ["blue"], follows))
    # by hand: the share of pixels that carry their region's majority label
    counts = [np.bincount(cuts[regions == r]).max() for r in np.unique(regions)]
    assert values[0] == 1.0 and values[1] == pytest.approx(sum(counts) / cuts.size) and values[1] < 0.9
    assert values[2] == 1.0  # the documented failure mode: one label everywhere agrees with anything


def test_flip_consistency_is_the_mean_iou_with_the_mirrored_images_map():
    objective = get_objective("flip_consistency")
    a = np.zeros((4, 4), dtype=np.int64)
    a[:, :2] = 1  # label 1 on the left half
    b = np.zeros((4, 4), dtype=np.int64)
    b[:, :1] = 1  # the mirrored image's map, mirrored back, keeps only a quarter
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    same, half = objective.score([scored(image, ["x"], a, views={"hflip": a}),
                                  scored(image, ["x"], a, views={"hflip": b})])
    assert same == 1.0
    assert half == pytest.approx((4 / 8 + 8 / 12) / 2)  # IoU of label 1 and of background, averaged
    with pytest.raises(ValueError, match="needs the label map of the mirrored image"):
        objective.score([scored(image, ["x"], a)])


def test_itm_match_is_inside_minus_outside_by_blips_itm_head(tiny_blip, rng):
    backend = load_backend("blip", tiny_blip, device="cpu")
    objective = get_objective("itm_match", backend=backend, device="cpu")
    image = random_image(rng, 32, 32)
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[:, :16] = 1
    labels[20:, 16:] = 2
    value = objective.score([scored(image, ["cat", "dog"], labels)])[0]

    def match(keep, name):  # the ITM head on the masked image, written with the backend's own call
        pixels = backend.prepare_images([image * keep[..., None].astype(np.uint8)], 32)
        return float(backend.itm_scores(pixels, [f"a picture of {name}"])[0, 0])

    by_hand = np.mean([match(labels == k, n) - match(labels != k, n) for k, n in ((1, "cat"), (2, "dog"))])
    assert value == pytest.approx(by_hand, abs=1e-5)
    scored_before = objective.crops_scored
    objective.score([scored(image, ["cat", "dog"], labels)])
    assert objective.crops_scored == scored_before == 4  # a revisited mask runs no ITM
    with pytest.raises(ValueError, match="needs the segmenter's backend"):
        get_objective("itm_match", device="cpu")


def test_combination_is_the_weighted_sum_of_its_parts(tiny_blip, rng):
    backend = load_backend("blip", tiny_blip, device="cpu")
    image = halves_image()
    labels = np.zeros((40, 40), dtype=np.int64)
    labels[:, 5:25] = 1
    items = [scored(image, ["red"], labels, views={"hflip": labels[:, ::-1]})]
    combo = get_objective("combination", backend=backend, device="cpu",
                          parts={"region_agreement": {"weight": 2.0, "segments": 20},
                                 "flip_consistency": -0.5})
    parts = [get_objective("region_agreement", segments=20).score(items)[0],
             get_objective("flip_consistency").score(items)[0]]
    assert combo.score(items)[0] == pytest.approx(2.0 * parts[0] - 0.5 * parts[1])
    assert combo.views == ("hflip",) and set(combo.last_parts) == {"region_agreement", "flip_consistency"}
    with pytest.raises(ValueError, match="needs `parts`"):
        get_objective("combination")
    with pytest.raises(ValueError, match="weight must be a finite number"):
        get_objective("combination", parts={"region_agreement": "heavy"})


# --- ties and the choice ---------------------------------------------------------------------------------
def study_with(values, per_image=None, tie_break=None, hashes=None, directions=None) -> optuna.Study:
    study = optuna.create_study(directions=directions or ["maximize"])
    for i, value in enumerate(values):
        attrs = {"config_hash": (hashes or [str(i) for i in range(len(values))])[i],
                 "objective_per_image": (per_image or [[value]] * len(values))[i]}
        if tie_break is not None:
            attrs["tie_break_value"] = tie_break[i]
        study.add_trial(optuna.trial.create_trial(
            params={"layer": i}, distributions={"layer": IntDistribution(0, 100)},
            user_attrs=attrs, **({"values": value} if directions else {"value": value})))
    return study


def test_a_unique_best_is_the_choice():
    choice = choose(study_with([0.2, 0.5, 0.4]))
    assert choice.trial.number == 1 and choice.rule == "only" and choice.tie_count == 1


def test_ties_are_broken_by_the_tie_break_objective_then_per_image_rank_then_trial_number():
    by_secondary = choose(study_with([0.5, 0.5, 0.3], tie_break=[0.1, 0.9, 1.0]))
    assert by_secondary.trial.number == 1 and by_secondary.rule == "tie_break" and by_secondary.tie_count == 2
    # equal means, but trial 2 wins on two of three images
    per_image = [[0.6, 0.6, 0.3], [0.0, 0.5, 0.0], [0.7, 0.7, 0.1]]
    by_rank = choose(study_with([0.5, 0.1666, 0.5], per_image=per_image))
    assert by_rank.trial.number == 2 and by_rank.rule == "per_image_rank"
    first = choose(study_with([0.5, 0.5]))
    assert first.trial.number == 0 and first.rule == "first" and "2 distinct configs tie" in first.describe()
    # the same config run twice is one config, not a tie
    assert choose(study_with([0.5, 0.5], hashes=["a", "a"])).rule == "only"


def test_the_pareto_choice_is_the_front_member_with_the_best_mean_rank():
    study = study_with([[0.9, 0.1], [0.6, 0.6], [0.1, 0.9], [0.5, 0.5]], directions=["maximize", "maximize"])
    choice = choose(study)
    assert choice.rule == "pareto_mean_rank" and choice.trial.number == 1
    assert {t.number for t in choice.candidates} == {0, 1, 2}


# --- the label-free confidence check -----------------------------------------------------------------------
def test_paired_test_says_reliably_better_only_when_the_choice_wins_image_by_image():
    rng = np.random.default_rng(0)
    default = rng.normal(size=40)
    better = paired_test(default + 0.5 + 0.1 * rng.normal(size=40), default)
    assert better["reliably_better"] and better["p_value"] < 1e-6 and better["effect"] > 0.9
    noise = paired_test(default + rng.normal(size=40), default)
    assert not noise["reliably_better"] and noise["p_value"] > 0.05
    same = paired_test(default, default)
    assert same["p_value"] == 1.0 and not same["reliably_better"] and same["ties"] == 40
    worse = paired_test(default - 1.0, default)
    assert worse["effect"] == -1.0 and not worse["reliably_better"]


def test_export_writes_the_default_config_when_the_choice_is_not_reliably_better(
        tmp_path, tiny_blip, tiny_clip, capsys):
    """Random tiny models: the objective is flat noise, so the pick is no better than the default."""
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [0], "dropout_rounds": 1,
             "crf_iterations": 2}  # a default config the tiny model has
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=6, trials=4, fixed=fixed)
    storage = f"sqlite:///{tmp_path}/tune.db"
    base = ["--storage", storage, "--cache-dir", str(tmp_path / "cache")]
    assert main(["run", "--study-file", str(spec), "--device", "cpu", "--no-progress", *base]) == 0
    out = capsys.readouterr().out
    assert "confidence check" in out
    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    check = study.user_attrs["confidence_check"]
    assert "unavailable" not in check, check
    assert check["trial"] == choose(study).trial.number and check["images"] == 96 and not check["optimistic"]
    assert set(study.user_attrs["check_ids"]).isdisjoint(study.user_attrs["tuning_ids"])
    assert main(["export", "--study", "shapes-clip_margin", "-o", str(tmp_path / "a.yaml"), *base]) == 0
    fixed = SegmenterConfig.from_dict(study.user_attrs["fixed"])
    chosen = SegmenterConfig.from_dict(choose(study).trial.user_attrs["config"])
    exported = SegmenterConfig.from_yaml(tmp_path / "a.yaml")
    provenance = yaml.safe_load((tmp_path / "a.yaml").read_text())["provenance"]
    if check["reliably_better"]:  # a random model can still make a real difference: then it is kept
        assert exported == chosen and "exported" not in provenance
    else:
        assert exported == fixed and provenance["exported"].startswith("default config")
        assert "NOT reliably better" in capsys.readouterr().err
    assert main(["export", "--study", "shapes-clip_margin", "-o", str(tmp_path / "b.yaml"), "--force",
                 *base]) == 0
    assert SegmenterConfig.from_yaml(tmp_path / "b.yaml") == chosen


# --- multi-objective studies ------------------------------------------------------------------------------
def test_a_multi_objective_study_records_both_values_and_exports_its_pareto_choice(tmp_path, tiny_blip,
                                                                                   tiny_clip):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=3,
                      objectives={"clip_margin": {"clip_model": tiny_clip},
                                  "region_agreement": {"segments": 30}})
    text = yaml.safe_load(spec.read_text())
    del text["objective"], text["objective_options"]
    spec.write_text(yaml.safe_dump(text))
    storage = f"sqlite:///{tmp_path}/tune.db"
    base = ["--storage", storage, "--cache-dir", str(tmp_path / "cache")]
    assert main(["run", "--study-file", str(spec), "--device", "cpu", "--no-progress", *base]) == 0
    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    assert len(study.directions) == 2
    for trial in study.trials:
        assert len(trial.values) == 2 and 0.0 <= trial.values[1] <= 1.0
        assert trial.values[1] == pytest.approx(np.mean(trial.user_attrs["extra_objectives_per_image"]
                                                        ["region_agreement"]))
    assert main(["export", "--study", "shapes-clip_margin", "-o", str(tmp_path / "best.yaml"), "--force",
                 *base]) == 0
    provenance = yaml.safe_load((tmp_path / "best.yaml").read_text())["provenance"]
    assert provenance["choice"]["rule"] == "pareto_mean_rank"
    assert provenance["trial"] == choose(study).trial.number


def test_a_multi_objective_spec_that_prunes_is_refused(tmp_path, tiny_blip, tiny_clip):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, pruner={"type": "wilcoxon"},
                      objectives=["clip_margin", "region_agreement"])
    text = yaml.safe_load(spec.read_text())
    del text["objective"], text["objective_options"]
    spec.write_text(yaml.safe_dump(text))
    assert main(["run", "--study-file", str(spec), "--device", "cpu", "--no-progress",
                 "--storage", f"sqlite:///{tmp_path}/tune.db"]) == 2


def test_the_verdict_says_when_the_objective_prefers_the_default_config():
    from tuner.confidence import verdict

    worse = {**paired_test(np.zeros(20), np.ones(20)), "images": 20}
    assert "prefers the default config" in verdict(worse) and "losses 20" in verdict(worse)
    better = {**paired_test(np.ones(20), np.zeros(20)), "images": 20}
    assert "wins 20, losses 0, ties 0" in verdict(better) and "reliably better" in verdict(better)


def test_an_objective_that_reads_pixel_labels_is_reported_and_multi_objective_audits_refused(
        tmp_path, tiny_blip, tiny_clip, capsys):
    storage = f"sqlite:///{tmp_path}/tune.db"
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=2,
                      objectives={"region_agreement": {}, "miou_supervised": {}})
    text = yaml.safe_load(spec.read_text())
    del text["objective"], text["objective_options"]
    spec.write_text(yaml.safe_dump(text))
    assert main(["run", "--study-file", str(spec), "--device", "cpu", "--no-progress", "--storage", storage,
                 "--cache-dir", str(tmp_path / "cache"), "--study", "supervised"]) == 0
    out = capsys.readouterr().out
    assert "READ pixel labels" in out and "labels used only to report" not in out
    study = optuna.load_study(study_name="supervised", storage=storage)
    assert study.user_attrs["objective_labels"] == "pixel"
    assert main(["audit", "--study", "supervised", "--storage", storage, "--out", str(tmp_path / "a")]) == 2
    assert "has 2 objectives: the audit compares one objective with mIoU" in capsys.readouterr().err


def test_an_exported_default_config_keeps_the_choices_numbers_apart(tmp_path, tiny_blip, tiny_clip):
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [0], "dropout_rounds": 1,
             "crf_iterations": 2}
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=3, fixed=fixed)
    storage = f"sqlite:///{tmp_path}/tune.db"
    base = ["--storage", storage, "--cache-dir", str(tmp_path / "cache")]
    assert main(["run", "--study-file", str(spec), "--device", "cpu", "--no-progress", *base]) == 0
    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    study.set_user_attr("confidence_check", {**study.user_attrs["confidence_check"], "reliably_better": False,
                                             "same_as_default": False})  # as a flat objective leaves it
    assert main(["export", "--study", "shapes-clip_margin", "-o", str(tmp_path / "d.yaml"), *base]) == 0
    provenance = yaml.safe_load((tmp_path / "d.yaml").read_text())["provenance"]
    chosen = choose(study).trial
    assert "trial" not in provenance and provenance["rejected_choice"]["trial"] == chosen.number
    assert provenance["default_config"]["value"] == study.user_attrs["default_outcome"]["value"]
