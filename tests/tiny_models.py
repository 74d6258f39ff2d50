"""Tiny random-initialised models and tokenizers, built in code (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a red square on the left of a blue circle",
    "What is in the picture? A cat sitting on a mat.",
    "USER: describe the image ASSISTANT: a small green triangle",
    "yes no one two three four five",
    "The capital of France is Paris.",
    "hello world, how are you today?",
] * 20


def make_tokenizer(directory: Path, chat_template: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHATML if chat_template else None,
    )
    fast.save_pretrained(directory)
    return fast


def make_llm(directory: Path, kind: str, chat_template: bool = True) -> Path:
    """A tiny random LLM and its tokenizer: "llama", "qwen2" and "opt" with a byte-level BPE tokenizer, "llama-sp"
    a Llama with Llama 2's kind of tokenizer (SentencePiece BPE, BOS in front, no chat template)."""
    if kind == "llama-sp":
        from transformers import LlamaTokenizer

        make_sentencepiece(directory, CORPUS * 5, vocab_size=400)
        tok = LlamaTokenizer.from_pretrained(directory, legacy=True, add_bos_token=True, add_eos_token=False)
        tok.pad_token = tok.unk_token
        tok.save_pretrained(directory)
        (directory / "tokenizer.model").unlink()  # transformers reads tokenizer.json, as from a hub checkpoint
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps(config | {"legacy": True}))  # not saved by 5.x
        kind = "llama"
    else:
        tok = make_tokenizer(directory, chat_template=chat_template, bos=kind == "opt")
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        model = Qwen2ForCausalLM(cfg)
    elif kind == "opt":
        cfg = OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=24,
            max_position_embeddings=512,
            **common,
        )
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    return directory


def make_vision(directory: Path, kind: str) -> Path:
    torch.manual_seed(1)
    common = dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    elif kind == "dinov2":
        common.pop("intermediate_size")
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return directory


def louden(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Redraw the LLM's matrices at a larger scale: the stock random init answers the same to everything,
    so tests that need answers to depend on the prompt and image use this."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` noise pictures of growing heights (40, 48, ... x 48): odd sizes for the processors."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def samples(processor) -> list:
    """One image; two `<image>` runs in one sample; text only: three lengths, so a batch of them is padded."""
    return [
        processor.prompt("What is in the picture?", images(1)),
        processor.encode_raw("compare <image> with <image> please", images(2, seed=1)),
        processor.prompt("hello world, how are you today?"),
    ]


def make_sentencepiece(directory: Path, lines: list[str], vocab_size: int = 700) -> Path:
    """A real SentencePiece BPE model (Llama's kind: byte fallback, `▁` for spaces, a dummy prefix) trained on
    `lines`: `directory/tokenizer.model`, which transformers' LlamaTokenizer loads."""
    import sentencepiece as spm  # the test extra installs it: CI never skips its tests

    (directory / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    return directory
