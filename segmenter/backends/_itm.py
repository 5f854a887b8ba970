"""`ItmBackend`: what BLIP and BridgeTower share as PnP-OVSS backends.

Both are ITM models whose caption tokens cross-attend to ViT patches: the same patch grid,
input preparation, Salience Dropout masking of the input, and per-class weights over a fast
tokenizer's word pieces. Subclasses set `_layers` (the cross-attention layers GradCAM reads),
`_patch`, `_mean`, `_std`, `device`, `dtype`, `tokenizer`, and give `_max_tokens()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._base import Backend, Prompt


class ItmBackend(Backend):
    """A `Backend` over an ITM model with text-to-image cross-attention layers in `_layers`."""

    _layers: torch.nn.ModuleList
    _patch: int
    _mean: torch.Tensor  # [1, 3, 1, 1]
    _std: torch.Tensor  # [1, 3, 1, 1]
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_heads(self) -> int:
        return int(self._layers[0].crossattention.self.num_attention_heads)

    def patch_grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self._patch:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the patch size {self._patch} of "
                f"{self.model_id}: use e.g. {image_size // self._patch * self._patch or self._patch}"
            )
        side = image_size // self._patch
        return side, side

    def prepare_images(self, images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
        """Bicubic resize (antialiased) of the whole image to image_size^2 and the processor's
        mean/std (no crop: the image's edges stay in). # [B, 3, S, S]"""
        self.patch_grid(image_size)
        batch = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            x = x.permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W]
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
            batch.append(x)
        pixels = (torch.cat(batch) - self._mean) / self._std  # [B, 3, S, S]
        return pixels.to(self.dtype)

    def _gradcam_input(
        self, pixel_values: torch.Tensor, prompts: Sequence[Prompt], layers: Sequence[int],
        dropped: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The checked input of one GradCAM round: the pixels with the dropped patches zeroed
        (Salience Dropout, in the normalised input) and the patch grid. ValueError for a layer
        the model lacks or a prompt count that is not the image count."""
        batch, _, size, _ = pixel_values.shape
        gh, gw = self.patch_grid(size)
        for layer in layers:
            self.check_layer_heads(layer, [])
        if len(prompts) != batch:
            raise ValueError(f"{batch} images but {len(prompts)} prompts: give one per image")
        pixel_values = pixel_values.to(self.device)
        if dropped is not None:
            keep = (~dropped.to(self.device)).view(batch, 1, gh, gw).to(pixel_values.dtype)
            keep = keep.repeat_interleave(self._patch, 2).repeat_interleave(self._patch, 3)
            pixel_values = pixel_values * keep
        return pixel_values, (gh, gw)

    def _max_tokens(self) -> int:
        """The longest caption (in tokens) the text model takes."""
        raise NotImplementedError

    def _tokenize(
        self, prompts: Sequence[Prompt], token_salience: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids for the captions and a [B, C_max, T] matrix averaging each class's pieces.

        A piece belongs to a class when the characters it spells lie in the class's span (a
        byte-level BPE piece such as "Ġcat" also covers the space before its word: that space is
        skipped). `token_salience`: one more row [B, C_max + 1, T], 1 on every class word piece
        and on the closing token ([SEP], </s>) of a caption shorter than the batch's longest (the
        authors' Salience Dropout score). ValueError for a caption over `_max_tokens()` or a
        class name that produced no token.
        """
        texts = [p.text for p in prompts]
        enc = self.tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
        length = enc["input_ids"].shape[1]
        if length > self._max_tokens():
            raise ValueError(
                f"the prompt has {length} tokens, more than the model's {self._max_tokens()}: "
                "list fewer candidate classes per image"
            )
        offsets = enc.pop("offset_mapping")  # [B, T, 2], (0, 0) for special tokens
        classes = max(len(p.class_names) for p in prompts)
        weights = torch.zeros(len(prompts), classes + int(token_salience), length)
        for b, prompt in enumerate(prompts):
            starts, ends = offsets[b, :, 0].clone(), offsets[b, :, 1]
            for t in range(length):  # skip the space a piece carries (tokenizers that keep it)
                while starts[t] < ends[t] and texts[b][int(starts[t])].isspace():
                    starts[t] += 1
            real = (ends > starts) & enc["attention_mask"][b].bool()
            for c, (s, e) in enumerate(prompt.spans):
                inside = real & (starts >= s) & (ends <= e)
                if not inside.any():
                    raise ValueError(f"class name {prompt.class_names[c]!r} produced no tokens: rename it")
                weights[b, c, inside] = 1.0 / inside.sum()
                if token_salience:
                    weights[b, classes, inside] = 1.0
            real_length = int(enc["attention_mask"][b].sum())
            if token_salience and real_length < length:  # the closing token is the last real one
                weights[b, classes, real_length - 1] = 1.0
        tokens = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        return tokens, weights.to(self.device)
