"""Candidate classes per image: which vocabulary names the prompt lists (ALGORITHM.md).

The paper asks GPT-4o or reads ground-truth image labels; the label-free rules here use the
models we already run. Rules (`SegmenterConfig.candidates`):

- `all`: the whole vocabulary.
- `clip_topk`: the `topk` names most similar to the image under CLIP zero-shot
  (cosine similarity of the image to `prompt_prefix + name`).
- `itm_threshold`: names whose BLIP ITM match probability softmax(itm logits)[1] for the caption
  `prompt_prefix + name` is >= `threshold`; when none passes, the single best, so a prompt is
  never empty.
- `oracle`: the ground-truth image-level labels (audits only; it reads labels).
- `file`: per-image lists read from a JSON file `{image_id: [names]}` (`candidate_file.py`: how
  ids and names are matched); an external source, recorded by its sha256, not dataset labels.

Selected names keep the vocabulary's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .candidate_file import load_candidate_file
from .config import CANDIDATE_RULES

#: which labels each rule reads: "none" or "image-level"
CANDIDATE_LABEL_USE: dict[str, str] = {
    "all": "none", "clip_topk": "none", "itm_threshold": "none", "oracle": "image-level",
    "file": "none",  # reads no dataset labels; the file is recorded as an external source
}


def candidate_label_use(rule: str) -> str:
    """The dataset labels a candidate rule reads: "image-level" for `oracle`, "none" for the others
    (`file` reads a file of the user's, recorded by its hash as an external source)."""
    _check_rule(rule)
    return CANDIDATE_LABEL_USE[rule]


def select_candidates(
    rule: str,
    image: np.ndarray,
    vocabulary: Sequence[str],
    *,
    image_classes: Sequence[str] | None = None,
    backend=None,
    clip=None,
    topk: int = 5,
    threshold: float = 0.5,
    prompt_prefix: str = "a picture of ",
    image_size: int | None = None,
    image_id: str | None = None,
    candidates_file: str | None = None,
    synonyms: Sequence[Sequence[str]] | None = None,
) -> tuple[str, ...]:
    """The candidate class names of one HxWx3 uint8 image under `rule`, in vocabulary order.

    `backend` (a BlipBackend) is needed by `itm_threshold`, `clip` (a ClipScorer) by `clip_topk`,
    `image_classes` by `oracle`, `image_id` and `candidates_file` by `file` (`synonyms[i]`: other
    names of `vocabulary[i]` that the file may use). `image_size` is BLIP's input side (default:
    its native size).
    """
    indices = candidate_indices(
        rule, [image], [vocabulary],
        image_classes=None if image_classes is None else [image_classes],
        backend=backend, clip=clip, topk=topk, threshold=threshold, prompt_prefix=prompt_prefix,
        image_size=image_size, image_ids=None if image_id is None else [image_id],
        candidates_file=candidates_file, synonyms=synonyms,
    )[0]
    return tuple(str(vocabulary[i]) for i in indices)


def candidate_indices(
    rule: str,
    images: Sequence[np.ndarray],
    vocabularies: Sequence[Sequence[str]],
    *,
    image_classes: Sequence[Sequence[str] | None] | None = None,
    backend=None,
    clip=None,
    topk: int = 5,
    threshold: float = 0.5,
    prompt_prefix: str = "a picture of ",
    image_size: int | None = None,
    image_ids: Sequence[str] | None = None,
    candidates_file: str | None = None,
    synonyms: Sequence[Sequence[str]] | None = None,
) -> list[list[int]]:
    """`select_candidates` for a batch: per image the sorted indices into its vocabulary.

    Images that share a vocabulary are scored in one batched model call. `file` may leave an
    image with no candidate (an empty list in the file: background only).
    """
    _check_rule(rule)
    if len(images) != len(vocabularies):
        raise ValueError(f"{len(images)} images but {len(vocabularies)} vocabularies: give one per image")
    if rule == "all":
        return [list(range(len(v))) for v in vocabularies]
    if rule == "oracle":
        if image_classes is None or any(c is None for c in image_classes):
            raise ValueError(
                "candidate rule 'oracle' needs image-level labels (image_classes); use a label-free "
                "rule (all, clip_topk, itm_threshold) for images without labels"
            )
        if len(image_classes) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_classes)} image_classes lists")
        # names of image_classes that are not in the vocabulary (e.g. "background") are ignored
        return [_present(vocab, present) for vocab, present in zip(vocabularies, image_classes)]
    if rule == "file":
        return _from_file(candidates_file, image_ids, vocabularies, synonyms)

    out: list[list[int]] = [[] for _ in images]
    groups: dict[tuple[str, ...], list[int]] = {}
    for b, vocab in enumerate(vocabularies):
        groups.setdefault(tuple(str(n) for n in vocab), []).append(b)
    for vocab, members in groups.items():
        if not vocab:
            continue
        texts = [prompt_prefix + name for name in vocab]
        batch = [images[b] for b in members]
        if rule == "clip_topk":
            scores = _clip_similarity(clip, batch, texts)  # [b, V]
            keep = min(int(topk), len(vocab))
            for b, row in zip(members, scores):
                out[b] = sorted(np.argsort(-row, kind="stable")[:keep].tolist())
        else:  # itm_threshold
            scores = _itm_probability(backend, batch, texts, image_size)  # [b, V]
            for b, row in zip(members, scores):
                passed = np.flatnonzero(row >= threshold).tolist()
                out[b] = passed or [int(np.argmax(row))]
    return out


def _from_file(path: str | None, image_ids: Sequence[str] | None, vocabularies: Sequence[Sequence[str]],
               synonyms: Sequence[Sequence[str]] | None) -> list[list[int]]:
    if not path:
        raise ValueError("candidate rule 'file' needs candidates_file: the JSON file of per-image "
                         "class lists")
    if image_ids is None or len(image_ids) != len(vocabularies):
        raise ValueError("candidate rule 'file' needs each image's id (the keys of candidates_file): pass "
                         "image_ids (segment_batch) or image_id (segment)")
    lists = load_candidate_file(path)
    return [lists.indices(str(i), vocab, synonyms) for i, vocab in zip(image_ids, vocabularies)]


def _present(vocabulary: Sequence[str], image_classes: Sequence[str]) -> list[int]:
    present = {str(name).strip() for name in image_classes}
    return [i for i, name in enumerate(vocabulary) if str(name).strip() in present]


def _clip_similarity(clip, images: Sequence[np.ndarray], texts: list[str]) -> np.ndarray:
    if clip is None:
        raise ValueError("candidate rule 'clip_topk' needs a CLIP model: pass clip=ClipScorer(...)")
    image_embeds = clip.image_embeddings(images)  # [b, D]
    return (image_embeds @ clip.text_embeddings(texts).T).float().cpu().numpy()  # [b, V]


def _itm_probability(backend, images: Sequence[np.ndarray], texts: list[str],
                     image_size: int | None) -> np.ndarray:
    if backend is None or not hasattr(backend, "itm_scores"):
        raise ValueError(
            "candidate rule 'itm_threshold' needs a backend with an ITM head: pass backend=BlipBackend(...)"
        )
    size = int(image_size or backend.model.config.vision_config.image_size)
    with torch.inference_mode():
        pixels = backend.prepare_images(images, size)  # [b, 3, S, S]
        return backend.itm_scores(pixels, texts).float().cpu().numpy()  # [b, V]


def _check_rule(rule: str) -> None:
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown candidate rule {rule!r}: use one of {', '.join(CANDIDATE_RULES)}")
