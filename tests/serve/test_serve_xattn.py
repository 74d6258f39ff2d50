"""The server with a Flamingo-style (xattn) model: images are cross-attended, not spliced, and answers
still equal `Generator.generate` one request at a time (greedy), alone and in a concurrent batch."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from serve_helpers import API_KEY, ask, png_bytes, start_server
from tiny_models import louden

from minillava.config import ModelConfig, ProjectorConfig, VisionConfig, XattnConfig
from minillava.generate import GenerationConfig, Generator
from minillava.model import MiniLlava

openai = pytest.importorskip("openai")

RED, BLUE = png_bytes(color=(200, 30, 30)), png_bytes((24, 48), color=(20, 40, 220))


@pytest.fixture(scope="module")
def xattn_dir(asset_dir, tmp_path_factory):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
        projector=ProjectorConfig(name="perceiver", options={"num_latents": 4, "depth": 1, "heads": 2, "dim_head": 8}),
        llm_source=str(asset_dir("llm", "llama")),
        fusion="xattn",
        xattn=XattnConfig(every=1, heads=2, dim_head=8, ff_mult=2),
    )
    torch.manual_seed(3)
    model, processor = MiniLlava.build(cfg)
    louden(model)
    with torch.no_grad():  # open the gates, so the image changes the answer
        for block in model.xattn.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    directory = tmp_path_factory.mktemp("serve-xattn") / "tiny"
    model.save_pretrained(directory, processor)
    return directory


def test_xattn_model_serves_like_the_generator(xattn_dir, one_thread):
    reference = Generator(*MiniLlava.from_pretrained(xattn_dir))

    def want(text, image):
        pil = Image.open(io.BytesIO(image))
        return reference.generate([{"role": "user", "content": "<image>\n" + text}], [pil], GenerationConfig(10))

    with start_server(xattn_dir, max_batch_size=4, default_max_tokens=16) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        def answer(text, image):
            return ask(client, text, image, max_tokens=10).choices[0].message.content

        asks = [("What is it?", RED), ("What is it?", BLUE), ("Describe it.", RED), ("Colour?", BLUE)]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda a: answer(*a), asks))
    wants = [want(*a) for a in asks]
    assert got == wants
    assert wants[0] != wants[1]  # the image reaches the answer through the cross-attention
