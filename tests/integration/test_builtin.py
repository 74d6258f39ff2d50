"""The real built-ins end to end: DINOv2-S + SmolLM2-135M-Instruct on a scikit-image photo."""

import pytest
import torch

import minillava
from minillava.generate import GenerationConfig, Generator

PHOTO = "examples/images/chelsea.jpg"


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    model, processor = minillava.build("builtin:dinov2-small", "builtin:smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("builtin") / "model"
    model.save_pretrained(out, processor)
    return minillava.load(str(out))


def test_shapes(builtin):
    model, processor = builtin
    assert model.vision.patch_grid == (16, 16) and model.tokens_per_image == 256 == processor.tokens_per_image
    assert processor.image_transform.mean == (0.485, 0.456, 0.406)  # DINOv2 uses ImageNet statistics
    assert processor.template.name == "auto" and processor.template.end_of_turn == "<|im_end|>"
    counts = model.parameter_counts()
    assert counts["vision"]["frozen"] > 21_000_000 and counts["llm"]["trainable"] > 130_000_000


def test_llm_still_speaks_after_adding_the_image_token(builtin):
    gen = Generator(*builtin)
    answer = gen.generate("What is the capital of France?", config=GenerationConfig(max_new_tokens=16))
    assert "Paris" in answer


def test_photo_end_to_end_batched_and_streamed(builtin):
    gen = Generator(*builtin)
    cfg = GenerationConfig(max_new_tokens=12)
    single = gen.generate("Describe the image.", [PHOTO], cfg)
    assert single.strip()
    p = gen.processor
    batch = gen.generate_batch(
        [p.prompt("Describe the image.", [PHOTO]), p.prompt("What is the capital of France?")], cfg
    )
    assert batch[0] == single and "Paris" in batch[1]
    assert "".join(gen.stream("Describe the image.", [PHOTO], cfg)) == single


def test_bfloat16_keeps_the_answer(builtin):
    model, processor = builtin
    import copy

    gen = Generator(copy.deepcopy(model).to(torch.bfloat16), processor)
    assert "Paris" in gen.generate("What is the capital of France?", config=GenerationConfig(max_new_tokens=16))
