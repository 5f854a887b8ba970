"""`BridgeTowerBackend`: PnP-OVSS maps from transformers' `BridgeTowerForImageAndTextRetrieval`.

BridgeTower differs from BLIP in where the image enters the text. Its uni-modal towers (a CLIP
ViT and a RoBERTa) run side by side; the top `num_hidden_layers` layers of each feed, through a
linear transform, a token-type embedding and a "link tower" (LayerNorm of the sum), the matching
layer of a two-stream cross-modal encoder: a text stream whose layers cross-attend from the
caption's tokens to the image tokens (`cross_modal_text_layers`, where GradCAM reads), and an image
stream that cross-attends back. The ITM head scores the concatenated pooled first tokens of both
streams (text <s>, image [CLS]); logit 1 is "match".

This module splits the model's forward at the seam between the uni-modal towers and the
cross-modal encoder: both towers run under `inference_mode` (neither depends on the other), the
image states that enter the cross-modal encoder are the only tensors that require grad, and the
gradient of the ITM match logit is asked for the captured text-to-image attention probabilities
only (`torch.autograd.grad`), so no parameter gradient is ever computed. All heads of a layer come
out of the same pass. The towers run once per image and once per caption, so `itm_scores` pairs
them in the cross-modal encoder alone. tests/test_bridgetower.py checks the split against the
model's own forward and a full backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._base import Backend, Prompt, resolve_model_path
from .blip import ITM_TOKENS, load_error, load_pretrained, resolve_device, resolve_dtype

DEFAULT_MODEL = "BridgeTower/bridgetower-large-itm-mlm-itc"
ITM_MATCH = 1  # index of the "match" logit of the ITM head
TEXT_TYPE, IMAGE_TYPE = 0, 1  # token-type ids of the cross-modal encoder's two streams


def _nth(modules: torch.nn.Module, k: int) -> torch.nn.Module:
    """Module `k` of a per-layer ModuleList, or the one module a config shares across layers."""
    return modules[k] if isinstance(modules, torch.nn.ModuleList) else modules


class BridgeTowerBackend(Backend):
    """BridgeTower image-text matching: GradCAM over its cross-modal text layers' cross-attention.

    `layer` is 1-based over the cross-modal encoder's text-stream layers (6 in the released
    checkpoints), heads 0-based. The caption starts with RoBERTa's <s>; BridgeTower has no [ENC]
    token, so `itm_token` must be "cls".
    """

    name = "bridgetower"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
    ) -> None:
        from transformers import AutoProcessor, BridgeTowerForImageAndTextRetrieval

        self.model_id, self.revision = str(model), revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        path = resolve_model_path(self.model_id)
        net = load_pretrained(BridgeTowerForImageAndTextRetrieval, self.model_id, revision,
                              kind="BridgeTower ITM model", model_type="bridgetower",
                              used=("bridgetower.", "itm_score."))
        try:
            processor = AutoProcessor.from_pretrained(path, revision=revision)
        except (OSError, ValueError, TypeError) as err:
            raise load_error("BridgeTower processor", self.model_id, err) from None
        if getattr(net.config, "_attn_implementation", "eager") != "eager":  # GradCAM reads the probabilities
            net.set_attn_implementation("eager")
        net.requires_grad_(False)
        self.model = net.eval().to(self.device, self.dtype)
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise OSError(f"the tokenizer of {self.model_id!r} is not a fast tokenizer, which GradCAM needs "
                          "for the characters of each word piece: save it with tokenizer.json")
        image_processor = processor.image_processor
        self._mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)
        vision = self.model.config.vision_config
        self._patch, self._native_size = int(vision.patch_size), int(vision.image_size)
        tower = self.model.bridgetower
        self._layers = tower.cross_modal_text_layers
        # the uni-modal layers before the first one that feeds the cross-modal encoder
        self._split = len(tower.text_model.encoder.layer) - len(self._layers) + 1
        self._itm_token = "cls"
        self.forward_calls = 0  # cross-modal passes of GradCAM; the tuner counts them

    # -- the ITM caption's first token -----------------------------------------------------------
    @property
    def itm_token(self) -> str:
        return self._itm_token

    @itm_token.setter
    def itm_token(self, value: str) -> None:
        self._itm_token = self._check_itm_token(value)

    @staticmethod
    def _check_itm_token(value: str | None) -> str:
        if value is None or value == "cls":
            return "cls"
        if value == "enc":
            raise ValueError("itm_token 'enc' asks for BLIP's [ENC] token, which BridgeTower does not have: "
                             "use itm_token: cls with backend: bridgetower")
        raise ValueError(f"itm_token {value!r} is unknown: use {' or '.join(ITM_TOKENS)}")

    # -- facts about the model -------------------------------------------------------------------
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

    # -- step 1: input ---------------------------------------------------------------------------
    def prepare_images(self, images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
        """Bicubic resize (antialiased) of the whole image to image_size^2 and the processor's
        mean/std. # [B, 3, S, S]

        BridgeTower's processor resizes the shorter side and centre-crops, which would cut off
        the image's edges; a square input has no padding, so no pixel mask is needed (the model
        does not read one either).
        """
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

    # -- the two uni-modal towers ------------------------------------------------------------------
    def _vision_tower(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The ViT's outputs (post-LayerNorm, batch first) that feed the cross-modal layers, one per
        layer; the last one is the tower's final output. Each [B, 1 + gh*gw, Dv], [CLS] first."""
        visual = self.model.bridgetower.vision_model.visual
        size = pixel_values.shape[-1]
        hidden = visual.forward_pre(pixel_values.to(self.device, self.dtype),
                                    interpolate_pos_encoding=size != self._native_size)  # [1 + N, B, Dv]
        blocks = visual.transformer.resblocks
        out = []
        for i in range(self._split + self.num_layers - 1):
            hidden = blocks[i](hidden)
            if i >= self._split - 1:
                out.append(visual.forward_post(hidden))  # [B, 1 + N, Dv]
        return out

    def _image_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The image inputs of the cross-modal encoder, per layer. # each [B, 1 + gh*gw, D]

        Layer 1 takes the transformed ViT output with the image token type, normalised; each later
        layer's link tower adds the next ViT layer's (transformed, typed) output to the previous
        cross-modal image output.
        """
        tower = self.model.bridgetower
        typed = tower.token_type_embeddings.weight[IMAGE_TYPE]  # [D]
        states = [_nth(tower.cross_modal_image_transform, k)(v) + typed
                  for k, v in enumerate(self._vision_tower(pixel_values))]
        states[0] = tower.cross_modal_image_layernorm(states[0])
        return states

    def _text_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The caption inputs of the cross-modal encoder per layer (each [T, L, D]), and the
        additive key mask of the captions' padding (0 kept, the dtype's minimum padded). # [T, 1, 1, L]"""
        tower = self.model.bridgetower
        hidden = tower.text_model.embeddings(input_ids=input_ids)  # [T, L, Dt]
        padded = 1.0 - attention_mask[:, None, None, :].to(hidden.dtype)
        mask = padded * torch.finfo(hidden.dtype).min  # [T, 1, 1, L]
        typed = tower.token_type_embeddings.weight[TEXT_TYPE]  # [D]
        layers, states = tower.text_model.encoder.layer, []
        for i in range(self._split + self.num_layers - 1):
            hidden = layers[i](hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # a tuple before transformers 5
            if i >= self._split - 1:
                states.append(_nth(tower.cross_modal_text_transform, len(states))(hidden) + typed)
        states[0] = tower.cross_modal_text_layernorm(states[0])
        return states, mask

    # -- the cross-modal encoder and the ITM head ---------------------------------------------------
    def _itm_logits(
        self, text: Sequence[torch.Tensor], image: Sequence[torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits [P, 2] of P (caption, image) pairs from their per-layer cross-modal inputs."""
        tower = self.model.bridgetower
        text_out = image_out = None
        for k in range(self.num_layers):
            if k == 0:
                text_in, image_in = text[0], image[0]
            else:  # the link towers join the uni-modal layer's states with the previous outputs
                text_in = _nth(tower.cross_modal_text_link_tower, k - 1)(text[k], text_out, mask)
                image_in = _nth(tower.cross_modal_image_link_tower, k - 1)(image[k], image_out, None)
            text_out = tower.cross_modal_text_layers[k](text_in, image_in, attention_mask=mask)[0]
            image_out = tower.cross_modal_image_layers[k](image_in, text_in, encoder_attention_mask=mask)[0]
        pooled = torch.cat([tower.cross_modal_text_pooler(text_out),
                            tower.cross_modal_image_pooler(image_out)], dim=-1)  # [P, 2D]
        return self.model.itm_score(pooled)

    # -- step 3: GradCAM ---------------------------------------------------------------------------
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
        """Per image [len(layers), heads, classes (+1), gh, gw] (`Backend.gradcam`); the attention
        is the text stream's cross-attention from caption tokens to image tokens."""
        batch, _, size, _ = pixel_values.shape
        gh, gw = self.patch_grid(size)
        for layer in layers:
            self.check_layer_heads(layer, [])
        if len(prompts) != batch:
            raise ValueError(f"{batch} images but {len(prompts)} prompts: give one per image")
        self._check_itm_token(itm_token)
        if dropped is not None:  # Salience Dropout: zero the dropped patches of the input
            keep = (~dropped.to(self.device)).view(batch, 1, gh, gw).to(pixel_values.dtype)
            keep = keep.repeat_interleave(self._patch, 2).repeat_interleave(self._patch, 3)
            pixel_values = pixel_values.to(self.device) * keep
        tokens, class_weights = self._tokenize(prompts, token_salience)  # [B, C_max (+1), T]
        with torch.inference_mode():
            image = self._image_states(pixel_values)
            text, mask = self._text_states(tokens["input_ids"], tokens["attention_mask"])
        # ordinary tensors (inference tensors cannot enter autograd); the image states the only leaves
        image = [s.clone().requires_grad_(True) for s in image]
        text = [s.clone() for s in text]
        mask = mask.clone()

        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for layer in layers:
            def keep_probs(_module, _inputs, output, layer=layer):
                captured[layer] = output[1]  # attention probabilities [B, heads, T, 1 + gh*gw]
            hooks.append(self._layers[layer - 1].crossattention.self.register_forward_hook(keep_probs))
        try:
            with torch.enable_grad():
                score = self._itm_logits(text, image, mask)[:, ITM_MATCH]  # [B]
                probs = [captured[layer] for layer in layers]
                if any(p is None for p in probs):
                    raise RuntimeError(f"the cross-attention of {self.model_id} returned no probabilities: "
                                       "GradCAM needs eager attention (attn_implementation='eager')")
                grads = torch.autograd.grad(score.sum(), probs)
        finally:
            for hook in hooks:
                hook.remove()
        self.forward_calls += 1

        cam = torch.stack([a.detach() * g.clamp(min=0) for a, g in zip(probs, grads)], dim=1)
        cam = cam[..., 1:].float()  # [B, L, heads, T, gh*gw], image [CLS] key dropped
        maps = torch.einsum("bct,blhtn->blhcn", class_weights, cam)  # [B, L, heads, C_max (+1), N]
        out = []
        for b, p in enumerate(prompts):
            rows = list(range(len(p.class_names))) + ([maps.shape[3] - 1] if token_salience else [])
            out.append(maps[b][:, :, rows].reshape(len(layers), -1, len(rows), gh, gw))
        return out

    # -- candidate classes and objectives: plain ITM ------------------------------------------------
    def _encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_tokens(),
                             return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def itm_scores(
        self, pixel_values: torch.Tensor, texts: Sequence[str], batch_size: int = 64,
        itm_token: str | None = None,
    ) -> torch.Tensor:
        """ITM match probability softmax(itm logits)[1] of every text for every image. # [B, T]

        The ViT runs once per image and the RoBERTa once per text; the (image, text) pairs go
        through the cross-modal encoder `batch_size` at a time.
        """
        self._check_itm_token(itm_token)
        batch = pixel_values.shape[0]
        if not texts or not batch:
            return torch.zeros(batch, len(texts), device=self.device)
        image = self._image_states(pixel_values)  # L x [B, 1 + N, D]
        tokens = self._encode_texts(texts)
        text, mask = self._text_states(tokens["input_ids"], tokens["attention_mask"])  # L x [T, L, D]
        pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(len(texts))).to(self.device)
        step, scores = max(1, int(batch_size)), []
        for start in range(0, len(pairs), step):
            b, t = pairs[start : start + step].unbind(1)  # [P], [P]
            logits = self._itm_logits([s[t] for s in text], [s[b] for s in image], mask[t]).float()  # [P, 2]
            scores.append(logits.softmax(-1)[:, ITM_MATCH])
        return torch.cat(scores).view(batch, len(texts))

    @torch.inference_mode()
    def itm_pair_scores(
        self, pixel_values: torch.Tensor, texts: Sequence[str], batch_size: int = 64,
        itm_token: str | None = None,
    ) -> torch.Tensor:
        """ITM match probability of image b with text b, for b < B (pairs, not every text). # [B]"""
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} texts: give one per image")
        self._check_itm_token(itm_token)
        step, out = max(1, int(batch_size)), []
        for start in range(0, len(texts), step):
            image = self._image_states(pixel_values[start : start + step])
            tokens = self._encode_texts(texts[start : start + step])
            text, mask = self._text_states(tokens["input_ids"], tokens["attention_mask"])
            logits = self._itm_logits(text, image, mask).float()  # [P, 2]
            out.append(logits.softmax(-1)[:, ITM_MATCH])
        if not out:
            return torch.zeros(0, device=self.device)
        return torch.cat(out)

    @torch.inference_mode()
    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's final output tokens for the patches (image [CLS] dropped). # [B, gh*gw, Dv]"""
        return self._vision_tower(pixel_values)[-1][:, 1:].float()

    # -- captions ----------------------------------------------------------------------------------
    def _max_tokens(self) -> int:
        """The longest caption the model takes: RoBERTa positions start after the padding index."""
        text_config = self.model.config.text_config
        positions = int(text_config.max_position_embeddings) - int(text_config.pad_token_id or 0) - 1
        limit = getattr(self.tokenizer, "model_max_length", None) or positions
        return min(int(limit), positions)

    def _tokenize(
        self, prompts: Sequence[Prompt], token_salience: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids for the captions and a [B, C_max, T] matrix averaging each class's pieces.

        A byte-level BPE piece covers the space before its word ("Ġcat"); the characters it
        spells start after that space. `token_salience`: one more row [B, C_max + 1, T], 1 on
        every class word piece and on the </s> of a caption shorter than the batch's longest.
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
            if token_salience and real_length < length:  # </s> is the caption's last real token
                weights[b, classes, real_length - 1] = 1.0
        tokens = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        return tokens, weights.to(self.device)
