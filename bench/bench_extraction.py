"""Map extraction: our path vs a reference-style path, per image, with Salience Dropout rounds.

Reference-style = what the original code does each round: a full model forward with parameters
requiring grad, hooks saving the cross-attention and its gradient, and a full `backward()` through
the text encoder and the ViT (parameter gradients included). Ours = BlipBackend.gradcam: vision
encoder under no_grad, autograd.grad of the ITM logit w.r.t. the attention of one layer only.

    python bench/bench_extraction.py --size tiny            # seconds
    python bench/bench_extraction.py --size large --images 2 # BLIP-large shapes, random weights

Prints a table and one JSON line; ratios are what count on CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from segmenter import SegmenterConfig, build_prompt, salience_dropout
from segmenter.backends.blip import BlipBackend
from segmenter.pipeline import select_patches

SIZES = {
    # text layers/heads/hidden, vision layers/hidden/heads, image size, patch
    "tiny": dict(text=(4, 4, 64), vision=(1, 96, 4), image=64, patch=8),
    "base": dict(text=(12, 12, 768), vision=(12, 768, 12), image=384, patch=16),
    "large": dict(text=(12, 12, 768), vision=(24, 1024, 16), image=384, patch=16),
}
CLASSES = ["cat", "dog", "person", "car", "tree"]


def save_random_blip(size: str, path: str) -> None:
    """A randomly initialised BlipForImageTextRetrieval of the given shape, saved with its processor."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    spec = SIZES[size]
    (t_layers, t_heads, t_hidden), (v_layers, v_hidden, v_heads) = spec["text"], spec["vision"]
    words = ["a", "picture", "of", *CLASSES]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=t_hidden, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, intermediate_size=4 * t_hidden,
                         max_position_embeddings=64, pad_token_id=0),
        vision_config=dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
                           intermediate_size=4 * v_hidden, image_size=spec["image"],
                           patch_size=spec["patch"]),
        image_text_hidden_size=256,
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).eval().save_pretrained(path)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    image_processor = BlipImageProcessor(size={"height": spec["image"], "width": spec["image"]})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def reference_maps(model, tokenizer, pixels, prompt, config, patch):
    """The original code's loop: full forward + full backward every round, one image at a time."""
    layer = model.text_encoder.encoder.layer[config.layer - 1].crossattention.self
    enc = tokenizer([prompt.text], return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    spans = [[t for t, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e] for s, e in prompt.spans]
    side = pixels.shape[-1] // patch
    dropped = torch.zeros(side * side, dtype=torch.bool)
    total = torch.zeros(len(spans), side, side)
    for round_index in range(config.dropout_rounds):
        keep = (~dropped).view(1, 1, side, side).float()
        keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        store = {}

        def hook(_m, _i, out, store=store):
            out[1].retain_grad()
            store["a"] = out[1]

        handle = layer.register_forward_hook(hook)
        model.zero_grad()
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=pixels * keep)
        out.itm_score[:, 1].sum().backward()
        handle.remove()
        cam = (store["a"] * store["a"].grad.clamp(min=0))[0, :, :, 1:].detach()  # [heads, T, N]
        maps = torch.stack([cam[:, idx].mean(1) for idx in spans], 1)  # [heads, C, N]
        maps = maps[list(config.heads)].mean(0).view(len(spans), side, side)
        maps = maps.masked_fill(dropped.view(side, side), 0.0)
        total += maps
        if round_index < config.dropout_rounds - 1:
            dropped |= select_patches(maps.sum(0).flatten(), dropped, config.dropout_schedule,
                                      config.dropout_k)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_blip(args.size, tmp)
        spec = SIZES[args.size]
        config = SegmenterConfig(model=tmp, image_size=spec["image"], layer=8 if args.size != "tiny" else 2,
                                 heads=(1,), dropout_rounds=args.rounds, dropout_k=10)
        backend = BlipBackend(tmp, device="cpu")
        images = [rng.integers(0, 256, (spec["image"], spec["image"], 3), dtype=np.uint8)
                  for _ in range(args.images)]
        prompts = [build_prompt(config.prompt_prefix, CLASSES) for _ in images]
        pixels = backend.prepare_images(images, config.image_size)

        salience_dropout(backend, pixels[:1], prompts[:1], config)  # warm-up
        start = time.perf_counter()
        ours = []
        for i in range(0, len(images), args.batch_size):
            ours += salience_dropout(backend, pixels[i : i + args.batch_size],
                                     prompts[i : i + args.batch_size], config)
        t_ours = (time.perf_counter() - start) / len(images)

        model = BlipForImageTextRetrieval.from_pretrained(tmp).eval()  # parameters require grad
        tokenizer = AutoProcessor.from_pretrained(tmp).tokenizer
        reference_maps(model, tokenizer, pixels[:1], prompts[0], config, spec["patch"])  # warm-up
        start = time.perf_counter()
        refs = [reference_maps(model, tokenizer, pixels[i : i + 1], prompts[i], config, spec["patch"])
                for i in range(len(images))]
        t_ref = (time.perf_counter() - start) / len(images)
        max_diff = max(float((o.cpu() - r).abs().max()) for o, r in zip(ours, refs))
        scale = max(float(r.abs().max()) for r in refs)

    result = {
        "bench": "extraction", "size": args.size, "images": args.images, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "device": "cpu",
        "ours_s_per_image": round(t_ours, 4), "reference_s_per_image": round(t_ref, 4),
        "speedup": round(t_ref / t_ours, 2), "max_abs_diff": max_diff, "max_abs_value": scale,
    }
    print(f"{'path':<12}{'s/image':>10}")
    print(f"{'reference':<12}{t_ref:>10.4f}")
    print(f"{'ours':<12}{t_ours:>10.4f}   speedup x{t_ref / t_ours:.2f}   max |diff| {max_diff:.2e}"
          f" (max |map| {scale:.2e})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
