"""Segmenter core: PnP-OVSS (BLIP cross-attention GradCAM, Salience Dropout), the dense CLIP
methods (segmenter.methods), and the shared post-processing.

    from segmenter import Segmenter, SegmenterConfig
    result = Segmenter(SegmenterConfig(model="path/or/hub-id")).segment(image, ["cat", "dog"])
    result = Segmenter(SegmenterConfig.preset("naclip")).segment(image, ["cat", "dog"])
"""

from .backends import Backend, Prompt, build_prompt, load_backend, register_backend
from .candidates import candidate_indices, candidate_label_use, select_candidates
from .clip import ClipScorer
from .config import SegmenterConfig
from .images import as_rgb_uint8, read_image
from .methods import Method, load_method, register_method
from .pipeline import SegmentationResult, Segmenter, postprocess, prompt_for, salience_dropout

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ClipScorer",
    "Method",
    "Prompt",
    "SegmentationResult",
    "Segmenter",
    "SegmenterConfig",
    "as_rgb_uint8",
    "build_prompt",
    "candidate_indices",
    "candidate_label_use",
    "load_backend",
    "load_method",
    "postprocess",
    "prompt_for",
    "read_image",
    "register_backend",
    "register_method",
    "salience_dropout",
    "select_candidates",
]
