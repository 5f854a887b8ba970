"""Candidate classes per image (label-free rules and the oracle) and their use in the Segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

from segmenter import (
    ClipScorer,
    Segmenter,
    SegmenterConfig,
    candidate_label_use,
    select_candidates,
)
from segmenter.backends.blip import BlipBackend
from segmenter.pipeline import postprocess

VOCABULARY = ("cat", "blue", "red", "dog")


def red_image(height: int = 32, width: int = 32) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = 255
    return image


@pytest.fixture(scope="module")
def blip(tiny_blip) -> BlipBackend:
    return BlipBackend(tiny_blip, device="cpu")


def test_all_and_label_use():
    image = red_image()
    assert select_candidates("all", image, VOCABULARY) == VOCABULARY
    assert candidate_label_use("oracle") == "image-level"
    assert {candidate_label_use(r) for r in ("all", "clip_topk", "itm_threshold")} == {"none"}
    assert SegmenterConfig(candidates="oracle").uses_image_labels
    assert not SegmenterConfig(candidates="clip_topk").uses_image_labels
    with pytest.raises(ValueError, match="unknown candidate rule 'gpt4o'"):
        select_candidates("gpt4o", image, VOCABULARY)


def test_clip_topk_keeps_the_most_similar_names_in_vocabulary_order(colour_clip):
    clip = ClipScorer(colour_clip, device="cpu")
    # the colour CLIP: a red image is closest to "red", then to names it knows nothing about
    # ("cat", "dog": the shared offset, tied, the vocabulary's first wins), last to "blue"
    assert select_candidates("clip_topk", red_image(), VOCABULARY, clip=clip, topk=1) == ("red",)
    assert select_candidates("clip_topk", red_image(), VOCABULARY, clip=clip, topk=2) == ("cat", "red")
    assert select_candidates("clip_topk", red_image(), VOCABULARY, clip=clip, topk=3) == (
        "cat", "red", "dog")
    assert select_candidates("clip_topk", red_image(), VOCABULARY, clip=clip, topk=9) == VOCABULARY
    blue = red_image()[..., ::-1]
    assert select_candidates("clip_topk", blue, VOCABULARY, clip=clip, topk=1) == ("blue",)
    with pytest.raises(ValueError, match="clip_topk' needs a CLIP model"):
        select_candidates("clip_topk", red_image(), VOCABULARY)


def test_itm_scores_equal_the_models_own_itm_head(tiny_blip, blip, rng):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    images = [random_image(rng, 32, 32), random_image(rng, 40, 24)]
    texts = ["a picture of " + name for name in VOCABULARY]
    pixels = blip.prepare_images(images, 32)
    ours = blip.itm_scores(pixels, texts, batch_size=3)  # pairs cut into uneven chunks
    assert ours.shape == (2, 4)
    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()
    tokens = AutoProcessor.from_pretrained(tiny_blip).tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        for b in range(2):
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixels[b : b + 1].expand(4, -1, -1, -1), use_itm_head=True)
            torch.testing.assert_close(ours[b], out.itm_score.softmax(-1)[:, 1], rtol=1e-4, atol=1e-6)


def test_itm_threshold_keeps_names_above_it_and_never_none(blip, rng):
    image = random_image(rng, 32, 32)
    probs = blip.itm_scores(blip.prepare_images([image], 32), [
        "a picture of " + n for n in VOCABULARY])[0].numpy()
    assert len(set(probs.round(6))) == 4  # distinct, so the expected sets below are defined
    middle = float(np.sort(probs)[1] + np.sort(probs)[2]) / 2  # between the 2nd and 3rd lowest
    above = tuple(n for n, p in zip(VOCABULARY, probs) if p >= middle)
    assert len(above) == 2
    pick = lambda t: select_candidates("itm_threshold", image, VOCABULARY, backend=blip,  # noqa: E731
                                       threshold=t, image_size=32)
    assert pick(middle) == above
    assert pick(0.0) == VOCABULARY
    assert pick(1.01) == (VOCABULARY[int(np.argmax(probs))],)  # none passes: the single best
    with pytest.raises(ValueError, match="itm_threshold' needs a backend"):
        select_candidates("itm_threshold", image, VOCABULARY)


def test_oracle_reads_image_labels_and_errors_without_them():
    image = red_image()
    assert select_candidates("oracle", image, VOCABULARY, image_classes=["dog", "cat", "background"]) == (
        "cat", "dog")
    with pytest.raises(ValueError, match="'oracle' needs image-level labels"):
        select_candidates("oracle", image, VOCABULARY)


def test_segmenter_with_clip_topk_indexes_the_callers_class_list(tiny_blip, colour_clip):
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=2,
                             dropout_k=2, candidates="clip_topk", candidates_topk=2,
                             candidates_model=colour_clip)
    seg = Segmenter(config)
    image = red_image(30, 36)
    result = seg.segment(image, list(VOCABULARY))
    assert result.class_names == VOCABULARY and result.candidates == ("cat", "red")
    assert seg.clip.model_id == colour_clip  # loaded from candidates_model, on first use
    # the pipeline ran on the candidates; maps and labels come back indexed by the caller's list
    maps = seg.relevance_maps([image], [["cat", "red"]])[0]
    assert result.maps.shape == (4, 4, 4)
    np.testing.assert_allclose(result.maps[[0, 2]], maps, rtol=1e-6)
    assert not result.maps[[1, 3]].any()  # blue, dog: not candidates
    on_candidates = postprocess(image, maps, config)  # 0 = bg, 1 = cat, 2 = red
    np.testing.assert_array_equal(result.label_map, np.array([0, 1, 3])[on_candidates])
    assert set(np.unique(result.label_map)) <= {0, 1, 3}
    # rule `all` runs on the whole list and says so
    plain = Segmenter(config.replace(candidates="all"), backend=seg.backend).segment(image, VOCABULARY)
    assert plain.candidates == plain.class_names == VOCABULARY and plain.maps.shape == (4, 4, 4)


def test_segmenter_oracle_needs_labels_and_skips_images_without_classes(tiny_blip, blip, rng):
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,),
                                    dropout_rounds=1, candidates="oracle"), backend=blip)
    image = random_image(rng, 32, 32)
    with pytest.raises(ValueError, match="'oracle' needs image-level labels"):
        seg.segment(image, VOCABULARY)
    results = seg.segment_batch([image, image], [VOCABULARY, VOCABULARY],
                                image_classes=[["dog"], []])
    assert results[0].candidates == ("dog",)
    assert set(np.unique(results[0].label_map)) <= {0, 4} and results[0].maps[:3].sum() == 0
    assert results[1].candidates == () and not results[1].label_map.any()
