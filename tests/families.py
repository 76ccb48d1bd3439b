"""Tiny random-weight models of each CLIP family, saved as their hub checkpoints ship.

Each family gets a real transformers model with a tiny config (the sizes transformers' own tests use)
and that family's own tokenizer class over a small vocabulary trained here, so the text path runs the
same code as a downloaded checkpoint. One folder holds the model and the processor, as on the hub, so
``AutoModel.from_pretrained(folder)`` and ``AutoProcessor.from_pretrained(folder)`` load it.

What transformers 5 loads from each folder (without torchvision, image processors are the PIL ones):

    clip          CLIPModel         CLIPTokenizer (the real 49,408-token BPE)  CLIPImageProcessorPil
    siglip        SiglipModel       SiglipTokenizer (sentencepiece)            SiglipImageProcessorPil
    siglip2       SiglipModel       GemmaTokenizer (tokenizer.json)            SiglipImageProcessorPil
    chinese_clip  ChineseCLIPModel  BertTokenizer (from vocab.txt)             ChineseCLIPImageProcessorPil
    altclip       AltCLIPModel      XLMRobertaTokenizer (from an spm model)    CLIPImageProcessorPil

SigLIP 2 means the fixed-resolution checkpoints (``google/siglip2-base-patch16-224``): a ``SiglipModel``
with a Gemma tokenizer. The NaFlex ``Siglip2Model`` (patches and ``spatial_shapes``) is not covered.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

FAMILIES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")

# transformers' tests size CLIP-like towers this way; patch 32 at 224 keeps the real input size cheap.
_TOWER = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
_VISION = dict(_TOWER, image_size=224, patch_size=32, num_channels=3)
_PROJECTION_DIM = 32

# SigLIP checkpoints pad every text to 64 tokens (their model cards and transformers' zero-shot pipeline).
_SIGLIP_TEXT = dict(padding="max_length", max_length=64, truncation=True)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_NOUNS = (
    "cat dog bird horse cow sheep elephant zebra giraffe bear car bicycle motorcycle bus truck house tree "
    "flower person child woman man boat train plane chair table sofa lamp clock phone laptop book cup bottle "
    "pizza banana apple orange sandwich cake rocket astronaut coffee guitar umbrella kite ball mountain city "
    "bridge window door garden"
).split()
_CLOTHING = (
    "shirt t-shirt blouse dress skirt jacket coat sweater hoodie cardigan jeans trousers pants shorts leggings "
    "hat cap beanie scarf gloves socks shoes sneakers boots sandals heels belt tie suit vest uniform pyjamas "
    "swimsuit bag backpack watch necklace earrings sunglasses"
).split()
_COLOURS = (
    "red blue green black white yellow pink purple brown grey gray orange beige navy striped checked dotted "
    "denim leather wool cotton"
).split()
_ADJECTIVES = "small big large tiny old new young cute happy sad wet dry soft bright dark sunny rainy fast slow".split()
_PLACES = "beach street park kitchen bedroom office shop market station forest desert snow grass road river".split()
_VERBS = "sitting standing running walking sleeping eating playing jumping swimming flying riding wearing".split()
_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand".split()

# Chinese captions for the multilingual families (Chinese-CLIP, AltCLIP, SigLIP 2's Gemma vocabulary).
_ZH_NOUNS = "猫 狗 鸟 马 汽车 自行车 摩托车 房子 树 花 孩子 女人 男人 宇航员 咖啡 火箭 飞机 苹果 蛋糕".split()
_ZH_CLOTHING = "衣服 帽子 鞋子 裙子 裤子 外套 衬衫 毛衣 围巾 手套 袜子 靴子 背包 眼镜".split()
_ZH_COLOURS = "红色 蓝色 绿色 黑色 白色 黄色 粉色 紫色 棕色 灰色".split()
_ZH_PLACES = "海滩 街道 公园 厨房 雪地 草地 河边 商店".split()


def english_corpus(lines: int = 600) -> list[str]:
    """Captions in the style of CLIP prompts (photos, clothing, digits): the same list on every call."""
    rng = random.Random(0)
    pick = rng.choice
    templates: list[Callable[[], str]] = [
        lambda: f"a photo of a {pick(_ADJECTIVES)} {pick(_NOUNS)}",
        lambda: f"a {pick(_COLOURS)} {pick(_CLOTHING)}",
        lambda: f"a person wearing a {pick(_COLOURS)} {pick(_CLOTHING)} and {pick(_COLOURS)} {pick(_CLOTHING)}",
        lambda: f"{rng.randint(0, 999)} {pick(_NOUNS)}s on the {pick(_PLACES)} in {rng.randint(1900, 2030)}",
        lambda: f"A Photo Of The {pick(_NOUNS).title()}, number {rng.randint(0, 99)}.",
        lambda: f"a {pick(_NOUNS)} {pick(_VERBS)} in the {pick(_PLACES)}",
        lambda: f"{pick(_NUMBERS)} {pick(_ADJECTIVES)} {pick(_NOUNS)}s and {pick(_NUMBERS)} {pick(_CLOTHING)}s",
        # "<" and ">" give SiglipTokenizer's "<unk>"-prefix trick real pieces to strip.
        lambda: f"there is a {pick(_NOUNS)} next to the {pick(_PLACES)} (<{rng.randint(0, 9)}>)",
    ]
    return [templates[i % len(templates)]() for i in range(lines)]


def chinese_corpus(lines: int = 200) -> list[str]:
    """Chinese captions of the same kinds: the same list on every call."""
    rng = random.Random(1)
    pick = rng.choice
    templates: list[Callable[[], str]] = [
        lambda: f"一张{pick(_ZH_NOUNS)}的照片",
        lambda: f"{pick(_ZH_COLOURS)}的{pick(_ZH_CLOTHING)}",
        lambda: f"穿着{pick(_ZH_COLOURS)}{pick(_ZH_CLOTHING)}的{pick(_ZH_NOUNS)}",
        lambda: f"{pick(_ZH_PLACES)}上有{rng.randint(1, 99)}只{pick(_ZH_NOUNS)}。",
    ]
    return [templates[i % len(templates)]() for i in range(lines)]


def _train_sentencepiece(lines: list[str], *, vocab_size: int, **special_ids) -> bytes:
    """A unigram sentencepiece model of ``lines``; one thread and unshuffled input keep it deterministic."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a few hundred captions hold fewer pieces than asked for; take what they hold
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        **special_ids,
    )
    return model.getvalue()


def _train_gemma_bpe(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's layout in small: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, 256 byte tokens, then BPE merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    # Gemma merges across the whole text; training word by word keeps every merge inside one word.
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 512, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(lines, trainer=trainer)
    saved = json.loads(bpe.to_str())["model"]
    return saved["vocab"], [tuple(merge) for merge in saved["merges"]]


def _wordpiece_vocab() -> list[str]:
    """BERT's specials, CJK ideographs, then English words, characters and ## pieces."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [chr(c) for c in range(0x4E00, 0x4E00 + 300)]  # 一 onwards
    tokens += sorted({ch for line in chinese_corpus() for ch in line})
    tokens += list("0123456789abcdefghijklmnopqrstuvwxyz.,!?'\"()-:;<>")
    tokens += ["##" + ch for ch in "0123456789abcdefghijklmnopqrstuvwxyz"]
    tokens += sorted({w for line in english_corpus() for w in re.findall(r"[a-z]+", line.lower())})
    tokens += ["##s", "##es", "##ed", "##ing", "##er", "##ly"]
    return list(dict.fromkeys(tokens))


# --- one builder per family: (scratch folder, seed) -> (model, processor) ---


def _clip(scratch: Path, seed: int):
    from transformers import CLIPModel, CLIPProcessor

    from embeddings.runtime.testmodel import build_test_model

    build_test_model("tiny", scratch, seed=seed)
    model = CLIPModel.from_pretrained(scratch / "model-clip")
    processor = CLIPProcessor.from_pretrained(scratch / "processor-clip")
    return model, processor


def _siglip(scratch: Path, seed: int):
    from transformers import SiglipImageProcessorPil, SiglipProcessor, SiglipTokenizer

    # google/siglip-*'s spiece.model is T5's layout: <pad> 0, </s> 1, <unk> 2, no <s>; </s> also pads.
    spiece = scratch / "spiece.model"
    spiece.write_bytes(
        _train_sentencepiece(
            english_corpus(), vocab_size=512, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, eos_piece="</s>"
        )
    )
    # As google/siglip-* were converted: no attention mask, since the model never used one.
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=64, model_input_names=["input_ids"])
    # google/siglip-base-patch16-224: a 224 square (no crop), bicubic, mean and std 0.5.
    image_processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _siglip_model(len(tokenizer), pad_id=1, eos_id=1, seed=seed), processor


def _siglip2(scratch: Path, seed: int):
    from transformers import GemmaTokenizer, SiglipImageProcessorPil, SiglipProcessor

    vocab, merges = _train_gemma_bpe(english_corpus() + chinese_corpus())
    # google/siglip2-*-224's Gemma tokenizer: <eos> and no <bos>, padding on the right, no attention mask.
    # It does not lowercase (big_vision did): transformers 5 picks its lowercasing Siglip2Tokenizer only
    # for model_type siglip2 (NaFlex), and these checkpoints are model_type siglip.
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_max_length=64,
        model_input_names=["input_ids"],
    )
    # The SigLIP 2 conversion resizes the fixed-resolution checkpoints bilinearly.
    image_processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _siglip_model(len(tokenizer), pad_id=0, eos_id=1, seed=seed), processor


def _siglip_model(vocab_size: int, *, pad_id: int, eos_id: int, seed: int):
    import torch
    from transformers import SiglipConfig, SiglipModel

    text = dict(
        _TOWER,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    # The text head projects to the vision tower's width, which is the embedding size (32).
    config = SiglipConfig(text_config=text, vision_config=dict(_VISION))
    torch.manual_seed(seed)
    return SiglipModel(config)


def _chinese_clip(scratch: Path, seed: int):
    import torch
    from transformers import (
        BertTokenizer,
        ChineseCLIPConfig,
        ChineseCLIPImageProcessorPil,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
    )

    # Like OFA-Sys/chinese-clip-*: a BERT vocab.txt, loaded (and converted) as transformers loads one.
    (scratch / "vocab.txt").write_text("\n".join(_wordpiece_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(scratch, model_max_length=512)
    # OFA-Sys/chinese-clip-vit-base-patch16: CLIP's preprocessing (shortest side 224, bicubic, centre crop).
    image_processor = ChineseCLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    processor = ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(_TOWER, vocab_size=len(tokenizer), max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
    config = ChineseCLIPConfig(
        text_config=text,
        vision_config=dict(_VISION, projection_dim=_PROJECTION_DIM),
        projection_dim=_PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    return ChineseCLIPModel(config), processor


def _altclip(scratch: Path, seed: int):
    import torch
    from transformers import AltCLIPConfig, AltCLIPModel, AltCLIPProcessor, CLIPImageProcessorPil, XLMRobertaTokenizer

    from embeddings.runtime.testmodel import IMAGE_PROCESSOR_CONFIG

    # XLM-R's sentencepiece.bpe.model keeps sentencepiece's ids (<unk> 0, <s> 1, </s> 2); loading it
    # shifts them to fairseq's <s> 0, <pad> 1, </s> 2, <unk> 3 and appends <mask>, as for BAAI/AltCLIP.
    (scratch / "sentencepiece.bpe.model").write_bytes(
        _train_sentencepiece(english_corpus() + chinese_corpus(), vocab_size=768, unk_id=0, bos_id=1, eos_id=2)
    )
    tokenizer = XLMRobertaTokenizer.from_pretrained(scratch, model_max_length=512)
    # BAAI/AltCLIP: OpenAI CLIP's preprocessing.
    image_processor = CLIPImageProcessorPil(**IMAGE_PROCESSOR_CONFIG)
    processor = AltCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(
        _TOWER,
        vocab_size=len(tokenizer),
        max_position_embeddings=514,  # XLM-R's: 512 tokens after the offset of padding_idx + 1
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        project_dim=_PROJECTION_DIM,
    )
    config = AltCLIPConfig(
        text_config=text,
        vision_config=dict(_VISION, projection_dim=_PROJECTION_DIM),
        projection_dim=_PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    return AltCLIPModel(config), processor


_BUILDERS = {
    "clip": _clip,
    "siglip": _siglip,
    "siglip2": _siglip2,
    "chinese_clip": _chinese_clip,
    "altclip": _altclip,
}


def build_family_model(family: str, out: Path, *, seed: int = 0) -> Path:
    """Build a random-weight model of ``family`` into ``out`` (model and processor together); same seed, same files."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        model, processor = _BUILDERS[family](Path(scratch), seed)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def ensure_family_model(family: str) -> Path:
    """Build (once; reused across runs) the seed-0 model of ``family`` under the test models folder."""
    from tests.conftest import MODELS

    out = MODELS / f"family-{family}-seed0"
    if (out / "config.json").exists():
        return out
    MODELS.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half folder to reuse.
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=MODELS))
    try:
        build_family_model(family, partial)
        partial.chmod(0o755)  # mkdtemp's 0700 would follow the folder
        partial.rename(out)
    except OSError:
        if not (out / "config.json").exists():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def text_context(config) -> int:
    """How many tokens the text tower takes: its position table, less the two that XLM-R's offset uses."""
    positions = config.text_config.max_position_embeddings
    return positions - 2 if config.model_type == "altclip" else positions


def reference_vectors(folder: Path, *, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own pipeline: AutoProcessor, get_image/text_features, L2 normalised (float32)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if model.config.model_type == "siglip":
        text_args = _SIGLIP_TEXT
    else:
        text_args = dict(padding=True, truncation=True, max_length=text_context(model.config))

    def features(out) -> np.ndarray:
        v = (out if isinstance(out, torch.Tensor) else out.pooler_output).float().numpy()
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    with torch.inference_mode():
        image_vectors = features(model.get_image_features(**processor(images=images, return_tensors="pt")))
        text_vectors = features(model.get_text_features(**processor(text=texts, return_tensors="pt", **text_args)))
    return image_vectors, text_vectors
