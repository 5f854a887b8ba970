"""Dense CLIP methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP) on tiny CLIPModels built from small configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmenter.methods import (
    PUBLISHED,
    VARIANTS,
    ClipDense,
    ClipDenseParams,
    dense_last_layer,
    input_size,
    prob_thd_background,
    published_params,
    window_boxes,
)
from segmenter.methods._templates import IMAGENET_TEMPLATES


@pytest.fixture(scope="module")
def dense(tiny_clip) -> ClipDense:
    """The random tiny CLIP: 2 vision layers x 2 heads, hidden 16, 32 px input, 8 px patches."""
    return ClipDense(tiny_clip, device="cpu", batch_size=3)


# --- the paper's formulas, written out ----------------------------------------------------------------
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def paper_last_layer(layer, x: torch.Tensor, variant: str, grid: tuple[int, int], sigma: float
                     ) -> torch.Tensor:
    """The last block as each paper defines it, from the layer's weights, head by head."""
    attn = layer.self_attn
    dim = x.shape[-1]
    heads = attn.num_heads
    d = dim // heads
    s = d**-0.5
    ln1, ln2 = layer.layer_norm1, layer.layer_norm2
    y = F.layer_norm(x, (dim,), ln1.weight, ln1.bias, ln1.eps)
    q = y @ attn.q_proj.weight.T + attn.q_proj.bias
    k = y @ attn.k_proj.weight.T + attn.k_proj.bias
    v = y @ attn.v_proj.weight.T + attn.v_proj.bias
    tokens = x.shape[1]
    gauss = torch.zeros(tokens, tokens)  # NACLIP: 0 on the class token's row and column
    for i in range(1, tokens):
        ri, ci = divmod(i - 1, grid[1])
        for j in range(1, tokens):
            rj, cj = divmod(j - 1, grid[1])
            gauss[i, j] = np.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma**2))
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        if variant == "maskclip":
            ctx = vh
        elif variant == "sclip":
            ctx = (torch.softmax(s * qh @ qh.transpose(1, 2), -1)
                   + torch.softmax(s * kh @ kh.transpose(1, 2), -1)) @ vh
        elif variant == "clearclip":
            ctx = torch.softmax(s * qh @ qh.transpose(1, 2), -1) @ vh
        else:
            ctx = torch.softmax(s * kh @ kh.transpose(1, 2) + gauss, -1) @ vh
        outs.append(ctx)
    out = torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    if variant in ("maskclip", "sclip"):  # residual and FFN kept
        h = x + out
        z = F.layer_norm(h, (dim,), ln2.weight, ln2.bias, ln2.eps)
        ffn = quick_gelu(z @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias) @ layer.mlp.fc2.weight.T \
            + layer.mlp.fc2.bias
        return h + ffn
    return out  # ClearCLIP, NACLIP: no residual, no FFN


def paper_patch_embeddings(model, pixels: torch.Tensor, variant: str, sigma: float = 5.0) -> torch.Tensor:
    """transformers' own forward up to the last layer, then the paper's last layer. # [B, D, gh, gw]"""
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True,
                                    output_hidden_states=True).hidden_states[-2]  # input of the last layer
        grid = (pixels.shape[-2] // 8, pixels.shape[-1] // 8)
        out = paper_last_layer(model.vision_model.encoder.layers[-1], hidden, variant, grid, sigma)
        tokens = model.vision_model.post_layernorm(out[:, 1:]) @ model.visual_projection.weight.T
        tokens = F.normalize(tokens, dim=-1)
    return tokens.transpose(1, 2).reshape(len(pixels), -1, *grid)


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_last_layer_equals_the_papers_formula(dense, variant):
    layer = dense.model.vision_model.encoder.layers[-1]
    assert dense.model.config.vision_config.hidden_act == "quick_gelu"
    grid = (3, 5)  # not square: rows and columns of NACLIP's neighbourhood cannot be swapped
    x = torch.randn(2, 3 * 5 + 1, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = dense_last_layer(layer, x, variant, grid, sigma=1.5)
    torch.testing.assert_close(ours, paper_last_layer(layer, x, variant, grid, 1.5), atol=1e-5, rtol=1e-5)


def test_the_variants_compute_different_things(dense):
    layer = dense.model.vision_model.encoder.layers[-1]
    x = torch.randn(1, 17, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        outs = {v: dense_last_layer(layer, x, v, (4, 4)) for v in VARIANTS}
    for a in VARIANTS:
        for b in VARIANTS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_patch_embeddings_follow_transformers_forward_at_any_size(dense, variant, size):
    """The model's own size and a non-square one (position embeddings interpolated)."""
    params = ClipDenseParams(variant, naclip_sigma=2.0)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    ours = dense.patch_embeddings(pixels, params)
    assert ours.shape == (2, 8, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(ours, paper_patch_embeddings(dense.model, pixels, variant, 2.0),
                               atol=1e-5, rtol=1e-5)


# --- sliding windows ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_sliding_window_equals_a_single_pass_on_an_image_of_one_window(dense, rng, variant):
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    names = ["cat", "dog", "sky"]
    slid = dense.logits(image, names,
                        ClipDenseParams(variant, slide_crop=32, slide_stride=16, short_side=None))
    whole = dense.logits(image, names, ClipDenseParams(variant, slide_crop=0, short_side=None))
    pixels = dense.pixels(image, ClipDenseParams(variant, short_side=None))
    single = torch.einsum("dhw,cd->chw", paper_patch_embeddings(dense.model, pixels, variant)[0],
                          dense.class_embeddings(names))
    assert slid.shape == (3, 4, 4)
    torch.testing.assert_close(slid, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-5)


def test_overlapping_windows_are_averaged_where_they_overlap(dense, rng):
    """A 32 x 56 image, 32 px windows at stride 16: windows start at x = 0, 16, 24 (the last one
    shifted back to the border); every patch gets the mean of the windows that cover it."""
    image = rng.integers(0, 256, size=(32, 56, 3), dtype=np.uint8)
    params = ClipDenseParams("sclip", slide_crop=32, slide_stride=16, short_side=None)
    names = ["red", "blue"]
    pixels = dense.pixels(image, params)
    text = dense.class_embeddings(names)
    total, count = torch.zeros(2, 4, 7), torch.zeros(4, 7)
    for x1 in (0, 16, 24):
        crop = pixels[..., :, x1 : x1 + 32]
        sim = torch.einsum("dhw,cd->chw", paper_patch_embeddings(dense.model, crop, "sclip")[0], text)
        total[:, :, x1 // 8 : x1 // 8 + 4] += sim
        count[:, x1 // 8 : x1 // 8 + 4] += 1
    assert count.tolist()[0] == [1, 1, 2, 3, 2, 2, 1]
    torch.testing.assert_close(dense.logits(image, names, params), total / count, atol=1e-5, rtol=1e-5)


def test_window_boxes_cover_the_image_and_end_at_its_border():
    assert window_boxes(48, 80, 32, 16) == [(y, x, y + 32, x + 32) for y in (0, 16) for x in (0, 16, 32, 48)]
    assert window_boxes(24, 40, 32, 16) == [(0, 0, 24, 32), (0, 8, 24, 40)]  # smaller than a window
    assert window_boxes(24, 40, 0, 16) == [(0, 0, 24, 40)]
    covered = np.zeros((336, 504), dtype=int)
    for y1, x1, y2, x2 in window_boxes(336, 504, 224, 112):
        assert (y2 - y1, x2 - x1) == (224, 224)
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_input_size_sets_the_short_side_and_keeps_whole_patches():
    assert input_size(375, 500, 336, 16) == (336, 448)  # 500 * 336 / 375 = 448
    assert input_size(500, 375, 448, 14) == (602, 448)  # 597.3 rounded to whole 14 px patches
    assert input_size(20, 30, None, 8) == (24, 32)
    assert input_size(100, 10000, 336, 16) == (16, 2048)  # longer side capped at 2048


# --- maps, text and the background rule ------------------------------------------------------------
def test_relevance_maps_have_one_map_per_class_and_follow_the_text(dense, rng):
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    params = ClipDenseParams("naclip", slide_crop=32, slide_stride=16, short_side=40)
    names = ["cat", "dog", "sky"]
    maps = dense.relevance_maps([image, image], [names, names[::-1]], params)
    assert maps[0].shape == (3, 5, 7) == (len(names), *dense.grid_size(50, 70, params))
    assert maps[0].dtype == np.float32
    np.testing.assert_allclose(maps[0].sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps[1], maps[0][::-1], atol=1e-6)  # the maps follow the class order
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(maps[0][a] - maps[0][b]).max() > 1e-4
    sharper = dense.relevance_maps([image], [names], ClipDenseParams(
        "naclip", logit_scale=100, slide_crop=32, slide_stride=16, short_side=40))[0]
    assert sharper.max() > maps[0].max()  # a larger logit_scale sharpens the softmax


def test_templates_average_the_normalised_prompt_embeddings(dense):
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    single = dense.class_embeddings(["cat"], "single")
    torch.testing.assert_close(single, dense.scorer.text_embeddings(["a photo of a cat."]))
    prompts = dense.scorer.text_embeddings([t.format("cat") for t in IMAGENET_TEMPLATES])
    torch.testing.assert_close(dense.class_embeddings(["cat"], "imagenet")[0],
                               F.normalize(prompts.mean(0), dim=0))
    assert (single - dense.class_embeddings(["cat"])).abs().max() > 1e-4


def test_prob_thd_turns_unsure_pixels_into_background():
    probs = np.array([[[0.5, 0.33], [0.05, 0.2]],
                      [[0.3, 0.33], [0.9, 0.4]],
                      [[0.2, 0.34], [0.05, 0.4]]], dtype=np.float32)  # [3, 2, 2]
    np.testing.assert_array_equal(prob_thd_background(probs, 0.0), [[1, 3], [2, 2]])
    np.testing.assert_array_equal(prob_thd_background(probs, 0.45), [[1, 0], [2, 0]])
    np.testing.assert_array_equal(prob_thd_background(probs, 0.5), [[1, 0], [2, 0]])  # below it, not at it
    np.testing.assert_array_equal(prob_thd_background(probs, 1.0), [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="prob_thd"):
        prob_thd_background(probs, 1.5)


def test_maskclip_labels_colours_and_prob_thd_makes_the_black_band_background(colour_clip):
    """The colour CLIP embeds each patch as its own colour; black patches match no name."""
    dense = ClipDense(colour_clip, device="cpu")
    image = np.zeros((32, 96, 3), dtype=np.uint8)
    image[:, :32, 0] = 255  # red | black | blue
    image[:, 64:, 2] = 255
    params = ClipDenseParams("maskclip", logit_scale=100, slide_crop=32, slide_stride=16, short_side=None,
                             templates="single")
    labels = dense.label_map(image, ["red", "blue"], params)
    assert labels.shape == (32, 96)
    assert (labels[:, :28] == 1).all() and (labels[:, 68:] == 2).all()
    assert set(np.unique(labels)) == {1, 2}  # prob_thd 0: every pixel gets a class
    labels = dense.label_map(image, ["red", "blue"], ClipDenseParams(**{**params.__dict__, "prob_thd": 0.7}))
    assert (labels[:, 36:60] == 0).all()
    assert (labels[:, :28] == 1).all() and (labels[:, 68:] == 2).all()


def test_no_gradient_is_recorded(dense, rng):
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    logits = dense.logits(image, ["cat"], ClipDenseParams("clearclip", slide_crop=0, short_side=None))
    assert not logits.requires_grad
    assert not any(p.requires_grad or p.grad is not None for p in dense.model.parameters())


# --- hyperparameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"variant": "gem"}, "variant 'gem' is unknown: use one of maskclip, sclip, clearclip, naclip"),
    ({"logit_scale": 0}, "logit_scale 0 must be a positive number"),
    ({"logit_scale": float("nan")}, "logit_scale nan must be a positive number"),
    ({"prob_thd": -0.1}, "prob_thd -0.1 must be a probability in [0, 1]"),
    ({"prob_thd": 1.2}, "prob_thd 1.2 must be a probability in [0, 1]"),
    ({"slide_crop": -32}, "slide_crop -32 must be a whole number of pixels >= 0"),
    ({"slide_crop": 224.5}, "slide_crop 224.5 must be a whole number"),
    ({"slide_stride": 0}, "slide_stride 0 must be a whole number of pixels >= 1"),
    ({"slide_crop": 224, "slide_stride": 256}, "slide_stride 256 is larger than slide_crop 224"),
    ({"short_side": 0}, "short_side 0 must be a whole number of pixels >= 1 or null"),
    ({"short_side": True}, "short_side True must be a whole number"),
    ({"naclip_sigma": 0}, "naclip_sigma 0 must be a positive number of patches"),
    ({"templates": "all"}, "templates 'all' is unknown: use imagenet or single"),
])
def test_bad_hyperparameters_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError) as err:
        ClipDenseParams(**fields)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_windows_off_the_patch_grid_are_refused(dense, rng):
    image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"slide_crop 36 is not a multiple of the model's patch size 8 px: "
                                         r"use 32 or 40"):
        dense.logits(image, ["cat"], ClipDenseParams("sclip", slide_crop=36, slide_stride=16))
    with pytest.raises(ValueError, match="slide_stride 12 is not a multiple"):
        dense.logits(image, ["cat"], ClipDenseParams("sclip", slide_crop=32, slide_stride=12))
    with pytest.raises(ValueError, match="slide_crop 4 is not a multiple of the model's patch size 8 px: "
                                         "use 8$"):
        dense.logits(image, ["cat"], ClipDenseParams("sclip", slide_crop=4, slide_stride=4))
    dense.logits(image, ["cat"], ClipDenseParams("sclip", slide_crop=0, slide_stride=12))  # no windows


def test_integral_numbers_are_accepted_and_published_defaults_are_valid():
    params = ClipDenseParams("sclip", slide_crop=224.0, slide_stride=112, logit_scale=50)
    assert (params.slide_crop, type(params.slide_crop), params.logit_scale) == (224, int, 50.0)
    assert set(PUBLISHED) == set(VARIANTS)
    for variant, published in PUBLISHED.items():
        assert published.variant == variant
        published.check_patch(16)
        published.check_patch(14)
    assert published_params("clearclip", prob_thd=0.4).prob_thd == 0.4
    assert "naclip_sigma" not in published_params("sclip").map_key()
    assert published_params("naclip").map_key()["naclip_sigma"] == 5.0
