"""`BlipBackend`: PnP-OVSS maps from transformers' `BlipForImageTextRetrieval` (ALGORITHM.md 1, 3).

The performance design of DESIGN.md lives here: the vision encoder runs under `inference_mode`; its
output is the only tensor that requires grad, so autograd records the text encoder alone; the
gradient of the ITM match logit is asked for the captured cross-attention probabilities only
(`torch.autograd.grad`), so no parameter gradient is ever computed and the backward pass stops at
the earliest requested layer. All heads of a layer come out of the same pass. The vision encoder's
self-attention runs through `scaled_dot_product_attention` (fused kernels, no [N, N] probability
tensor kept), which transformers' BLIP does not offer; the text encoder keeps its eager attention,
whose probabilities GradCAM reads.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._base import Prompt, resolve_model_path
from ._itm import ItmBackend

ITM_MATCH = 1  # index of the "match" logit of the ITM head
#: BLIP's encoder token, which BLIP was trained for ITM with (LAVIS puts it first in the caption)
ENC_TOKEN = "[ENC]"
ITM_TOKENS = ("cls", "enc")

log = logging.getLogger("ovss_tune.segmenter")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
    return device


def _sdpa_attention(self, hidden_states: torch.Tensor, **_kwargs) -> tuple[torch.Tensor, None]:
    """`BlipAttention.forward` through `F.scaled_dot_product_attention` (same maths, eval mode only)."""
    batch, length, dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, d]
    context = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, dim)), None


def use_sdpa_vision_attention(vision_model: torch.nn.Module) -> None:
    """Route every ViT self-attention of a BLIP vision model through SDPA."""
    from transformers.models.blip.modeling_blip import BlipAttention

    for module in vision_model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_sdpa_attention, module)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto"/None: bfloat16 on a CUDA GPU that supports it (else float16), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_error(kind: str, model: str, err: Exception) -> OSError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OSError(
        f"could not load the {kind} from {model!r} ({first}); give a local directory written by "
        "save_pretrained or a Hugging Face hub id (downloads need network access)"
    )


#: model types (config.json `model_type`) and the checkpoints that carry them, for messages
MODEL_KINDS = {"blip": "a BLIP model (set it as `model`)",
               "bridgetower": "a BridgeTower model (set it as `model` with `backend: bridgetower`)",
               "clip": "a CLIP model (set it as `clip_model` of a CLIP method such as `method: sclip`, "
                       "as `candidates_model` or as the objective's `clip_model`)"}


def load_pretrained(model_cls, model: str, revision: str | None, *, kind: str, model_type: str,
                    used: tuple[str, ...]):
    """`model_cls.from_pretrained` that refuses what would run with random weights.

    `model` is a hub id or directory (`pkg://` resolved). Raises OSError (one line) when it
    cannot be read, when its config names another `model_type` (a CLIP where a BLIP is asked
    for, say), or when any weight of the modules in `used` (name prefixes) is missing from the
    checkpoint or has another shape: transformers would initialise those at random (a BLIP
    without its ITM head scores at chance) and say so only in a warning.
    """
    from transformers import AutoConfig

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        raise load_error(kind, model, err) from None
    found = getattr(config, "model_type", None)
    if found != model_type:
        what = MODEL_KINDS.get(found, f"a model of type {found!r}")
        raise OSError(f"{model!r} holds {what}, not the {kind} asked for here: give a {kind} checkpoint")
    try:
        net, info = model_cls.from_pretrained(path, revision=revision, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise load_error(kind, model, err) from None
    missing = sorted({*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                        for k in info.get("mismatched_keys", ()))})
    missing = [k for k in missing if k.startswith(used)]
    if missing:
        raise OSError(
            f"{model!r} lacks {len(missing)} weights the {kind} needs ({missing[0]}, ...): they would be "
            "random; give a complete checkpoint (save_pretrained of the whole model)"
        )
    return net


class BlipBackend(ItmBackend):
    """BLIP image-text matching: BERT-style text encoder with cross-attention over ViT patches."""

    name = "blip"

    def __init__(
        self,
        model: str = "Salesforce/blip-itm-large-flickr",
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        sdpa: bool = True,
    ) -> None:
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        self.model_id, self.revision = str(model), revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        path = resolve_model_path(self.model_id)
        net = load_pretrained(BlipForImageTextRetrieval, self.model_id, revision, kind="BLIP ITM model",
                              model_type="blip", used=("vision_model.", "text_encoder.", "itm_head."))
        try:
            processor = AutoProcessor.from_pretrained(path, revision=revision)
        except (OSError, ValueError) as err:
            raise load_error("BLIP processor", self.model_id, err) from None
        net.requires_grad_(False)
        self.model = net.eval().to(self.device, self.dtype)
        if sdpa:  # the ViT's attention probabilities are never read: fused attention is exact maths
            use_sdpa_vision_attention(self.model.vision_model)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self._mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)
        vision = self.model.config.vision_config
        self._patch, self._native_size = int(vision.patch_size), int(vision.image_size)
        self._layers = self.model.text_encoder.encoder.layer
        self.forward_calls = 0  # text-encoder passes run; the tuner counts them
        self._enc_id: int | None | bool = False  # not looked up yet

    # -- the ITM caption's first token -----------------------------------------------------------
    def first_token_id(self, itm_token: str | None = None) -> int | None:
        """The id that replaces the tokenizer's [CLS] at the caption's start; None keeps [CLS].

        "enc": BLIP's [ENC] when the checkpoint's tokenizer has it (the authors' code, after
        LAVIS); a tokenizer without it keeps [CLS] and says so once in a warning. ValueError for
        another value.
        """
        token = self.itm_token if itm_token is None else itm_token
        if token not in ITM_TOKENS:
            raise ValueError(f"itm_token {token!r} is unknown: use {' or '.join(ITM_TOKENS)}")
        if token == "cls":
            return None
        if self._enc_id is False:
            vocab = self.tokenizer.get_vocab()
            self._enc_id = vocab.get(ENC_TOKEN)
            size = self.model.text_encoder.embeddings.word_embeddings.num_embeddings
            if self._enc_id is not None and self._enc_id >= size:
                self._enc_id = None
            if self._enc_id is None:
                log.warning("itm_token enc: the tokenizer of %s has no %s token (the one BLIP was trained "
                            "for ITM with), so the caption starts with [CLS] as in transformers' BLIP; "
                            "maps differ from the authors' code (README, Differences)",
                            self.model_id, ENC_TOKEN)
        return self._enc_id

    def _swap_first(self, ids: torch.Tensor, itm_token: str | None) -> torch.Tensor:
        """`ids` [N, T] with the first token replaced per `first_token_id` (a copy if changed)."""
        first = self.first_token_id(itm_token)
        if first is None:
            return ids
        ids = ids.clone()
        ids[:, 0] = first
        return ids

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
        size = pixel_values.shape[-1]
        pixel_values, (gh, gw) = self._gradcam_input(pixel_values, prompts, layers, dropped)
        with torch.inference_mode():
            image_embeds = self.model.vision_model(
                pixel_values=pixel_values.to(self.device, self.dtype),
                interpolate_pos_encoding=size != self._native_size,
            ).last_hidden_state  # [B, 1 + gh*gw, D]
        # an ordinary tensor (inference tensors cannot enter autograd): the graph's only leaf
        image_embeds = image_embeds.clone().requires_grad_(True)
        tokens, class_weights = self._tokenize(prompts, token_salience)  # [B, C_max (+1), T]
        tokens["input_ids"] = self._swap_first(tokens["input_ids"], itm_token)

        captured: dict[int, torch.Tensor] = {}
        hooks = []
        for layer in layers:
            def keep_probs(_module, _inputs, output, layer=layer):
                captured[layer] = output[1]  # attention probabilities [B, heads, T, 1 + gh*gw]
            hooks.append(self._layers[layer - 1].crossattention.self.register_forward_hook(keep_probs))
        try:
            with torch.enable_grad():
                text = self.model.text_encoder(
                    input_ids=tokens["input_ids"],
                    attention_mask=tokens["attention_mask"],
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(
                        image_embeds.shape[:-1], dtype=torch.long, device=self.device
                    ),
                )
                score = self.model.itm_head(text.last_hidden_state[:, 0, :])[:, ITM_MATCH]  # [B]
                probs = [captured[layer] for layer in layers]
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

    # -- candidate classes: plain ITM --------------------------------------------------------------
    @torch.inference_mode()
    def itm_scores(
        self, pixel_values: torch.Tensor, texts: Sequence[str], batch_size: int = 64,
        itm_token: str | None = None,
    ) -> torch.Tensor:
        """ITM match probability softmax(itm logits)[1] of every text for every image. # [B, T]

        The vision encoder runs once per image; the (image, text) pairs go through the text
        encoder `batch_size` at a time.
        """
        batch, size = pixel_values.shape[0], pixel_values.shape[-1]
        if not texts or not batch:
            return torch.zeros(batch, len(texts), device=self.device)
        image_embeds = self.model.vision_model(
            pixel_values=pixel_values.to(self.device, self.dtype),
            interpolate_pos_encoding=size != self._native_size,
        ).last_hidden_state  # [B, 1 + gh*gw, D]
        max_pos = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_pos,
                                return_tensors="pt")
        ids = self._swap_first(tokens["input_ids"].to(self.device), itm_token)  # [T, L]
        mask = tokens["attention_mask"].to(self.device)  # [T, L]
        pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(len(texts))).to(self.device)
        step, scores = max(1, int(batch_size)), []
        for start in range(0, len(pairs), step):
            b, t = pairs[start : start + step].unbind(1)  # [P], [P]
            images = image_embeds[b]  # [P, 1 + gh*gw, D]
            text = self.model.text_encoder(
                input_ids=ids[t], attention_mask=mask[t], encoder_hidden_states=images,
                encoder_attention_mask=torch.ones(images.shape[:-1], dtype=torch.long,
                                                  device=self.device),
            )
            logits = self.model.itm_head(text.last_hidden_state[:, 0, :]).float()  # [P, 2]
            scores.append(logits.softmax(-1)[:, ITM_MATCH])
        return torch.cat(scores).view(batch, len(texts))

    @torch.inference_mode()
    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder's output tokens for the patches (image [CLS] dropped). # [B, gh*gw, D]"""
        size = pixel_values.shape[-1]
        hidden = self.model.vision_model(
            pixel_values=pixel_values.to(self.device, self.dtype),
            interpolate_pos_encoding=size != self._native_size,
        ).last_hidden_state  # [B, 1 + gh*gw, D]
        return hidden[:, 1:].float()

    @torch.inference_mode()
    def itm_pair_scores(
        self, pixel_values: torch.Tensor, texts: Sequence[str], batch_size: int = 64,
        itm_token: str | None = None,
    ) -> torch.Tensor:
        """ITM match probability of image b with text b, for b < B (pairs, not every text). # [B]"""
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} texts: give one per image")
        size, out = pixel_values.shape[-1], []
        max_pos = self.model.config.text_config.max_position_embeddings
        step = max(1, int(batch_size))
        for start in range(0, len(texts), step):
            images = self.model.vision_model(
                pixel_values=pixel_values[start : start + step].to(self.device, self.dtype),
                interpolate_pos_encoding=size != self._native_size,
            ).last_hidden_state  # [P, 1 + gh*gw, D]
            tokens = self.tokenizer(list(texts[start : start + step]), padding=True, truncation=True,
                                    max_length=max_pos, return_tensors="pt")
            text = self.model.text_encoder(
                input_ids=self._swap_first(tokens["input_ids"].to(self.device), itm_token),
                attention_mask=tokens["attention_mask"].to(self.device),
                encoder_hidden_states=images,
                encoder_attention_mask=torch.ones(images.shape[:-1], dtype=torch.long, device=self.device),
            )
            logits = self.model.itm_head(text.last_hidden_state[:, 0, :]).float()  # [P, 2]
            out.append(logits.softmax(-1)[:, ITM_MATCH])
        if not out:
            return torch.zeros(0, device=self.device)
        return torch.cat(out)

    def _max_tokens(self) -> int:
        limit = getattr(self.tokenizer, "model_max_length", None) or 512
        return min(int(limit), int(self.model.config.text_config.max_position_embeddings))
