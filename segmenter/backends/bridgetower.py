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

import torch

from ._base import Prompt, resolve_model_path
from ._itm import ItmBackend
from .blip import ITM_TOKENS, load_error, load_pretrained, resolve_device, resolve_dtype

DEFAULT_MODEL = "BridgeTower/bridgetower-large-itm-mlm-itc"
ITM_MATCH = 1  # index of the "match" logit of the ITM head
TEXT_TYPE, IMAGE_TYPE = 0, 1  # token-type ids of the cross-modal encoder's two streams


def _nth(modules: torch.nn.Module, k: int) -> torch.nn.Module:
    """Module `k` of a per-layer ModuleList, or the one module a config shares across layers."""
    return modules[k] if isinstance(modules, torch.nn.ModuleList) else modules


class BridgeTowerBackend(ItmBackend):
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
        pixel_values, (gh, gw) = self._gradcam_input(pixel_values, prompts, layers, dropped)
        self._check_itm_token(itm_token)
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
