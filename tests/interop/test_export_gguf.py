"""GGUF export (the LLM for llama.cpp, beside minillava's image encoder) and the llama.cpp runner: llama.cpp must
compute the torch model's logits from the spliced embeddings, pick its greedy tokens, and read the tokenizer and chat
template the model was trained with."""

from __future__ import annotations

import ctypes
import json

import pytest
import torch
from export_helpers import greedy_tokens, relative_error
from tiny_models import images, louden, samples

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from minillava.cli import main  # noqa: E402
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from minillava.generate import stop_token_ids  # noqa: E402
from minillava.interop.gguf_export import MANIFEST, export_gguf, tokenizer_spec  # noqa: E402
from minillava.interop.hf import ExportError, _export_chat_template  # noqa: E402
from minillava.interop.llamacpp_runtime import is_gguf_dir, load_gguf  # noqa: E402
from minillava.model import MiniLlava  # noqa: E402

# float32 weights and a float32 KV cache against float32 torch: only the order of the sums differs, but this loud
# random LLM (weights ~0.3) has logits in the tens, so the bound is relative to their size
REL_TOL = 1e-4
PROMPTS = ["What is in the picture?", "describe the image", "What colour is it?", "hello world"]


@pytest.fixture(scope="module")
def exported(build_tiny, tmp_path_factory):
    """projector, type, LLM -> (torch model, processor, LlamaCppModel, its processor), each exported once."""
    made: dict[tuple[str, str, str], tuple] = {}

    def get(projector: str = "mlp2x_gelu", weight_type: str = "f32", llm: str = "llama") -> tuple:
        key = (projector, weight_type, llm)
        if key not in made:
            model, processor = build_tiny(projector=projector, llm=llm)
            louden(model)  # answers that depend on the prompt and image
            with torch.no_grad():  # Qwen2's q/k/v biases start at 0: make the export carry real ones
                for name, p in model.llm.named_parameters():
                    if name.endswith(".bias"):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
            out = tmp_path_factory.mktemp("gguf") / "-".join(key)
            export_gguf(model.eval(), processor, out, weight_type)
            made[key] = (model, processor, *load_gguf(out, "float32"))  # parity: the image encoder in float32 too
        return made[key]

    return get


@pytest.mark.parametrize("llm", ["llama", "qwen2"])  # qwen2: biased q/k/v, RoPE over halves in llama.cpp too
def test_prefill_and_step_logits_equal_torch(exported, llm):
    model, processor, gguf_model, _ = exported(llm=llm)
    batch = processor.collate(samples(processor), padding_side="left")
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    counts = batch["image_counts"]
    with torch.no_grad():
        ref = model(ids, mask, pixels, use_cache=True, image_counts=counts)
    got = gguf_model(ids, mask, pixels, use_cache=True, logits_to_keep=1, image_counts=counts)
    assert got.logits.shape == (3, 1, model.llm.config.vocab_size)
    assert relative_error(got.logits[:, -1], ref.logits[:, -1]) < REL_TOL
    token = ref.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    position = mask.sum(-1, keepdim=True) - 1
    with torch.no_grad():
        ref_step = model(token, mask, position_ids=position, past_key_values=ref.past_key_values, use_cache=True)
    got_step = gguf_model(token, mask, position_ids=position, past_key_values=got.past_key_values, use_cache=True)
    assert relative_error(got_step.logits[:, -1], ref_step.logits[:, -1]) < REL_TOL


@pytest.mark.parametrize(
    ("projector", "llm"), [("mlp2x_gelu", "llama"), ("perceiver", "llama"), ("mlp2x_gelu", "qwen2")]
)
def test_greedy_tokens_equal_torch_generate(exported, projector, llm):
    model, processor, gguf_model, gguf_processor = exported(projector, llm=llm)
    expected = greedy_tokens(model, processor, samples(processor), 8)
    got = greedy_tokens(gguf_model, gguf_processor, samples(gguf_processor), 8)
    assert got == expected
    assert len({tuple(row) for row in expected}) > 1  # the rows differ: the prompts and images matter


def test_rows_decode_as_they_would_alone(exported):
    """Each row is its own llama.cpp sequence: batched greedy tokens equal one-at-a-time ones."""
    _, processor, gguf_model, _ = exported()
    prompts = [processor.prompt(q, images(1, seed=s)) for s, q in enumerate(PROMPTS)]
    together = greedy_tokens(gguf_model, processor, prompts, 6)
    alone = [greedy_tokens(gguf_model, processor, [p], 6)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("weight_type", ["f16", "q8_0", "q4_0"])
def test_smaller_types_stay_close_to_float32(exported, weight_type):
    _, processor, float_model, _ = exported()
    _, _, small_model, _ = exported(weight_type=weight_type)
    files = [m.directory / m.manifest["files"]["llm"] for m in (small_model, float_model)]
    assert files[0].stat().st_size < {"f16": 0.6, "q8_0": 0.4, "q4_0": 0.3}[weight_type] * files[1].stat().st_size
    batch = processor.collate([processor.prompt(q, images(1, seed=s)) for s, q in enumerate(PROMPTS)], "left")
    args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    expected = float_model(*args, logits_to_keep=1).logits[:, -1]
    got = small_model(*args, logits_to_keep=1).logits[:, -1]
    error = (got - expected).norm() / expected.norm()
    # q8_0 rounds the activations to 8 bits too (its dot products are int8 x int8), on logits this loud
    # 4 bits on a 32-wide LLM with weights ~0.3 move the logits by a third: q4_0 is checked to run and to stay
    # correlated here; its quality on real weights is measured by benchmarks/quantize_demo_check.py --exports
    assert 0 < error < {"f16": 0.01, "q8_0": 0.08, "q4_0": 0.5}[weight_type]
    if weight_type != "q4_0":
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_gguf_carries_the_training_tokenizer_and_template(exported):
    """llama.cpp's own tokenizer, read from the file, splits text as the model's tokenizer did; the chat template
    and special ids are the processor's."""
    from gguf import GGUFReader

    _, processor, gguf_model, _ = exported()
    vocab = llama_cpp.llama_model_get_vocab(gguf_model.llm)
    tok = processor.tokenizer
    for text in ["What is in the picture?", "a red square on the left\nof a blue circle!", "  spaces  and 123 4.5"]:
        buffer = (llama_cpp.llama_token * 256)()
        raw = text.encode()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, 256, False, True)
        assert list(buffer[:n]) == tok(text, add_special_tokens=False)["input_ids"], text
    reader = GGUFReader(gguf_model.directory / gguf_model.manifest["files"]["llm"])
    fields = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("tokenizer.ggml.t")}
    assert fields["tokenizer.chat_template"] == _export_chat_template(processor)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["llama.vocab_size"] == len(tok)  # <image> included
    image_token = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, processor.image_token_id, image_token, 64, 0, True)
    assert image_token.raw[:n].decode() == processor.image_token


def _llama_cpp_ids(gguf_model, text: str, parse_special: bool = False) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(gguf_model.llm)
    buffer = (llama_cpp.llama_token * 512)()
    raw = text.encode()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, 512, False, parse_special)
    return list(buffer[:n])


def test_sentencepiece_tokenizer_is_written_as_llamas(exported):
    """A Llama 2 style tokenizer (SentencePiece BPE, byte fallback, `▁` for spaces, a dummy prefix) becomes GGUF's
    "llama" vocabulary: llama.cpp splits text, unseen characters (byte pieces) and whole vicuna prompts with their
    special tokens as the model's tokenizer does, and the model decodes as in torch."""
    from gguf import GGUFReader

    model, processor, gguf_model, gguf_processor = exported(llm="llama-sp")
    tok = processor.tokenizer
    # (not text that starts with a space: transformers' Metaspace then adds no `▁`, SentencePiece and llama.cpp do)
    for text in ["What is in the picture?", "a red square on the left\nof a blue circle!", "spaces  and 123 4.5",
                 "naïve 東京 ☃", "ASSISTANT: the answer"]:  # fmt: skip
        assert _llama_cpp_ids(gguf_model, text) == tok(text, add_special_tokens=False)["input_ids"], text
    turn = [{"role": "user", "content": f"{processor.image_token}\nWhat colour is it?"}]
    prompt = tok.bos_token + "".join(s.text for s in processor.template.render(turn, True))  # vicuna's roles
    assert _llama_cpp_ids(gguf_model, prompt, parse_special=True) == tok(prompt, add_special_tokens=False)["input_ids"]
    reader = GGUFReader(gguf_model.directory / gguf_model.manifest["files"]["llm"])
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert greedy_tokens(gguf_model, gguf_processor, samples(gguf_processor), 8) == greedy_tokens(
        model, processor, samples(processor), 8
    )


def test_manifest_and_processor(exported):
    model, processor, gguf_model, gguf_processor = exported()
    m = json.loads((gguf_model.directory / MANIFEST).read_text())
    assert m["format"] == "minillava-gguf" and m["type"] == "f32"
    assert m["image"]["token_id"] == processor.image_token_id
    assert m["image"]["tokens_per_image"] == model.tokens_per_image
    assert m["eos_token_ids"] == stop_token_ids(processor)
    assert gguf_processor.prompt("hi", images(1)).input_ids == processor.prompt("hi", images(1)).input_ids
    assert not (gguf_model.directory / "llm" / "model.safetensors").exists()  # the LLM lives in the GGUF only


def test_export_merges_lora(build_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = build_tiny()
    louden(model)
    torch.manual_seed(4)
    get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    gguf_model, _ = load_gguf(export_gguf(model.eval(), processor, tmp_path / "gguf", "f32"), "float32")
    batch = processor.collate(samples(processor)[:1])
    args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        ref = model(*args).logits[:, -1]
    assert relative_error(gguf_model(*args, logits_to_keep=1).logits[:, -1], ref) < REL_TOL


def test_image_encoder_dtype_is_bfloat16_where_asked_or_where_auto_finds_it_faster(exported, monkeypatch):
    """--dtype of a GGUF export is its image encoder's (torch); the LLM keeps the file's type. bfloat16 image
    tokens stay near float32's; auto follows the measured bf16 speed, whatever this CPU is."""
    model, processor, exact, _ = exported()
    directory = exact.directory
    half, _ = load_gguf(directory, "bfloat16")
    assert {p.dtype for p in half.vision.parameters()} == {torch.bfloat16}
    pixels = processor.collate(samples(processor))["pixel_values"]
    with torch.no_grad():
        ref, got = exact.encode_images(pixels), half.encode_images(pixels)
    assert got.dtype == torch.float32 and 0 < relative_error(got, ref) < 0.03
    for fast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("minillava.runtime.fast_bfloat16", lambda device="cpu", fast=fast: fast)
        assert load_gguf(directory, "auto")[0].vision_dtype == dtype
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        load_gguf(directory, "float16")


# ---- what is refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm", ["opt"])
def test_refuses_other_llm_architectures(build_tiny, tmp_path, llm):
    model, processor = build_tiny(llm=llm)
    with pytest.raises(ExportError, match=f"LLM architecture '{llm}' is not exported to GGUF yet; supported:"):
        export_gguf(model, processor, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_refuses_tokenizers_llama_cpp_reads_otherwise():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_piece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word_piece.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_piece, unk_token="[UNK]")
    with pytest.raises(ExportError, match="tokenizer is WordPiece without byte-level pre-tokenization or byte"):
        tokenizer_spec(tok)


def test_refuses_xattn_and_anyres(asset_dir, tmp_path):
    vision = VisionConfig(source=str(asset_dir("vision", "clip")))
    common = dict(vision=vision, llm_source=str(asset_dir("llm", "llama")))
    perceiver = ProjectorConfig(name="perceiver")
    xattn, processor = MiniLlava.build(ModelConfig(projector=perceiver, fusion="xattn", **common))
    with pytest.raises(ExportError, match="fusion 'xattn' cannot be exported to GGUF"):
        export_gguf(xattn, processor, tmp_path / "gguf")
    anyres, processor = MiniLlava.build(
        ModelConfig(projector=ProjectorConfig(name="mlp2x_gelu"), aspect="resize",
                    image_grid_pinpoints=[[32, 64], [64, 32]], **common)  # fmt: skip
    )
    with pytest.raises(ExportError, match="AnyRes"):
        export_gguf(anyres, processor, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


# ---- the CLI ----------------------------------------------------------------------------------------------


def test_cli_export_then_generate_eval_and_chat(build_tiny, tmp_path, capsys):
    model, processor = build_tiny()
    louden(model)
    model.save_pretrained(tmp_path / "model", processor)
    images(1)[0].save(tmp_path / "image.png")
    out = tmp_path / "gguf"
    export = ["export", "--model", str(tmp_path / "model"), "--format", "gguf", "--type", "f32", "--out", str(out)]
    assert main(export) == 0
    assert is_gguf_dir(out) and "GGUF" in capsys.readouterr().out
    answers = {}
    for name in ("model", "gguf"):
        ask = ["generate", "--model", str(tmp_path / name), "--image", str(tmp_path / "image.png"), "--prompt", "What?"]
        assert main([*ask, "--max-new-tokens", "8", "--dtype", "float32"]) == 0
        answers[name] = capsys.readouterr().out
    assert answers["gguf"] == answers["model"] and answers["model"].strip()
    data = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "image": "image.png", "question": q, "answer": "yes"} for i, q in enumerate(PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = {}
    for name in ("model", "gguf"):
        args = ["eval", "--model", str(tmp_path / name), "--data", str(data), "--metric", "exact"]
        assert main([*args, "--out", str(tmp_path / f"eval-{name}"), "--max-new-tokens", "6", "--dtype", "float32",
                     "--no-progress"]) == 0  # fmt: skip
        lines = (tmp_path / f"eval-{name}" / "predictions.jsonl").read_text().splitlines()
        predictions[name] = [json.loads(line)["prediction"] for line in lines]
    assert predictions["gguf"] == predictions["model"]


def test_cli_refuses_type_without_gguf_and_load_time_quantize(tmp_path, capsys, exported):
    _, _, gguf_model, _ = exported()
    export = ["export", "--model", str(tmp_path), "--format", "hf", "--type", "q8_0", "--out", str(tmp_path / "x")]
    assert main(export) == 1
    assert "--type applies to --format gguf" in capsys.readouterr().err
    assert main(["generate", "--model", str(gguf_model.directory), "--prompt", "hi", "--quantize", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized when exported" in err

