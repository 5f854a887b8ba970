"""Do the segmenter's outputs stay the same on another transformers version? (no downloads)

    python3 tools/check_transformers_floor.py save DIR      # with the reference transformers
    OTHER/bin/python tools/check_transformers_floor.py compare DIR   # with the version under test

`save` builds a tiny BLIP ITM model and a tiny CLIP from fixed configs, writes their weights
(safetensors) and what the project computes from them to DIR: GradCAM maps of every layer and
head at the checkpoint's own size and at an interpolated one (`interpolate_pos_encoding`), with
and without dropped patches, with [CLS] or BLIP's [ENC] first and token-level salience, captions
of different lengths in one batch; ITM scores; patch
features; CLIP image and text embeddings. `compare` rebuilds the same models on the installed
transformers from those weights, recomputes everything and exits 1 when any array differs by
more than 1e-4 of its largest value. Tests that pass can still hide a wrong map (a forward hook
that captures something other than the attention probabilities gives maps of the right shape);
this comparison cannot. `.ci/check_transformers_floor.sh` runs both sides.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLIP_WORDS = ["a", "picture", "of", "cat", "dog", "person", "traffic", "light", "sky", "grass",
              "potted", "plant", "tri", "##angle", "##s"]
CLIP_WORDS = ["a", "picture", "of", "cat", "dog", "person", "sky", "grass", "red", "blue"]
BLIP_CONFIG = dict(
    text_config=dict(vocab_size=6 + len(BLIP_WORDS), hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=2, sep_token_id=3, initializer_range=0.2),
    vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, initializer_range=0.2),
    image_text_hidden_size=16, initializer_range=0.2,
)
CLASSES = [["cat", "traffic light", "potted plant"], ["dog"], ["sky", "grass", "person", "triangles"]]
TOLERANCE = 1e-4  # of each array's largest absolute value


def blip_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS, "[ENC]"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(folder, additional_special_tokens=["[ENC]"])


def clip_tokenizer(folder: Path):
    """The tests' byte-level BPE CLIP tokenizer (tests/conftest.py) over CLIP_WORDS."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import clip_tokenizer as tests_clip_tokenizer

    return tests_clip_tokenizer(CLIP_WORDS)


def clip_config(vocab_size: int) -> dict:
    return dict(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )


def build_checkpoints(folder: Path, weights: Path | None) -> tuple[str, str]:
    """Tiny BLIP and CLIP checkpoints (save_pretrained) in folder; weights from `weights` when
    given (the reference's), else drawn here and written there."""
    from safetensors.torch import load_file, save_file
    from transformers import (
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
    )

    tok_dir = folder / "tokenizers"
    (tok_dir / "blip").mkdir(parents=True)
    (tok_dir / "clip").mkdir(parents=True)
    blip_tok, clip_tok = blip_tokenizer(tok_dir / "blip"), clip_tokenizer(tok_dir / "clip")
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(BlipConfig(**BLIP_CONFIG)).eval()
    clip = CLIPModel(CLIPConfig(**clip_config(len(clip_tok)))).eval()
    for name, model in (("blip", blip), ("clip", clip)):
        params = dict(model.named_parameters())
        if weights is None:
            save_file({k: v.detach().contiguous() for k, v in params.items()},
                      str(folder / f"{name}.safetensors"))
            continue
        state = load_file(str(weights / f"{name}.safetensors"))
        if set(state) != set(params):
            raise SystemExit(f"{name}: parameter names differ from the reference's: "
                             f"{sorted(set(state) ^ set(params))[:4]}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
    blip_dir, clip_dir = folder / "blip", folder / "clip"
    blip.save_pretrained(blip_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=blip_tok).save_pretrained(blip_dir)
    clip.save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tok).save_pretrained(clip_dir)
    return str(blip_dir), str(clip_dir)


def outputs(blip_path: str, clip_path: str) -> dict[str, np.ndarray]:
    """Everything the project computes with transformers' models, on fixed inputs."""
    from segmenter import build_prompt
    from segmenter.backends.blip import BlipBackend
    from segmenter.clip import ClipScorer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (31, 29), (64, 64))]
    prompts = [build_prompt("a picture of ", names) for names in CLASSES]
    out: dict[str, np.ndarray] = {}
    for sdpa in (True, False):
        backend = BlipBackend(blip_path, device="cpu", dtype="float32", sdpa=sdpa)
        for size in (32, 48):  # the checkpoint's own size, and one that interpolates positions
            pixels = backend.prepare_images(images, size)
            side = size // 8
            dropped = torch.from_numpy(rng.random((len(images), side * side)) < 0.3)
            variants = (("", None, {}), ("_dropped", dropped, {}),  # + BLIP's [ENC] first, token salience
                        ("_enc_tokens", dropped, dict(itm_token="enc", token_salience=True)))
            for tag, drop, options in variants:
                maps = backend.gradcam(pixels, prompts, [1, 2, 3], dropped=drop, **options)
                for b, image_maps in enumerate(maps):
                    out[f"gradcam_sdpa{int(sdpa)}_{size}{tag}_image{b}"] = image_maps.numpy()
            if sdpa:
                texts = [p.text for p in prompts] + ["a dog", "sky"]
                out[f"itm_scores_{size}"] = backend.itm_scores(pixels, texts).numpy()
                out[f"itm_scores_enc_{size}"] = backend.itm_scores(pixels, texts, itm_token="enc").numpy()
                out[f"itm_pair_scores_{size}"] = backend.itm_pair_scores(pixels, texts[:3]).numpy()
                out[f"patch_features_{size}"] = backend.patch_features(pixels).numpy()
    clip = ClipScorer(clip_path, device="cpu", dtype="float32")
    out["clip_image_embeddings"] = clip.image_embeddings(images).float().numpy()
    out["clip_text_embeddings"] = clip.text_embeddings(["cat", "red dog", "a picture of sky"]).float().numpy()
    return out


def compare(reference: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> tuple[list[str], float]:
    """One line per array that differs (shape, or values beyond TOLERANCE of its scale), and the
    largest difference relative to its array's scale."""
    problems = [f"{k}: missing" for k in sorted(set(reference) - set(current))]
    worst = 0.0
    for key in sorted(set(reference) & set(current)):
        ref, cur = reference[key], current[key]
        if ref.shape != cur.shape:
            problems.append(f"{key}: shape {cur.shape}, reference {ref.shape}")
            continue
        scale = float(np.abs(ref).max())
        diff = float(np.abs(ref - cur).max())
        worst = max(worst, diff / max(scale, 1e-30))
        if not np.isfinite(cur).all() or diff > TOLERANCE * scale + 1e-12:
            problems.append(f"{key}: max |diff| {diff:.3g} of scale {scale:.3g}")
    return problems, worst


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("folder", type=Path, help="where `save` writes and `compare` reads")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    version = transformers.__version__
    if args.mode == "save":
        args.folder.mkdir(parents=True, exist_ok=True)
        blip_path, clip_path = build_checkpoints(args.folder, None)
        np.savez(args.folder / "outputs.npz", **outputs(blip_path, clip_path))
        (args.folder / "version.txt").write_text(version + "\n")
        print(f"reference outputs of transformers {version} written to {args.folder}")
        return 0
    reference_version = (args.folder / "version.txt").read_text().strip()
    with np.load(args.folder / "outputs.npz") as data:
        reference = dict(data)
    with tempfile.TemporaryDirectory() as tmp:
        current = outputs(*build_checkpoints(Path(tmp), args.folder))
    gradcam = [k for k in reference if k.startswith("gradcam") and np.abs(reference[k]).max() > 0]
    if len(gradcam) < len([k for k in reference if k.startswith("gradcam")]) // 2:
        print("the reference's GradCAM maps are mostly zero: nothing to compare", file=sys.stderr)
        return 1
    problems, worst = compare(reference, current)
    for line in problems:
        print(f"DIFFERS  {line}")
    verdict = "differ" if problems else "match"
    print(f"transformers {version}: {len(reference) - len(problems)}/{len(reference)} outputs match "
          f"transformers {reference_version}'s (largest difference {worst:.1e} of an array's scale, "
          f"tolerance {TOLERANCE:g}): {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
