"""The mmproj GGUF (the vision side in llama.cpp's multimodal layout): llama.cpp's own image encoder (mtmd, clip.cpp)
must compute minillava's image tokens from the exported files, and its greedy answer with them must be minillava's.

Images are made at the tower's square input size, so llama.cpp's resize/pad is the identity and both sides normalise
the same bytes."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch
from export_helpers import relative_error
from PIL import Image
from tiny_models import louden

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

from minillava.generate import GenerationConfig, decode, stop_token_ids  # noqa: E402
from minillava.interop.gguf_export import MANIFEST, export_gguf  # noqa: E402

# float32 files: the rest is llama.cpp's GELU, the tanh approximation looked up in a float16 table on CPU, against
# torch's exact erf GELU (projector) and exact quick_gelu / tanh-GELU (tower). Measured: 6.5e-4 (SigLIP + MLP),
# 6.1e-4 (SigLIP + linear), 3.4e-4 / 3.9e-4 (CLIP against the CLS-last layout) of the largest |value|.
REL_TOL = 2e-3
REL_TOL_F16 = 2e-2  # float16 vision matrices


@pytest.fixture(scope="module")
def exported(build_tiny, tmp_path_factory):
    """(vision, projector, type) -> (torch model, processor, export dir), each exported once."""
    made: dict[tuple[str, str, str], tuple] = {}

    def get(vision: str, projector: str, weight_type: str = "f32") -> tuple:
        key = (vision, projector, weight_type)
        if key not in made:
            model, processor = build_tiny(vision=vision, projector=projector)
            louden(model)  # answers that depend on the prompt and image
            gen = torch.Generator().manual_seed(3)
            dim = model.vision.hidden_size  # a fitted standardisation, so the folding into mm.0 is exercised
            model.projector.set_feature_stats(
                torch.randn(dim, generator=gen) * 0.3, torch.rand(dim, generator=gen) + 0.5
            )
            out = tmp_path_factory.mktemp("mmproj") / "-".join(key)
            export_gguf(model.eval(), processor, out, weight_type)
            made[key] = (model, processor, out)
        return made[key]

    return get


class LlamaCpp:
    """The exported LLM and mmproj loaded by llama.cpp, as llama-mtmd-cli loads them."""

    def __init__(self, directory) -> None:
        manifest = json.loads((directory / MANIFEST).read_text())
        llama_cpp.llama_backend_init()
        path = str(directory / manifest["files"]["llm"]).encode()
        self.model = llama_cpp.llama_model_load_from_file(path, llama_cpp.llama_model_default_params())
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds queries to f16
        self.ctx = mtmd.mtmd_init_from_file(str(directory / manifest["files"]["mmproj"]).encode(), self.model, params)
        assert self.ctx, "llama.cpp could not load the mmproj"
        self.chunks = None

    def close(self) -> None:
        if self.chunks:
            mtmd.mtmd_input_chunks_free(self.chunks)
        mtmd.mtmd_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def image_chunk(self, image: Image.Image):
        """mtmd's image chunk for one RGB picture (a prompt that is just the media marker)."""
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(marker, len(marker), False, True)
        self.chunks = mtmd.mtmd_input_chunks_init()
        status = mtmd.mtmd_tokenize(
            self.ctx, self.chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
        )
        mtmd.mtmd_bitmap_free(bitmap)
        assert status == 0
        found = [mtmd.mtmd_input_chunks_get(self.chunks, i) for i in range(mtmd.mtmd_input_chunks_size(self.chunks))]
        return next(c for c in found if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)

    def encode(self, image: Image.Image, width: int) -> np.ndarray:  # -> (N, D) llama.cpp's image tokens
        chunk = self.image_chunk(image)
        assert mtmd.mtmd_encode_chunk(self.ctx, chunk) == 0
        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * width,)).reshape(n, width).copy()


def square_image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def torch_tokens(model, processor, image: Image.Image) -> np.ndarray:  # -> (N, D)
    with torch.no_grad():
        return model.encode_images(processor.pixels([image]))[0].numpy()


def cls_last_tokens(model, processor, image: Image.Image) -> np.ndarray:  # -> (N, D)
    """What a llama.cpp LLaVA graph with the CLS-ordering bug (ggml-org/llama.cpp#25814) computes: CLS appended
    after the patches, position rows 0..P in that order, output rows 1..P (patches 1..P-1, then CLS)."""
    vm = getattr(model.vision.model, "vision_model", model.vision.model)
    emb = vm.embeddings
    with torch.no_grad():
        patches = emb.patch_embedding(processor.pixels([image])).flatten(2).transpose(1, 2)  # (1, P, Dv)
        x = torch.cat([patches, emb.class_embedding[None, None]], 1) + emb.position_embedding.weight[None]
        x = vm.pre_layrnorm(x)  # (1, P + 1, Dv)
        for layer in vm.encoder.layers[: model.vision.selected_layer]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return model.projector(x[:, 1 : patches.shape[1] + 1])[0].numpy()


def llama_cpp_tokens(out, image: Image.Image, width: int) -> np.ndarray:  # -> (N, D)
    """The image tokens llama.cpp's mtmd computes for `image` from the export in `out`."""
    runner = LlamaCpp(out)
    try:
        return runner.encode(image, width)
    finally:
        runner.close()


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_siglip_image_tokens_equal_torch(exported, projector):
    model, processor, out = exported("siglip", projector)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"]["mmproj"] == "mmproj-f32.gguf" and "note" not in manifest["mmproj"]
    image = square_image(processor.image_transform.size)
    got = llama_cpp_tokens(out, image, manifest["hidden_size"])
    expected = torch_tokens(model, processor, image)
    assert got.shape == expected.shape == (model.tokens_per_image, manifest["hidden_size"])
    assert relative_error(got, expected) < REL_TOL


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_clip_image_tokens_match_torch_up_to_llama_cpp_cls_order(exported, projector):
    """The CLIP file is written CLS-first (as llama.cpp's converters write it). This llama.cpp build may append the
    CLS token last (a known bug): then its tokens equal that layout's computed in torch, and the file is still right;
    a fixed build must give minillava's own tokens."""
    model, processor, out = exported("clip", projector)
    manifest = json.loads((out / MANIFEST).read_text())
    assert "25814" in manifest["mmproj"]["note"]
    image = square_image(processor.image_transform.size, seed=1)
    got = llama_cpp_tokens(out, image, manifest["hidden_size"])
    exact = relative_error(got, torch_tokens(model, processor, image))
    cls_last = relative_error(got, cls_last_tokens(model, processor, image))
    assert min(exact, cls_last) < REL_TOL, (exact, cls_last)


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_f16_and_q8_0_write_a_float16_mmproj(exported, weight_type):
    model, processor, out = exported("siglip", "mlp2x_gelu", weight_type)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"]["mmproj"] == "mmproj-f16.gguf"
    image = square_image(processor.image_transform.size)
    got = llama_cpp_tokens(out, image, manifest["hidden_size"])
    assert relative_error(got, torch_tokens(model, processor, image)) < REL_TOL_F16


def test_greedy_tokens_with_mmproj_equal_minillava(exported):
    """llama.cpp decodes the prompt's text ids, mtmd's image chunk (its encoder, its embedding decode), then greedy."""
    model, processor, out = exported("siglip", "mlp2x_gelu")
    image = square_image(processor.image_transform.size, seed=2)
    encoded = processor.prompt("What is in the picture?", [image])
    steps = 8
    cfg = GenerationConfig(max_new_tokens=steps)
    batch = processor.collate([encoded], "left")
    expected = [int(t) for t, _ in decode(model, batch, cfg, stop_token_ids(processor), processor.pad_token_id)]
    ids = list(encoded.input_ids)
    first = ids.index(processor.image_token_id)
    before, after = ids[:first], ids[first + model.tokens_per_image :]
    runner = LlamaCpp(out)
    try:
        got = llama_cpp_greedy(runner, image, before, after, len(expected))
    finally:
        runner.close()
    assert got == expected, (got, expected)
    assert len(expected) == steps and len(set(expected)) > 1  # a real answer, not one repeated token


def llama_cpp_greedy(
    runner: LlamaCpp, image: Image.Image, before: list[int], after: list[int], steps: int
) -> list[int]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 256
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32  # float32 cache, as minillava's runtime uses for f32
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(runner.model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(runner.model))
    try:
        pos = _decode_ids(ctx, before, 0)
        n_past = llama_cpp.llama_pos(0)
        chunk = runner.image_chunk(image)
        assert mtmd.mtmd_helper_eval_chunk_single(runner.ctx, ctx, chunk, pos, 0, 256, False, ctypes.byref(n_past)) == 0
        pos = _decode_ids(ctx, after, n_past.value)
        tokens = []
        for _ in range(steps):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            tokens.append(int(logits.argmax()))
            pos = _decode_ids(ctx, tokens[-1:], pos)
        return tokens
    finally:
        llama_cpp.llama_free(ctx)


def _decode_ids(ctx, ids: list[int], start: int) -> int:
    """Decode token ids at positions start.. in sequence 0, logits for the last; the next free position."""
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = int(i == len(ids) - 1)
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    return start + len(ids)


@pytest.mark.parametrize(("vision", "projector"), [("dinov2", "mlp2x_gelu"), ("siglip", "perceiver")])
def test_unsupported_models_get_no_mmproj_and_a_reason(build_tiny, tmp_path, vision, projector):
    model, processor = build_tiny(vision=vision, projector=projector)
    export_gguf(model.eval(), processor, tmp_path / "out", "f32")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert "mmproj" not in manifest["files"] and manifest["mmproj"]["file"] is None
    assert (
        manifest["mmproj"]["reason"].startswith("no mmproj: ")
        and "supported: CLIP or SigLIP" in manifest["mmproj"]["reason"]
    )
    assert not list((tmp_path / "out").glob("mmproj*"))
