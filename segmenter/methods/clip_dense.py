"""Training-free dense CLIP segmentation: MaskCLIP, SCLIP, ClearCLIP and NACLIP on transformers' `CLIPModel`.

All four keep CLIP's vision tower up to its last encoder layer and change only that layer; the
patch tokens it outputs go through CLIP's final layer norm (`post_layernorm`) and
`visual_projection` into the text space, are L2-normalised and compared (cosine similarity)
with one L2-normalised text embedding per class. Notation for the last layer, per head, with
x the layer's input tokens [N+1, D] (class token first), y = LN1(x), q = y Wq + bq, k = y Wk + bk,
v = y Wv + bv, s = head_dim^-1/2, softmax over the last axis, O = out_proj of the heads
concatenated, FFN(h) = fc2(act(fc1(h))):

- `maskclip` (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP"; its ViT code):
  the value path only, no q-k attention: a = O(v), then the block's residual and FFN as usual:
  h = x + a, out = h + FFN(LN2(h)). (MaskCLIP's released ViT backbone keeps both; ClearCLIP's
  re-implementation writes the same value path as attention with an identity matrix.)
- `sclip` (Wang et al., ECCV 2024, "SCLIP: Rethinking Self-Attention for Dense Vision-Language
  Inference"): correlative self-attention a = O((softmax(s q q^T) + softmax(s k k^T)) v), with
  the residual and FFN kept: h = x + a, out = h + FFN(LN2(h)) (as in SCLIP's released code).
- `clearclip` (Lan et al., ECCV 2024, "ClearCLIP: Decomposing CLIP Representations for Dense
  Vision-Language Inference"): q-q attention with the residual connection and the FFN removed:
  out = O(softmax(s q q^T) v).
- `naclip` (Hajimiri et al., WACV 2025, "Pay Attention to Your Neighbours: Training-Free
  Open-Vocabulary Semantic Segmentation"), attention `naclip` with the `reduced` architecture:
  out = O(softmax(s k k^T + G) v), no residual, no FFN, where G[i, j] =
  exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2)) for patches i, j at rows r and columns c of
  the patch grid, and G = 0 on the class token's row and column.

Every variant attends over all N+1 tokens (class token included), as the references do.

Text side: each class name is put into every prompt template (`templates: imagenet`, the 80
ImageNet prompts, or `single`, "a photo of a {}."); each prompt's embedding is normalised, the
mean over templates normalised again. Probabilities are softmax over classes of
`logit_scale` x cosine similarity.

Inference follows the SCLIP evaluation harness (SCLIP, ClearCLIP and NACLIP share it): the image
is resized with its aspect kept so that its shorter side is `short_side` pixels (longer side at
most 2048, MMSeg's `Resize(scale=(2048, short_side), keep_ratio=True)`); here each side is then
rounded to a multiple of the patch size, so the patch grid tiles the image exactly. Windows of
`slide_crop` pixels at `slide_stride` (the last row and column of windows shifted back to end at
the image border, a window clipped to the image when the image is smaller) each run through the
model, with the position embeddings interpolated to the window (transformers'
`interpolate_pos_encoding`); the windows' cosine-similarity maps are averaged where they overlap.
`slide_crop: 0` runs the whole image in one pass. Unlike the harness, which averages each
window's map after bilinear upsampling to pixels, the average is taken on the image's patch grid
(crop and stride must be multiples of the patch size, so every window sits on that grid); the two
differ only within half a patch of window borders. `prob_thd` is the harness's background rule:
a pixel whose highest class probability is below it becomes background.

No gradient is ever computed: everything runs under `torch.inference_mode` with frozen weights.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..clip import DEFAULT_CLIP, ClipScorer
from ..images import as_rgb_uint8
from ._templates import TEMPLATE_SETS

VARIANTS = ("maskclip", "sclip", "clearclip", "naclip")
#: variants whose last block keeps its residual connection and FFN
KEEPS_RESIDUAL_FFN = ("maskclip", "sclip")
#: MMSeg's Resize(scale=(2048, short_side), keep_ratio=True): the longer side's cap in pixels
MAX_LONG_SIDE = 2048


def _whole(name: str, value, minimum: int, hint: str) -> int:
    """`value` as an int >= minimum (integral floats accepted), else a one-line ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer() and value >= minimum
    if not ok:
        raise ValueError(f"{name} {value!r} must be a whole number of pixels >= {minimum}{hint}")
    return int(value)


@dataclass(frozen=True)
class ClipDenseParams:
    """Hyperparameters of a dense CLIP method; invalid values raise a one-line ValueError.

    variant: maskclip | sclip | clearclip | naclip (what the last vision layer computes).
    logit_scale: factor on cosine similarities before the softmax over classes (methods: 40-100).
    prob_thd: background rule, pixels whose top class probability is below it are background
        (0 turns it off; the methods use 0.1-0.5 on datasets with a background class).
    slide_crop: sliding-window side in pixels; 0 runs the whole image in one pass.
    slide_stride: step between windows in pixels (at most slide_crop).
    short_side: the image's shorter side in pixels before inference; None keeps its size.
    naclip_sigma: standard deviation, in patches, of NACLIP's Gaussian neighbourhood (naclip only).
    templates: imagenet (80 prompts averaged) | single ("a photo of a {}.").
    """

    variant: str = "naclip"
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    slide_crop: int = 224
    slide_stride: int = 112
    short_side: int | None = 336
    naclip_sigma: float = 5.0
    templates: str = "imagenet"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown: use one of {', '.join(VARIANTS)}")
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates {self.templates!r} is unknown: use {' or '.join(TEMPLATE_SETS)}")
        if not (_is_number(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale {self.logit_scale!r} must be a positive number "
                             "(the methods use 40 to 100)")
        if not (_is_number(self.prob_thd) and 0 <= self.prob_thd <= 1):
            raise ValueError(f"prob_thd {self.prob_thd!r} must be a probability in [0, 1] "
                             "(0 turns the background rule off)")
        if not (_is_number(self.naclip_sigma) and self.naclip_sigma > 0):
            raise ValueError(f"naclip_sigma {self.naclip_sigma!r} must be a positive number of patches "
                             "(NACLIP uses 5)")
        crop = _whole("slide_crop", self.slide_crop, 0, " (0: the whole image in one pass)")
        stride = _whole("slide_stride", self.slide_stride, 1, "")
        if crop and stride > crop:
            raise ValueError(f"slide_stride {stride} is larger than slide_crop {crop}: the windows would "
                             "leave gaps; use a stride no larger than the crop")
        short = None if self.short_side is None else _whole(
            "short_side", self.short_side, 1, " or null (keep the image's size)")
        object.__setattr__(self, "slide_crop", crop)
        object.__setattr__(self, "slide_stride", stride)
        object.__setattr__(self, "short_side", short)
        object.__setattr__(self, "logit_scale", float(self.logit_scale))
        object.__setattr__(self, "prob_thd", float(self.prob_thd))
        object.__setattr__(self, "naclip_sigma", float(self.naclip_sigma))

    def check_patch(self, patch: int) -> None:
        """Raise a one-line ValueError unless crop and stride are multiples of `patch` pixels."""
        fields = [("slide_crop", self.slide_crop)] if self.slide_crop else []
        if self.slide_crop:
            fields.append(("slide_stride", self.slide_stride))
        for name, value in fields:
            if value % patch:
                low, high = value // patch * patch, (value // patch + 1) * patch
                use = f"{low} or {high}" if low else str(high)
                raise ValueError(f"{name} {value} is not a multiple of the model's patch size {patch} px: "
                                 f"use {use}")

    def map_key(self) -> dict:
        """The fields that shape the cosine-similarity maps (`ClipDense.logits`), for cache keys;
        logit_scale and prob_thd act after them. naclip_sigma only counts for naclip."""
        key = {k: v for k, v in asdict(self).items() if k not in ("logit_scale", "prob_thd")}
        if self.variant != "naclip":
            key.pop("naclip_sigma")
        return key


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: the defaults of each method's released code (base config; per-dataset configs override
#: logit_scale, prob_thd and short_side). MaskCLIP predates the shared harness: its rows in the
#: harness's tables use the harness's defaults, which it gets here.
PUBLISHED: dict[str, ClipDenseParams] = {
    "maskclip": ClipDenseParams("maskclip", logit_scale=40.0, slide_crop=224, slide_stride=112,
                                short_side=336),
    "sclip": ClipDenseParams("sclip", logit_scale=40.0, slide_crop=224, slide_stride=112, short_side=336),
    "clearclip": ClipDenseParams("clearclip", logit_scale=50.0, slide_crop=448, slide_stride=224,
                                 short_side=448),
    "naclip": ClipDenseParams("naclip", logit_scale=40.0, slide_crop=224, slide_stride=112, short_side=336,
                              naclip_sigma=5.0),
}


# --- the patched last layer ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _gaussian_bias_cpu(grid_h: int, grid_w: int, sigma: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    r, c = rows.reshape(-1), cols.reshape(-1)  # [N], patch n at row n // gw, column n % gw
    dist2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2  # [N, N]
    bias = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-dist2 / (2.0 * sigma**2))
    return bias.float()


def gaussian_bias(grid: tuple[int, int], sigma: float, device=None) -> torch.Tensor:
    """NACLIP's neighbourhood term G for a (gh, gw) patch grid. # [N+1, N+1], N = gh * gw

    G[i, j] = exp(-d(i, j)^2 / (2 sigma^2)) with d the distance in patches between the patches of
    tokens i and j (row-major, token 0 the class token, whose row and column are 0).
    """
    return _gaussian_bias_cpu(int(grid[0]), int(grid[1]), float(sigma)).to(device)


def dense_last_layer(
    layer: torch.nn.Module, hidden: torch.Tensor, variant: str, grid: tuple[int, int] | None = None,
    sigma: float = 5.0,
) -> torch.Tensor:
    """The last vision encoder layer (`CLIPEncoderLayer`) as `variant` defines it. # [B, N+1, D]

    `hidden` [B, N+1, D] is the layer's input (class token first); `grid` (gh, gw) the patch grid,
    needed by naclip. The attention products and softmaxes run in float32; the layer's own
    modules (layer norms, projections, FFN) in the model's dtype. See the module docstring.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown: use one of {', '.join(VARIANTS)}")
    attn = layer.self_attn
    batch, tokens, dim = hidden.shape
    heads, head_dim, scale = attn.num_heads, attn.head_dim, float(attn.scale)
    y = layer.layer_norm1(hidden)

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, N+1, D] -> [B, heads, N+1, head_dim]
        return t.view(batch, tokens, heads, head_dim).transpose(1, 2).float()

    v = split(attn.v_proj(y))
    if variant == "maskclip":
        context = v
    elif variant == "sclip":
        q, k = split(attn.q_proj(y)), split(attn.k_proj(y))
        weights = (scale * q @ q.transpose(-1, -2)).softmax(-1) \
            + (scale * k @ k.transpose(-1, -2)).softmax(-1)
        context = weights @ v
    elif variant == "clearclip":
        q = split(attn.q_proj(y))
        context = (scale * q @ q.transpose(-1, -2)).softmax(-1) @ v
    else:  # naclip
        if grid is None or grid[0] * grid[1] + 1 != tokens:
            raise ValueError(f"naclip needs the patch grid of its {tokens - 1} patch tokens, got {grid}")
        k = split(attn.k_proj(y))
        logits = scale * k @ k.transpose(-1, -2) + gaussian_bias(grid, sigma, hidden.device)
        context = logits.softmax(-1) @ v
    out = attn.out_proj(context.transpose(1, 2).reshape(batch, tokens, dim).to(hidden.dtype))
    if variant in KEEPS_RESIDUAL_FFN:
        out = hidden + out
        out = out + layer.mlp(layer.layer_norm2(out))
    return out


@functools.cache
def _takes_causal_mask(layer_cls: type) -> bool:
    """transformers 4.x's CLIPEncoderLayer takes (hidden, attention_mask, causal_attention_mask)."""
    return "causal_attention_mask" in inspect.signature(layer_cls.forward).parameters


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, None, None) if _takes_causal_mask(type(layer)) else layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


# --- windows and sizes ----------------------------------------------------------------------------------
def input_size(height: int, width: int, short_side: int | None, patch: int) -> tuple[int, int]:
    """The (h, w) in pixels an image of height x width is resized to before inference.

    Shorter side `short_side` (longer side capped at 2048), aspect kept, each side then rounded to
    the nearest multiple of `patch` (halves up; at least one patch); `short_side=None` keeps the
    size up to that rounding.
    """
    scale = 1.0 if short_side is None else min(short_side / min(height, width),
                                                MAX_LONG_SIDE / max(height, width))
    return tuple(max(1, math.floor(side * scale / patch + 0.5)) * patch for side in (height, width))


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, x1, y2, x2) in pixels over a height x width image, row by row.

    Starts step by `stride`; the last window of a row or column is shifted back to end at the
    border; a window is clipped to the image where the image is smaller than `crop`. `crop=0`
    gives the whole image as one window.
    """
    if crop <= 0:
        return [(0, 0, height, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        y2 = min(i * stride + crop, height)
        for j in range(cols):
            x2 = min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


# --- probabilities and the background rule --------------------------------------------------------------
def class_probabilities(
    logits: torch.Tensor | np.ndarray, logit_scale: float, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """softmax over classes of logit_scale x cosine similarity. # [C, h, w] float32

    `logits` [C, gh, gw] are cosine similarities; with `size` (H, W) they are first upsampled
    bilinearly to it (the harness upsamples before the softmax).
    """
    x = torch.as_tensor(logits).float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return (float(logit_scale) * x).softmax(dim=0)


def prob_thd_background(probs: torch.Tensor | np.ndarray, prob_thd: float) -> np.ndarray:
    """The MMSeg-style background rule: probabilities [C, H, W] -> label map [H, W] int64.

    Label i >= 1 is class i - 1 (the most probable one); 0 (background) where the top probability
    is below `prob_thd`. prob_thd = 0 never gives background.
    """
    if not (_is_number(prob_thd) and 0 <= prob_thd <= 1):
        raise ValueError(f"prob_thd {prob_thd!r} must be a probability in [0, 1]")
    p = torch.as_tensor(probs)
    if p.ndim != 3 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be [classes, H, W] with at least one class, "
                         f"got {tuple(p.shape)}")
    top, index = p.float().max(dim=0)
    labels = index + 1
    labels[top < prob_thd] = 0
    return labels.cpu().numpy().astype(np.int64)


# --- the model ------------------------------------------------------------------------------------------
class ClipDense:
    """A frozen `CLIPModel` that turns images and class names into dense class maps.

    `model` is a hub id, a directory written by save_pretrained, or a loaded `ClipScorer` (its
    model, tokenizer and text-embedding cache are shared). `batch_size` windows run at once.
    The hyperparameters (`ClipDenseParams`) are given per call, so one loaded model serves every
    trial of a study.
    """

    def __init__(
        self,
        model: str | ClipScorer = DEFAULT_CLIP,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 16,
    ) -> None:
        self.scorer = model if isinstance(model, ClipScorer) else ClipScorer(
            model, revision=revision, device=device, dtype=dtype)
        self.model = self.scorer.model
        self.device, self.dtype = self.scorer.device, self.scorer.dtype
        self.batch_size = max(1, int(batch_size))
        self._class_cache: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def patch_size(self) -> int:
        """The ViT's patch side p in pixels."""
        return int(self.model.config.vision_config.patch_size)

    def grid_size(self, height: int, width: int, params: ClipDenseParams) -> tuple[int, int]:
        """The (gh, gw) patch grid of the maps for a height x width image."""
        h, w = input_size(height, width, params.short_side, self.patch_size)
        return h // self.patch_size, w // self.patch_size

    # -- text ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def class_embeddings(self, class_names: Sequence[str], templates: str = "imagenet") -> torch.Tensor:
        """One normalised text embedding per class, averaged over the templates. # [C, D] float32"""
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"templates {templates!r} is unknown: use {' or '.join(TEMPLATE_SETS)}")
        prompts = TEMPLATE_SETS[templates]
        missing = [n for n in dict.fromkeys(map(str, class_names)) if (n, templates) not in self._class_cache]
        if missing:
            texts = [t.format(name) for name in missing for t in prompts]
            embeds = self.scorer.text_embeddings(texts).view(len(missing), len(prompts), -1)  # [c, T, D]
            for name, rows in zip(missing, F.normalize(embeds.mean(dim=1), dim=-1)):
                self._class_cache[(name, templates)] = rows
        if not len(class_names):
            return torch.zeros(0, self.scorer.embedding_dim, device=self.device)
        return torch.stack([self._class_cache[(str(n), templates)] for n in class_names])

    # -- images ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def pixels(self, image: np.ndarray, params: ClipDenseParams) -> torch.Tensor:
        """An HxWx3 image resized (`input_size`) and normalised for the model. # [1, 3, h, w]

        Resizing is bilinear with antialiasing, on RGB in [0, 1]; normalisation uses the
        checkpoint's processor mean and std.
        """
        image = as_rgb_uint8(image)
        size = input_size(*image.shape[:2], params.short_side, self.patch_size)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
        return ((x - self.scorer._mean) / self.scorer._std).to(self.dtype)

    @torch.inference_mode()
    def patch_embeddings(self, pixels: torch.Tensor, params: ClipDenseParams) -> torch.Tensor:
        """Normalised text-space embeddings of every patch, in one pass. # [B, D, gh, gw] float32

        `pixels` [B, 3, h, w] (normalised, h and w multiples of the patch size) of any size: the
        position embeddings are interpolated to it.
        """
        vision = self.model.vision_model
        batch, _, height, width = pixels.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} px is not a whole number of {p} px patches")
        grid = (height // p, width // p)
        try:
            hidden = vision.embeddings(pixels.to(self.dtype), interpolate_pos_encoding=True)
        except TypeError:
            raise RuntimeError("this transformers version's CLIP cannot interpolate position embeddings "
                               "(interpolate_pos_encoding): upgrade transformers") from None
        hidden = vision.pre_layrnorm(hidden)
        layers = vision.encoder.layers
        for layer in layers[:-1]:
            hidden = _run_layer(layer, hidden)
        hidden = dense_last_layer(layers[-1], hidden, params.variant, grid, params.naclip_sigma)
        tokens = self.model.visual_projection(vision.post_layernorm(hidden[:, 1:]))  # [B, N, D']
        tokens = F.normalize(tokens.float(), dim=-1)
        return tokens.transpose(1, 2).reshape(batch, -1, *grid)

    @torch.inference_mode()
    def logits(self, image: np.ndarray, class_names: Sequence[str], params: ClipDenseParams) -> torch.Tensor:
        """Cosine similarity of every patch with every class, window-averaged. # [C, gh, gw] float32

        `image` HxWx3 (uint8 or what `as_rgb_uint8` accepts); (gh, gw) = `grid_size(H, W, params)`.
        Raises ValueError when slide_crop or slide_stride is not a multiple of the patch size.
        """
        p = self.patch_size
        params.check_patch(p)
        text = self.class_embeddings(class_names, params.templates)  # [C, D]
        pixels = self.pixels(image, params)  # [1, 3, h, w]
        height, width = pixels.shape[-2:]
        total = torch.zeros(len(text), height // p, width // p, device=self.device)  # [C, gh, gw]
        count = torch.zeros(1, height // p, width // p, device=self.device)
        boxes = window_boxes(height, width, params.slide_crop, params.slide_stride)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            crops = torch.cat([pixels[..., y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])  # all one size
            sims = torch.einsum("bdhw,cd->bchw", self.patch_embeddings(crops, params), text)
            for (y1, x1, y2, x2), sim in zip(chunk, sims):
                total[:, y1 // p : y2 // p, x1 // p : x2 // p] += sim
                count[:, y1 // p : y2 // p, x1 // p : x2 // p] += 1
        return total / count

    def relevance_maps(
        self, images: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]], params: ClipDenseParams
    ) -> list[np.ndarray]:
        """Per image the class probabilities on its patch grid. # [C, gh, gw] float32, sum 1 over C

        softmax over the image's classes of logit_scale x `logits`.
        """
        if len(images) != len(class_lists):
            raise ValueError(f"{len(images)} images but {len(class_lists)} class lists")
        return [class_probabilities(self.logits(im, names, params), params.logit_scale).cpu().numpy()
                for im, names in zip(images, class_lists)]

    def label_map(self, image: np.ndarray, class_names: Sequence[str], params: ClipDenseParams) -> np.ndarray:
        """The method's own post-processing, as the harness does it. # [H, W] int64

        Cosine maps upsampled bilinearly to the image, softmax of logit_scale x them, argmax, and
        `prob_thd_background`: 0 = background, i = class_names[i - 1].
        """
        image = as_rgb_uint8(image)
        probs = class_probabilities(self.logits(image, class_names, params), params.logit_scale,
                                    size=image.shape[:2])
        return prob_thd_background(probs, params.prob_thd)


def published_params(variant: str, **overrides) -> ClipDenseParams:
    """The defaults of `variant`'s released code, with `overrides` (field=value) applied."""
    if variant not in PUBLISHED:
        raise ValueError(f"variant {variant!r} is unknown: use one of {', '.join(VARIANTS)}")
    return replace(PUBLISHED[variant], **overrides)
