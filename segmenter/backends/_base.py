"""The `Backend` seam: one vision-language model with text-to-image cross-attention and an ITM head."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Prompt:
    """One caption listing an image's candidate classes, with each class's character span."""

    text: str
    class_names: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each class name in `text`


def caption_word(name: str, spelling: str = "given", aliases: Mapping[str, str] | None = None) -> str:
    """How class `name` is written in the caption: its alias when `aliases` has one, else the name
    ("given") or the name with its spaces and hyphens removed ("joined", as the authors' code
    writes ADE20K and COCO names: `traffic light` -> `trafficlight`)."""
    if aliases and name in aliases:
        return aliases[name].strip()
    if spelling == "joined":
        return name.replace(" ", "").replace("-", "")
    return name


def build_prompt(
    prefix: str, class_names: Sequence[str], spelling: str = "given",
    aliases: Mapping[str, str] | None = None,
) -> Prompt:
    """ALGORITHM.md step 2: `prefix + " ".join(words)`, remembering where each class's word sits.

    `words` are the class names as `caption_word` writes them (`spelling`, `aliases`);
    `class_names` stays the given names. ValueError for an empty list, an empty name, or a name
    with no caption word left.
    """
    names = tuple(str(n).strip() for n in class_names)
    if not names:
        raise ValueError("the class list is empty: give at least one class name to segment")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"class name #{empty[0] + 1} is empty: remove it from the class list")
    text, spans, seen = prefix, [], {}
    for i, name in enumerate(names):
        word = caption_word(name, spelling, aliases)
        if word in seen and seen[word] != name:
            raise ValueError(f"classes {seen[word]!r} and {name!r} would both be written {word!r} in the "
                             "caption (spelling or prompt_aliases): their maps would be the same; give "
                             "them different words")
        seen[word] = name
        if not word:
            raise ValueError(f"class name {name!r} leaves no caption word under the spelling "
                             f"{spelling!r}: rename it or give it a prompt alias")
        if i:
            text += " "
        spans.append((len(text), len(text) + len(word)))
        text += word
    return Prompt(text=text, class_names=names, spans=tuple(spans))


PACKAGE_SCHEME = "pkg://"
#: images per model batch on CPU, where larger batches buy little and cost memory
CPU_BATCH = 8


def batch_size_for_memory(free_bytes: float, per_image_bytes: float, cap: int = 64,
                          headroom: float = 0.7) -> int:
    """How many images of `per_image_bytes` fit in `headroom` of `free_bytes`: 1..cap."""
    if per_image_bytes <= 0:
        return cap
    return int(max(1, min(cap, headroom * free_bytes // per_image_bytes)))


def parse_batch_size(value: str | int) -> str | int:
    """CLI/API batch size: a positive integer or "auto" (from free GPU memory)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"batch size {value!r} is not a positive integer or 'auto'")
    return number


def resolve_batch_size(value: str | int, backend: Backend, image_size: int) -> int:
    """An integer batch size for `value` ("auto": `backend.auto_batch_size(image_size)`)."""
    value = parse_batch_size(value)
    return backend.auto_batch_size(image_size) if value == "auto" else value


def resolve_model_path(model: str) -> str:
    """`pkg://package.name/sub/dir` -> that directory inside an installed package; else unchanged.

    Lets shipped configs name bundled checkpoints portably (the shapes-world models).
    """
    if not model.startswith(PACKAGE_SCHEME):
        return model
    from importlib import resources

    package, _, sub = model.removeprefix(PACKAGE_SCHEME).partition("/")
    try:
        return str(resources.files(package) / sub)
    except ModuleNotFoundError:
        raise OSError(f"cannot resolve {model!r}: package {package!r} is not installed") from None


class Backend(abc.ABC):
    """Wraps one VLM and turns a batch of images + prompts into GradCAM maps.

    Subclasses load with `from_pretrained(id_or_path)`; they never compute parameter gradients.
    """

    name: str = "base"
    #: the caption's first token in ITM passes when a call does not say ("cls" or "enc")
    itm_token: str = "cls"
    #: model id or path and revision, recorded in studies and used in cache keys
    model_id: str
    revision: str | None
    device: torch.device

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Number of text layers with cross-attention (valid `layer` values are 1..num_layers)."""

    @property
    @abc.abstractmethod
    def num_heads(self) -> int:
        """Cross-attention heads per layer (valid head indices are 0..num_heads-1)."""

    @abc.abstractmethod
    def patch_grid(self, image_size: int) -> tuple[int, int]:
        """The (gh, gw) patch grid for square inputs of `image_size` pixels."""

    @abc.abstractmethod
    def prepare_images(self, images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
        """Resize and normalise HxWx3 uint8 images into model input. # [B, 3, S, S]"""

    @abc.abstractmethod
    def gradcam(
        self,
        pixel_values: torch.Tensor,
        prompts: Sequence[Prompt],
        layers: Sequence[int],
        dropped: torch.Tensor | None = None,
        *,
        itm_token: str | None = None,
        token_salience: bool = False,
    ) -> list[torch.Tensor]:
        """One round of ALGORITHM.md step 3 for a batch.

        `layers` are 1-based; `dropped` is a bool mask [B, gh*gw] of patches zeroed in the input;
        `itm_token` the caption's first token ("cls" or "enc"; None: the backend's `itm_token`).
        Returns per image a float32 tensor [len(layers), heads, classes, gh, gw] of
        attention x clamp(dScore/dAttention, min=0), [CLS] key dropped, word pieces averaged.
        `token_salience=True` adds one row after the classes ([.., classes + 1, gh, gw]): the
        authors' Salience Dropout score, the sum of the maps of every class word piece plus the
        [SEP] token's for a caption shorter than the batch's longest (PnP-OVSS
        `Inference_BLIP_filteredcaption`, rows [3:-1] of the token-level map).
        """

    def auto_batch_size(self, image_size: int, classes: int = 8, cap: int = 64) -> int:
        """Images per model batch: from free GPU memory on CUDA, `CPU_BATCH` elsewhere.

        On CUDA, one GradCAM pass of two blank images with a `classes`-name caption, through every
        layer (the most a trial asks), measures the peak memory per image; the batch fills 70% of
        what is free now, at most `cap`.
        """
        if self.device.type != "cuda":
            return CPU_BATCH
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        pixels = torch.zeros(2, 3, image_size, image_size, device=self.device)
        prompt = build_prompt("a picture of ", ["a"] * classes)
        try:
            self.gradcam(pixels, [prompt, prompt], list(range(1, self.num_layers + 1)))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return 1  # not even two images fit now: one at a time
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / 2
        free, _total = torch.cuda.mem_get_info(self.device)
        return batch_size_for_memory(free, per_image, cap)

    def check_layer_heads(self, layer: int, heads: Sequence[int]) -> None:
        """Raise one ValueError naming the valid ranges when `layer` or a head does not exist
        (both at once when both are wrong: a preset's published values on a smaller model)."""
        problems = []
        if not 1 <= layer <= self.num_layers:
            problems.append(f"layer {layer} does not exist in {self.model_id}: valid layers are "
                            f"1..{self.num_layers} (1-based)")
        bad = [h for h in heads if not 0 <= h < self.num_heads]
        if bad:
            problems.append(f"head {bad[0]} does not exist in {self.model_id}: valid heads are "
                            f"0..{self.num_heads - 1} (0-based)")
        if problems:
            raise ValueError("; ".join(problems))
