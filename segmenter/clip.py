"""`ClipScorer`: frozen transformers `CLIPModel` embeddings for candidates and the CLIP reward.

Text embeddings are cached per string, so a study embeds each class name once; the black image
is embedded once per scorer. Images are squashed (not cropped) to CLIP's square input, the way
the segmenter feeds BLIP, and normalised with the processor's mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from .backends import resolve_model_path
from .backends.blip import load_error, load_pretrained, resolve_device, resolve_dtype

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
#: the paper's temperature: cosine similarity / 0.01, i.e. logits = 100 x cosine similarity
PAPER_LOGIT_SCALE = 100.0
LOGIT_SCALES = ("paper", "model")


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised), frozen, in eval and inference mode."""

    def __init__(
        self,
        model: str = DEFAULT_CLIP,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.model_id, self.revision = str(model), revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)  # auto: bfloat16/float16 on CUDA
        self.batch_size = max(1, int(batch_size))
        path = resolve_model_path(self.model_id)
        net = load_pretrained(CLIPModel, self.model_id, revision, kind="CLIP model", model_type="clip",
                              used=("text_model.", "vision_model.", "text_projection.",
                                    "visual_projection.", "logit_scale"))
        try:
            processor = AutoProcessor.from_pretrained(path, revision=revision)
        except (OSError, ValueError) as err:
            raise load_error("CLIP processor", self.model_id, err) from None
        net.requires_grad_(False)
        self.model = net.eval().to(self.device, self.dtype)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self._mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)
        self._max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- facts -------------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """CLIP's square input side S in pixels (336 for ViT-L/14-336)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def embedding_dim(self) -> int:
        """Size D of the joint embedding space."""
        return int(self.model.config.projection_dim)

    def logit_scale(self, choice: float | str = "paper") -> float:
        """The factor on cosine similarities that gives softmax logits.

        "paper": 100 (similarity / 0.01, the PnP-OVSS reward); "model": CLIP's learned
        exp(logit_scale); or a positive number.
        """
        if isinstance(choice, str):
            if choice == "paper":
                return PAPER_LOGIT_SCALE
            if choice == "model":
                return float(self.model.logit_scale.detach().float().exp())
            raise ValueError(
                f"logit_scale {choice!r} is unknown: use {' or '.join(map(repr, LOGIT_SCALES))} or a number"
            )
        if not choice > 0:
            raise ValueError(f"logit_scale {choice!r} must be positive")
        return float(choice)

    # -- text --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings of `texts` used as they are (no prompt template). # [T, D]

        Each distinct string is embedded once per scorer and cached.
        """
        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self._max_tokens,
                                    return_tensors="pt")
            features = _features(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ))  # [chunk, D]
            for text, row in zip(chunk, F.normalize(features.float(), dim=-1)):
                self._text_cache[text] = row
        if not texts:
            return torch.zeros(0, self.embedding_dim, device=self.device)
        return torch.stack([self._text_cache[t] for t in texts])

    # -- images ------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """HxWx3 uint8 images, or a float tensor [B, 3, h, w] of RGB in [0, 1], -> CLIP input.

        Images not already S x S are resized with antialiased bicubic interpolation, then
        normalised with the processor's mean and std. Returns # [B, 3, S, S] in the model's dtype.
        """
        size = self.input_size
        if isinstance(images, torch.Tensor):
            batch = resize_square(images.to(self.device).float(), size)  # [B, 3, S, S]
        elif len(images):
            batch = torch.cat([
                resize_square(torch.from_numpy(np.ascontiguousarray(im)).to(self.device)
                              .permute(2, 0, 1)[None].float() / 255.0, size)  # [1, 3, S, S]
                for im in images
            ])
        else:
            batch = torch.zeros(0, 3, size, size, device=self.device)
        return ((batch - self._mean) / self._std).to(self.dtype)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of HxWx3 uint8 images or a [B, 3, h, w] tensor in [0, 1]. # [B, D]

        The model runs on chunks of `batch_size` images.
        """
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[start : start + self.batch_size])  # [b, 3, S, S]
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=pixels))
                                   .float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embedding_dim, device=self.device)
        return torch.cat(out)

    @cached_property
    def black_embedding(self) -> torch.Tensor:
        """Normalised embedding of the all-black S x S image, computed once. # [D]"""
        size = self.input_size
        return self.image_embeddings(torch.zeros(1, 3, size, size))[0]

    @torch.inference_mode()
    def probabilities(
        self, image_embeds: torch.Tensor, texts: Sequence[str], logit_scale: float | str = "paper"
    ) -> torch.Tensor:
        """Softmax over `texts` of scale x cosine similarity for each image. # [B, T]"""
        logits = self.logit_scale(logit_scale) * image_embeds.float() @ self.text_embeddings(texts).T
        return logits.softmax(dim=-1)


def resize_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, h, w] floats in [0, 1] -> [B, 3, size, size] (antialiased bicubic, clamped)."""
    if tuple(batch.shape[-2:]) == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is projected; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
