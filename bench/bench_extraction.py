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
from _models import BLIP_SIZES, save_random_blip

from segmenter import SegmenterConfig, build_prompt, salience_dropout
from segmenter.backends import resolve_batch_size
from segmenter.backends.blip import BlipBackend
from segmenter.pipeline import select_patches

CLASSES = ["cat", "dog", "person", "car", "tree"]


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


class ExtractionBench:
    """One saved BLIP, loaded once for our path and once as the reference-style model, and random
    input images: what both measurements below share."""

    def __init__(self, path: str, size: str, device: str = "cpu", image_size: int | None = None,
                 images: int = 8) -> None:
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        self.path, self.size, self.patch = path, size, BLIP_SIZES[size]["patch"]
        self.side = image_size or BLIP_SIZES[size]["image"]
        self.layer = 8 if size != "tiny" else 2
        self.backend = BlipBackend(path, device=device)
        rng = np.random.default_rng(0)
        pictures = [rng.integers(0, 256, (self.side, self.side, 3), dtype=np.uint8) for _ in range(images)]
        self.prompts = [build_prompt("a picture of ", CLASSES) for _ in pictures]
        self.pixels = self.backend.prepare_images(pictures, self.side)
        # parameters require grad, float32, eager attention everywhere: the original code's setup
        self.model = BlipForImageTextRetrieval.from_pretrained(path).eval().to(self.backend.device)
        self.tokenizer = AutoProcessor.from_pretrained(path).tokenizer

    def config(self, **changes) -> SegmenterConfig:
        return SegmenterConfig(model=self.path, image_size=self.side, layer=self.layer, **changes)

    def timed(self, function, images: int):
        """(result, seconds per image) of `function(images)`, after a warm-up `function(1)`."""
        function(1)
        sync(self.backend.device)
        start = time.perf_counter()
        result = function(images)
        sync(self.backend.device)
        return result, (time.perf_counter() - start) / images

    def reference(self, config: SegmenterConfig, images: int) -> list[torch.Tensor]:
        return [reference_maps(self.model, self.tokenizer, self.pixels[i : i + 1].float(), self.prompts[i],
                               config, self.patch) for i in range(images)]

    def extraction(self, images: int, rounds: int = 4, batch_size: int | str = 8,
                   reference: bool = True) -> dict:
        """Seconds per image of our path and the reference-style one with `rounds` dropout rounds.

        Our path runs in the backend's default dtype (bfloat16 on a GPU, float32 on CPU); the
        reference-style path in float32 (as the original code) on the same device.
        """
        config = self.config(heads=(1,), dropout_rounds=rounds, dropout_k=10)
        batch = resolve_batch_size(batch_size, self.backend, self.side)

        def ours(count: int) -> list[torch.Tensor]:
            pixels, prompts = self.pixels[:count], self.prompts[:count]
            return [m for i in range(0, count, batch) for m in salience_dropout(
                self.backend, pixels[i : i + batch], prompts[i : i + batch], config)]

        maps, t_ours = self.timed(ours, images)
        result = {
            "bench": "extraction", "size": self.size, "images": images, "rounds": rounds,
            "image_size": self.side, "threads": torch.get_num_threads(), "device": str(self.backend.device),
            "dtype": str(self.backend.dtype), "batch_size": batch, "ours_s_per_image": round(t_ours, 4),
            "ours_images_per_s": round(1 / t_ours, 2),
        }
        if not reference:
            return result
        refs, t_ref = self.timed(lambda count: self.reference(config, count), images)
        max_diff = max(float((o.float().cpu() - r.cpu()).abs().max()) for o, r in zip(maps, refs))
        return {**result, "reference_s_per_image": round(t_ref, 4), "speedup": round(t_ref / t_ours, 2),
                "max_abs_diff": max_diff, "max_abs_value": max(float(r.abs().max()) for r in refs)}

    def head_sweep(self, images: int = 2) -> dict:
        """Maps of every head of one layer (one round), as a search over heads needs them.

        Ours: one GradCAM pass gives every head. Reference-style: the original code runs a full
        forward and backward per head configuration.
        """
        heads = range(self.backend.num_heads)
        ours, t_ours = self.timed(lambda count: self.backend.gradcam(  # per image [1, heads, C, gh, gw]
            self.pixels[:count], self.prompts[:count], [self.layer]), images)
        per_head = [self.config(heads=(h,), dropout_rounds=1) for h in heads]
        refs, t_ref = self.timed(lambda count: [self.reference(c, count) for c in per_head], images)
        max_diff = max(float((ours[i][0, h].float().cpu() - refs[h][i].cpu()).abs().max())
                       for i in range(images) for h in heads)
        return {
            "bench": "head_sweep", "size": self.size, "images": images, "image_size": self.side,
            "layer": self.layer, "heads": self.backend.num_heads, "device": str(self.backend.device),
            "ours_s_per_image": round(t_ours, 4), "reference_s_per_image": round(t_ref, 4),
            "speedup": round(t_ref / t_ours, 2), "max_abs_diff": max_diff,
        }


def print_head_sweep(result: dict) -> None:
    title = f"all {result['heads']} heads of layer {result['layer']} (1 round)"
    print(f"{title:<50}{'s/image':>10}")
    print(f"{'  reference-style (a pass per head)':<50}{result['reference_s_per_image']:>10.4f}")
    print(f"{'  ours (one pass)':<50}{result['ours_s_per_image']:>10.4f}   x{result['speedup']:.2f} faster, "
          f"max |diff| {result['max_abs_diff']:.2e}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_extraction(result: dict) -> None:
    title = (f"extraction ({result['size']}, {result['image_size']} px, {result['rounds']} rounds, "
             f"{result['device']})")
    print(f"{title:<50}{'s/image':>10}")
    if "reference_s_per_image" in result:
        print(f"{'  reference-style':<50}{result['reference_s_per_image']:>10.4f}")
    line = f"{'  ours':<50}{result['ours_s_per_image']:>10.4f}   {result['ours_images_per_s']} images/s"
    if "speedup" in result:
        line += (f", x{result['speedup']:.2f} faster, max |diff| {result['max_abs_diff']:.2e} "
                 f"(max |map| {result['max_abs_value']:.2e})")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(BLIP_SIZES), default="tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", default="8", help="a number, or auto (from free GPU memory)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--no-reference", action="store_true", help="time our path only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        bench = ExtractionBench(save_random_blip(args.size, tmp), args.size, args.device, args.image_size,
                                args.images)
        result = bench.extraction(args.images, args.rounds, args.batch_size, not args.no_reference)
        print_extraction(result)
        if not args.no_reference:
            sweep = bench.head_sweep(min(args.images, 2))
            print_head_sweep(sweep)
            result = {"extraction": result, "head_sweep": sweep}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
