"""Shared fixtures: tiny BLIP ITM models of the real transformers classes, saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

WORDS = [
    "a", "picture", "of", "cat", "dog", "person", "traffic", "light", "sky", "grass",
    "red", "blue", "square", "circle", "tri", "##angle", "##s", "potted", "plant",
]


def bert_tokenizer(vocab: list[str], special: list[str] | None = None):
    """A fast BERT WordPiece tokenizer over `vocab` (with `special` as extra special tokens),
    read from a vocab.txt: the one way to build it that transformers 4.x and 5.x share (the
    tests also run on the oldest supported version, `.ci/check_transformers_floor.sh`)."""
    import tempfile

    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast.from_pretrained(folder, additional_special_tokens=special or [])


def save_tiny_blip(path, *, text_layers=3, heads=4, image_size=32, patch=8, seed=0, hidden=32,
                   enc=False, max_positions=64) -> str:
    """A randomly initialised BlipForImageTextRetrieval + processor, saved with save_pretrained.

    `enc=True`: the tokenizer also has BLIP's [ENC] token (a special token, last id), as LAVIS's.
    """
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(["[ENC]"] if enc else [])]
    tokenizer = bert_tokenizer(vocab, ["[ENC]"] if enc else None)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=text_layers,
            num_attention_heads=heads, intermediate_size=64, max_position_embeddings=max_positions,
            pad_token_id=0, bos_token_id=2, sep_token_id=3, initializer_range=0.2,
        ),
        vision_config=dict(
            hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            image_size=image_size, patch_size=patch, initializer_range=0.2,
        ),
        image_text_hidden_size=16, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> str:
    """Path of a tiny BLIP ITM checkpoint: 3 text layers x 4 heads, 32 px input, 4x4 patches."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_image(rng: np.random.Generator, height: int, width: int, channels: int = 3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# --- tiny CLIP ---------------------------------------------------------------------------------------
CLIP_WORDS = [
    "red", "blue", "a", "picture", "of", "cat", "dog", "person", "sky", "grass", "square", "circle",
]
COLOUR_SHARPNESS = 0.05  # the colour CLIP's alpha: small = cosine similarities close together


def clip_tokenizer(words=CLIP_WORDS):
    """A byte-level BPE CLIPTokenizer: single letters plus merges that spell each of `words`."""
    import json
    import string
    import tempfile

    from transformers import CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            vocab.setdefault(current, len(vocab))
    with tempfile.TemporaryDirectory() as folder:  # files: the form transformers 4.x and 5.x share
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizerFast.from_pretrained(folder)


def save_tiny_clip(path, *, colour=False, image_size=32, patch=8, seed=0) -> str:
    """A tiny CLIPModel + CLIPProcessor saved with save_pretrained.

    `colour=False`: random weights, CLIP's mean/std. `colour=True`: weights set by hand so that
    an image embedding is the mean colour direction of its non-black patches and the names "red"
    and "blue" embed to the red and blue directions (plus a shared offset that keeps cosine
    similarities close, so probabilities at temperature 100 do not saturate); black patches
    contribute nothing and the black image embeds to the shared offset alone (P uniform).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    hidden = 8 if colour else 16
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1 if colour else 2,
            num_attention_heads=1 if colour else 2, intermediate_size=2 * hidden,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=hidden, num_hidden_layers=1 if colour else 2,
            num_attention_heads=1 if colour else 2, intermediate_size=2 * hidden,
            image_size=image_size, patch_size=patch,
        ),
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    if colour:
        _set_colour_weights(model, tokenizer, patch)
    else:
        redraw_weights(model, seed)
    model.save_pretrained(path)
    mean, std = ([0.0] * 3, [1.0] * 3) if colour else ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=mean, image_std=std,
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(path)
    return str(path)


def redraw_weights(model, seed: int) -> None:
    """Redraw a CLIPModel's weights from a generator seeded here, in parameter-name order, with
    the spreads of CLIP's own initialisation (embedding tables 0.02, attention and MLP matrices
    scaled by width and depth, projections 1/sqrt(width)); biases 0, LayerNorm scales 1.

    transformers draws its initialisation in another order from one release to the next, so
    without this the tiny model (and the near-ties a test guards against) would change with the
    installed version; this way the tests see one model on every supported version."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            tower = model.config.text_config if name.startswith("text") else model.config.vision_config
            width, depth = tower.hidden_size, tower.num_hidden_layers
            if param.dim() == 0:  # logit_scale: from the config
                continue
            if name.endswith("bias"):
                param.zero_()
                continue
            if "norm" in name:  # LayerNorm scale
                param.fill_(1.0)
                continue
            if name.endswith("class_embedding") or name.endswith(("projection.weight", "out_proj.weight")):
                std = width**-0.5
            elif name.endswith("embedding.weight"):  # token, position and patch embeddings
                std = 0.02
            elif name.endswith("fc1.weight"):
                std = (2 * width) ** -0.5
            else:  # q, k, v and fc2
                std = (2 * width * depth) ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _set_colour_weights(model, tokenizer, patch: int) -> None:
    """Hidden dims 0-2 = +RGB, 3-5 = -RGB (zero mean, so LayerNorm keeps the direction), 6 = offset."""
    eye = torch.eye(8)
    red, blue = eye[0] - eye[3], eye[2] - eye[5]
    scale = torch.full((8,), COLOUR_SHARPNESS)
    with torch.no_grad():
        for tower in (model.text_model, model.vision_model):
            for layer in tower.encoder.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj):  # uniform attention
                    proj.weight.zero_()
                    proj.bias.zero_()
                for proj in (attn.v_proj, attn.out_proj):  # tokens are averaged unchanged
                    proj.weight.copy_(eye)
                    proj.bias.zero_()
                layer.mlp.fc2.weight.zero_()  # no MLP contribution
                layer.mlp.fc2.bias.zero_()
                for norm in (layer.layer_norm1, layer.layer_norm2):
                    norm.weight.fill_(1.0)
                    norm.bias.zero_()
            tower.embeddings.position_embedding.weight.zero_()
        text = model.text_model
        text.embeddings.token_embedding.weight.zero_()
        for word, direction in (("red", red), ("blue", blue)):
            ids = tokenizer(word)["input_ids"]
            assert len(ids) == 3, f"{word!r} must be one token"
            text.embeddings.token_embedding.weight[ids[1]] = direction
        vision = model.vision_model
        vision.embeddings.class_embedding.zero_()
        weight = torch.zeros(8, 3, patch, patch)  # per-patch mean of each channel, and its negative
        for c in range(3):
            weight[c, c] = 1.0 / patch**2
            weight[c + 3, c] = -1.0 / patch**2
        vision.embeddings.patch_embedding.weight.copy_(weight)
        vision.pre_layrnorm.weight.fill_(1.0)
        vision.pre_layrnorm.bias.zero_()
        for norm in (text.final_layer_norm, vision.post_layernorm):
            norm.weight.copy_(scale)
            norm.bias.copy_(eye[6])
        model.text_projection.weight.copy_(eye)
        model.visual_projection.weight.copy_(eye)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Path of a random tiny CLIP checkpoint: 32 px input, 8 px patches, 8-d embeddings."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def colour_clip(tmp_path_factory) -> str:
    """Path of a hand-set tiny CLIP that sees colours: "red" and "blue" mean what they say."""
    return save_tiny_clip(tmp_path_factory.mktemp("colour-clip"), colour=True)


def write_spec(tmp_path: Path, blip: str, clip: str, *, space=None, images=4, trials=3, **extra) -> Path:
    """A study spec over shapes-world images with the tiny models, written to tmp_path/study.yaml."""
    spec = {
        "dataset": "shapes",
        "dataset_options": {"size": 40},
        "tuning": {"split": "train", "images": images, "seed": 0},
        "objective": "clip_margin",
        "objective_options": {"clip_model": clip},
        "fixed": {"model": blip, "image_size": 32, "layer": 2, "dropout_rounds": 1, "crf_iterations": 2},
        "search_space": space or {
            "layer": {"type": "int", "low": 1, "high": 2},
            "head": {"type": "int", "low": 0, "high": 3},
            "threshold": {"type": "float", "low": 0.05, "high": 0.45, "step": 0.1},
        },
        "pruner": {"type": "none"},
        "trials": trials,
        **extra,
    }
    spec = {k: v for k, v in spec.items() if v is not None}  # `objective=None`: leave the key out
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def kill_mid_trial(proc, storage, study_name: str, min_done: int = 2, timeout: float = 180) -> bool:
    """SIGKILL a `tune run` process once the study has `min_done` finished trials and the process
    runs one; True when it died inside that trial (its trial is left RUNNING), False when the
    kill landed between two of its trials. `storage`: a URL or an Optuna storage object."""
    import signal
    import time

    import optuna

    running = (optuna.trial.TrialState.RUNNING,)
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def own_running(study):
        return [t for t in study.get_trials(deepcopy=False, states=running)
                if str(t.user_attrs.get("worker", "")).endswith(f":{proc.pid}")]

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            continue
        if len(study.get_trials(deepcopy=False, states=finished_states)) >= min_done and own_running(study):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return bool(own_running(optuna.load_study(study_name=study_name, storage=storage)))
    err = proc.stderr.read().decode()[-2000:] if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"process {proc.pid} was never seen inside a trial {err}")
