"""Shared fixtures: tiny BLIP ITM models of the real transformers classes, saved to disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

WORDS = [
    "a", "picture", "of", "cat", "dog", "person", "traffic", "light", "sky", "grass",
    "red", "blue", "square", "circle", "tri", "##angle", "##s", "potted", "plant",
]


def save_tiny_blip(path, *, text_layers=3, heads=4, image_size=32, patch=8, seed=0) -> str:
    """A randomly initialised BlipForImageTextRetrieval + processor, saved with save_pretrained."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=text_layers,
            num_attention_heads=heads, intermediate_size=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=2, sep_token_id=3, initializer_range=0.2,
        ),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            image_size=image_size, patch_size=patch, initializer_range=0.2,
        ),
        image_text_hidden_size=16, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> str:
    """Path of a tiny BLIP ITM checkpoint: 3 text layers x 4 heads, 32 px input, 4x4 patches."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_image(rng: np.random.Generator, height: int, width: int, channels: int = 3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)
