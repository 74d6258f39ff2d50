"""The server with an exported model (a GGUF export decoded by llama.cpp): static batches, and answers equal the
torch model's `Generator.generate` one request at a time (greedy, float32), alone and in a concurrent batch."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from serve_helpers import API_KEY, ask, png_bytes, start_server

from minillava.generate import GenerationConfig, Generator
from minillava.model import MiniLlava

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

RED, BLUE = png_bytes(color=(200, 30, 30)), png_bytes((24, 48), color=(20, 40, 220))


def test_gguf_export_serves_like_the_torch_model(serve_dir, tmp_path, one_thread):
    from minillava.interop.gguf_export import export_gguf

    model, processor = MiniLlava.from_pretrained(serve_dir)
    gguf_dir = export_gguf(model, processor, tmp_path / "gguf", "f32")
    reference = Generator(model, processor)

    def want(text, image):
        pil = Image.open(io.BytesIO(image))
        return reference.generate([{"role": "user", "content": "<image>\n" + text}], [pil], GenerationConfig(10))

    with start_server(gguf_dir, max_batch_size=4, default_max_tokens=16) as live:
        assert type(live.app.state.engine).__name__ == "BatchEngine"  # its cache cannot merge rows
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        def answer(text, image):
            return ask(client, text, image, max_tokens=10).choices[0].message.content

        asks = [("What is it?", RED), ("What is it?", BLUE), ("Describe it.", RED), ("Colour?", BLUE)]
        alone = answer(*asks[0])
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda a: answer(*a), asks))
    wants = [want(*a) for a in asks]
    assert got == wants and alone == wants[0]
    assert wants[0] != wants[1]  # the image reaches the answer
