"""The `file` candidate rule: per-image class lists from a JSON file (ids, names, errors, ledger)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image, write_spec
from PIL import Image

from segmenter import Segmenter, SegmenterConfig
from segmenter.backends.blip import BlipBackend
from segmenter.candidate_file import load_candidate_file
from segmenter.config import read_provenance
from segmenter.pipeline import postprocess
from tuner.cli import main
from tuner.datasets import builtin_classes, load_dataset

VOCABULARY = ("cat", "blue", "red", "dog")


def write_lists(path: Path, lists: dict) -> str:
    path.write_text(json.dumps(lists))
    return str(path)


@pytest.fixture(scope="module")
def blip(tiny_blip) -> BlipBackend:
    return BlipBackend(tiny_blip, device="cpu")


def test_reads_a_json_and_segments_only_the_listed_classes(tmp_path, tiny_blip, blip, rng):
    lists = write_lists(tmp_path / "lists.json", {"a.jpg": ["Dog", "cat"], "b": [], "unused": ["red"]})
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=2,
                             dropout_k=2, candidates="file", candidates_file=lists)
    seg = Segmenter(config, backend=blip)
    image = random_image(rng, 30, 36)
    first, second = seg.segment_batch([image, image], [VOCABULARY, VOCABULARY], image_ids=["a", "b.png"])
    # the listed names, matched ignoring case, in the vocabulary's order; maps indexed by the caller's list
    assert first.candidates == ("cat", "dog") and first.class_names == VOCABULARY
    maps = seg.relevance_maps([image], [["cat", "dog"]])[0]
    np.testing.assert_allclose(first.maps[[0, 3]], maps, rtol=1e-6)
    assert not first.maps[[1, 2]].any()
    expected = np.array([0, 1, 4])[postprocess(image, maps, config)]
    np.testing.assert_array_equal(first.label_map, expected)
    # an empty list: no class in the image, all background
    assert second.candidates == () and not second.label_map.any()
    # one image through `segment`, and the id is required
    assert seg.segment(image, VOCABULARY, image_id="a").candidates == ("cat", "dog")
    with pytest.raises(ValueError, match="needs each image's id"):
        seg.segment(image, VOCABULARY)


def test_rejects_an_id_the_file_lacks_naming_it_and_counting(tmp_path):
    lists = load_candidate_file(write_lists(tmp_path / "l.json", {"img1": ["cat"], "img2": []}))
    with pytest.raises(ValueError, match=r"no class list for 2 of the 3 images of this run; the first: "
                                         r"'img3', 'img4'\. Add a list"):
        lists.check(["img1", "img3", "img4"], VOCABULARY)
    with pytest.raises(ValueError, match=r"no class list for image 'img9'"):
        lists.indices("img9", VOCABULARY)
    lists.check(["img2"], VOCABULARY)  # ids in the file but not in the run are fine


def test_rejects_an_unknown_name_naming_it_and_the_image(tmp_path):
    lists = load_candidate_file(write_lists(tmp_path / "l.json", {"img1": ["cat"], "img2": ["cat", "zebra"]}))
    with pytest.raises(ValueError, match=r"class 'zebra' listed for image 'img2' in .* matches no class"):
        lists.check(["img1", "img2"], VOCABULARY)
    # "background" is the background rule's, never a candidate
    lists = load_candidate_file(write_lists(tmp_path / "b.json", {"img1": ["Background", "dog"]}))
    assert lists.indices("img1", VOCABULARY) == [3]


def test_joined_names_and_synonyms_match_the_vocabulary(tmp_path):
    voc = builtin_classes("voc").take(1)  # VOC-20, with its synonyms
    lists = load_candidate_file(write_lists(tmp_path / "voc.json", {
        # the official lists' spellings: joined words, VOC's own names, another case
        "2007_000559": ["bottle", "table", "person", "tvmonitor"],
        "2007_000661": ["sofa", "pottedplant", "chair", "Aeroplane"],
        "2007_000830": ["diningtable", "Potted-Plant", "motorcycle", "TV Monitor"],
    }))
    names = lambda i: [voc.names[k] for k in lists.indices(i, voc.names, voc.synonyms)]  # noqa: E731
    assert names("2007_000559") == ["bottle", "dining table", "person", "television monitor"]
    assert names("2007_000661") == ["aeroplane", "chair", "potted plant", "sofa"]
    assert names("2007_000830") == ["dining table", "motorbike", "potted plant", "television monitor"]
    # without synonyms (tune segment's --classes) joined spellings still match spaced names
    plain = ("dining table", "potted plant", "person")
    only_joined = load_candidate_file(write_lists(tmp_path / "j.json", {"x": ["diningtable", "PottedPlant"]}))
    assert only_joined.indices("x", plain) == [0, 1]


def test_ids_match_without_suffix_and_by_file_name_where_unambiguous(tmp_path):
    lists = load_candidate_file(write_lists(tmp_path / "ids.json", {
        "JPEGImages/2007_000033.jpg": ["cat"], "0001": ["dog"], ".\\cam3\\0002.png": ["red"],
        "x/dup.jpg": ["cat"], "y/dup.jpg": ["dog"],
    }))
    assert lists.indices("2007_000033", VOCABULARY) == [0]  # a dataset id, a key with folders
    assert lists.indices("cam1/0001.jpg", VOCABULARY) == [3]  # tune segment's id, a flat key
    assert lists.indices("cam3/0002.jpg", VOCABULARY) == [2]  # \ and ./ read as paths, suffix ignored
    with pytest.raises(ValueError, match=r"no class list for image 'cam4/0002.jpg'"):
        lists.indices("cam4/0002.jpg", VOCABULARY)  # both sides have folders: no guess by file name
    with pytest.raises(ValueError, match=r"image 'dup' fits 2 keys"):
        lists.indices("dup", VOCABULARY)
    with pytest.raises(ValueError, match=r"images 'cam1/0001.jpg' and 'cam2/0001.jpg' both match key '0001'"):
        lists.check(["cam1/0001.jpg", "cam2/0001.jpg"], VOCABULARY)


@pytest.mark.parametrize("content, message", [
    (None, "candidates_file not found"),
    ("{'a': ['cat']}", "is not JSON"),
    ('["cat", "dog"]', "holds a JSON list, not an object of image ids"),
    ('{"2007_000033": "[1: \'aeroplane\'], [100%]"}', "maps to the text .* official GPT-4o"),
    ('{"a": ["cat", 3]}', "image 'a' maps to .* not a list of class names"),
    ('{"a": ["cat"], "a": ["dog"]}', "lists image 'a' twice with different classes"),
    ('{"a": ["cat", " "]}', "holds an empty class name"),
])
def test_bad_files_are_refused_with_what_to_write(tmp_path, content, message):
    path = tmp_path / "lists.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_candidate_file(path)


def test_config_requires_the_file_and_resolves_it_beside_the_yaml(tmp_path):
    with pytest.raises(ValueError, match="candidates_file=None: is required by candidates: file"):
        SegmenterConfig(candidates="file")
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "c.yaml").write_text("model: m\ncandidates: file\ncandidates_file: lists/gpt4o.json\n")
    config = SegmenterConfig.from_yaml(folder / "c.yaml")
    assert config.candidates_file == str(folder / "lists" / "gpt4o.json")
    assert SegmenterConfig.from_yaml(config.to_yaml()) == config  # text round-trips unchanged


def test_segment_cli_reads_lists_by_relative_path_and_refuses_a_missing_id(tmp_path, tiny_blip, rng, capsys):
    inputs = tmp_path / "in"
    for name in ("cam1/0001.jpg", "cam2/0001.jpg"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(rng, 24, 30)).save(inputs / name)
    write_lists(tmp_path / "lists.json", {"cam1/0001": ["dog"], "cam2/0001.jpg": ["cat", "dog"]})
    config_file = tmp_path / "best.yaml"
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=1, crf=False,
                             candidates="file", candidates_file="lists.json")  # beside the config
    config_file.write_text(config.to_yaml())
    args = ["segment", "--config", str(config_file), "--classes", "cat,dog,person", str(inputs),
            "--out", str(tmp_path / "out"), "--save-maps", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    one = np.load(tmp_path / "out" / "cam1" / "0001.jpg_maps.npz")["maps"]
    two = np.load(tmp_path / "out" / "cam2" / "0001.jpg_maps.npz")["maps"]
    assert one[[0, 2]].sum() == 0 and one[1].any()  # only dog
    assert two[2].sum() == 0 and two[[0, 1]].any()  # cat and dog
    write_lists(tmp_path / "lists.json", {"cam1/0001": ["dog"]})
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no class list for 1 of the 2 input images" in err and "'cam2/0001.jpg'" in err


def test_study_records_the_file_and_its_hash_and_refuses_a_changed_file(tmp_path, tiny_blip, tiny_clip,
                                                                        capsys):
    shapes = load_dataset("shapes", size=40)
    names = shapes.vocabulary
    lists = {i: [names[k % 8], names[(k + 3) % 8].upper()] if k % 5 else [] for k, i in
             enumerate(shapes.ids("train"))}
    lists_file = tmp_path / "lists.json"
    write_lists(lists_file, lists)
    fixed = {"model": tiny_blip, "image_size": 32, "layer": 2, "heads": [1], "dropout_rounds": 1,
             "crf_iterations": 2, "candidates": "file", "candidates_file": "lists.json"}  # beside the spec
    spec = write_spec(tmp_path, tiny_blip, tiny_clip, images=4, trials=2, fixed=fixed)
    storage = f"sqlite:///{tmp_path}/tune.db"
    run = ["run", "--study-file", str(spec), "--storage", storage, "--cache-dir", str(tmp_path / "cache"),
           "--device", "cpu", "--no-progress"]
    assert main(run) == 0
    import optuna

    study = optuna.load_study(study_name="shapes-clip_margin", storage=storage)
    digest = hashlib.sha256(lists_file.read_bytes()).hexdigest()
    [source] = study.user_attrs["external_sources"]
    assert source["path"] == str(lists_file) and source["sha256"] == digest and source["images"] == 2000
    assert "image-level" not in study.user_attrs["labels_touched"]  # an external source, not labels
    assert study.user_attrs["definition"]["candidates_file_sha256"] == digest

    # the audit's ledger names the file and its hash
    out = tmp_path / "audit"
    assert main(["audit", "--study", "shapes-clip_margin", "--storage", storage, "--cache-dir",
                 str(tmp_path / "cache"), "--device", "cpu", "--no-progress", "-o", str(out)]) == 0
    ledger = json.loads((out / "audit.json").read_text())["ledger"]
    assert ledger["external_sources"] == [source]
    assert f"sha256 {digest}" in capsys.readouterr().out

    # the exported config names the file, its provenance the hash; tune eval records it too
    best = tmp_path / "best.yaml"
    assert main(["export", "--study", "shapes-clip_margin", "--storage", storage, "-o", str(best),
                 "--force"]) == 0
    assert SegmenterConfig.from_yaml(best).candidates_file == str(lists_file)
    assert read_provenance(best)["external_sources"] == [source]
    result = tmp_path / "eval.json"
    assert main(["eval", "--config", str(best), "--dataset", "shapes", "--split", "train", "--images", "3",
                 "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                 "-o", str(result)]) == 0
    assert json.loads(result.read_text())["external_sources"] == [source]

    # a changed file is another study: refused, the finished trials kept
    lists[shapes.ids("train")[0]] = ["circle"]
    write_lists(lists_file, lists)
    assert main([*run, "--trials", "3"]) == 2
    assert "candidates_file_sha256" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="shapes-clip_margin", storage=storage).trials) == 2

    # a file that lacks a tuning image is refused before any trial, naming it
    tuning = study.user_attrs["tuning_ids"]
    del lists[tuning[1]]
    write_lists(lists_file, lists)
    assert main([*run, "--study", "other"]) == 2
    err = capsys.readouterr().err
    assert "no class list for 1 of the" in err and repr(tuning[1]) in err
    assert not optuna.load_study(study_name="other", storage=storage).trials


def test_an_empty_list_is_background_in_trials_without_a_model_pass(tmp_path, tiny_blip, blip):
    from objectives import get_objective
    from segmenter.images import image_digest
    from tuner.cache import MapCache
    from tuner.trial import CandidatePicker, MapProvider, TrialRunner, TuningImage

    shapes = load_dataset("shapes", size=40)
    sample = shapes.load("val", shapes.ids("val")[0])
    assert sample.image_classes  # the image shows shapes; the file says it shows none
    lists = write_lists(tmp_path / "l.json", {sample.id: []})
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=1,
                             crf_iterations=2, candidates="file", candidates_file=lists)
    provider = MapProvider(blip, MapCache(None))
    runner = TrialRunner(shapes, [TuningImage(sample, image_digest(sample.image))], provider,
                         get_objective("miou_supervised"), CandidatePicker(shapes.vocabulary, blip))
    outcome = runner.evaluate(config)
    assert provider.model_runs == 0 and outcome.confusion[:, 1:].sum() == 0  # all predicted background
    assert outcome.confusion.sum() == sample.image.shape[0] * sample.image.shape[1]
    assert np.isfinite(outcome.value)
