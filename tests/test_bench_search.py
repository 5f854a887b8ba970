"""The search benchmark (issue 16, item 6) on tiny models: both runs search the same configs and agree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_search  # noqa: E402


@pytest.mark.parametrize("extra", [[], ["--stand-in"]], ids=["official", "stand-in"])
def test_reference_and_tune_run_search_the_same_configs_and_agree(tmp_path, capsys, extra):
    out = bench_search.main(["--size", "tiny", "--images", "2", "--trials", "5", "--json",
                             str(tmp_path / "s.json"), *extra])
    printed = capsys.readouterr().out
    assert "ratio a/b" in printed and "torch threads 1" in printed and "where (b)'s time goes" in printed
    assert ("STAND-IN" in printed) == bool(extra)
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(printed.strip().splitlines()[-1])
    assert out["trials"] == 5 and len({tuple(c.values()) for c in out["configs"]}) == 5
    # the reference evaluated tune run's configs: every trial's reward is the same both ways
    assert out["same_values"] == 5 and out["values_a"] == out["values_b"]
    a, b = out["a_reference"], out["b_tune_run"]
    assert a["model_passes"] == 5 * 2  # a full pass per trial and image
    layers = {c["layer"] for c in out["configs"]}
    assert b["model_passes"] == 2 * len(layers)  # one pass per image and layer: every head from it
    assert b["clip_images"] < a["clip_images"]  # black image once, empty masks and repeats skipped
    assert out["ratio_passes"] == round(a["model_passes"] / b["model_passes"], 2)


def test_the_official_pieces_are_all_on_this_checkout():
    assert bench_search.official_pieces() == {"preset": True, "rebinarize": True, "protocol": True}
