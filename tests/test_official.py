"""The `official` preset: each difference from the authors' PnP-OVSS code it restores (issue 16).

One test per row of README's "Differences from the authors' code" table that the segmenter owns:
[ENC] as the ITM token, round 1 counted twice, token-level Salience Dropout scores, joined class
names, float32, align_corners=True; then the preset's ways in (YAML, study spec, CLI).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, save_tiny_blip

from segmenter import Segmenter, SegmenterConfig, prompt_for, salience_dropout
from segmenter.backends import Backend, build_prompt
from segmenter.backends.blip import BlipBackend
from segmenter.pipeline import postprocess, upsample

CLASSES = ["cat", "traffic light", "potted plant"]


@pytest.fixture(scope="module")
def enc_blip(tmp_path_factory) -> str:
    """A tiny BLIP whose tokenizer has BLIP's [ENC] token."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip-enc"), enc=True)


def tiny(model: str, **changes) -> SegmenterConfig:
    return SegmenterConfig.preset("official", model=model, image_size=32, layer=2, heads=(1,), **changes)


def record_first_ids(backend: BlipBackend) -> list[torch.Tensor]:
    """The input ids of every text-encoder pass of `backend`, recorded by a pre-hook."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.clone())

    backend.model.text_encoder.embeddings.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# -- row 1: [ENC] -------------------------------------------------------------------------------------
def test_official_preset_starts_every_itm_caption_with_enc(enc_blip, rng):
    seg = Segmenter(tiny(enc_blip, dropout_rounds=2))
    seen = record_first_ids(seg.backend)
    seg.segment(random_image(rng, 32, 32), CLASSES)
    enc = seg.backend.tokenizer.convert_tokens_to_ids("[ENC]")
    pixels = seg.backend.prepare_images([random_image(rng, 32, 32)], 32)
    seg.backend.itm_scores(pixels, ["a picture of cat"])  # the candidates' and itm_match's passes
    seg.backend.itm_pair_scores(pixels, ["a picture of cat"])
    assert len(seen) == 4 and all(ids[:, 0].eq(enc).all() for ids in seen)
    assert all((ids[:, 1:] != enc).all() for ids in seen)  # only the first token changes


def test_enc_changes_the_maps_and_default_keeps_cls(enc_blip, rng):
    image = random_image(rng, 32, 32)
    official = Segmenter(tiny(enc_blip, dropout_rounds=1))
    ours = Segmenter(tiny(enc_blip, dropout_rounds=1, itm_token="cls"),
                     backend=BlipBackend(enc_blip, device="cpu"))
    seen = record_first_ids(ours.backend)
    a = official.relevance_maps([image], [CLASSES])[0]
    b = ours.relevance_maps([image], [CLASSES])[0]
    assert seen[0][0, 0] == ours.backend.tokenizer.cls_token_id
    assert np.abs(a - b).sum() > 0.05 * np.abs(b).sum()  # a different token, different maps


def test_a_tokenizer_without_enc_warns_once_and_keeps_cls(tiny_blip, rng, caplog):
    seg = Segmenter(tiny(tiny_blip, dropout_rounds=2))
    seen = record_first_ids(seg.backend)
    with caplog.at_level(logging.WARNING, logger="ovss_tune.segmenter"):
        seg.segment(random_image(rng, 32, 32), CLASSES)
        seg.segment(random_image(rng, 32, 32), CLASSES)
    warnings = [r for r in caplog.records if "[ENC]" in r.getMessage()]
    assert len(warnings) == 1 and "[CLS]" in warnings[0].getMessage()
    assert all(ids[:, 0].eq(seg.backend.tokenizer.cls_token_id).all() for ids in seen)


# -- rows 3 and 4: Salience Dropout -------------------------------------------------------------------
class StubBackend(Backend):
    """Round r's maps are `values[r]` everywhere outside the dropped patches; a 2x2 grid.

    With token_salience, the extra row is `salience` (a fixed [4] score per patch)."""

    name = "stub"
    model_id, revision, device = "stub", None, torch.device("cpu")

    def __init__(self, values, salience=None, class_maps=None):
        self.values, self.salience, self.class_maps, self.calls = values, salience, class_maps, []

    num_layers = property(lambda self: 2)
    num_heads = property(lambda self: 2)

    def patch_grid(self, image_size):
        return 2, 2

    def prepare_images(self, images, image_size):
        return torch.zeros(len(images), 3, 2, 2)

    def gradcam(self, pixel_values, prompts, layers, dropped=None, *, itm_token=None, token_salience=False):
        r = len(self.calls)
        self.calls.append((None if dropped is None else dropped.clone(), token_salience))
        out = []
        for p in prompts:
            if self.class_maps is not None:
                maps = torch.as_tensor(self.class_maps, dtype=torch.float32).view(-1, 2, 2)
            else:
                maps = torch.full((len(p.class_names), 2, 2), float(self.values[r]))
            if token_salience:
                maps = torch.cat([maps, torch.as_tensor(self.salience, dtype=torch.float32).view(1, 2, 2)])
            out.append(maps.expand(1, 2, *maps.shape).clone())  # [L, heads, C (+1), 2, 2]
        return out


def test_official_sum_counts_round_one_twice():
    values = [1.0, 10.0, 100.0, 1000.0]
    config = SegmenterConfig.preset("official", heads=(0,), dropout_rounds=4, dropout_k=1)
    backend = StubBackend(values, salience=[4.0, 3.0, 2.0, 1.0])
    total = salience_dropout(backend, torch.zeros(1, 3, 2, 2), [build_prompt("a ", ["cat"])], config)[0]
    # patch 0 is dropped after round 1, patch 1 after round 2, patch 2 after round 3
    expected = [2 * 1.0, 2 * 1.0 + 10.0, 2 * 1.0 + 10.0 + 100.0, 2 * 1.0 + 10.0 + 100.0 + 1000.0]
    np.testing.assert_allclose(total[0].flatten().numpy(), expected)
    ours = salience_dropout(StubBackend(values, salience=[4.0, 3.0, 2.0, 1.0]), torch.zeros(1, 3, 2, 2),
                            [build_prompt("a ", ["cat"])], config.replace(dropout_count_first_twice=False))[0]
    assert float(ours[0, 1, 1]) == 1.0 + 10.0 + 100.0 + 1000.0  # ours: once


def test_token_level_salience_drops_the_patch_a_three_piece_name_points_at():
    """`cat` is hot at patch 0 (1.0); each of the 3 pieces of `triangles` at patch 1 (0.5).

    Class-averaged maps sum to 1.0 at patch 0 and 0.5 at patch 1: ours drops patch 0. The
    authors' token-level score counts the 3 pieces: 1.5 at patch 1, which they drop."""
    class_maps = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]]  # cat, triangles (pieces averaged)
    token_score = [1.0, 1.5, 0.0, 0.0]  # cat + tri + ##angle + ##s
    prompts = [build_prompt("a picture of ", ["cat", "triangles"])]
    for rule, first in (("tokens", 1), ("classes", 0)):
        backend = StubBackend([0] * 2, salience=token_score, class_maps=class_maps)
        config = SegmenterConfig(heads=(0,), dropout_rounds=2, dropout_k=1, dropout_salience=rule)
        salience_dropout(backend, torch.zeros(1, 3, 2, 2), prompts, config)
        assert backend.calls[0][1] is (rule == "tokens")
        assert torch.nonzero(backend.calls[1][0][0]).flatten().tolist() == [first]


def test_blip_token_salience_row_sums_word_pieces_and_sep_of_shorter_captions(tiny_blip, rng):
    backend = BlipBackend(tiny_blip, device="cpu")
    pixels = backend.prepare_images([random_image(rng, 32, 32) for _ in range(2)], 32)
    long, short = build_prompt("a picture of ", ["cat", "triangles"]), build_prompt("a picture of ", ["cat"])
    plain = backend.gradcam(pixels, [long, short], [2])
    scored = backend.gradcam(pixels, [long, short], [2], token_salience=True)
    for p, a, b in zip((long, short), plain, scored):
        assert b.shape[2] == len(p.class_names) + 1
        torch.testing.assert_close(b[:, :, :-1], a)  # the class maps are unchanged
    # the longest caption: cat once, the three pieces of `triangles` (tri ##angle ##s) three times
    torch.testing.assert_close(scored[0][0, :, 2], plain[0][0, :, 0] + 3 * plain[0][0, :, 1])
    # the shorter caption adds its [SEP] row: a non-negative map, not zero
    sep = scored[1][0, :, 1] - plain[1][0, :, 0]
    assert sep.min() >= -1e-6 and sep.abs().sum() > 0


# -- row 5: joined names ------------------------------------------------------------------------------
def test_voc_official_names_give_the_official_caption():
    from tuner.datasets._classes import builtin_classes

    voc = list(builtin_classes("voc").names[1:])  # the VOC dataset's names, without background
    config = SegmenterConfig.preset("official", dataset="voc")
    official = ("aeroplane bicycle bird boat bottle bus car cat chair cow table dog horse motorbike "
                "person pottedplant sheep sofa train tvmonitor")
    prompt = prompt_for(config, voc)
    assert prompt.text == "a picture of " + official
    assert prompt.class_names == tuple(voc)  # the outputs keep the given names
    assert [prompt.text[s:e] for s, e in prompt.spans][10] == "table"
    assert prompt_for(SegmenterConfig(), voc).text.endswith(
        "dining table dog horse motorbike person potted plant sheep sofa train television monitor")


def test_joined_spelling_removes_spaces_and_hyphens_like_the_ade_and_coco_lists():
    config = SegmenterConfig.preset("official", dataset="ade20k")
    assert prompt_for(config, ["chest of drawers", "hair-drier", "cat"]).text == (
        "a picture of chestofdrawers hairdrier cat")
    with pytest.raises(ValueError, match="no caption word"):
        prompt_for(config, ["-"])


def test_joined_names_reach_the_model_as_other_tokens(tiny_blip, rng):
    image = random_image(rng, 32, 32)
    joined = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,),
                                       dropout_rounds=1, class_spelling="joined"))
    seen = record_first_ids(joined.backend)
    joined.relevance_maps([image], [["potted plant"]])
    words = joined.backend.tokenizer.convert_ids_to_tokens(seen[0][0].tolist())
    assert "potted" not in words and "plant" not in words  # `pottedplant` is one unknown word here


# -- rows 7 and 8: float32, align_corners ---------------------------------------------------------------
def test_the_preset_runs_in_float32_and_the_config_dtype_reaches_the_model(tiny_blip):
    from segmenter.backends.blip import resolve_dtype

    assert SegmenterConfig.preset("official").dtype == "float32"
    assert resolve_dtype(SegmenterConfig.preset("official").dtype, torch.device("cuda")) == torch.float32
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dtype="bfloat16"))
    assert seg.backend.dtype == torch.bfloat16
    assert Segmenter(tiny(tiny_blip)).backend.dtype == torch.float32


def test_official_upsampling_aligns_corners():
    grid = np.zeros((1, 21, 21), dtype=np.float32)
    grid[0, :3, :3] = 1.0  # a corner blob
    aligned = upsample(grid, (375, 500), align_corners=True)
    expected = F.interpolate(torch.from_numpy(grid)[None], size=(375, 500), mode="bilinear",
                             align_corners=True)[0].numpy()
    np.testing.assert_allclose(aligned, expected)
    ours = upsample(grid, (375, 500))
    assert (aligned > 0).sum() < 0.9 * (ours > 0).sum()  # 4275 vs 5146 px: the blob's support shrinks
    image = np.zeros((375, 500, 3), dtype=np.uint8)
    config = SegmenterConfig.preset("official", crf=False, blur_sigma=0.0, threshold=0.5)
    assert not np.array_equal(postprocess(image, grid, config), postprocess(image, grid, config.replace(
        align_corners=False)))


# -- the preset's ways in -----------------------------------------------------------------------------
def test_preset_in_yaml_and_its_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: official\nlayer: 7\n")
    config = SegmenterConfig.from_yaml(path, dataset="voc")
    assert config == SegmenterConfig.preset("official", dataset="voc", layer=7)
    assert config.itm_token == "enc" and config.dropout_count_first_twice and config.align_corners
    assert SegmenterConfig.from_yaml(config.to_yaml()) == config  # exported configs keep every field
    with pytest.raises(ValueError, match="unknown preset"):
        SegmenterConfig.from_yaml("preset: offical\nlayer: 7\n")
    assert SegmenterConfig.preset("default") == SegmenterConfig()


def test_study_spec_takes_a_preset_and_tune_run_preset_overrides_it(tmp_path, tiny_blip):
    from tuner.spec import load_spec, parse_spec

    data = {"dataset": "voc", "preset": "official", "fixed": {"model": tiny_blip, "threshold": 0.2},
            "search_space": {"layer": {"type": "int", "low": 1, "high": 2}}}
    spec = parse_spec(data)
    assert spec.fixed.itm_token == "enc" and spec.fixed.threshold == 0.2
    assert dict(spec.fixed.prompt_aliases)["dining table"] == "table"
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**data, "preset": "default"}))
    assert load_spec(path).fixed.itm_token == "cls"
    assert load_spec(path, preset="official").fixed.itm_token == "enc"
    from tuner.spec import SpecError

    for bad in ("offical", ["official"]):  # the key the user wrote is named, not `fixed`
        with pytest.raises(SpecError, match=r": preset: unknown preset"):
            parse_spec({**data, "preset": bad})


def test_map_cache_keys_tell_the_official_settings_apart(tiny_blip, tmp_path, rng):
    from tuner.cache import MapCache
    from tuner.datasets import Sample
    from tuner.trial import MapProvider, TuningImage

    backend = BlipBackend(tiny_blip, device="cpu")
    provider = MapProvider(backend, MapCache(tmp_path / "cache"))
    image = TuningImage(Sample(id="a", image=random_image(rng, 32, 32), labels=None), "digest")
    base = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, dropout_rounds=2)
    keys = {provider._key(base.replace(**change), image.digest, ["cat"]) for change in (
        {}, {"itm_token": "enc"}, {"class_spelling": "joined"}, {"dropout_salience": "tokens"},
        {"prompt_aliases": {"cat": "kitty"}}, {"dropout_count_first_twice": True})}
    assert len(keys) == 6


def test_a_studys_models_follow_the_config_dtype(tmp_path, tiny_blip, tiny_clip):
    """The official preset's float32 reaches BLIP and the objective's CLIP (bfloat16 shows it on CPU)."""
    from conftest import write_spec

    from tuner.spec import load_spec
    from tuner.study import RunOptions, StudyRunner

    path = write_spec(tmp_path, tiny_blip, tiny_clip, images=2, trials=1)
    spec = load_spec(path)
    spec = spec.replace(fixed=spec.fixed.replace(dtype="bfloat16"))
    runner = StudyRunner(spec, RunOptions(storage=f"sqlite:///{tmp_path}/t.db", device="cpu", cache_dir=None,
                                          progress=False))
    try:
        assert runner.backend.dtype == torch.bfloat16 and runner.objective.clip.dtype == torch.bfloat16
    finally:
        runner.close()


def test_two_classes_with_one_caption_word_are_refused():
    with pytest.raises(ValueError, match="both be written 'table'"):
        prompt_for(SegmenterConfig.preset("official", dataset="voc"), ["dining table", "table"])
    with pytest.raises(ValueError, match="both be written"):
        prompt_for(SegmenterConfig(prompt_aliases={"cat": "dog"}), ["cat", "dog"])
    # a repeated name is one class twice, as before
    assert prompt_for(SegmenterConfig(), ["cat", "cat"]).text == "a picture of cat cat"
