"""ONNX export (vision / embed_tokens / decoder graphs) and the onnxruntime runner: every graph must compute what
the torch model computes, and greedy decoding on onnxruntime must pick the torch model's tokens."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from export_helpers import greedy_tokens
from tiny_models import images, louden, samples

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from minillava.cli import main  # noqa: E402
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from minillava.generate import stop_token_ids  # noqa: E402
from minillava.interop.hf import ExportError  # noqa: E402
from minillava.interop.onnx_export import MANIFEST, export_onnx  # noqa: E402
from minillava.interop.onnx_runtime import is_onnx_dir, load_onnx  # noqa: E402
from minillava.model import MiniLlava  # noqa: E402

PROJECTORS = ["linear", "mlp2x_gelu", "avgpool", "pixel_shuffle", "perceiver"]
# every projector on the tied-head Llama; Qwen2 adds an untied LM head and attention biases
CASES = [(p, "llama") for p in PROJECTORS] + [("mlp2x_gelu", "qwen2")]
TOL = 1e-4  # float32 graphs against float32 torch: only the order of the sums differs


@pytest.fixture(scope="module")
def exported(build_tiny, tmp_path_factory):
    """projector, quantize, llm -> (torch model, processor, OnnxModel, its processor), each exported once."""
    made: dict[tuple[str, str | None, str], tuple] = {}

    def get(projector: str = "mlp2x_gelu", quantize: str | None = None, llm: str = "llama") -> tuple:
        key = (projector, quantize, llm)
        if key not in made:
            model, processor = build_tiny(projector=projector, llm=llm)
            louden(model)  # answers that depend on the prompt and image
            out = tmp_path_factory.mktemp("onnx") / "-".join(map(str, key))
            export_onnx(model.eval(), processor, out, quantize)
            made[key] = (model, processor, *load_onnx(out))
        return made[key]

    return get


# ---- graph parity, every projector ------------------------------------------------------------------------


@pytest.mark.parametrize("projector", PROJECTORS)
def test_vision_graph_equals_encode_images(exported, projector):
    model, processor, onnx_model, _ = exported(projector)
    pixels = processor.pixels(images(3))  # (3, 3, H, W): a batch size the export never saw
    with torch.no_grad():
        expected = model.encode_images(pixels)  # (3, N, D)
    got = onnx_model.encode_images(pixels)
    assert got.shape == expected.shape == (3, model.tokens_per_image, model.llm.config.hidden_size)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize(("projector", "llm"), CASES)
def test_decoder_logits_equal_prefill_and_cached_step(exported, projector, llm):
    model, processor, onnx_model, _ = exported(projector, llm=llm)
    batch = processor.collate(samples(processor), padding_side="left")
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    counts = batch["image_counts"]
    with torch.no_grad():
        ref = model(ids, mask, pixels, use_cache=True, image_counts=counts)
    got = onnx_model(ids, mask, pixels, use_cache=True, image_counts=counts)
    real = mask.bool()  # left padding attends to nothing: its logits are arbitrary on both sides
    assert (got.logits[real] - ref.logits[real]).abs().max() < TOL
    # one cached step: the next token, its rotary position, the mask grown by one column
    token = ref.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    position = mask.sum(-1, keepdim=True) - 1
    with torch.no_grad():
        ref_step = model(token, mask, position_ids=position, past_key_values=ref.past_key_values, use_cache=True)
    got_step = onnx_model(token, mask, position_ids=position, past_key_values=got.past_key_values, use_cache=True)
    assert got_step.logits.shape == ref_step.logits.shape == (3, 1, model.llm.config.vocab_size)
    assert (got_step.logits - ref_step.logits).abs().max() < TOL
    assert got_step.past_key_values[0].shape[2] == ids.shape[1] + 1  # the presents grew by the step


@pytest.mark.parametrize(("projector", "llm"), CASES)
def test_greedy_tokens_equal_torch_generate(exported, projector, llm):
    model, processor, onnx_model, onnx_processor = exported(projector, llm=llm)
    expected = greedy_tokens(model, processor, samples(processor), 8)
    got = greedy_tokens(onnx_model, onnx_processor, samples(onnx_processor), 8)
    assert got == expected
    assert len({tuple(row) for row in expected}) > 1  # the rows differ: the prompts and images matter


# ---- the directory ----------------------------------------------------------------------------------------


def test_manifest_says_how_to_splice_and_stop(exported):
    model, processor, onnx_model, onnx_processor = exported()
    m = json.loads((onnx_model.directory / MANIFEST).read_text())
    assert m["format"] == "minillava-onnx" and m["format_version"] == 1 and m["dtype"] == "float32"
    assert m["image"]["token_id"] == processor.image_token_id and m["image"]["token"] == processor.image_token
    assert m["image"]["tokens_per_image"] == model.tokens_per_image
    assert m["eos_token_ids"] == stop_token_ids(processor) and m["chat_template"] == processor.template.name
    assert m["decoder"]["num_layers"] == model.llm.config.num_hidden_layers
    assert m["quantization"] is None
    # the exported processor renders a prompt exactly as the model's own
    assert onnx_processor.prompt("hi", images(1)).input_ids == processor.prompt("hi", images(1)).input_ids


def test_export_merges_lora(build_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = build_tiny()
    louden(model)
    torch.manual_seed(4)
    # init_lora_weights=False: random B, so the adapters change the logits and merging has to be right
    get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    onnx_model, _ = load_onnx(export_onnx(model.eval(), processor, tmp_path / "onnx"))
    batch = processor.collate(samples(processor)[:1])
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    got = onnx_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert (got - ref).abs().max() < TOL


# ---- int8 -------------------------------------------------------------------------------------------------


def test_int8_export_runs_and_stays_close_to_float32(exported):
    """Weight-only int8 against the float32 export. This loud random LLM amplifies every rounding (measured: the
    last logits move by ~3 % relative L2; 5 of 8 rows keep all 8 greedy tokens, 7 of 8 their first), so what is
    checked is the first greedy token of each prompt and the size of the logit error."""
    _, processor, float_model, _ = exported()
    _, _, int8_model, int8_processor = exported(quantize="int8")
    assert int8_model.manifest["quantization"]["scheme"] == "int8"
    ops = {node.op_type for node in onnx.load(int8_model.directory / "decoder.onnx").graph.node}
    assert "MatMulNBits" in ops  # the decoder really is quantized
    sizes = [(m.directory / "decoder.onnx").stat().st_size for m in (int8_model, float_model)]
    assert sizes[0] < sizes[1]
    prompts = [processor.prompt(q, images(1, seed=s)) for s, q in enumerate(PROMPTS * 2)]
    reference = greedy_tokens(float_model, processor, prompts, 2)
    got = greedy_tokens(int8_model, int8_processor, prompts, 2)
    first = sum(a[0] == b[0] for a, b in zip(got, reference, strict=True))
    assert first >= 6, f"int8's first greedy token equals float32's on only {first} of {len(prompts)} prompts"
    batch = processor.collate(prompts, "left")
    args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    expected, logits = float_model(*args).logits[:, -1], int8_model(*args).logits[:, -1]
    assert 0 < (logits - expected).norm() / expected.norm() < 0.06


PROMPTS = ["What is in the picture?", "describe the image", "What colour is it?", "hello world"]


# ---- the CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(build_tiny, tmp_path_factory):
    """A saved minillava dir (loud LLM) and an image file."""
    root = tmp_path_factory.mktemp("onnx-cli")
    model, processor = build_tiny()
    louden(model)
    model.save_pretrained(root / "model", processor)
    images(1)[0].save(root / "image.png")
    return root


@pytest.fixture(scope="module")
def cli_exported(saved):
    """`minillava export --format onnx` of the saved model: its exit code and output directory."""
    onnx_dir = saved / "onnx"
    return main(["export", "--model", str(saved / "model"), "--format", "onnx", "--out", str(onnx_dir)]), onnx_dir


def test_cli_export_then_generate_and_eval(saved, cli_exported, capsys):
    code, onnx_dir = cli_exported
    assert code == 0 and is_onnx_dir(onnx_dir)
    answers = {}
    for name in ("model", "onnx"):
        ask = ["generate", "--model", str(saved / name), "--image", str(saved / "image.png"), "--prompt", "What is it?"]
        assert main([*ask, "--max-new-tokens", "8", "--dtype", "float32"]) == 0  # auto may pick bf16 for torch
        answers[name] = capsys.readouterr().out
    assert answers["onnx"] == answers["model"] and answers["model"].strip()
    data = saved / "q.jsonl"
    rows = [{"question_id": i, "image": "image.png", "question": q, "answer": "yes"} for i, q in enumerate(PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = {}
    for name in ("model", "onnx"):
        out = saved / f"eval-{name}"
        args = ["eval", "--model", str(saved / name), "--data", str(data), "--metric", "exact", "--out", str(out)]
        assert main([*args, "--max-new-tokens", "6", "--dtype", "float32", "--no-progress"]) == 0
        lines = (out / "predictions.jsonl").read_text().splitlines()
        predictions[name] = [json.loads(line)["prediction"] for line in lines]
    assert predictions["onnx"] == predictions["model"]


def test_cli_generate_refuses_load_time_quantize(cli_exported, capsys):
    code, onnx_dir = cli_exported
    assert code == 0
    capsys.readouterr()
    args = ["generate", "--model", str(onnx_dir), "--prompt", "hi", "--quantize", "int8"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized when exported" in err


def test_anyres_export_equals_torch_for_every_image_size(asset_dir, tmp_path):
    """AnyRes through the CLI: the crops go through vision.onnx and are laid out per image (base view, unpadded
    tile map, learned newlines) by the runtime; logits and greedy tokens equal torch's for images whose sizes give
    different tile grids and token counts, two images in one row included."""
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))), projector=ProjectorConfig(name="mlp2x_gelu"),
        llm_source=str(asset_dir("llm", "llama")), aspect="resize",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
    )  # fmt: skip
    torch.manual_seed(0)
    model, processor = MiniLlava.build(cfg)
    louden(model)
    with torch.no_grad():
        model.anyres.image_newline.normal_(0, 1.0)  # a newline the test would miss if it were dropped or moved
    model.save_pretrained(tmp_path / "anyres", processor)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tmp_path / "anyres"), "--format", "onnx", "--out", str(out)]) == 0
    onnx_model, onnx_processor = load_onnx(out)
    pictures = [images(1, seed=s)[0].resize(size) for s, size in enumerate([(30, 100), (90, 40), (64, 64), (7, 5)])]
    prompts = [onnx_processor.prompt(q, [p]) for q, p in zip(PROMPTS[:3], pictures[:3], strict=True)]
    prompts.append(onnx_processor.prompt("compare <image> and <image>", pictures[2:]))
    assert len({len(p.input_ids) for p in prompts}) == 4  # each size its own token count
    batch = processor.collate(prompts, padding_side="left")
    args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    kw = {"image_sizes": batch["image_sizes"], "image_counts": batch["image_counts"]}
    with torch.no_grad():
        expected = model(*args, **kw).logits
    got = onnx_model(*args, **kw).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() < TOL
    assert greedy_tokens(onnx_model, onnx_processor, prompts, 6) == greedy_tokens(model, processor, prompts, 6)


def test_refuses_xattn(asset_dir, tmp_path):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
        projector=ProjectorConfig(name="perceiver"),
        llm_source=str(asset_dir("llm", "llama")),
        fusion="xattn",
    )
    model, processor = MiniLlava.build(cfg)
    with pytest.raises(ExportError, match="fusion 'xattn' cannot be exported to ONNX; supported: fusion splice"):
        export_onnx(model, processor, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
