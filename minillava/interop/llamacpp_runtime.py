"""Run a `minillava export --format gguf` directory with llama.cpp as the decode engine (llama-cpp-python).

minillava turns pixels into image tokens (its own tower and projector, in torch) and splices them into the
prompt's embeddings; llama.cpp reads those rows as input embeddings, which is how its own multimodal library feeds
images, and decodes. Each batch row is one llama.cpp sequence (its own positions from 0, no padding), so a
batch decodes all rows in one `llama_decode` per token:

    prefill:  embed (B, T, D) --real tokens of row r as sequence r, rows of embeddings--> logits of each last token
    step:     token (B,) at position p_r in sequence r --> logits (B, V)

Text embeddings come from the GGUF's own token_embd (dequantized once), so an embedding row fed by minillava equals
what llama.cpp looks up for a token id.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillava.config import ModelConfig
from minillava.interop.exported import ExportedModel, export_kind, read_manifest
from minillava.interop.gguf_export import FORMAT_VERSION
from minillava.model import Output, load_image_encoder, positions_from_mask
from minillava.processor import Processor
from minillava.runtime import parse_dtype

log = logging.getLogger("minillava.gguf")


def is_gguf_dir(path: str | Path) -> bool:
    """A directory written by `minillava export --format gguf` (it holds minillava_gguf.json)."""
    return export_kind(path) == "gguf"


class LlamaCppModel(ExportedModel):
    """A GGUF export behind MiniLlava's forward signature; the KV cache lives in the llama.cpp context, so the
    `past_key_values` handed back is only a marker that a prefill happened."""

    def __init__(self, directory: str | Path, threads: int | None = None,
                 vision_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        import llama_cpp  # optional dependency: `pip install minillava[llamacpp]`

        directory = Path(directory)
        m = read_manifest(directory, "gguf", FORMAT_VERSION)
        super().__init__(m["image"]["token_id"], m["image"]["tokens_per_image"])
        self.directory, self.manifest, self.lib = directory, m, llama_cpp
        config = ModelConfig.load(directory)
        # the image encoder runs in torch: in bfloat16 where that is faster (`load_gguf`), the LLM in the file's type
        self.vision, self.projector = load_image_encoder(directory, config, m["hidden_size"], vision_dtype)
        self.vision_dtype = vision_dtype
        self.threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        self.wanted = (1, 2048)  # rows, tokens per row: what `reserve` asked for last
        _quiet_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        path = directory / m["files"]["llm"]
        self.llm = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.llm:
            raise ValueError(f"{path}: llama.cpp could not load this GGUF file")
        self.hidden = llama_cpp.llama_model_n_embd(self.llm)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm))
        self.token_embeddings = torch.from_numpy(_token_embeddings(path))  # (V, D) float32, as llama.cpp reads it
        self.ctx, self.rows, self.per_row = None, 0, 0
        self.output_view: tuple[tuple[int, int], torch.Tensor] | None = None  # ((address, rows), view)
        # llama_get_logits returning the address as an int: llama_cpp's own binding returns a float pointer
        self.logits_address = ctypes.CDLL(llama_cpp.llama_cpp._lib._name).llama_get_logits
        self.logits_address.argtypes, self.logits_address.restype = [ctypes.c_void_p], ctypes.c_void_p

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
        if getattr(self, "llm", None):
            lib.llama_model_free(self.llm)

    # ---- MiniLlava's surface ---------------------------------------------------------------------
    def reserve(self, rows: int, tokens_per_row: int) -> None:
        """The next generation's size (generate.decode says it before the prefill): the context is made to fit."""
        self.wanted = (rows, tokens_per_row)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (I, 3, H, W) -> (I, N, D) float32
        return self.projector(self.vision(pixel_values.to(self.vision_dtype))).float()

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.token_embeddings[input_ids]

    def forward(  # no autograd to turn off: llama.cpp's tensors and the no_grad image encoder's are plain
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_sizes: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        **_: Any,  # media, labels ...: nothing a spliced GGUF model reads
    ) -> Output:
        if image_sizes is not None:
            raise ValueError("image_sizes: AnyRes models are not exported to GGUF")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if past_key_values is None:
            if logits_to_keep != 1:
                raise ValueError("a GGUF export returns the last position's logits only (logits_to_keep=1)")
            logits = self._prefill(self.embed(input_ids, pixel_values, image_counts), attention_mask)[:, None]
        else:
            if input_ids.shape[1] != 1 or past_key_values is not self:
                raise ValueError("a GGUF export continues its own prefill one token at a time")
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, -1:]
            logits = self._step(input_ids, position_ids)
        return Output(logits=logits, past_key_values=self if use_cache else None)  # (B, 1, V)

    # ---- llama.cpp -------------------------------------------------------------------------------
    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, V)
        """Each row's real tokens as its own sequence from position 0; the logits of each row's last token."""
        rows = embeds.shape[0]
        self._context(rows, max(int(mask.sum(1).max()), self.wanted[1] if rows <= self.wanted[0] else 0))
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        out = torch.empty(rows, self.vocab)
        for r in range(rows):  # one sequence per llama_decode call: its positions and its logits only
            real = embeds[r][mask[r].bool()].contiguous().numpy()  # (n, D), left padding dropped
            for start in range(0, len(real), self.n_batch):
                chunk = real[start : start + self.n_batch]
                last = start + len(chunk) == len(real)
                self._decode_embeddings(chunk, start, r, last)
            out[r] = self._logits(-1)  # the row's last token: the only one that asked for logits
        return out

    def _decode_embeddings(self, rows: np.ndarray, start: int, seq: int, want_last: bool) -> None:
        batch, n = self.embd_batch, len(rows)
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = int(want_last and i == n - 1)
        batch.n_tokens = n
        self._run(batch)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B, 1), (B, 1) -> (B, 1, V)
        # few torch ops and ctypes calls: with the caches cold after a decode each costs 30-60 us, and llama.cpp's
        # own loop spends ~0.3 ms a token on everything but llama_decode
        batch, rows = self.token_batch, tokens.shape[0]
        for r, ((token,), (position,)) in enumerate(zip(tokens.tolist(), positions.tolist(), strict=True)):
            batch.token[r] = token  # row r is sequence r and asks for its logits: set when the batch was made
            batch.pos[r] = position
        batch.n_tokens = rows
        self._run(batch)
        # every row asked for logits, in row order: llama.cpp's output buffer is (B, V), handed out as it is, not
        # copied: valid until the next decode rewrites it, as `generate.decode` promises its observers
        return self._output_view(rows)

    def _output_view(self, rows: int) -> torch.Tensor:  # (rows, 1, V) over llama.cpp's logits buffer, not a copy
        # made again only when llama.cpp moves its buffer: numpy's ctypes view costs 0.15 ms with the caches cold
        address = self.logits_address(self.ctx)
        if self.output_view is None or self.output_view[0] != (address, rows):
            buffer = (ctypes.c_float * (rows * self.vocab)).from_address(address)
            view = torch.from_numpy(np.frombuffer(buffer, np.float32).reshape(rows, 1, self.vocab))
            self.output_view = ((address, rows), view)
        return self.output_view[1]

    def _run(self, batch: Any) -> None:
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (context full or out of memory)")

    def _logits(self, i: int) -> torch.Tensor:  # (V,) a copy: llama.cpp rewrites the buffer on the next decode
        pointer = self.lib.llama_get_logits_ith(self.ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.vocab,)).copy())

    def _context(self, rows: int, per_row: int) -> None:
        """A context with a sequence per row and room for `per_row` tokens in each; kept while big enough."""
        if self.ctx is not None and rows <= self.rows and per_row <= self.per_row:
            return
        lib = self.lib
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            lib.llama_batch_free(self.embd_batch)
            lib.llama_batch_free(self.token_batch)
        per_row = -(-per_row // 256) * 256
        params = lib.llama_context_default_params()
        params.n_seq_max = rows
        params.n_ctx = per_row * rows
        self.n_batch = params.n_batch = params.n_ubatch = min(512, per_row)
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True  # rows share one buffer: a row uses what it needs, not a fixed share
        # llama.cpp's flash attention ("auto": on) rounds queries to f16 on CPU and, for one new token against a
        # short cache, is slower: batch-1 q8_0 decoding of the bench model went from 131 / 127 / 134 to
        # 158 / 163 / 150 tokens/s without it (0.85-0.88x llama.cpp's own Llama.generate -> 0.94-1.06x, same runs)
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self.manifest["type"] == "f32":  # llama.cpp's default float16 cache would round what f32 weights keep
            params.type_k = params.type_v = lib.GGML_TYPE_F32
        self.ctx = lib.llama_init_from_model(self.llm, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {rows} rows of {per_row} tokens")
        self.rows, self.per_row = rows, per_row
        self.embd_batch = lib.llama_batch_init(self.n_batch, self.hidden, 1)
        self.token_batch = lib.llama_batch_init(max(rows, 1), 0, 1)
        for r in range(rows):  # a decode step: one token of each row r, in sequence r, with its logits
            self.token_batch.n_seq_id[r] = 1
            self.token_batch.seq_id[r][0] = r
            self.token_batch.logits[r] = 1


def _token_embeddings(path: Path) -> np.ndarray:
    """The GGUF's token_embd as float32 (V, D): dequantized exactly as llama.cpp's row lookup does."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    return np.array(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(-1, tensor.shape[0])  # a copy


def _quiet_logs(lib: Any) -> None:
    """llama.cpp prints every load step to stderr; keep its warnings and errors only."""
    callback = lib.llama_log_callback(lambda level, text, _: None)
    _quiet_logs.callback = callback  # ctypes would free a callback nobody references
    lib.llama_log_set(callback, ctypes.c_void_p(0))


def load_gguf(
    directory: str | Path, dtype: str = "auto", quantize: str | None = None, threads: int | None = None
) -> tuple[LlamaCppModel, Processor]:
    """A GGUF export directory as (model, processor) for `Generator`. The LLM's weight type was fixed at export
    (asking to quantize here is an error, not a silent no-op); `dtype` is the image encoder's, which runs in torch:
    float32, bfloat16, or auto (bfloat16 where its matmuls measure faster, `runtime.fast_bfloat16`).
    With CLIP ViT-B/16 at 224 px that is 0.06 s against 0.21 s per image on an AVX-512 BF16 CPU."""
    vision_dtype = parse_dtype(dtype, "cpu")
    if quantize not in (None, "none"):
        raise ValueError(f"{directory}: a GGUF export is quantized when exported (`--type q8_0`), not when loaded")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ImportError("running a GGUF export needs llama-cpp-python: pip install 'minillava[llamacpp]'") from None
    log.info("GGUF export %s: the LLM in its file's type on llama.cpp, the image encoder in %s (--dtype %s)",
             directory, str(vision_dtype).removeprefix("torch."), dtype)  # fmt: skip
    return LlamaCppModel(directory, threads, vision_dtype).eval(), Processor.from_pretrained(directory)
