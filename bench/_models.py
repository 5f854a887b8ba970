"""Randomly initialised BLIP ITM and CLIP models of real sizes, saved for the benchmarks.

Speed does not depend on the weights, so on a machine without downloads the benchmarks time
models of the published shapes (BLIP-large ITM, CLIP ViT-L/14 at 336 px) with random weights,
saved with `save_pretrained` and loaded back through the same code path as real checkpoints.
"""

from __future__ import annotations

import re
import string

import torch

from tuner.datasets._classes import builtin_classes
from tuner.datasets.shapes import SHAPE_CLASSES

#: text layers/heads/hidden, vision layers/hidden/heads, input size, patch
BLIP_SIZES = {
    "tiny": dict(text=(4, 4, 64), vision=(1, 96, 4), image=64, patch=8),
    "base": dict(text=(12, 12, 768), vision=(12, 768, 12), image=384, patch=16),
    "large": dict(text=(12, 12, 768), vision=(24, 1024, 16), image=384, patch=16),
}
#: text layers/hidden/heads, vision layers/hidden/heads, input size, patch, projection
CLIP_SIZES = {
    "tiny": dict(text=(2, 64, 4), vision=(2, 96, 4), image=64, patch=8, projection=64),
    "base": dict(text=(12, 512, 8), vision=(12, 768, 12), image=224, patch=16, projection=512),
    "large": dict(text=(12, 768, 12), vision=(24, 1024, 16), image=336, patch=14, projection=768),
}
#: the BLIP tokenizer's words: a few prompt words, the shapes, and every word of the COCO-Stuff names
#: (spelt spaced or joined), so that a whole-vocabulary COCO caption has about as many tokens as
#: with BLIP's own BERT tokenizer (most COCO words are one BERT token)
_COCO = builtin_classes("coco_stuff").names
WORDS = tuple(dict.fromkeys((
    "a", "picture", "of", "background", "cat", "dog", "person", "car", "tree", *SHAPE_CLASSES,
    *(w for name in _COCO for w in re.split(r"[\s-]+", name) if w),
    *(re.sub(r"[\s-]+", "", name) for name in _COCO),
)))
#: BLIP's text position embeddings (512 in the published checkpoints): room for a caption that lists
#: the whole COCO-Stuff vocabulary, as the official search's does
TEXT_POSITIONS = 512


def save_random_blip(size: str, path: str, seed: int = 0) -> str:
    """A random BlipForImageTextRetrieval of the given shape + BlipProcessor, at `path`."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    spec = BLIP_SIZES[size]
    (t_layers, t_heads, t_hidden), (v_layers, v_hidden, v_heads) = spec["text"], spec["vision"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]", "[ENC]"]  # BLIP's own last two
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=t_hidden, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, intermediate_size=4 * t_hidden,
                         max_position_embeddings=TEXT_POSITIONS, pad_token_id=0),
        vision_config=dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
                           intermediate_size=4 * v_hidden, image_size=spec["image"],
                           patch_size=spec["patch"], initializer_range=0.02),
        image_text_hidden_size=256,
    )
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(config).eval().save_pretrained(path)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    image_processor = BlipImageProcessor(size={"height": spec["image"], "width": spec["image"]})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_random_clip(size: str, path: str, seed: int = 0) -> str:
    """A random CLIPModel of the given shape + CLIPProcessor (a letter-level BPE tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    spec = CLIP_SIZES[size]
    (t_layers, t_hidden, t_heads), (v_layers, v_hidden, v_heads) = spec["text"], spec["vision"]
    vocab = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase,
             *(f"{c}</w>" for c in string.ascii_lowercase)]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(vocab)}, merges=[], model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=t_hidden, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, intermediate_size=4 * t_hidden,
                         max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
                           intermediate_size=4 * v_hidden, image_size=spec["image"],
                           patch_size=spec["patch"]),
        projection_dim=spec["projection"],
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": spec["image"]},
                                         crop_size={"height": spec["image"], "width": spec["image"]})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
