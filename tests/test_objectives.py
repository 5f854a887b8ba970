"""Objectives (issue: label-free CLIP reward and its variants) and the supervised metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image, save_tiny_clip
from scipy.ndimage import gaussian_filter

from objectives import (
    ScoreInput,
    confusion_matrix,
    describe_objectives,
    get_objective,
    miou,
    to_class_ids,
)
from segmenter.clip import ClipScorer

SIZE = 32  # the tiny CLIPs' input side


def two_colour_image() -> np.ndarray:
    """Left half pure red, right half pure blue. # [32, 32, 3] uint8"""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[:, : SIZE // 2] = (255, 0, 0)
    image[:, SIZE // 2 :] = (0, 0, 255)
    return image


def column_maps(*column_ranges: tuple[int, int], grid: int = 8) -> np.ndarray:
    """One map per range: 1 on columns [a, b) of a grid x grid patch grid, 0 elsewhere."""
    maps = np.zeros((len(column_ranges), grid, grid), dtype=np.float32)
    for c, (a, b) in enumerate(column_ranges):
        maps[c, :, a:b] = 1.0
    return maps


def paper_objective(name: str, **options):
    """A CLIP objective with the paper's masks (cut from the thresholded maps, not the label map)."""
    return get_objective(name, mask_source="threshold", **options)


def item(image, names, maps, threshold=0.5, **context) -> ScoreInput:
    label_map = np.zeros(image.shape[:2], dtype=np.int64)
    return ScoreInput(image=image, class_names=tuple(names), maps=maps, label_map=label_map,
                      threshold=threshold, **context)


# --- the paper's reward, by hand ------------------------------------------------------------------------
def prob(image_embed: torch.Tensor, text_embeds: torch.Tensor, k: int) -> float:
    """Softmax over the given names of cosine similarity / 0.01: the probability of name k."""
    return float(torch.softmax(image_embed @ text_embeds.T / 0.01, dim=-1)[0, k])


def hand_reward(model_path: str, items: list[ScoreInput]) -> tuple[list[int], list[np.ndarray]]:
    """The formula written out with the raw transformers model: wins and P margins per image."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)

    def projected(output):  # transformers 5: an output whose pooler_output is projected; 4.x: a tensor
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def embed_images(images):
        pixels = processor(images=images, do_resize=False, do_center_crop=False,
                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return torch.nn.functional.normalize(projected(model.get_image_features(pixel_values=pixels)),
                                                 dim=-1)

    def embed_texts(names):
        tokens = processor.tokenizer(list(names), padding=True, return_tensors="pt")
        with torch.no_grad():
            return torch.nn.functional.normalize(projected(model.get_text_features(**tokens)), dim=-1)

    black = embed_images([np.zeros((SIZE, SIZE, 3), dtype=np.uint8)])  # [1, D]
    wins, margins, log_ratios = [], [], []
    for it in items:
        grid = it.maps.shape[-1]
        lo = it.maps.min(axis=(1, 2), keepdims=True)
        norm = (it.maps - lo) / np.maximum(it.maps.max(axis=(1, 2), keepdims=True) - lo, 1e-30)
        binary = (norm >= it.threshold) & (norm > 0)  # threshold_maps(...) > 0
        crops = []
        for k in range(len(it.class_names)):
            up = np.kron(binary[k], np.ones((SIZE // grid, SIZE // grid)))  # nearest resize to S
            mask = gaussian_filter(up, sigma=0.04 * SIZE, mode="nearest") > 0.5
            # M_k * I; with an empty mask that is the black image itself
            crops.append(embed_images([it.image * mask[..., None].astype(np.uint8)]) if mask.any()
                         else black)
        text = embed_texts(it.class_names)  # softmax over the image's candidates only
        p_masked = np.array([prob(crop, text, k) for k, crop in enumerate(crops)])  # P(k | M_k * I)
        p_black = np.array([prob(black, text, k) for k in range(len(crops))])  # P(k | black)
        wins.append(int(np.sum(p_masked > p_black)))
        margins.append(p_masked - p_black)
        log_ratios.append(np.log(p_masked) - np.log(p_black))
    return wins, margins, log_ratios


def test_clip_reward_equals_the_formula_by_hand(tmp_path, rng):
    # a draw of the tiny CLIP whose P ratios below have no near-tie (the guard below): with two
    # or three names at temperature 100 most draws saturate a softmax or nearly tie somewhere
    tiny_clip = save_tiny_clip(tmp_path / "clip", seed=3)
    maps_a = rng.random((3, 8, 8)).astype(np.float32)
    maps_a[2] = 0.25  # a constant map: empty mask, the black image itself, never a win
    items = [
        item(random_image(rng, SIZE, SIZE), ["cat", "dog", "sky"], maps_a, threshold=0.4),
        item(random_image(rng, SIZE, SIZE), ["person", "grass", "square", "circle"],
             rng.random((4, 4, 4)).astype(np.float32), threshold=0.3),
        item(two_colour_image(), ["red", "dog"], column_maps((0, 4), (3, 8)), threshold=0.15),
    ]
    reward = paper_objective("clip_reward", clip_model=tiny_clip, device="cpu", batch_size=3)
    wins, margins, log_ratios = hand_reward(tiny_clip, items)
    assert margins[0][2] == 0.0  # the empty mask
    ratios = np.concatenate(log_ratios)
    assert np.sum(ratios == 0) == 1 and np.all(np.abs(ratios[ratios != 0]) > 1e-3)  # no near-ties
    assert sorted(set(wins)) != [0]  # some classes win, so a constant 0 would fail
    np.testing.assert_array_equal(reward.score(items), np.array(wins, dtype=float))
    margin = paper_objective("clip_margin", clip=reward.clip)
    np.testing.assert_allclose(margin.score(items), [m.mean() for m in margins], rtol=1e-4, atol=1e-7)


def test_reward_counts_masks_on_their_objects_and_not_swapped_ones(colour_clip):
    reward = paper_objective("clip_reward", clip_model=colour_clip, device="cpu")
    image = two_colour_image()
    right = item(image, ["red", "blue"], column_maps((0, 4), (4, 8)))
    swapped = item(image, ["red", "blue"], column_maps((4, 8), (0, 4)))
    alone = item(image, ["red"], column_maps((0, 4)))  # one candidate: P = 1 everywhere
    np.testing.assert_array_equal(reward.score([right, swapped, alone]), [2.0, 0.0, 0.0])


def test_margin_orders_perfect_above_shifted_above_empty(colour_clip):
    margin = paper_objective("clip_margin", clip_model=colour_clip, device="cpu")
    image = two_colour_image()
    perfect = item(image, ["red", "blue"], column_maps((0, 4), (4, 8)))
    shifted = item(image, ["red", "blue"], column_maps((1, 5), (3, 7)))  # each overlaps the other colour
    empty = item(image, ["red", "blue"], np.zeros((2, 8, 8), dtype=np.float32))
    scores = margin.score([perfect, shifted, empty])
    assert scores[0] - scores[1] > 0.1 and scores[1] - scores[2] > 0.1
    assert scores[2] == 0.0  # an empty mask is the black image: no margin
    assert 0.3 < scores[0] < 0.5  # unsaturated: P(k | crop) about 0.88 against 0.5 on black


def test_contrastive_uses_the_vocabulary_and_scores_single_candidates(colour_clip):
    contrastive = paper_objective("clip_contrastive", clip_model=colour_clip, device="cpu")
    vocabulary = ("cat", "red", "dog", "blue")
    image = two_colour_image()
    good = item(image, ["red"], column_maps((0, 4)), vocabulary=vocabulary)
    bad = item(image, ["red"], column_maps((4, 8)), vocabulary=vocabulary)
    empty = item(image, ["red"], np.zeros((1, 8, 8), np.float32), vocabulary=vocabulary)
    scores = contrastive.score([good, bad, empty])
    assert scores[0] > 0 > scores[1] and scores[2] == 0.0
    # by hand for the good mask: the crop is the red image; softmax over the four names
    clip = contrastive.clip
    red_only = image.copy()
    red_only[:, SIZE // 2 :] = 0
    logp = lambda e: torch.log_softmax(100 * e @ clip.text_embeddings(vocabulary).T, -1)  # noqa: E731
    expected = logp(clip.image_embeddings([red_only]))[0, 1] - logp(clip.black_embedding[None])[0, 1]
    assert scores[0] == pytest.approx(float(expected), rel=1e-4)
    # with the candidates as the only names the same single-class image carries no signal
    assert paper_objective("clip_reward", clip=clip).score([good])[0] == 0.0


def test_masks_reach_clip_batched_across_items(colour_clip):
    scorer = ClipScorer(colour_clip, device="cpu", batch_size=4)
    calls = []
    original = scorer.image_embeddings

    def recording(images):
        calls.append(len(images))
        return original(images)

    scorer.image_embeddings = recording
    reward = paper_objective("clip_reward", clip=scorer)
    images = [two_colour_image() for _ in range(3)]
    for i, image in enumerate(images):
        image[0, 0] = i  # three different images
    items = [item(image, ["red", "blue"], column_maps((0, 4), (4, 8))) for image in images]
    reward.score(items)
    assert calls[1:] == [4, 2]  # 6 masked images of 3 items in chunks of 4 (calls[0]: black image)


def test_a_crop_seen_before_is_not_embedded_again(tiny_clip, rng):
    images = [random_image(rng, SIZE, SIZE) for _ in range(2)]
    maps = [rng.random((3, 8, 8)).astype(np.float32) for _ in images]
    items = [item(im, ["cat", "dog", "sky"], m, threshold=0.4) for im, m in zip(images, maps)]
    reward = paper_objective("clip_reward", clip_model=tiny_clip, device="cpu", batch_size=4)
    first = reward.score(items)
    embedded = reward.crops_embedded
    assert embedded == 6
    np.testing.assert_array_equal(reward.score(items), first)  # a revisited config: no CLIP run
    assert reward.crops_embedded == embedded
    # a threshold that keeps the same patches (no map value between the two) reuses the crops too
    below = 0.4 - 1e-4
    for m in maps:  # the threshold compares min-max normalised map values
        flat = m.reshape(3, -1)
        norm = (flat - flat.min(1, keepdims=True)) / np.ptp(flat, axis=1, keepdims=True)
        assert not ((norm >= below) & (norm < 0.4)).any()
    same = [item(im, ["cat", "dog", "sky"], m, threshold=below) for im, m in zip(images, maps)]
    reward.score(same)
    assert reward.crops_embedded == embedded
    # another threshold makes new masks, and a fresh objective gives the memo's values
    other = [item(im, ["cat", "dog", "sky"], m, threshold=0.7) for im, m in zip(images, maps)]
    reward.score(other)
    assert reward.crops_embedded > embedded
    fresh = paper_objective("clip_reward", clip_model=tiny_clip, device="cpu", batch_size=4)
    np.testing.assert_array_equal(fresh.score(items), first)
    # the same crop twice in one call: embedded once
    twice = paper_objective("clip_reward", clip=fresh.clip)
    twice.score([items[0], items[0]])
    assert twice.crops_embedded == 3


def test_clip_scorer_caches_text_and_errors(colour_clip, tmp_path):
    scorer = ClipScorer(colour_clip, device="cpu")
    first = scorer.text_embeddings(["red", "blue"])
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))

    def no_more_text(**_kwargs):
        raise AssertionError("a cached name went through the text encoder again")

    scorer.model.get_text_features = no_more_text
    torch.testing.assert_close(scorer.text_embeddings(["blue", "red", "blue"]), first[[1, 0, 1]])
    assert scorer.input_size == SIZE and scorer.logit_scale() == 100.0
    with pytest.raises(ValueError, match="logit_scale"):
        scorer.logit_scale("temperature")
    with pytest.raises(OSError, match="could not load the CLIP model"):
        ClipScorer(str(tmp_path / "missing"), device="cpu")


# --- supervised metrics ---------------------------------------------------------------------------------
GT = np.array([[0, 0, 1, 1],
               [0, 0, 1, 1],
               [2, 2, 1, 255],
               [2, 2, 2, 2]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 1],
                 [2, 0, 1, 3],
                 [2, 2, 2, 3]])


def test_confusion_matrix_and_miou_by_hand():
    cm = confusion_matrix(PRED, GT, num_classes=5)
    # rows = ground truth, columns = prediction; the pixel with gt 255 is not counted
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[0, :2] = [3, 1]
    expected[1, 1] = 5
    expected[2, [0, 2, 3]] = [1, 4, 1]
    np.testing.assert_array_equal(cm, expected)
    scores = miou(cm)
    # IoU = TP / (gt + pred - TP): class 0: 3/(4+4-3); 1: 5/(5+6-5); 2: 4/(6+4-4); 3: 0/(0+1-0)
    np.testing.assert_allclose(scores.per_class_iou[:4], [3 / 5, 5 / 6, 4 / 6, 0.0])
    assert np.isnan(scores.per_class_iou[4])  # in neither ground truth nor prediction
    # class 3 is predicted but not in the ground truth: not part of the mean
    assert scores.miou == pytest.approx((3 / 5 + 5 / 6 + 4 / 6) / 3)
    assert scores.pixel_accuracy == pytest.approx(12 / 15)
    # accumulation over images is addition
    both = confusion_matrix(np.concatenate([PRED, PRED[::-1]]), np.concatenate([GT, GT[::-1]]), 5)
    np.testing.assert_array_equal(both, cm + confusion_matrix(PRED[::-1], GT[::-1], 5))


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="predicted class id 5 is outside 0..4"):
        confusion_matrix(np.where(PRED == 3, 5, PRED), GT, num_classes=5)
    with pytest.raises(ValueError, match="ground-truth class id 7"):
        confusion_matrix(PRED, np.where(GT == 2, 7, GT), num_classes=5)
    pred = PRED.copy()
    pred[2, 3] = 200  # under an ignored ground-truth pixel: never looked at
    assert confusion_matrix(pred, GT, num_classes=5).sum() == 15
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:3], GT, num_classes=5)


def test_miou_supervised_maps_labels_through_the_dataset_names():
    label_names = ("background", "cat", "dog", "sky")
    # the segmenter saw candidates (sky, cat): label 1 = sky, label 2 = cat
    label_map = np.array([[1, 1, 2, 2],
                          [1, 0, 2, 2],
                          [0, 0, 0, 0],
                          [0, 0, 0, 0]])
    labels = np.array([[3, 3, 1, 1],
                       [3, 3, 1, 255],
                       [0, 0, 0, 0],
                       [0, 0, 2, 2]])
    np.testing.assert_array_equal(to_class_ids(label_map, ("sky", "cat"), label_names)[:2],
                                  [[3, 3, 1, 1], [3, 0, 1, 1]])
    objective = get_objective("miou_supervised", device="cpu")
    base = ScoreInput(image=np.zeros((4, 4, 3), np.uint8), class_names=("sky", "cat"), maps=np.zeros(
        (2, 2, 2)), label_map=label_map, threshold=0.5, labels=labels, label_names=label_names)
    # IoU = TP / (gt + pred - TP), the ignored pixel left out:
    # background 6/(6+9-6); cat 3/(3+3-3); dog 0/(2+0-0); sky 3/(4+3-3)
    expected = (6 / 9 + 1.0 + 0.0 + 3 / 4) / 4
    assert objective.score([base])[0] == pytest.approx(expected)
    # without label_names the vocabulary is read the same way
    via_vocabulary = ScoreInput(**{**base.__dict__, "label_names": (), "vocabulary": label_names})
    assert objective.score([via_vocabulary])[0] == pytest.approx(expected)
    # a dataset without background: predicted background is a miss of the true class
    no_bg = ScoreInput(**{**base.__dict__, "label_names": ("cat", "sky"),
                          "labels": np.where(labels == 3, 1, np.where(labels == 1, 0, 255))})
    # cat (id 0): pixels (0,2),(0,3),(1,2) all predicted cat -> 3/3; sky (id 1): 3 of 4 -> 3/4
    assert objective.score([no_bg])[0] == pytest.approx((1.0 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="needs pixel labels"):
        objective.score([ScoreInput(**{**base.__dict__, "labels": None})])


def test_describe_objectives_lists_label_use():
    rows = {row.name: row for row in describe_objectives()}
    assert {"clip_reward", "clip_margin", "clip_contrastive", "miou_supervised"} <= set(rows)
    for name in ("clip_reward", "clip_margin", "clip_contrastive"):
        assert rows[name].labels == "none" and rows[name].models == ("clip",)
        assert rows[name].direction == "maximize" and rows[name].summary
    assert rows["miou_supervised"].labels == "pixel"
    assert "SUPERVISED" in rows["miou_supervised"].summary
    name, direction, models, labels, summary = rows["clip_reward"]  # rows unpack as tuples
    assert "P(k | M_k * I) > P(k | black image)" in summary
    with pytest.raises(ValueError, match="unknown objective 'clip_rewrd'.*clip_reward"):
        get_objective("clip_rewrd")


def test_score_input_from_a_segmentation_result_keeps_candidates_only():
    from segmenter import SegmentationResult

    maps = np.stack([np.full((2, 2), v, np.float32) for v in (1.0, 0.0, 3.0)])  # cat, dog (left out), sky
    result = SegmentationResult(label_map=np.array([[0, 1], [3, 3]]), maps=maps,
                                class_names=("cat", "dog", "sky"), candidates=("cat", "sky"))
    scored = ScoreInput.from_result(np.zeros((2, 2, 3), np.uint8), result, 0.15,
                                    vocabulary=("cat", "dog", "sky"))
    assert scored.class_names == ("cat", "sky")
    np.testing.assert_array_equal(scored.maps[:, 0, 0], [1.0, 3.0])
    np.testing.assert_array_equal(scored.label_map, [[0, 1], [2, 2]])
    assert scored.vocabulary == ("cat", "dog", "sky") and scored.threshold == 0.15
