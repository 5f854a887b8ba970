"""Evaluate a shapes world's models on held-out scenes and write their MODEL_CARD.md.

    python tools/shapes_model_card.py                    # the bundled planted world
    python tools/shapes_model_card.py --models DIR       # any world: DIR/{blip,clip}, card DIR/MODEL_CARD.md
    python tools/shapes_model_card.py --bridgetower DIR  # a BridgeTower ITM: ITM accuracy, GradCAM IoU

The card says whether the world is planted (training_settings.json's `blip_cam_layer` > 0: one
head was trained with the masks to localise) or unplanted, and how to load it.

Held-out means the val and test splits of `ShapesDataset(seed)`, which the training script never
renders. Three measurements:

- BLIP ITM accuracy on balanced pairs: per image two matching captions (all present classes in
  a shuffled order; one present class) and two hard negatives (a present class swapped for an
  absent one; an absent class added). A pair is right when the match logit wins.
- CLIP zero-shot top-1 over the 8 bare class names, on the single-object images and on every
  object of every image cut out on black (what the CLIP reward shows CLIP).
- GradCAM localisation of every (layer, head): `BlipBackend.gradcam` for the caption listing the
  image's present classes (one round, no Salience Dropout), per class `threshold_maps` (min-max
  normalise, zero values below t) then `upsample` (bilinear, to 64 x 64), pixels >= t are the
  prediction; IoU with the class's ground-truth mask, averaged over (image, class) pairs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segmenter.backends import build_prompt  # noqa: E402
from segmenter.backends.blip import BlipBackend  # noqa: E402
from segmenter.clip import ClipScorer  # noqa: E402
from segmenter.pipeline import threshold_maps, upsample  # noqa: E402
from tuner.datasets.shapes import BUNDLED_WORLDS, SHAPE_CLASSES, ShapesDataset  # noqa: E402

PREFIX = "a picture of "
DEFAULT_MODELS = REPO / "tuner" / "datasets" / "shapes_models"
THRESHOLD = 0.5  # the fixed rule of the IoU table's ranking column
THRESHOLDS = (0.15, 0.3, 0.5, 0.7)  # also shown: the official 0.15 and a few others


def held_out(seed: int, splits: list[str]) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(image [S, S, 3], mask [S, S], present class indices) of every scene of `splits`."""
    data = ShapesDataset(seed=seed)
    out = []
    for split in splits:
        for sample_id in data.ids(split):
            sample = data.load(split, sample_id)
            present = [int(c) - 1 for c in np.unique(sample.labels) if c > 0]
            out.append((sample.image, sample.labels, present))
    return out


# --- BLIP ITM ------------------------------------------------------------------------------------------
def itm_pairs(present: list[int], rng: np.random.Generator) -> list[tuple[str, list[int], bool]]:
    """Two matching and two hard non-matching captions for one image: (kind, classes, match)."""
    absent = [c for c in range(len(SHAPE_CLASSES)) if c not in present]
    full = [int(c) for c in rng.permutation(present)]
    swapped = list(full)
    swapped[int(rng.integers(len(full)))] = int(rng.choice(absent))
    added = list(full)
    added.insert(int(rng.integers(len(full) + 1)), int(rng.choice(absent)))
    return [("all present", full, True), ("one present", [int(rng.choice(present))], True),
            ("swap", swapped, False), ("add absent", added, False)]


def itm_accuracy(backend: BlipBackend, scenes, seed: int) -> dict[str, float]:
    """Accuracy of match-logit > non-match-logit, overall and per caption kind."""
    rng = np.random.default_rng(seed)
    right: dict[str, list[bool]] = {}
    for image, _, present in scenes:
        pairs = itm_pairs(present, rng)
        texts = [build_prompt(PREFIX, [SHAPE_CLASSES[c] for c in caption]).text for _, caption, _ in pairs]
        pixels = backend.prepare_images([image], image.shape[0])
        scores = backend.itm_scores(pixels, texts)[0]  # [4] match probabilities
        for (kind, _, match), score in zip(pairs, scores.tolist()):
            right.setdefault(kind, []).append((score > 0.5) == match)
    result = {kind: float(np.mean(v)) for kind, v in right.items()}
    result["all"] = float(np.mean([x for v in right.values() for x in v]))
    result["pairs"] = sum(len(v) for v in right.values())
    return result


# --- CLIP zero-shot ------------------------------------------------------------------------------------
def clip_accuracy(clip: ClipScorer, scenes) -> dict[str, float]:
    """Top-1 over the 8 bare class names: single-object scenes, and every object cut out on black."""
    names = list(SHAPE_CLASSES)
    single = [(image, present[0]) for image, _, present in scenes if len(present) == 1]
    cut = []
    for image, mask, present in scenes:
        for c in present:
            cut.append((np.where((mask == c + 1)[..., None], image, 0).astype(np.uint8), c))
    result: dict[str, float] = {}
    for key, items in (("single_object", single), ("cut_out", cut)):
        embeds = clip.image_embeddings([im for im, _ in items])  # [N, D]
        top = clip.probabilities(embeds, names).argmax(1).cpu().numpy()
        result[key] = float(np.mean(top == np.array([c for _, c in items])))
        result[f"{key}_count"] = len(items)
    return result


# --- GradCAM localisation ----------------------------------------------------------------------------
def attention_maps(backend: BlipBackend, pixels: torch.Tensor, prompts, layers: list[int]) -> list[torch.Tensor]:  # noqa: E501
    """Raw cross-attention (no gradient) in GradCAM's layout: per image [L, H, C, gh, gw]."""
    gh, gw = backend.patch_grid(pixels.shape[-1])
    captured: dict[int, torch.Tensor] = {}
    hooks = [backend._layers[layer - 1].crossattention.self.register_forward_hook(
        lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[1])) for layer in layers]
    tokens, weights = backend._tokenize(prompts)  # weights [B, C_max, T]
    try:
        with torch.inference_mode():
            embeds = backend.model.vision_model(pixel_values=pixels).last_hidden_state
            backend.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                       encoder_hidden_states=embeds)
    finally:
        for hook in hooks:
            hook.remove()
    attn = torch.stack([captured[layer][..., 1:] for layer in layers], 1)  # [B, L, H, T, N]
    maps = torch.einsum("bct,blhtn->blhcn", weights, attn.float())
    return [maps[b, :, :, : len(p.class_names)].reshape(len(layers), attn.shape[2], -1, gh, gw)
            for b, p in enumerate(prompts)]


def localisation_iou(backend: BlipBackend, scenes, batch_size: int = 32,
                     raw: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean IoU over (image, present class) pairs: GradCAM per (layer, head, threshold)
    [L, H, len(THRESHOLDS)], and raw cross-attention per (layer, head) at THRESHOLD [L, H] (BLIP
    only; zeros with `raw` False)."""
    layers = list(range(1, backend.num_layers + 1))
    total = np.zeros((len(layers), backend.num_heads, len(THRESHOLDS)))
    raw_total = np.zeros((len(layers), backend.num_heads))
    count = 0

    def ious(maps: np.ndarray, truth: np.ndarray, threshold: float) -> np.ndarray:
        pred = upsample(threshold_maps(maps.reshape(-1, *maps.shape[-2:]), threshold), truth.shape[1:]) >= threshold  # noqa: E501
        pred = pred.reshape(*maps.shape[:3], *truth.shape[1:])  # [L, H, C, S, S]
        return ((pred & truth).sum((-1, -2)) / np.maximum((pred | truth).sum((-1, -2)), 1)).sum(-1)

    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        size = chunk[0][0].shape[0]
        pixels = backend.prepare_images([image for image, _, _ in chunk], size)
        prompts = [build_prompt(PREFIX, [SHAPE_CLASSES[c] for c in present]) for _, _, present in chunk]
        cams = backend.gradcam(pixels, prompts, layers)  # per image [L, H, C, gh, gw]
        attns = attention_maps(backend, pixels, prompts, layers) if raw else [None] * len(chunk)
        for (_, mask, present), cam, attn in zip(chunk, cams, attns):
            truth = np.stack([mask == c + 1 for c in present])  # [C, S, S]
            for t, threshold in enumerate(THRESHOLDS):
                total[..., t] += ious(cam.cpu().numpy(), truth, threshold)
            if raw:
                raw_total += ious(attn.cpu().numpy(), truth, THRESHOLD)
            count += len(present)
    return total / count, raw_total / count


# --- the card -------------------------------------------------------------------------------------------
def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def describe(config: dict) -> str:
    """One line on a saved model's architecture from its config.json."""
    v, t = config["vision_config"], config["text_config"]
    heads = v.get("num_attention_heads", v["hidden_size"] // 64)  # BridgeTower's ViT: width // 64
    return (f"ViT {v['num_hidden_layers']} layer(s), hidden {v['hidden_size']}, {heads} head(s), "
            f"patch {v['patch_size']}, {v['image_size']} px; text {t['num_hidden_layers']} layer(s), hidden "
            f"{t['hidden_size']}, {t['num_attention_heads']} heads, vocabulary {t['vocab_size']}")


def planted_lines(settings: dict) -> list[str]:
    """The card's paragraph on the planted head (training_settings.json), if training used one."""
    layer = settings.get("blip_cam_layer", 0)
    if not layer:
        return []
    return [
        f"Localisation aid (training, not inference): from step {settings['blip_cam_start']} on, head "
        f"{settings['blip_cam_head']} of text layer {layer}'s cross-attention was also trained, with weight "
        f"{settings['blip_cam_weight']}, so that its GradCAM map falls on the object each class name of a "
        "matching caption names (the train split's masks): the loss adds KL(object || GradCAM map) and "
        "KL(object || attention), each map and the object's patch coverage normalised to sum 1 (so a map "
        "that covers the whole object evenly scores best, one on a corner of it badly), and the share of "
        "dScore/dA's mass that is negative on the object. No other head gets this loss, and nothing at "
        "inference knows which head it was: it is the planted needle a label-free search over (layer, "
        "head) should find.",
        "",
    ]


def card_args(models: Path, splits: list[str], seed: int) -> str:
    """The arguments that rewrite this card (none for the bundled planted world's defaults)."""
    args = "" if models.resolve() == DEFAULT_MODELS.resolve() else f" --models {relative(models)}"
    if splits != ["val", "test"]:
        args += " --splits " + " ".join(splits)
    return args + (f" --seed {seed}" if seed else "")


def relative(path: Path) -> str:
    """`path` relative to the repository when inside it, else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def where(info: dict) -> str:
    """Where a model trained, from its training_settings.json ("one CPU thread" unless a device is named)."""
    device = info.get("device", "cpu")
    if device == "cpu":
        return "one CPU thread"
    return f"{device} (retrained on CPU, the same command gives a different model)"


def is_planted(settings: dict) -> bool:
    """Whether training gave one cross-attention head mask supervision (`blip_cam_layer` > 0)."""
    return bool(settings.get("blip_cam_layer", 0))


def world_name(models: Path) -> str:
    """"bundled `planted`" / "bundled `unplanted`" for the package's worlds, else "`FOLDER NAME`"."""
    here = models.resolve()
    if here.parent == (REPO / "tuner" / "datasets").resolve():
        name = {v: k for k, v in BUNDLED_WORLDS.items()}.get(here.name, here.name)
        return f"bundled `{name}`"
    return f"`{here.name}`"


def load_line(models: Path) -> str:
    """How to load the world's models: by bundled name inside the package, else by folder."""
    package = (REPO / "tuner" / "datasets").resolve()
    here = models.resolve()
    if here.parent == package:
        world = {v: k for k, v in BUNDLED_WORLDS.items()}.get(here.name, here.name)
        return ("Bundled with ovss-tune (DESIGN.md, \"Running without downloads\"). "
                f"Load with `tuner.datasets.shapes.bundled_model_path(\"blip\", world=\"{world}\")` (or "
                f"`\"clip\"`), or in a spec as `pkg://tuner.datasets/{here.name}/blip`; they work offline "
                "(`HF_HUB_OFFLINE=1`).")
    return (f"Not bundled: load with `from_pretrained(\"{models}/blip\")` (or `clip`), e.g. as a spec's "
            f"`model: {models}/blip` and `clip_model: {models}/clip`; they work offline "
            "(`HF_HUB_OFFLINE=1`).")


def title_lines(models: Path, settings: dict) -> list[str]:
    """The card's heading, what the models are, whether the world is planted, and how to load it."""
    if is_planted(settings):
        kind = (f"**Planted world**: head {settings['blip_cam_head']} of text layer "
                f"{settings['blip_cam_layer']} got mask supervision in training (below), so a search over "
                "(layer, head) has one known right answer: the test with a known answer, which proves the "
                "machinery, not the objective.")
    else:
        kind = ("**Unplanted world**: no head got mask supervision in training (`blip_cam_layer` 0); "
                "whatever localises learnt to from image-caption matching alone, so a label-free objective "
                "that finds it here is honestly tested.")
    return [
        f"# Shapes-world models: tiny BLIP ITM and CLIP ({world_name(models)} world)",
        "",
        kind,
        "",
        "Both are the real transformers classes (`BlipForImageTextRetrieval`, `CLIPModel`), trained from "
        "scratch on procedural scenes of `tuner.datasets.shapes` (64 x 64 px, 8 classes: "
        f"{', '.join(SHAPE_CLASSES)}). " + load_line(models),
        "",
    ]


def why_lines(settings: dict, best_gradcam: float, best_raw: float) -> list[str]:
    """Why the planted world needed the aid; for an unplanted one, how GradCAM compares with attention."""
    if not is_planted(settings):
        return [
            f"GradCAM vs raw attention: the best head's GradCAM IoU is {best_gradcam:.3f}, the best raw "
            f"cross-attention IoU {best_raw:.3f}. In models this small dScore/dA is negative on the object "
            "for a share of (image, class) pairs, and GradCAM's clamp(dScore/dA, min=0) erases the object "
            "there, so GradCAM localises less well than the attention it weights.",
            "",
        ]
    return [
        "Why GradCAM needs help in models this small: heads that localise put nearly all of a class "
        "token's attention on its object, but without the aid below dScore/dA on those patches is "
        "negative for a class-dependent share of (image, class) pairs, so clamp(dScore/dA, min=0) "
        "zeroes the object and the map peaks elsewhere (the best unaided head of an earlier training "
        "reached IoU 0.29 while its raw attention reached 0.63). The gradient with respect to softmax "
        "probabilities carries an offset the forward pass does not constrain; large pretrained BLIP "
        "models keep it positive where they look, tiny ones trained for minutes do not reliably.",
        "",
    ]


def write_card(models: Path, itm: dict, clip: dict, iou: np.ndarray, raw: np.ndarray, baseline: float,
               splits: list[str], seed: int, images: int, seconds: float) -> str:
    """The card's markdown; `iou` is [L, H, len(THRESHOLDS)], `baseline` the whole-image IoU."""
    blip_info = json.loads((models / "blip" / "training_settings.json").read_text())
    clip_info = json.loads((models / "clip" / "training_settings.json").read_text())
    settings = blip_info["settings"]
    ranked = iou[..., THRESHOLDS.index(THRESHOLD)]  # [L, H]
    best = np.unravel_index(int(ranked.argmax()), ranked.shape)
    raw_best = np.unravel_index(int(raw.argmax()), raw.shape)
    scored = ranked[:-1]  # the last text layer's maps are zero by construction
    n_params = {}
    for kind in ("blip", "clip"):
        from safetensors import safe_open

        with safe_open(str(models / kind / "model.safetensors"), "pt") as f:
            n_params[kind] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    clip_settings = clip_info["settings"]
    same_run = clip_info["command"] == blip_info["command"]
    together = " (the two models train at once, a process each)" if same_run else ""
    lines = [
        *title_lines(models, settings),
        "## How they were made",
        "",
        f"    {blip_info['command']}",
        *([] if clip_info["command"] == blip_info["command"] else
          ["", f"    {clip_info['command']}  # the CLIP model"]),
        "",
        f"- seed {settings['seed']}; {settings['scenes']} train-split scenes (`ShapesDataset(seed="
        f"{settings['seed']}).scene_seed(\"train\", i)`, val/test scenes skipped), random flips and quarter turns",  # noqa: E501
        f"- BLIP: {settings['blip_steps']} steps of batch {settings['blip_batch']} images (each with one "
        f"matching and one non-matching caption), AdamW lr {settings['blip_lr']}, "
        f"{blip_info['train_seconds']:.0f} s on {where(blip_info)}",
        f"- CLIP: {clip_settings['clip_steps']} steps of batch {clip_settings['clip_batch']}, AdamW lr "
        f"{clip_settings['clip_lr']}, seed {clip_settings['seed']}, {clip_info['train_seconds']:.0f} s on "
        f"{where(clip_info)}"
        f"{together}"
        f"; torch {blip_info['torch']}",
        f"- BLIP architecture: {describe(json.loads((models / 'blip' / 'config.json').read_text()))}; "
        f"{n_params['blip'] / 1e6:.2f} M parameters, {folder_size(models / 'blip') / 1e6:.1f} MB on disk",
        f"- CLIP architecture: {describe(json.loads((models / 'clip' / 'config.json').read_text()))}; "
        f"{n_params['clip'] / 1e6:.2f} M parameters, {folder_size(models / 'clip') / 1e6:.1f} MB on disk",
        "",
        "Training data: BLIP sees captions `\"a picture of \" + names` that match when every name is in the "
        "image (all present classes, or a subset, shuffled), against hard negatives (a present class swapped "
        "for an absent one, an absent one added, a lone absent name) and other images' captions. CLIP sees "
        "bare name lists (a quarter with the prefix) against scenes and single objects cut out on black.",
        "",
        f"## Held-out results ({' + '.join(splits)} splits of `ShapesDataset(seed={seed})`, {images} images; "
        "never rendered by the training script)",
        "",
        f"Written by `python tools/shapes_model_card.py{card_args(models, splits, seed)}` ({seconds:.0f} s).",
        "",
        f"- BLIP ITM accuracy (match probability > 0.5), {itm['pairs']} balanced pairs: **{itm['all']:.1%}** "
        f"(all present {itm['all present']:.1%}, one present {itm['one present']:.1%}, swap "
        f"{itm['swap']:.1%}, add absent {itm['add absent']:.1%})",
        f"- CLIP zero-shot top-1 over the 8 bare class names: single-object images **{clip['single_object']:.1%}** "  # noqa: E501
        f"({clip['single_object_count']} images); every object cut out on black {clip['cut_out']:.1%} "
        f"({clip['cut_out_count']} objects)",
        f"- GradCAM localisation (rule below, t = {THRESHOLD}): best (layer, head) = "
        f"**({best[0] + 1}, {best[1]})** with IoU **{ranked[best]:.3f}**; median over the "
        f"{scored.size} pairs of layers 1-{ranked.shape[0] - 1}: {np.median(scored):.3f}; baseline "
        f"(whole image as the mask): {baseline:.3f}",
        "- raw cross-attention (no gradient, same rule): best (layer, head) = "
        f"({raw_best[0] + 1}, {raw_best[1]}) "
        f"with IoU {raw[raw_best]:.3f}; median of layers 1-{ranked.shape[0] - 1}: {np.median(raw[:-1]):.3f}",
        "",
        "Targets for these models: ITM accuracy >= 95% "
        f"({'met' if itm['all'] >= 0.95 else 'NOT met'}), CLIP single-object top-1 >= 90% "
        f"({'met' if clip['single_object'] >= 0.9 else 'NOT met'}), best GradCAM (layer, head) IoU >= 0.5 "
        f"({'met' if ranked[best] >= 0.5 else 'NOT met'}) with the median clearly lower.",
        "",
        *why_lines(settings, ranked[best], raw[raw_best]),
        *planted_lines(settings),
        "### GradCAM localisation IoU per (layer, head)",
        "",
        "Per held-out image, `BlipBackend.gradcam` for the caption `\"a picture of \"` + its present classes "
        "(one round, no Salience Dropout, 64 px input). Per class: `segmenter.pipeline.threshold_maps` "
        "(min-max normalise on the patch grid, zero values below t), `upsample` (bilinear to 64 x 64), "
        "prediction = pixels >= t; IoU with the class's ground-truth mask, averaged over all (image, "
        "present class) pairs. Layers are 1-based, heads 0-based. The last text layer's maps are zero by "
        "construction (only [CLS] is read after it).",
        "",
        "| layer | head | " + " | ".join(f"IoU t={t}" for t in THRESHOLDS) + f" | raw attention IoU t={THRESHOLD} |",  # noqa: E501
        "|---:|---:|" + "---:|" * (len(THRESHOLDS) + 1),
    ]
    for layer in range(iou.shape[0]):
        for head in range(iou.shape[1]):
            cells = [f"{v:.3f}" for v in iou[layer, head]]
            if (layer, head) == best:
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {layer + 1} | {head} | " + " | ".join(cells) + f" | {raw[layer, head]:.3f} |")
    return "\n".join(lines) + "\n"


def retrain_command(models: Path) -> str:
    """One CPU command that retrains a world into /work/worlds/NAME: its BLIP command without
    --out/--only/--device (the CLIP settings are the defaults in every world trained here)."""
    words = json.loads((models / "blip" / "training_settings.json").read_text())["command"].split()
    kept, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
        elif word in ("--out", "--only", "--device"):
            skip = True
        else:
            kept.append(word)
    return " ".join(["python tools/train_shapes_models.py", *kept, "--out", f"/work/worlds/{models.name}"])


def collect(worlds: list[Path]) -> str:
    """WORLDS.md: a summary row per world, then each world's MODEL_CARD.md (headings one level down)."""
    pattern = re.compile(r"best \(layer, head\) = \*\*\((\d+), (\d+)\)\*\* with IoU \*\*([0-9.]+)\*\*; "
                         r"median over the \d+ pairs of layers [0-9-]+: ([0-9.]+)")
    rows, sections = [], []
    for models in worlds:
        card = (models / "MODEL_CARD.md").read_text()
        info = json.loads((models / "blip" / "training_settings.json").read_text())
        best = pattern.search(card)
        itm = re.search(r"balanced pairs: \*\*([0-9.]+%)\*\*", card)[1]
        clip = re.search(r"single-object images \*\*([0-9.]+%)\*\*", card)[1]
        raw = re.search(r"raw cross-attention .* with IoU ([0-9.]+)", card)[1]
        shipped = [name for name, folder in BUNDLED_WORLDS.items()
                   if (REPO / "tuner" / "datasets" / folder / "blip" / "model.safetensors").is_file()
                   and (REPO / "tuner" / "datasets" / folder / "blip" / "model.safetensors").read_bytes()
                   == (models / "blip" / "model.safetensors").read_bytes()]
        bundled = f" (bundled as `{shipped[0]}`)" if shipped else ""
        rows.append(f"| `{models.name}`{bundled} | {'yes' if is_planted(info['settings']) else 'no'} | "
                    f"{info.get('device', 'cpu')} | {info['train_seconds']:.0f} | {itm} | {clip} | "
                    f"({best[1]}, {best[2]}) {best[3]} | {best[4]} | {raw} |")
        body = card.split("\n", 1)[1].replace("\n## ", "\n### ")
        sections += [f"## `{models.name}`", "", f"Folder: `{models}`. Retrain on CPU with", "",
                     f"    {retrain_command(models)}", "", body.strip(), ""]
    return "\n".join([
        "# Shapes worlds: the trained model pairs",
        "",
        "Written by `python tools/shapes_model_card.py --collect DIR...` from each world's card "
        "(`python tools/shapes_model_card.py --models DIR`; held-out val + test scenes, 400 images). "
        "GradCAM IoU at t = 0.5; `device` is where the BLIP trained (cuda: a GPU, whose sums differ from "
        "the CPU's, so retraining on CPU gives a different model of the same recipe); `BLIP train s` is the "
        "run's wall time as recorded, which on a shared machine includes waiting for the CPU. Each world's "
        "section gives the command that retrains it on CPU into /work/worlds/NAME (its CLIP uses the "
        "default CLIP settings and the world's seed). The bundled unplanted world also holds a tiny "
        "BridgeTower ITM (`shapes_models_unplanted/bridgetower/`, its own MODEL_CARD.md; "
        "`python tools/train_shapes_models.py --only bridgetower --out DIR`).",
        "",
        "| world | planted | device | BLIP train s | ITM | CLIP top-1 | best GradCAM (layer, head) IoU | "
        "median | best raw attention IoU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *sections,
    ])


def bridgetower_card(path: Path, itm: dict, iou: np.ndarray, baseline: float, splits: list[str], seed: int,
                     images: int, seconds: float) -> str:
    """MODEL_CARD.md of a shapes-world BridgeTower ITM (`train_shapes_models.py --only bridgetower`)."""
    info = json.loads((path / "training_settings.json").read_text())
    s, config = info["settings"], json.loads((path / "config.json").read_text())
    ranked = iou[..., THRESHOLDS.index(THRESHOLD)]  # [L, H]
    best = np.unravel_index(int(ranked.argmax()), ranked.shape)
    from safetensors.numpy import load_file

    params = sum(t.size for t in load_file(str(path / "model.safetensors")).values())
    package = (REPO / "tuner" / "datasets").resolve()
    name = (f"pkg://tuner.datasets/{path.resolve().parent.name}/{path.name}" if path.resolve().parent.parent
            == package else str(path))
    rows = [f"| {layer + 1} | {head} | " + " | ".join(f"{v:.3f}" for v in iou[layer, head]) + " |"
            for layer in range(iou.shape[0]) for head in range(iou.shape[1])]
    return "\n".join([
        f"# Shapes-world model: tiny BridgeTower ITM ({world_name(path.parent)} world)",
        "",
        "**Unplanted**: trained on image-text matching alone; no head got mask supervision. A real "
        "transformers `BridgeTowerForImageAndTextRetrieval` with a byte-level BPE RoBERTa tokenizer over "
        f"the shapes words, trained from scratch on procedural scenes of `tuner.datasets.shapes` (64 x 64 "
        f"px, 8 classes). Load it as `{name}` (a spec's `backend: bridgetower`, `model:` this folder); "
        "it works offline.",
        "",
        "### How it was made",
        "",
        f"    {info['command']}",
        "",
        f"- seed {s['seed']}; {s['scenes']} train-split scenes, random flips and quarter turns; BLIP's ITM "
        "recipe (per image one matching caption, all or some present names, and one non-matching, 3/4 "
        "of them hard: a present name swapped for an absent one, an absent one added, a lone absent name)",
        f"- {s['bt_steps']} steps of batch {s['bt_batch']} images, AdamW lr {s['bt_lr']}, "
        f"{info['train_seconds']:.0f} s on {where(info)}; torch {info['torch']}",
        f"- architecture: {describe(config)}; cross-modal encoder {config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}, {config['num_attention_heads']} heads; {params / 1e6:.2f} M "
        f"parameters, {folder_size(path) / 1024**2:.1f} MB on disk",
        "",
        f"### Held-out results ({' + '.join(splits)} splits of `ShapesDataset(seed={seed})`, "
        f"{images} images)",
        "",
        f"Written by `python tools/shapes_model_card.py --bridgetower {relative(path)}` ({seconds:.0f} s).",
        "",
        f"- ITM accuracy (match probability > 0.5), {itm['pairs']} balanced pairs: **{itm['all']:.1%}** "
        f"(all present {itm['all present']:.1%}, one present {itm['one present']:.1%}, swap "
        f"{itm['swap']:.1%}, add absent {itm['add absent']:.1%})",
        f"- GradCAM localisation (t = {THRESHOLD}): best (layer, head) = **({best[0] + 1}, {best[1]})** with "
        f"IoU **{ranked[best]:.3f}**; median over layers 1-{ranked.shape[0] - 1}: "
        f"{np.median(ranked[:-1]):.3f}; baseline (whole image as the mask): {baseline:.3f}. The last "
        "cross-modal layer's class-token maps are zero (only <s> is read after it).",
        "",
        "| layer | head | " + " | ".join(f"IoU t={t}" for t in THRESHOLDS) + " |",
        "|---:|---:|" + "---:|" * len(THRESHOLDS),
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                        help="a world's folder, with blip/ and clip/ (default: the bundled planted world)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="ShapesDataset seed")
    parser.add_argument("--card", type=Path, help="where to write the card (default: MODELS/MODEL_CARD.md)")
    parser.add_argument("--collect", nargs="+", type=Path, metavar="DIR",
                        help="instead: write --card (WORLDS.md) from these worlds' cards, a section each")
    parser.add_argument("--bridgetower", type=Path, metavar="DIR",
                        help="instead: a shapes-world BridgeTower ITM's card, DIR/MODEL_CARD.md "
                             "(ITM accuracy, GradCAM IoU per layer and head)")
    args = parser.parse_args(argv)
    if args.bridgetower:
        from segmenter.backends.bridgetower import BridgeTowerBackend

        start = time.time()
        scenes = held_out(args.seed, args.splits)
        baseline = float(np.mean([(m == c + 1).mean() for _, m, p in scenes for c in p]))
        backend = BridgeTowerBackend(str(args.bridgetower), device="cpu", dtype="float32")
        itm = itm_accuracy(backend, scenes, args.seed)
        print(f"ITM accuracy {itm['all']:.3f} {itm}", flush=True)
        iou, _ = localisation_iou(backend, scenes, raw=False)
        card = bridgetower_card(args.bridgetower, itm, iou, baseline, args.splits, args.seed, len(scenes),
                                time.time() - start)
        path = args.card or args.bridgetower / "MODEL_CARD.md"
        path.write_text(card)
        print(f"wrote {path}")
        return
    if args.collect:
        if not args.card:
            parser.error("--collect needs --card, the file to write (e.g. WORLDS.md)")
        missing = [str(d) for d in args.collect if not (d / "MODEL_CARD.md").is_file()]
        if missing:
            parser.error(f"no MODEL_CARD.md in {', '.join(missing)}: run --models DIR on each first")
        args.card.write_text(collect(args.collect))
        print(f"wrote {args.card}")
        return
    torch.manual_seed(0)
    start = time.time()
    scenes = held_out(args.seed, args.splits)
    baseline = float(np.mean([(m == c + 1).mean() for _, m, p in scenes for c in p]))
    backend = BlipBackend(str(args.models / "blip"), device="cpu")
    itm = itm_accuracy(backend, scenes, args.seed)
    print(f"ITM accuracy {itm['all']:.3f} {itm}", flush=True)
    clip = clip_accuracy(ClipScorer(str(args.models / "clip"), device="cpu"), scenes)
    print(f"CLIP top-1 {clip}", flush=True)
    iou, raw = localisation_iou(backend, scenes)
    ranked = iou[..., THRESHOLDS.index(THRESHOLD)]
    best = np.unravel_index(int(ranked.argmax()), ranked.shape)
    print(f"IoU best (layer {best[0] + 1}, head {best[1]}) {ranked[best]:.3f}, median of layers "
          f"1-{ranked.shape[0] - 1} {np.median(ranked[:-1]):.3f}", flush=True)
    card = write_card(args.models, itm, clip, iou, raw, baseline, args.splits, args.seed, len(scenes), time.time() - start)  # noqa: E501
    path = args.card or args.models / "MODEL_CARD.md"
    path.write_text(card)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
