"""Random-weight CLIP models with real architectures and the real CLIP tokenizer.

Tests, CI, benchmarks and offline demos use these: the folder they are saved to is loaded by the
same code as a downloaded model. Same preset and seed, same weights.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BPE_VOCAB = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
# Marker file saved next to config.json: its presence makes the service say "random weights".
MARKER = "clipsite_test_model.json"

_OPENAI_TOKEN_IDS = {"bos": 49406, "eos": 49407}

# openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14, field by field.
_B32_TEXT = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
_B32_VISION = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32)
_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14
)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, patch_size=32)

PRESETS: dict[str, dict] = {
    "tiny": {"text": _TINY_TEXT, "vision": _TINY_VISION, "projection_dim": 64},
    "vit-b-32": {"text": _B32_TEXT, "vision": _B32_VISION, "projection_dim": 512},
    "vit-l-14": {"text": _L14_TEXT, "vision": _L14_VISION, "projection_dim": 768},
}

# OpenAI's preprocessing: shortest side 224 (bicubic), centre crop 224, OpenAI mean and std.
IMAGE_PROCESSOR_CONFIG = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE (49,408 tokens, 48,894 merges), built from OpenAI's vocabulary file."""
    with gzip.open(BPE_VOCAB, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != 49408:
        raise RuntimeError(f"CLIP vocabulary has {len(tokens)} tokens, expected 49408")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_processor():
    """The real CLIP tokenizer plus OpenAI's image preprocessing, as a transformers CLIPProcessor."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessorPil(**IMAGE_PROCESSOR_CONFIG)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_clip_config(preset: str):
    from transformers import CLIPConfig

    spec = PRESETS[preset]
    common_text = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=spec["projection_dim"],
        # openai's checkpoints keep the legacy ids, which make pooling take the first highest id (EOT).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    common_vision = dict(
        image_size=224,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=spec["projection_dim"],
    )
    return CLIPConfig(
        text_config={**common_text, **spec["text"]},
        vision_config={**common_vision, **spec["vision"]},
        projection_dim=spec["projection_dim"],
        logit_scale_init_value=2.6592,
    )


def build_test_model(preset: str, out: Path, *, seed: int = 0) -> Path:
    """Build a random-weight CLIP of ``preset`` and save it in the model-clip/ + processor-clip/ layout."""
    import torch
    from transformers import CLIPModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = Path(out)
    torch.manual_seed(seed)
    model = CLIPModel(build_clip_config(preset)).eval()
    model_dir, processor_dir = out / "model-clip", out / "processor-clip"
    model.save_pretrained(model_dir)
    build_clip_processor().save_pretrained(processor_dir)
    marker = {"preset": preset, "seed": seed, "weights": "random"}
    (model_dir / MARKER).write_text(json.dumps(marker))
    return out


def read_marker(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
