"""Train the tiny shapes-world BLIP ITM and CLIP models shipped with ovss-tune (seeded, CPU).

    python tools/train_shapes_models.py

writes the bundled planted world, `tuner/datasets/shapes_models/{blip,clip}/` (model + processor,
`save_pretrained`, and training_settings.json: every setting, the command, torch, the device),
then `python tools/shapes_model_card.py` evaluates them on held-out scenes and writes MODEL_CARD.md.
An unplanted world (no head gets mask supervision) is `--blip-cam-layer 0 --out DIR`, its card
`python tools/shapes_model_card.py --models DIR`; the trained ones are listed in
`tuner/datasets/shapes_models_unplanted/WORLDS.md`. Training runs on CPU, one thread per model;
`--device cuda` trains on a GPU for quick pilots, whose models differ from the CPU's.

Both models are instances of the real transformers classes (`BlipForImageTextRetrieval`,
`CLIPModel`) with word-level tokenizers over the shapes vocabulary, trained on scenes of the
shapes world's train split (`ShapesDataset(seed).scene_seed("train", i)` for i past the split's
size as well, never a val/test scene), so everything downstream runs the real-model code path.

- BLIP: image-text matching only (binary, logit 1 = match). A caption "a picture of " + names
  matches when every name it lists is in the image: positives list all present classes or a
  random subset (so single-name captions, as the `itm_threshold` candidate rule asks, work),
  negatives are hard ones (a present class swapped for an absent one, an absent one added, a
  single absent name) and other images' captions. A one-layer ViT with 4 x 4 px patches (a
  16 x 16 grid) keeps patch tokens local, which is what lets the text cross-attention localise;
  deeper ViTs mix the patches and localise poorly, and 8 x 8 px patches cap the IoU of a perfect
  patch map at 0.64 on these small objects. One planted cross-attention head (`--blip-cam-layer`,
  `--blip-cam-head`; 0 turns it off) also learns, with the training masks, to put its GradCAM
  map on the named object: without it, dScore/dA of these tiny models is negative on the
  object about half the time, GradCAM's clamp erases it, and no head reaches IoU 0.5. The
  other heads get no such loss, so a search over (layer, head) has one good answer to find.
- BridgeTower (`--only bridgetower`, into OUT/bridgetower; never planted): a tiny
  `BridgeTowerForImageAndTextRetrieval` (3 uni-modal and 3 cross-modal layers, 8 x 8 px patches:
  4 x 4 px ones cost 7x the time) with a byte-level BPE RoBERTa tokenizer that spells each shapes
  word as one piece, trained on BLIP's ITM recipe above through the model's own forward. Its card:
  `python tools/shapes_model_card.py --bridgetower OUT/bridgetower`.
- CLIP: contrastive, text = bare class-name lists (a quarter with the "a picture of " prefix),
  images = scenes and single objects cut out on black (what the CLIP reward shows it). A text
  is a positive for every image of the batch that holds all of its classes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segmenter.backends import build_prompt  # noqa: E402
from tuner.datasets.shapes import SHAPE_CLASSES, ShapesDataset, render_shapes  # noqa: E402

PREFIX = "a picture of "  # SegmenterConfig.prompt_prefix
IMAGE_SIZE = 64
DEFAULT_OUT = REPO / "tuner" / "datasets" / "shapes_models"
#: words with their own token; other text falls back to characters (BLIP: word pieces, CLIP: BPE)
WORDS = ("a", "picture", "of", "background", *SHAPE_CLASSES)
LETTERS = string.ascii_lowercase + string.digits + string.punctuation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes the checkpoints; written next to them as training_settings.json."""

    seed: int = 0
    scenes: int = 16000  # multi-object train scenes for the two models
    # BLIP ITM
    blip_steps: int = 2000
    blip_batch: int = 32
    blip_lr: float = 5e-4
    blip_vision_layers: int = 1
    blip_text_layers: int = 4
    blip_hidden: int = 64
    blip_heads: int = 4
    blip_patch: int = 4
    # localisation aid: one planted (layer, head) of the text cross-attention (1-based layer,
    # 0-based head; layer 0 = off) is also trained so that its GradCAM map falls on the object
    blip_cam_layer: int = 2
    blip_cam_head: int = 2
    blip_cam_weight: float = 0.25
    blip_cam_start: int = 400
    # CLIP
    clip_steps: int = 1500
    clip_batch: int = 64
    clip_lr: float = 5e-4
    clip_vision_layers: int = 2
    clip_patch: int = 8
    clip_masked_fraction: float = 0.25
    # BridgeTower ITM (`--only bridgetower`; never planted): uni-modal towers and cross-modal
    # encoder of `bt_layers` layers each (the top `bt_layers` feed the cross-modal layers)
    bt_steps: int = 1800
    bt_batch: int = 32
    bt_lr: float = 5e-4
    bt_layers: int = 3
    bt_hidden: int = 64  # text tower and cross-modal encoder; the ViT is 64 wide (1 head: width // 64)
    bt_heads: int = 4
    bt_patch: int = 8  # 4 px patches cost 7x the time (1.8 s a step on one thread)


# --- data --------------------------------------------------------------------------------------------
def training_scenes(seed: int, count: int, first: int = 0, max_objects: int = 4) -> tuple[np.ndarray, ...]:
    """`count` train-split scenes from index `first` on (past the split's size too), never a val/test one.

    Returns images [N, S, S, 3] uint8 and masks [N, S, S] uint8 (class id + 1, 0 = background).
    """
    data = ShapesDataset(seed=seed, size=IMAGE_SIZE)
    held_out = {data.scene_seed(s, i) for s in ("val", "test") for i in range(data.split_sizes[s])}
    images, masks, index = [], [], first
    while len(images) < count:
        scene = data.scene_seed("train", index)
        index += 1
        if scene in held_out:
            continue
        image, mask = render_shapes(scene, IMAGE_SIZE, max_objects)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def present_classes(masks: np.ndarray) -> list[list[int]]:
    """Per scene the class indices (0-based into SHAPE_CLASSES) visible in its mask."""
    return [[int(c) - 1 for c in np.unique(m) if c > 0] for m in masks]


def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The same random flip and quarter turn for every image of the batch and its mask."""
    turns = int(torch.randint(4, (1,), generator=gen))
    images, masks = images.rot90(turns, (1, 2)), masks.rot90(turns, (1, 2))
    if bool(torch.randint(2, (1,), generator=gen)):
        images, masks = images.flip(2), masks.flip(2)
    return images.contiguous(), masks.contiguous()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> model input [B, 3, S, S] with CLIP's mean and std (both processors)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def names(indices) -> list[str]:
    return [SHAPE_CLASSES[i] for i in indices]


def positive_caption(present: list[int], rng: np.random.Generator) -> list[int]:
    """All present classes (half the time) or a random non-empty subset, shuffled."""
    chosen = list(present)
    if len(chosen) > 1 and rng.random() < 0.5:
        chosen = list(rng.choice(chosen, size=int(rng.integers(1, len(chosen))), replace=False))
    rng.shuffle(chosen)
    return [int(c) for c in chosen]


def hard_negative(present: list[int], rng: np.random.Generator) -> list[int]:
    """A caption naming at least one absent class: swap, add, or a lone absent name."""
    absent = [c for c in range(len(SHAPE_CLASSES)) if c not in present]
    chosen = positive_caption(present, rng)
    kind = rng.random()
    if kind < 0.45:
        chosen[int(rng.integers(len(chosen)))] = int(rng.choice(absent))
    elif kind < 0.85:
        chosen.insert(int(rng.integers(len(chosen) + 1)), int(rng.choice(absent)))
    else:
        chosen = [int(rng.choice(absent))]
    return chosen


# --- training helpers ----------------------------------------------------------------------------
def itm_batch(all_images: torch.Tensor, all_masks: torch.Tensor, batch: int, rng, gen):
    """One ITM training batch: `batch` augmented scenes and masks, a positive caption of each and a
    negative (a hard one, or another scene's caption that does not fit)."""
    pick = rng.choice(len(all_images), size=batch, replace=False)
    x, m = augment(all_images[pick], all_masks[pick], gen)
    present = present_classes(m.numpy())
    positives = [positive_caption(p, rng) for p in present]
    negatives = [
        hard_negative(p, rng) if rng.random() < 0.75 or set(positives[(b + 1) % batch]) <= set(p)
        else positives[(b + 1) % batch]
        for b, p in enumerate(present)
    ]
    return x, m, positives, negatives


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def multi_positive_nce(logits: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where `holds[i, j]` (float 0/1, diagonal 1) marks every positive pair."""
    image_to_text = -(holds / holds.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(holds / holds.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


def holds_matrix(texts: list[list[int]], present: list[list[int]]) -> torch.Tensor:
    """[images, texts] 1.0 where the image holds every class the text names."""
    return torch.tensor([[set(t) <= set(p) for t in texts] for p in present], dtype=torch.float32)


# --- BLIP ----------------------------------------------------------------------------------------------
def blip_tokenizer():
    """A word-level `BertTokenizer`: the shapes words, then letters and ##letters as a fallback."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))})


def build_blip(settings: TrainSettings):
    """A randomly initialised tiny `BlipForImageTextRetrieval` and its `BlipProcessor`."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    hidden, heads = settings.blip_hidden, settings.blip_heads
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, num_hidden_layers=settings.blip_text_layers,  # noqa: E501
            num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=2, sep_token_id=3,
        ),
        vision_config=dict(
            hidden_size=hidden, num_hidden_layers=settings.blip_vision_layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, image_size=IMAGE_SIZE, patch_size=settings.blip_patch,
            initializer_range=0.02,  # the default 1e-10 starts the ViT dead (its output ~0)
        ),
        image_text_hidden_size=64,
    )
    model = BlipForImageTextRetrieval(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)  # noqa: E501
        ),
        tokenizer=tokenizer,
    )
    return model, processor


def caption_tokens(tokenizer, captions: list[list[int]]) -> dict[str, torch.Tensor]:
    texts = [build_prompt(PREFIX, names(c)).text for c in captions]
    return tokenizer(texts, padding=True, return_tensors="pt")


def itm_logits(model, tokens: dict[str, torch.Tensor], image_embeds: torch.Tensor) -> torch.Tensor:
    """ITM logits [B, 2] of caption b for image b."""
    text = model.text_encoder(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                          device=image_embeds.device),
    ).last_hidden_state  # [B, T, D]
    return model.itm_head(text[:, 0, :])


def token_targets(tokenizer, input_ids: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Per caption token the share of each patch its class covers, 0 for non-class tokens.
    # [B, T, N]"""
    class_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPE_CLASSES)))
    cover = torch.stack([(masks == c + 1).float() for c in range(len(SHAPE_CLASSES))], 1)  # [B, K, S, S]
    cover = F.avg_pool2d(cover, patch).flatten(2)  # [B, K, N]
    hit = input_ids[..., None] == class_ids  # [B, T, K]
    return torch.einsum("btk,bkn->btn", hit.float(), cover)


def planted_head_loss(score: torch.Tensor, probs: torch.Tensor, head: int,
                      target: torch.Tensor) -> torch.Tensor:
    """How far one head's GradCAM map (probs * clamp(dScore/dprobs, 0)) and its attention are
    from covering the class tokens' objects evenly, plus the share of dScore/dprobs's mass that is
    negative on the object; averaged over class tokens. `probs` [B, H, T, 1 + N] from the
    forward that gave `score` [B]; `target` [B, T, N] patch coverage (zero rows: no class token).

    The cover terms are KL(object || map): a map on one corner of the object scores badly, so the
    thresholded map grows to the object's shape."""
    grad = torch.autograd.grad(score.sum(), probs, create_graph=True)[0][:, head, :, 1:]  # [B, T, N]
    attn = probs[:, head, :, 1:]
    cam = attn * grad.clamp(min=0)
    valid = target.sum(-1) > 0  # [B, T] class tokens
    goal = target[valid] / target[valid].sum(-1, keepdim=True)  # [V, N], sums to 1

    def cover(weights: torch.Tensor) -> torch.Tensor:  # KL(goal || weights / sum) per token
        share = weights[valid] / (weights[valid].sum(-1, keepdim=True) + 1e-12)
        return (goal * (torch.log(goal.clamp_min(1e-12)) - torch.log(share + 1e-6))).sum(-1)

    negative = (grad.clamp(max=0).neg() * target).sum(-1) / (grad.abs().sum(-1) + 1e-12)
    return (cover(cam) + cover(attn) + negative[valid]).mean()


def train_blip(settings: TrainSettings, images: np.ndarray, masks: np.ndarray, log,
               device: str = "cpu") -> tuple:
    """ITM from scratch with balanced positives and negatives (3/4 of the negatives hard)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    model, processor = build_blip(settings)
    model.to(device)
    model.train()
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.blip_lr, weight_decay=0.05)
    all_images, all_masks = torch.from_numpy(images), torch.from_numpy(masks)
    batch, start, recent = settings.blip_batch, time.time(), []
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if settings.blip_cam_layer:
        planted = model.text_encoder.encoder.layer[settings.blip_cam_layer - 1].crossattention.self
        hook = planted.register_forward_hook(lambda _m, _i, out: captured.__setitem__("probs", out[1]))
    for step in range(settings.blip_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.blip_steps, settings.blip_lr)
        x, m, positives, negatives = itm_batch(all_images, all_masks, batch, rng, gen)
        pixels = normalise(x).to(device)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # [B, 1+N, D]
        tokens = {k: v.to(device) for k, v in caption_tokens(tokenizer, positives + negatives).items()}
        logits = itm_logits(model, tokens, torch.cat([image_embeds, image_embeds]))
        target = torch.cat([torch.ones(batch), torch.zeros(batch)]).long().to(device)
        loss = F.cross_entropy(logits, target)
        aux = torch.zeros((), device=device)
        if settings.blip_cam_layer and step >= settings.blip_cam_start:
            where = token_targets(tokenizer, tokens["input_ids"][:batch].cpu(), m, settings.blip_patch)
            where = where.to(device)
            # the matching half only: the negatives' rows get no target
            aux = planted_head_loss(logits[:batch, 1], captured["probs"], settings.blip_cam_head,
                                    F.pad(where, (0, 0, 0, 0, 0, batch)))
            loss = loss + settings.blip_cam_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(((logits.argmax(1) == target).float().mean().item(), loss.item(), aux.item()))
        if (step + 1) % 200 == 0 or step + 1 == settings.blip_steps:
            acc, mean_loss, mean_aux = np.mean(recent, axis=0)
            log(f"step {step + 1}/{settings.blip_steps} loss {mean_loss:.3f} (planted head {mean_aux:.3f}) "
                f"train acc {acc:.3f} "
                f"({time.time() - start:.0f}s)")
            recent = []
    if hook is not None:
        hook.remove()
    return model.eval().cpu(), processor, time.time() - start


# --- CLIP ----------------------------------------------------------------------------------------------
def clip_tokenizer():
    """A `CLIPTokenizer` (byte-level BPE) whose merges spell each shapes word as one token."""
    from transformers import CLIPTokenizer

    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(f"{c}</w>" for c in LETTERS)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge, pieces = (pieces[0], pieces[1]), [pieces[0] + pieces[1], *pieces[2:]]
            if merge not in merges:
                merges.append(merge)
            vocab.append(pieces[0])
    vocab = list(dict.fromkeys(vocab))
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(vocab)}, merges=merges, model_max_length=32)


def build_clip(settings: TrainSettings):
    """A randomly initialised tiny `CLIPModel` and its `CLIPProcessor`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=96, num_hidden_layers=settings.clip_vision_layers, num_attention_heads=4,
            intermediate_size=384,
            image_size=IMAGE_SIZE, patch_size=settings.clip_patch,
        ),
        projection_dim=64,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        ),
        tokenizer=tokenizer,
    )
    return model, processor


def single_objects(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator) -> tuple:
    """One present object of each scene on black: (images [B, S, S, 3], class index per image)."""
    out, classes = images.clone(), []
    for b, present in enumerate(present_classes(masks.numpy())):
        c = int(rng.choice(present))
        out[b][masks[b] != c + 1] = 0
        classes.append(c)
    return out, classes


def train_clip(settings: TrainSettings, images: np.ndarray, masks: np.ndarray, log,
               device: str = "cpu") -> tuple:
    """Multi-positive InfoNCE from scratch (text j is a positive of image i when i holds all of
    j's classes)."""
    torch.manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed + 1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    model, processor = build_clip(settings)
    model.to(device).train()
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.clip_lr, weight_decay=0.05)
    all_images, all_masks = torch.from_numpy(images), torch.from_numpy(masks)
    batch, start, recent = settings.clip_batch, time.time(), []
    masked = int(round(batch * settings.clip_masked_fraction))
    for step in range(settings.clip_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.clip_steps, settings.clip_lr)
        pick = rng.choice(len(images), size=batch, replace=False)
        x, m = augment(all_images[pick], all_masks[pick], gen)
        present = present_classes(m.numpy())
        cut, cut_classes = single_objects(x[:masked], m[:masked], rng)
        x = torch.cat([cut, x[masked:]])
        present = [[c] for c in cut_classes] + present[masked:]
        texts = [positive_caption(p, rng) for p in present]
        strings = [(PREFIX if rng.random() < 0.25 else "") + " ".join(names(t)) for t in texts]
        tokens = {k: v.to(device) for k, v in tokenizer(strings, padding=True, return_tensors="pt").items()}
        pixels = normalise(x).to(device)
        image_features = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text_features = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T  # [B, B]
        holds = holds_matrix(texts, present).to(device)
        loss = multi_positive_nce(logits, holds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append((holds[torch.arange(batch), logits.argmax(1)].mean().item(), loss.item()))
        if (step + 1) % 200 == 0 or step + 1 == settings.clip_steps:
            acc, mean_loss = np.mean(recent, axis=0)
            log(f"step {step + 1}/{settings.clip_steps} loss {mean_loss:.3f} train top-1 {acc:.3f} "
                f"({time.time() - start:.0f}s)")
            recent = []
    return model.eval().cpu(), processor, time.time() - start


# --- BridgeTower ------------------------------------------------------------------------------------
def bridgetower_tokenizer():
    """A byte-level BPE `RobertaTokenizerFast` whose merges spell each shapes word, with and without
    the leading space ("Ġcircle", "circle"), as one token; other text falls apart into characters."""
    import tempfile

    from transformers import RobertaTokenizerFast

    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ", *LETTERS]
    merges: list[tuple[str, str]] = []
    for word in [*("Ġ" + w for w in WORDS), *WORDS]:
        current = word[0]
        for symbol in word[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            vocab.append(current)
    vocab = list(dict.fromkeys(vocab))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return RobertaTokenizerFast.from_pretrained(folder, model_max_length=32)


def build_bridgetower(settings: TrainSettings):
    """A randomly initialised tiny `BridgeTowerForImageAndTextRetrieval` and its `BridgeTowerProcessor`."""
    from transformers import (
        BridgeTowerConfig,
        BridgeTowerForImageAndTextRetrieval,
        BridgeTowerImageProcessor,
        BridgeTowerProcessor,
    )

    tokenizer = bridgetower_tokenizer()
    hidden, layers = settings.bt_hidden, settings.bt_layers
    config = BridgeTowerConfig(
        hidden_size=hidden, num_attention_heads=settings.bt_heads, num_hidden_layers=layers,
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=settings.bt_heads, intermediate_size=4 * hidden, max_position_embeddings=40,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        # nn.MultiheadAttention of the ViT takes hidden_size // 64 heads: 64 is the smallest width
        vision_config=dict(hidden_size=64, num_hidden_layers=layers, patch_size=settings.bt_patch,
                           image_size=IMAGE_SIZE),
    )
    model = BridgeTowerForImageAndTextRetrieval(config)
    image_processor = BridgeTowerImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"shortest_edge": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return model, BridgeTowerProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_bridgetower(settings: TrainSettings, images: np.ndarray, masks: np.ndarray, log,
                      device: str = "cpu") -> tuple:
    """ITM from scratch, BLIP's recipe without a planted head: per image one matching and one
    non-matching caption (3/4 of the negatives hard), through the model's own forward."""
    torch.manual_seed(settings.seed + 2)
    rng = np.random.default_rng(settings.seed + 2)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    model, processor = build_bridgetower(settings)
    model.to(device).train()
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.bt_lr, weight_decay=0.05)
    all_images, all_masks = torch.from_numpy(images), torch.from_numpy(masks)
    batch, start, recent = settings.bt_batch, time.time(), []
    for step in range(settings.bt_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.bt_steps, settings.bt_lr)
        x, m, positives, negatives = itm_batch(all_images, all_masks, batch, rng, gen)
        pixels = normalise(x).to(device)
        tokens = {k: v.to(device) for k, v in caption_tokens(tokenizer, positives + negatives).items()}
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=torch.cat([pixels, pixels])).logits  # [2B, 2]
        target = torch.cat([torch.ones(batch), torch.zeros(batch)]).long().to(device)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(((logits.argmax(1) == target).float().mean().item(), loss.item()))
        if (step + 1) % 100 == 0 or step + 1 == settings.bt_steps:
            acc, mean_loss = np.mean(recent, axis=0)
            log(f"step {step + 1}/{settings.bt_steps} loss {mean_loss:.3f} train acc {acc:.3f} "
                f"({time.time() - start:.0f}s)")
            recent = []
    return model.eval().cpu(), processor, time.time() - start


# --- main ---------------------------------------------------------------------------------------------
def save(model, processor, path: Path, settings: TrainSettings, seconds: float, device: str = "cpu") -> None:
    """float32 safetensors + processor files, and the settings that made them."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    info = {"settings": asdict(settings), "train_seconds": round(seconds, 1),
            "torch": torch.__version__, "device": device, "command": " ".join(["python", *sys.argv])}
    (path / "training_settings.json").write_text(json.dumps(info, indent=2) + "\n")


def train_and_save(kind: str, settings: TrainSettings, out: Path, device: str = "cpu") -> None:
    """Render the training scenes and train one model ("blip" or "clip") on one CPU thread (or on
    `device`: quick pilots only, its sums differ from the CPU's)."""
    torch.set_num_threads(1)  # one thread per model: no spin-waiting on a shared machine, same sums
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)

    def log(message: str) -> None:
        print(f"[{kind}] {message}", flush=True)

    start = time.time()
    images, masks = training_scenes(settings.seed, settings.scenes)
    log(f"rendered {len(images)} training scenes ({time.time() - start:.0f}s)")
    train = {"blip": train_blip, "clip": train_clip, "bridgetower": train_bridgetower}[kind]
    model, processor, _ = train(settings, images, masks, log, device)
    save(model, processor, out / kind, settings, time.time() - start, device)
    log(f"saved {out / kind} ({time.time() - start:.0f}s)")


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/blip and OUT/clip")
    parser.add_argument("--only", choices=("blip", "clip", "bridgetower"),
                        help="train one model (bridgetower: only this way, into OUT/bridgetower)")
    parser.add_argument("--sequential", action="store_true",
                        help="train one model after the other (default: both at once, a process each)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for quick pilots (e.g. cuda); the shipped models train on cpu")
    for name, value in asdict(defaults).items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, metavar=type(value).__name__)  # noqa: E501
    args = parser.parse_args(argv)
    settings = TrainSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    if not 0 <= settings.blip_cam_layer < settings.blip_text_layers:
        parser.error(f"--blip-cam-layer {settings.blip_cam_layer}: use 1-{settings.blip_text_layers - 1} "
                     "(the last text layer's class-token gradients are zero), or 0 for no planted head")
    if not 0 <= settings.blip_cam_head < settings.blip_heads:
        parser.error(f"--blip-cam-head {settings.blip_cam_head}: use 0-{settings.blip_heads - 1}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device} is not usable here ({str(error).splitlines()[0]}): use cpu")
    kinds = [args.only] if args.only else ["blip", "clip"]
    start = time.time()
    if args.sequential or len(kinds) == 1:
        for kind in kinds:
            train_and_save(kind, settings, args.out, args.device)
    else:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=train_and_save, args=(k, settings, args.out, args.device))
                   for k in kinds]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [k for k, w in zip(kinds, workers) if w.exitcode]
        if failed:
            raise SystemExit(f"training {', '.join(failed)} failed: see the log above")
    print(f"done in {time.time() - start:.0f}s: {args.out}", flush=True)


if __name__ == "__main__":
    main()
