"""The BridgeTower backend on a tiny random BridgeTowerForImageAndTextRetrieval (no downloads)."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from segmenter import Segmenter, SegmenterConfig, build_prompt
from segmenter.backends import load_backend

IMAGE_SIZE, PATCH = 32, 8  # native input: a 4x4 patch grid
CROSS_LAYERS, HEADS = 3, 4
WORDS = ["a", "picture", "of", "cat", "dog", "sky", "grass"]


def roberta_tokenizer():
    """A byte-level BPE RoBERTa tokenizer: single letters plus merges that spell each word, with and
    without the leading space ("Ġcat", "cat"); other words fall apart into letters. Read from
    vocab.json and merges.txt, the form transformers 4.x and 5.x share."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import RobertaTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in string.ascii_lowercase + "Ġ":
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in [*("Ġ" + w for w in WORDS), *WORDS]:
        current = word[0]
        for symbol in word[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            vocab.setdefault(current, len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return RobertaTokenizerFast.from_pretrained(folder)


def tiny_config():
    from transformers import BridgeTowerConfig

    tokenizer = roberta_tokenizer()
    return BridgeTowerConfig(
        hidden_size=16, num_attention_heads=HEADS, num_hidden_layers=CROSS_LAYERS, initializer_factor=8,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=4,
                         num_attention_heads=HEADS, intermediate_size=32, max_position_embeddings=130),
        # nn.MultiheadAttention of the ViT takes hidden_size // 64 heads: 64 is the smallest width
        vision_config=dict(hidden_size=64, num_hidden_layers=4, patch_size=PATCH, image_size=IMAGE_SIZE),
    ), tokenizer


def save_tiny_bridgetower(path, model_cls_name: str = "BridgeTowerForImageAndTextRetrieval") -> str:
    import transformers
    from transformers import BridgeTowerImageProcessor, BridgeTowerProcessor

    config, tokenizer = tiny_config()
    torch.manual_seed(0)
    model = getattr(transformers, model_cls_name)(config).eval()
    model.save_pretrained(path)
    image_processor = BridgeTowerImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                crop_size={"shortest_edge": IMAGE_SIZE})
    BridgeTowerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bridgetower(tmp_path_factory) -> str:
    return save_tiny_bridgetower(tmp_path_factory.mktemp("tiny-bridgetower"))


@pytest.fixture(scope="module")
def backend(tiny_bridgetower):
    return load_backend("bridgetower", tiny_bridgetower, device="cpu", dtype="float32")


def images(rng, n: int, size: int = 48) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


# the two captions of the padded batch and, per class, its word pieces' token positions
PROMPTS = (("cat", "catdog", "sky"), ("dog",))
TOKENS = (["<s>", "a", "Ġpicture", "Ġof", "Ġcat", "Ġcat", "dog", "Ġsky", "</s>"],
          ["<s>", "a", "Ġpicture", "Ġof", "Ġdog", "</s>", "<pad>", "<pad>", "<pad>"])
PIECES = (([4], [5, 6], [7]), ([4],))


def reference_gradcam(path: str, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """GradCAM the plain way: the whole model with parameters requiring grad, its own forward,
    the cross-attention probabilities kept with retain_grad, and `.backward()` of the summed ITM
    match logits. # [B, layers, heads, T, 1 + gh*gw]"""
    from transformers import AutoTokenizer, BridgeTowerForImageAndTextRetrieval

    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(path).eval()
    model.requires_grad_(True)
    tokens = AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    kept = []

    def keep(_module, _inputs, output):
        output[1].retain_grad()
        kept.append(output[1])

    hooks = [layer.crossattention.self.register_forward_hook(keep)
             for layer in model.bridgetower.cross_modal_text_layers]
    image = {"pixel_values": pixels, "pixel_mask": torch.ones(pixels.shape[0], *pixels.shape[2:])}
    if pixels.shape[-1] != IMAGE_SIZE:  # interpolated position embeddings: the embedded patches go in
        # (the forward's own `interpolate_pos_encoding` is missing before transformers 5)
        visual = model.bridgetower.vision_model.visual
        image = {"image_embeds": visual.forward_pre(pixels, interpolate_pos_encoding=True).permute(1, 0, 2)}
    logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], **image).logits
    logits[:, 1].sum().backward()
    for hook in hooks:
        hook.remove()
    # a full backward: the gradient reached the vision tower's first weights
    assert model.bridgetower.vision_model.visual.embeddings.patch_embedding.weight.grad is not None
    return torch.stack([a.detach() * a.grad.clamp(min=0) for a in kept], dim=1)


@pytest.mark.parametrize("size", [IMAGE_SIZE, 40])
def test_bridgetower_gradcam_equals_full_backward_every_layer_padded_batch(
        tiny_bridgetower, backend, rng, size):
    prompts = [build_prompt("a picture of ", names) for names in PROMPTS]
    texts = [p.text for p in prompts]
    ids = backend.tokenizer(texts, padding=True)["input_ids"]
    assert [backend.tokenizer.convert_ids_to_tokens(row) for row in ids] == [*TOKENS]
    pixels = backend.prepare_images(images(rng, 2), size)  # [2, 3, S, S]
    layers = list(range(1, CROSS_LAYERS + 1))
    ours = backend.gradcam(pixels, prompts, layers, token_salience=True)
    ref = reference_gradcam(tiny_bridgetower, pixels, texts)[..., 1:]  # image [CLS] key dropped
    grid = size // PATCH
    for b, pieces in enumerate(PIECES):
        assert ours[b].shape == (CROSS_LAYERS, HEADS, len(pieces) + 1, grid, grid)
        expected = [ref[b, :, :, idx].mean(2) for idx in pieces]  # each [layers, heads, N]
        # the authors' Salience Dropout row: every class piece, plus </s> of the shorter caption
        salient = [i for idx in pieces for i in idx] + ([TOKENS[b].index("</s>")] if b == 1 else [])
        expected.append(ref[b, :, :, salient].sum(2))
        expected = torch.stack(expected, dim=2).view(CROSS_LAYERS, HEADS, -1, grid, grid)
        assert expected.abs().max() > 1e-4  # the maps are not all zero
        torch.testing.assert_close(ours[b], expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ours[0][0, 0], ours[0][0, 1])  # heads differ
    assert not torch.allclose(ours[0][0], ours[0][1])  # layers differ
    # as in BLIP, the ITM head reads the last layer's text output at <s> alone: the class tokens'
    # cross-attention there cannot change the score, so its maps are zero (studies refuse it)
    assert all(m[-1].abs().max() == 0 for m in ours)


def test_bridgetower_gradcam_computes_no_parameter_gradient(backend, rng):
    pixels = backend.prepare_images(images(rng, 2), IMAGE_SIZE)
    prompts = [build_prompt("a picture of ", names) for names in PROMPTS]
    params = list(backend.model.parameters())
    backend.model.requires_grad_(True)  # even parameters that ask for one get none
    try:
        maps = backend.gradcam(pixels, prompts, [1, CROSS_LAYERS])
    finally:
        backend.model.requires_grad_(False)
    assert maps[0].abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_bridgetower_out_of_range_layer_and_head_errors(tiny_bridgetower, backend, rng):
    pixels = backend.prepare_images(images(rng, 1), IMAGE_SIZE)
    prompt = build_prompt("a picture of ", ["cat"])
    for layer in (0, CROSS_LAYERS + 1):
        with pytest.raises(ValueError, match=rf"^layer {layer} does not exist .*valid layers are "
                                             rf"1\.\.{CROSS_LAYERS} \(1-based\)$"):
            backend.gradcam(pixels, [prompt], [layer])
    config = SegmenterConfig(backend="bridgetower", model=tiny_bridgetower, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match=rf"valid layers are 1\.\.{CROSS_LAYERS}"):
        Segmenter(config.replace(layer=CROSS_LAYERS + 1, heads=(0,)), backend=backend)
    with pytest.raises(ValueError, match=rf"^head {HEADS} does not exist .*valid heads are 0\.\.{HEADS - 1}"):
        Segmenter(config.replace(layer=1, heads=(0, HEADS)), backend=backend)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        backend.prepare_images(images(rng, 1), 36)


def test_bridgetower_segmenter_returns_label_map_of_image_size(tiny_bridgetower, rng):
    config = SegmenterConfig(backend="bridgetower", model=tiny_bridgetower, image_size=40, layer=2,
                             heads=(0, 3), dropout_rounds=3, dropout_k=4, crf_iterations=2, dtype="float32")
    segmenter = Segmenter(config, device="cpu", batch_size=2)
    image = images(rng, 1, size=50)[0]  # 50 x 50
    result = segmenter.segment(image, ["cat", "dog", "sky"])
    assert result.label_map.shape == (50, 50)
    assert set(np.unique(result.label_map)) <= {0, 1, 2, 3}
    assert result.maps.shape == (3, 5, 5) and np.isfinite(result.maps).all()
    assert segmenter.backend.forward_calls == 3  # one GradCAM pass per Salience Dropout round
    tokens = Segmenter(config.replace(dropout_salience="tokens", class_spelling="joined"), device="cpu",
                       batch_size=2).segment_batch([image, image[:40]], [["cat", "grass sky"], ["dog"]])
    assert [r.label_map.shape for r in tokens] == [(50, 50), (40, 50)]


def test_bridgetower_salience_dropout_zeroes_dropped_patches_in_the_input(backend, rng):
    pixels = backend.prepare_images(images(rng, 1), IMAGE_SIZE)  # [1, 3, 32, 32]
    prompt = [build_prompt("a picture of ", ["cat", "sky"])]
    dropped = torch.zeros(1, 16, dtype=torch.bool)
    dropped[0, [0, 5, 15]] = True
    zeroed = pixels.clone()
    for n in (0, 5, 15):  # patch n of the 4x4 grid
        r, c = divmod(n, 4)
        zeroed[..., r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 0
    with_drop = backend.gradcam(pixels, prompt, [2], dropped)[0]
    torch.testing.assert_close(with_drop, backend.gradcam(zeroed, prompt, [2])[0])
    assert not torch.allclose(with_drop, backend.gradcam(pixels, prompt, [2])[0])


def test_bridgetower_itm_scores_equal_the_models_match_probability(tiny_bridgetower, backend, rng):
    from transformers import BridgeTowerForImageAndTextRetrieval

    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(tiny_bridgetower).eval()
    pixels = backend.prepare_images(images(rng, 2), IMAGE_SIZE)
    texts = ["a picture of cat", "a picture of grass sky", "dog"]
    scores = backend.itm_scores(pixels, texts, batch_size=4)  # [2, 3]
    expected = torch.zeros(2, 3)
    with torch.no_grad():
        for b in range(2):
            for t, text in enumerate(texts):
                tokens = backend.tokenizer([text], return_tensors="pt")
                logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               pixel_values=pixels[b : b + 1]).logits
                expected[b, t] = logits.softmax(-1)[0, 1]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(backend.itm_pair_scores(pixels, texts[:2], batch_size=1),
                               expected[[0, 1], [0, 1]], rtol=1e-4, atol=1e-6)
    features = backend.patch_features(pixels)
    assert features.shape == (2, 16, 64)
    with torch.no_grad():
        final = model.bridgetower.vision_model(pixels)[-1]  # [B, 1 + N, Dv], post-LayerNorm
    torch.testing.assert_close(features, final[:, 1:], rtol=1e-4, atol=1e-6)
    candidates = Segmenter(SegmenterConfig(
        backend="bridgetower", model=tiny_bridgetower, image_size=IMAGE_SIZE, layer=1, heads=(0,),
        candidates="itm_threshold", candidates_threshold=0.0, dropout_rounds=1, crf=False,
    ), backend=backend, batch_size=2).segment(images(rng, 1)[0], ["cat", "dog"])
    assert candidates.candidates == ("cat", "dog")  # threshold 0 keeps every class


def test_bridgetower_refuses_enc_token_and_incomplete_or_foreign_checkpoints(
        tiny_bridgetower, backend, tmp_path, tiny_blip):
    with pytest.raises(ValueError, match="BridgeTower does not have: use itm_token: cls"):
        Segmenter(SegmenterConfig.preset("official", backend="bridgetower", model=tiny_bridgetower,
                                         image_size=IMAGE_SIZE, layer=1, heads=(0,)), backend=backend)
    masked_lm = save_tiny_bridgetower(tmp_path / "mlm", "BridgeTowerForMaskedLM")
    with pytest.raises(OSError, match=r"lacks 2 weights the BridgeTower ITM model needs \(itm_score"):
        load_backend("bridgetower", masked_lm, device="cpu")
    with pytest.raises(OSError, match="holds a BLIP model .*not the BridgeTower ITM model"):
        load_backend("bridgetower", tiny_blip, device="cpu")


def test_bridgetower_class_pieces_found_whether_or_not_offsets_keep_the_space(backend, rng):
    """A byte-level piece "Ġcat" spells " cat"; tokenizers that keep the space in its character
    offsets (trim_offsets=False) must still find the class."""
    import copy

    from tokenizers import processors

    pixels = backend.prepare_images(images(rng, 2), IMAGE_SIZE)
    prompts = [build_prompt("a picture of ", names) for names in PROMPTS]
    trimmed = backend.gradcam(pixels, prompts, [2], token_salience=True)
    untrimmed = copy.deepcopy(backend.tokenizer)
    untrimmed.backend_tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=False, add_prefix_space=False)
    assert untrimmed(prompts[0].text, return_offsets_mapping=True)["offset_mapping"][4] == (12, 16)
    kept, backend.tokenizer = backend.tokenizer, untrimmed
    try:
        for ours, expected in zip(backend.gradcam(pixels, prompts, [2], token_salience=True), trimmed):
            torch.testing.assert_close(ours, expected)
    finally:
        backend.tokenizer = kept
