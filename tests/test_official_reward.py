"""The authors' reward mask rule (`mask_rebinarize: official`) and the search protocol `paper`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_spec
from scipy.ndimage import gaussian_filter

from objectives import ScoreInput, get_objective, official_reward_options
from objectives._clip import reward_masks
from segmenter import SegmenterConfig
from tuner.cli import main
from tuner.spec import SpecError, load_spec, parse_spec
from tuner.study import RunOptions, StudyRunner

GRID, S, T = 21, 336, 0.15  # the authors' search: 21 x 21 patches at 336 px, t = 0.15


def block_maps(*blocks: tuple[int, int, int]) -> np.ndarray:
    """One map per (row, col, side): 1 on a side x side block of a GRID x GRID grid."""
    maps = np.zeros((len(blocks), GRID, GRID), dtype=np.float32)
    for c, (r, q, side) in enumerate(blocks):
        maps[c, r : r + side, q : q + side] = 1.0
    return maps


def block_pixels(r: int, q: int, side: int) -> np.ndarray:
    """The block's pixels at S (each patch S / GRID = 16 px). # [S, S] bool"""
    inside = np.zeros((S, S), dtype=bool)
    inside[16 * r : 16 * (r + side), 16 * q : 16 * (q + side)] = True
    return inside


# --- the mask rule -----------------------------------------------------------------------------------
def test_a_one_patch_mask_survives_and_grows_under_the_official_rule():
    maps = block_maps((10, 10, 1))
    official = reward_masks(maps, T, S, rebinarize="official")[0].numpy()
    assert official[block_pixels(10, 10, 1)].all()  # contains its 16 x 16 block
    assert 2500 < official.sum() < 3200  # about 2,800 px, far more than the block's 256
    assert reward_masks(maps, T, S)[0].sum() == 0  # the float rule erodes it away: it could never win


def test_the_official_mask_is_a_superset_of_a_block_and_grows_more_for_a_low_threshold():
    maps = block_maps((3, 4, 6))
    block = block_pixels(3, 4, 6)
    areas = {}
    for t in (0.05, 0.15, 0.25, 0.45):
        mask = reward_masks(maps, t, S, rebinarize="official")[0].numpy()
        assert t > 0.25 or mask[block].all()  # at t = 0.45 the blur's min-max rounds the corners off
        areas[t] = int(mask.sum())
    assert areas[0.05] > areas[0.15] > areas[0.25] > areas[0.45] > block.sum()
    assert reward_masks(maps, T, S)[0].sum() < block.sum()  # ours (0.5): rounded corners, shrinks


def test_the_float_rule_keeps_nearest_resize_blur_and_level(rng):
    maps = rng.random((3, 8, 8)).astype(np.float32)
    size, level = 64, 0.3
    got = reward_masks(maps, 0.4, size, rebinarize=level).numpy()
    lo = maps.min(axis=(1, 2), keepdims=True)
    norm = (maps - lo) / (maps.max(axis=(1, 2), keepdims=True) - lo)
    for k in range(3):
        up = np.kron((norm[k] >= 0.4).astype(float), np.ones((8, 8)))
        want = gaussian_filter(up, sigma=0.04 * size, mode="nearest") > level
        assert (got[k] != want).sum() <= 2  # float32 blur vs float64: a pixel at the level at most
    assert got.sum() > 0


def test_an_empty_map_gives_an_empty_official_mask():
    assert reward_masks(np.zeros((1, GRID, GRID), np.float32), T, S, rebinarize="official").sum() == 0


@pytest.mark.parametrize("value", ["offical", 1.0, -0.1, True, None])
def test_bad_rebinarize_values_are_refused(value):
    with pytest.raises(ValueError, match="is not a mask rule"):
        reward_masks(block_maps((0, 0, 2)), T, S, rebinarize=value)


def test_the_objective_uses_the_official_rule_and_refuses_bad_options(tiny_clip):
    reward = get_objective("clip_reward", clip_model=tiny_clip, device="cpu", mask_source="threshold",
                           mask_rebinarize="official")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    maps = np.zeros((1, 8, 8), dtype=np.float32)
    maps[0, 3, 3] = 1.0  # one patch of 4 x 4 px
    scored = ScoreInput(image=image, class_names=("cat",), maps=maps, label_map=np.zeros((32, 32), int),
                        threshold=T)
    mask = reward.masks(scored, 32)[0]
    assert mask[12:16, 12:16].all() and mask.sum() > 16
    for options, message in (
        ({"mask_source": "threshold", "mask_rebinarize": "bogus"}, "'bogus' is not a mask rule"),
        ({"mask_source": "threshold", "mask_rebinarize": 1.5}, "1.5 is not a mask rule"),
        ({"mask_rebinarize": "official"}, "applies to mask_source: threshold only"),
    ):
        with pytest.raises(ValueError, match=message):
            get_objective("clip_margin", clip=reward.clip, **options)


def spec_data(**objective_options) -> dict:
    return {"dataset": "shapes", "objective": "clip_reward", "objective_options": objective_options,
            "search_space": {"threshold": {"type": "float", "low": 0.05, "high": 0.45}}}


@pytest.mark.parametrize("options, where", [
    ({"mask_source": "threshold", "mask_rebinarize": "offical"}, "objective_options.mask_rebinarize"),
    ({"mask_rebinarize": 0.5}, "objective_options.mask_rebinarize"),
    ({"mask_source": "threshold", "mask_rebinarize": 2}, "objective_options.mask_rebinarize"),
])
def test_a_spec_with_a_bad_mask_rule_is_refused_in_one_line(options, where):
    with pytest.raises(SpecError, match=f"^s.yaml: {where}: ") as err:
        parse_spec(spec_data(**options), "s.yaml")
    assert "\n" not in str(err.value)
    combined = {"dataset": "shapes", "objective": "combination",
                "objective_options": {"parts": {"clip_margin": {"weight": 1.0, **options}}},
                "search_space": spec_data()["search_space"]}
    with pytest.raises(SpecError, match="objective_options.parts.clip_margin.mask_rebinarize"):
        parse_spec(combined, "s.yaml")


def test_official_reward_options_fill_in_what_the_spec_leaves_out():
    assert official_reward_options("clip_reward", {}) == {"mask_source": "threshold",
                                                          "mask_rebinarize": "official"}
    assert official_reward_options("clip_margin", {"mask_rebinarize": 0.5})["mask_rebinarize"] == 0.5
    assert official_reward_options("clip_contrastive", {"mask_source": "final"}) == {"mask_source": "final"}
    assert official_reward_options("patch_coherence", {}) == {}
    assert parse_spec(spec_data(), "s.yaml").objective_options == {}  # our default elsewhere


def test_a_study_on_the_official_preset_scores_the_official_reward():
    official = {"mask_source": "threshold", "mask_rebinarize": "official"}
    for data in ({**spec_data(), "fixed": {"preset": "official"}}, {**spec_data(), "preset": "official"}):
        assert parse_spec(data, "s.yaml").objective_options == official
    kept = parse_spec({**spec_data(mask_source="final"), "preset": "official"}, "s.yaml")
    assert kept.objective_options == {"mask_source": "final"}  # what the spec says wins


# --- the search protocol `paper` ----------------------------------------------------------------------
def test_protocol_paper_captions_the_vocabulary_and_scores_the_ground_truth(tmp_path, tiny_blip, tiny_clip):
    spec_path = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=2, protocol="paper",
                           objective="clip_reward")
    spec = load_spec(spec_path)
    assert spec.protocol == "paper"
    options = RunOptions(storage=f"sqlite:///{tmp_path}/tune.db", device="cpu", cache_dir=None,
                         progress=False)
    runner = StudyRunner(spec, options)
    captions, scored = [], []
    gradcam, score = runner.backend.gradcam, runner.objective.score

    def recording_gradcam(pixels, prompts, layers, *args, **kwargs):
        captions.extend(tuple(p.class_names) for p in prompts)
        return gradcam(pixels, prompts, layers, *args, **kwargs)

    def recording_score(items):
        scored.extend(items)
        return score(items)

    runner.backend.gradcam, runner.objective.score = recording_gradcam, recording_score
    study = runner.run()

    vocabulary = runner.dataset.vocabulary
    assert captions and all(c == vocabulary for c in captions)  # every caption lists the vocabulary
    truth = {im.digest: im.sample.image_classes for im in runner.images}
    assert scored and all(set(it.class_names) == set(truth[it.image_digest]) for it in scored)
    assert any(len(it.class_names) < len(vocabulary) for it in scored)  # fewer than the caption's
    assert all(it.maps.shape[0] == len(it.class_names) and it.label_map.max() <= len(it.class_names)
               for it in scored)
    assert all(list(it.class_names) == sorted(it.class_names, key=vocabulary.index) for it in scored)

    attrs = study.user_attrs
    assert attrs["protocol"] == "paper" and "image-level" in attrs["labels_touched"]
    assert all(t.user_attrs["labels_used"] == "image-level" for t in study.trials)
    assert attrs["definition"]["protocol"] == "paper"


def test_the_audit_ledger_says_the_search_read_image_level_labels(tmp_path, tiny_blip, tiny_clip, capsys):
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=2, trials=2, protocol="paper",
                      fixed={"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [1],
                             "dropout_rounds": 1, "crf": False})
    storage = f"sqlite:///{tmp_path}/tune.db"
    assert main(["run", "--study-file", str(spec), "--storage", storage, "--no-cache", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "READ image-level labels: not a label-free choice" in printed
    assert "labels used only to report this)" not in printed
    out = tmp_path / "audit"
    assert main(["audit", "--study", "shapes-clip_margin", "--storage", storage, "--no-cache",
                 "--device", "cpu", "--no-progress", "-o", str(out), "--bootstrap", "20"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "search protocol paper" in printed
    assert "label-free choice" not in printed and "confidence check (no labels)" not in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["consistency"]["reproduced"] is True  # re-evaluated under the study's protocol
    ledger = report["ledger"]
    assert ledger["search_protocol"] == "paper" and "image-level" in ledger["labels_touched"]
    assert ledger["choice_is_label_free"] is False
    assert any("protocol paper reads image-level labels" in r for r in ledger["choice_label_use"])


def test_protocol_paper_is_refused_on_a_dataset_without_labels(tmp_path, tiny_blip, tiny_clip, capsys):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, protocol="paper", dataset="folder",
                      dataset_options={"root": str(tmp_path), "classes": "circle,square"},
                      tuning={"split": "all", "images": 2, "seed": 0}, eval_split="all")
    assert main(["run", "--study-file", str(spec), "--storage", f"sqlite:///{tmp_path}/t.db", "--no-cache",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "protocol paper" in err and "has no labels" in err


def test_a_bad_protocol_or_a_searched_candidate_rule_is_refused():
    with pytest.raises(SpecError, match="^s.yaml: protocol: must be one of standard, paper"):
        parse_spec({**spec_data(), "protocol": "official"}, "s.yaml")
    space = {"candidates": {"type": "categorical", "choices": ["all", "oracle"]}}
    with pytest.raises(SpecError, match="search_space.candidates: protocol paper"):
        parse_spec({**spec_data(), "protocol": "paper", "search_space": space}, "s.yaml")


def test_a_vocabulary_caption_longer_than_the_model_takes_says_why(tiny_blip):
    from segmenter import load_backend
    from tuner.trial import check_caption

    backend = load_backend("blip", tiny_blip, device="cpu")
    names = [f"circle{i}" for i in range(70)]  # the tiny model takes 64 tokens
    with pytest.raises(ValueError, match=r"protocol paper lists the whole vocabulary \(70 names\)") as err:
        check_caption(backend, SegmenterConfig(model=tiny_blip), names)
    assert "protocol: standard" in str(err.value) and "list fewer candidate" not in str(err.value)
    check_caption(backend, SegmenterConfig(model=tiny_blip), names[:3])  # a short one passes


def test_a_standard_spec_keeps_its_definition(tmp_path, tiny_blip, tiny_clip):
    from tuner.study import study_definition

    spec = load_spec(write_spec(tmp_path, tiny_blip, tiny_clip))
    assert spec.protocol == "standard" and "protocol" not in study_definition(spec)  # old studies resume


def test_run_notes_when_the_official_reward_cannot_see_the_searched_post_processing(
        tmp_path, tiny_blip, tiny_clip, capsys):
    """`--preset official` switches a CLIP objective to threshold masks; a space that searches blur or
    CRF then ties configs differing only there, and `tune run` says so before it runs."""
    space = {"layer": {"type": "int", "low": 1, "high": 2},
             "crf": {"type": "categorical", "choices": [True, False]}}
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [1], "dropout_rounds": 1,
             "crf_iterations": 2}
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=2, trials=1, space=space, fixed=fixed)
    storage = f"sqlite:///{tmp_path}/tune.db"
    run = ["run", "--study-file", str(spec), "--storage", storage, "--no-cache", "--device", "cpu",
           "--no-progress"]
    assert main([*run, "--study", "ours"]) == 0
    assert "threshold masks" not in capsys.readouterr().out  # final masks see the CRF
    assert main([*run, "--study", "official", "--preset", "official"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "note: clip_margin scores threshold masks (mask_source: threshold), which the searched crf " \
        "cannot change" in printed
