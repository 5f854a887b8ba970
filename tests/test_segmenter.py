"""The segmenter core (issue: PnP-OVSS on transformers BLIP) on tiny real BLIP models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image, save_tiny_blip
from PIL import Image

from segmenter import Segmenter, SegmenterConfig, build_prompt
from segmenter.backends.blip import BlipBackend
from segmenter.pipeline import dense_crf, select_patches

CLASSES = ["cat", "traffic light", "potted plant"]


def reference_gradcam(model_path, pixels, prompt, layer):
    """The original code's way: full forward with hooks, full backward through everything."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(model_path).eval()  # params require grad
    tokenizer = AutoProcessor.from_pretrained(model_path).tokenizer
    enc = tokenizer([prompt.text], return_offsets_mapping=True, return_tensors="pt")
    store = {}

    def hook(_m, _i, out):
        out[1].retain_grad()
        store["attn"] = out[1]

    handle = model.text_encoder.encoder.layer[layer - 1].crossattention.self.register_forward_hook(
        hook
    )
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                pixel_values=pixels, interpolate_pos_encoding=False)
    out.itm_score[:, 1].sum().backward()
    handle.remove()
    cam = (store["attn"] * store["attn"].grad.clamp(min=0))[0, :, :, 1:]  # [heads, T, N]
    maps = []
    offsets = enc["offset_mapping"][0]
    for s, e in prompt.spans:
        idx = [t for t, (a, b) in enumerate(offsets.tolist()) if b > a and a >= s and b <= e]
        maps.append(cam[:, idx].mean(1))
    side = int(cam.shape[-1] ** 0.5)
    return torch.stack(maps, 1).reshape(cam.shape[0], len(maps), side, side).detach()


def test_optimised_gradcam_equals_full_backward_reference(tiny_blip, rng):
    backend = BlipBackend(tiny_blip, device="cpu")
    images = [random_image(rng, 40, 50), random_image(rng, 31, 29)]
    prompts = [build_prompt("a picture of ", CLASSES), build_prompt("a picture of ", ["dog"])]
    pixels = backend.prepare_images(images, 32)
    ours = backend.gradcam(pixels, prompts, layers=[1, 2, 3])  # one batch, captions padded
    for b in range(2):
        assert ours[b].shape == (3, 4, len(prompts[b].class_names), 4, 4)
        for layer in (1, 2, 3):
            ref = reference_gradcam(tiny_blip, pixels[b : b + 1], prompts[b], layer)
            # the last layer's class tokens never reach the [CLS] output: zero maps there
            assert (ref.abs().max() > 0) == (layer < 3)
            torch.testing.assert_close(ours[b][layer - 1], ref, rtol=1e-4, atol=1e-7)


def test_fused_vision_attention_gives_the_eager_maps(tiny_blip, rng):
    """The ViT's SDPA attention (our speed path) changes no map: same as transformers' eager one."""
    fused, eager = BlipBackend(tiny_blip, device="cpu"), BlipBackend(tiny_blip, device="cpu", sdpa=False)
    attention = fused.model.vision_model.encoder.layers[0].self_attn
    assert attention.forward.__func__ is not type(attention).forward  # the fused path is installed
    pixels = fused.prepare_images([random_image(rng, 32, 32) for _ in range(2)], 32)
    prompts = [build_prompt("a picture of ", CLASSES)] * 2
    for a, b in zip(fused.gradcam(pixels, prompts, [1, 2]), eager.gradcam(pixels, prompts, [1, 2])):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_segment_sets_no_parameter_gradient(tiny_blip, rng):
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(0, 3)))
    result = seg.segment(random_image(rng, 32, 32), CLASSES)
    assert result.maps.shape == (3, 4, 4) and np.abs(result.maps).sum() > 0
    params = list(seg.backend.model.named_parameters())
    assert params and all(p.grad is None for _, p in params)
    assert not any(p.requires_grad for n, p in params if n.startswith("vision_model"))


class RecordingBackend(BlipBackend):
    """The real backend, remembering the dropped-patch mask and the maps of every round."""

    def gradcam(self, pixel_values, prompts, layers, dropped=None, **_options):
        out = super().gradcam(pixel_values, prompts, layers, dropped)
        self.rounds.append((None if dropped is None else dropped.clone(), out))
        return out


@pytest.mark.parametrize("schedule,expected_new", [("topk", [3, 3, 3]), ("halving", [8, 4, 2])])
def test_salience_dropout_drops_the_right_patches_each_round(tiny_blip, rng, schedule, expected_new):
    backend = RecordingBackend(tiny_blip, device="cpu")
    backend.rounds = []
    heads = (1, 2)
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=heads,
                             dropout_schedule=schedule, dropout_rounds=4, dropout_k=3)
    seg = Segmenter(config, backend=backend)
    maps = seg.relevance_maps([random_image(rng, 32, 32)], [CLASSES])[0]
    assert len(backend.rounds) == 4 and backend.rounds[0][0] is None
    dropped = torch.zeros(16, dtype=torch.bool)
    total = torch.zeros(3, 4, 4)
    prev = torch.zeros(3, 4, 4)
    for r, (mask, cams) in enumerate(backend.rounds):
        if r:
            new = mask[0] & ~dropped
            assert int(new.sum()) == expected_new[r - 1]
            assert torch.equal(mask[0] & dropped, dropped)  # drops are kept
            # the new drops are the most salient patches of the previous round, not yet dropped
            salience = prev.sum(0).flatten().masked_fill(dropped, float("-inf"))
            order = torch.argsort(salience, descending=True)
            assert set(order[: int(new.sum())].tolist()) == set(torch.nonzero(new).flatten().tolist())
            dropped = mask[0]
        prev = cams[0][0, list(heads)].mean(0).masked_fill(dropped.view(4, 4), 0.0)
        free = prev.sum(0).flatten()[~dropped].tolist()
        assert len(set(free)) == len(free)  # no ties among candidates: the order is defined
        assert torch.all(prev.flatten(1)[:, dropped] == 0)  # dropped patches zeroed in later maps
        total += prev
    np.testing.assert_allclose(maps, total.numpy(), rtol=1e-6)


def test_select_patches_schedules():
    salience = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 0.0])
    dropped = torch.tensor([True, False, False, False, False, False])
    assert torch.nonzero(select_patches(salience, dropped, "topk", 2)).flatten().tolist() == [2, 3]
    assert torch.nonzero(select_patches(salience, dropped, "halving", 0)).flatten().tolist() == [2, 3]
    everything = torch.ones(6, dtype=torch.bool)
    assert not select_patches(salience, everything, "topk", 2).any()


def test_first_round_counted_twice_when_asked(tiny_blip, rng):
    image = random_image(rng, 32, 32)
    base = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), dropout_rounds=1)
    once = Segmenter(base).relevance_maps([image], [CLASSES])[0]
    twice = Segmenter(base.replace(dropout_count_first_twice=True)).relevance_maps(
        [image], [CLASSES])[0]
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)


def test_config_yaml_round_trip_and_errors(tmp_path):
    config = SegmenterConfig(layer=5, heads=(1, 7), dropout_schedule="halving", threshold=0.35,
                             background="auto", background_min_classes=2, crf=False)
    assert SegmenterConfig.from_yaml(config.to_yaml()) == config
    path = tmp_path / "best.yaml"
    path.write_text(config.to_yaml(provenance={"study": "s", "trial": 3}))
    assert SegmenterConfig.from_yaml(path) == config
    assert SegmenterConfig.from_yaml(str(path)) == config
    with pytest.raises(ValueError, match="threshold"):
        SegmenterConfig(threshold=1.5)
    with pytest.raises(ValueError, match="dropout_schedule"):
        SegmenterConfig(dropout_schedule="random")
    with pytest.raises(ValueError, match="lyer"):
        SegmenterConfig.from_yaml("lyer: 3\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        SegmenterConfig.from_yaml("layer: [3\n")


def test_missing_layer_head_and_empty_class_list_errors(tiny_blip, rng):
    with pytest.raises(ValueError, match=r"layer 4 does not exist .* valid layers are 1\.\.3"):
        Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=4, heads=(0,)))
    with pytest.raises(ValueError, match=r"head 4 does not exist .* valid heads are 0\.\.3"):
        Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=1, heads=(0, 4)))
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=1, heads=(0,)))
    with pytest.raises(ValueError, match="class list is empty"):
        seg.segment(random_image(rng, 20, 20), [])
    with pytest.raises(OSError, match="could not load"):
        Segmenter(SegmenterConfig(model=str(tiny_blip) + "-missing", image_size=32))


def test_crf_snaps_a_blurry_unary_to_the_colour_edge():
    height, width = 40, 60
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :30] = (220, 30, 30)  # red left half
    image[:, 30:] = (30, 30, 220)  # blue right half
    ramp = 1.0 / (1.0 + np.exp(-(np.arange(width) - 40) / 6.0))  # blurry boundary at x=40
    right = np.tile(ramp, (height, 1)).astype(np.float32)
    probs = np.stack([1.0 - right, right])
    before = probs.argmax(0)
    after = dense_crf(image, probs, SegmenterConfig()).argmax(0)
    assert (before[:, 30:40] == 0).all()  # the unary puts the edge too far right
    assert (after[:, 32:40] == 1).all() and (after[:, :28] == 0).all()
    assert (after != before).sum() > 0


@pytest.mark.parametrize("shape", [(37, 45, 3), (23, 61), (41, 19, 4), (33, 33, 1)])
def test_label_map_matches_input_size_and_kind(tiny_blip, rng, shape):
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,),
                                    dropout_rounds=2, dropout_k=2))
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    result = seg.segment(image, ["cat", "dog"])
    assert result.label_map.shape == shape[:2]
    assert set(np.unique(result.label_map)) <= {0, 1, 2}
    assert result.class_names == ("cat", "dog")


def test_pil_images_and_background_rules(tiny_blip, rng):
    image = Image.fromarray(random_image(rng, 30, 40)).convert("RGBA")
    base = SegmenterConfig(model=tiny_blip, image_size=32, layer=2, heads=(1,), threshold=0.9)
    never = Segmenter(base.replace(background="never")).segment(image, ["cat", "dog"])
    assert never.label_map.min() >= 1  # no background channel: every pixel gets a class
    always = Segmenter(base.replace(background="always", crf=False, blur_sigma=0.0)).segment(
        image, ["cat", "dog"])
    assert (always.label_map == 0).any()  # at t=0.9 most pixels keep no class


def test_local_directory_loads_with_from_pretrained_offline(tmp_path, rng):
    path = save_tiny_blip(tmp_path / "model", text_layers=2, heads=2, image_size=48, patch=16)
    seg = Segmenter(SegmenterConfig(model=path, image_size=48, layer=2, heads=(1,)))
    assert (seg.backend.num_layers, seg.backend.num_heads) == (2, 2)
    assert seg.segment(random_image(rng, 50, 50), ["sky"]).maps.shape == (1, 3, 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Segmenter(SegmenterConfig(model=path, image_size=40, layer=1, heads=(0,)))


def test_bfloat16_maps_match_float32_within_tolerance(tiny_blip, rng):
    """The reduced-precision path used on GPUs keeps the maps (checked here on CPU)."""
    images = [random_image(rng, 32, 32) for _ in range(3)]
    config = SegmenterConfig(model=tiny_blip, image_size=32, layer=1, heads=(0, 1, 2, 3),
                             dropout_rounds=1)
    full = Segmenter(config, device="cpu", dtype="float32")
    half = Segmenter(config, device="cpu", dtype="bfloat16")
    assert half.backend.dtype == torch.bfloat16 and full.backend.dtype == torch.float32
    for a, b in zip(full.relevance_maps(images, [CLASSES] * 3), half.relevance_maps(images, [CLASSES] * 3)):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 0.1 * scale  # bfloat16 keeps ~3 significant digits
        # the ranking of patches, which thresholding and dropout act on, is kept
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_torch_blur_equals_scipy_blur(rng):
    from segmenter.pipeline import gaussian_blur

    channels = rng.random((3, 37, 52)).astype(np.float32)
    channels[1] = 0.0  # a constant channel keeps its value
    ours = gaussian_blur(channels, 0.05, backend="torch")
    reference = gaussian_blur(channels, 0.05, backend="scipy")
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    # photo-sized, with a kernel a third of the image wide, and a constant channel of ones
    # and a background-like channel: ones but for a small hole (min-max after the blur magnifies
    # any rounding error of the blur there)
    photo = rng.random((4, 240, 320)).astype(np.float32)
    photo[2] = 1.0
    photo[3] = 1.0
    photo[3, 100:104, 200:204] = 0.0
    ours, reference = gaussian_blur(photo, 0.05, backend="torch"), gaussian_blur(photo, 0.05, backend="scipy")
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    assert (ours[2] == 1.0).all()


def test_conv_crf_also_snaps_a_blurry_unary_to_the_colour_edge():
    from segmenter.refine import conv_crf

    height, width = 40, 60
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :30] = (220, 30, 30)
    image[:, 30:] = (30, 30, 220)
    ramp = 1.0 / (1.0 + np.exp(-(np.arange(width) - 40) / 6.0))
    right = np.tile(ramp, (height, 1)).astype(np.float32)
    probs = np.stack([1.0 - right, right])
    after = conv_crf(image, probs, SegmenterConfig()).argmax(0)
    assert (after[:, 32:40] == 1).all() and (after[:, :28] == 0).all()
    # end to end through the config switch
    config = SegmenterConfig(crf_backend="conv", blur_backend="torch")
    assert SegmenterConfig.from_yaml(config.to_yaml()) == config


def test_batch_size_auto_fills_free_memory_and_rejects_nonsense(tiny_blip):
    from segmenter.backends import batch_size_for_memory, parse_batch_size

    gib = 1024**3
    assert batch_size_for_memory(40 * gib, 2 * gib) == 14  # 70% of 40 GiB in 2 GiB images
    assert batch_size_for_memory(1 * gib, 2 * gib) == 1  # never zero
    assert batch_size_for_memory(80 * gib, 0.1 * gib, cap=64) == 64
    assert parse_batch_size("auto") == "auto" and parse_batch_size("12") == 12
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        parse_batch_size("0")
    seg = Segmenter(SegmenterConfig(model=tiny_blip, image_size=32, layer=1, heads=(0,)), device="cpu")
    assert seg.batch_size == 8  # CPU: no memory probe


def test_positions_are_interpolated_bicubically_to_the_patch_grid(tiny_blip, rng):
    """At an image size other than the checkpoint's (336 on a 384 BLIP), the position grid is
    resized bicubically (align_corners=False) to exactly the patch grid, as the authors' code
    does once at load; transformers 4.41-4.44 scaled it by a factor instead, with other maps."""
    backend = BlipBackend(tiny_blip, device="cpu")
    embeddings = backend.model.vision_model.embeddings
    seen = {}
    handle = embeddings.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    pixels = backend.prepare_images([random_image(rng, 40, 40)], 48)  # native 32: a 4x4 grid -> 6x6
    try:
        backend.patch_features(pixels)
    finally:
        handle.remove()
    with torch.no_grad():
        table = embeddings.position_embedding  # [1, 1 + 4*4, D]
        table = table.weight[None] if isinstance(table, torch.nn.Embedding) else table
        dim = table.shape[-1]
        grid = table[:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        positions = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, dim)], dim=1)
        patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [1, 36, D]
        tokens = torch.cat([embeddings.class_embedding.expand(1, 1, -1), patches], dim=1)
    assert seen["out"].shape == (1, 37, dim)
    torch.testing.assert_close(seen["out"], tokens + positions, rtol=1e-5, atol=1e-6)
