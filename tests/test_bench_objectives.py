"""The objective benchmark's fast mode (issue 14): it runs, and its statistics mean what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_objectives  # noqa: E402


def test_fast_mode_scores_every_objective_and_the_oracle_ranks_like_miou(tmp_path, capsys):
    out = bench_objectives.main(["--fast", "--world", "planted", "--json", str(tmp_path / "b.json"),
                                 "--objectives", "clip_margin,patch_coherence,miou_supervised (oracle)",
                                 "--combination", "both=clip_margin:1,patch_coherence:0.5"])
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "regret" in printed and "torch threads 1" in printed
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(printed.strip().splitlines()[-1])
    world = out["worlds"][0]
    assert world["configs"] == 8 and world["images"] == 6 and 0 < world["best_miou"] <= 1
    assert set(world["objectives"]) == {"clip_margin", "patch_coherence", "miou_supervised (oracle)", "both"}
    for row in world["objectives"].values():
        assert -1 <= row["spearman"] <= 1 and row["regret_points"] >= 0 and row["tied_at_top"] >= 1
        assert abs(row["pick_miou"] - (world["best_miou"] - row["regret_points"] / 100)) < 1e-9
    oracle = world["objectives"]["miou_supervised (oracle)"]
    # per-image mIoU averages images, dataset mIoU sums pixels first: close, not equal
    assert oracle["spearman"] > 0.5 and oracle["regret_points"] < 5


def test_tied_at_top_counts_equal_best_values():
    assert bench_objectives.tied_at_top(np.array([0.5, 0.2, 0.5, 0.5 + 1e-15])) == 3
    assert bench_objectives.tied_at_top(np.array([1.0, 0.9])) == 1
