"""Label tables per template: exactly the assistant answers and their end-of-turn token are supervised."""

import pytest
from PIL import Image

from minillava.processor import IGNORE_INDEX

IMG = Image.new("RGB", (40, 30), (200, 10, 10))
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
    {"role": "user", "content": "how are you today?"},
    {"role": "assistant", "content": "yes"},
]


def supervised_text(processor, enc) -> list[str]:
    """Decode each maximal run of supervised labels."""
    runs, cur = [], []
    for tok, lab in zip(enc.input_ids, enc.labels, strict=False):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok  # labels are the ids themselves; the shift happens in the loss
            cur.append(lab)
    if cur:
        runs.append(cur)
    return [processor.tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize(
    "template, eot",
    [("auto", "<|im_end|>"), ("chatml", "<|im_end|>"), ("vicuna_v1", "</s>")],
)
def test_multi_turn_labels(tiny, template, eot):
    _, processor = tiny
    p = processor.with_template(template)
    enc = p.encode(TWO_TURNS, [IMG])
    assert len(enc.input_ids) == len(enc.labels)
    answers = supervised_text(p, enc)
    assert [a.strip() for a in answers] == [f"A cat sitting on a mat.{eot}", f"yes{eot}"]
    # image tokens: exactly N per image, never supervised
    slots = [i for i, t in enumerate(enc.input_ids) if t == p.image_token_id]
    assert len(slots) == p.tokens_per_image == 16
    assert slots == list(range(slots[0], slots[0] + 16))
    assert all(enc.labels[i] == IGNORE_INDEX for i in slots)


def test_plain_template_is_image_then_caption(tiny):
    _, processor = tiny
    p = processor.with_template("plain")
    enc = p.encode(
        [{"role": "user", "content": "<image>\nignored text"}, {"role": "assistant", "content": "a red square"}], [IMG]
    )
    assert enc.input_ids[:16] == [p.image_token_id] * 16
    assert supervised_text(p, enc) == ["a red square</s>"]
    assert "ignored" not in p.tokenizer.decode(enc.input_ids)


def test_bos_is_kept_and_unsupervised(build_tiny):
    _, p = build_tiny(llm="opt", template="vicuna_v1")  # the OPT tiny tokenizer adds <s>
    enc = p.encode(TWO_TURNS[:2], [IMG])
    assert enc.input_ids[0] == p.tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.input_ids.count(p.tokenizer.bos_token_id) == 1


def test_images_anywhere_and_several(tiny):
    _, p = tiny
    enc = p.encode(
        [{"role": "user", "content": "left <image> and right <image> compare"}], [IMG, IMG], add_generation_prompt=True
    )
    assert enc.pixel_values.shape == (2, 3, 32, 32)
    assert enc.input_ids.count(p.image_token_id) == 32


def test_marker_image_count_mismatch(tiny):
    _, p = tiny
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        p.encode([{"role": "user", "content": "<image> hi"}], [IMG, IMG])


def test_truncation_never_cuts_image_tokens(tiny):
    _, p = tiny
    short = p.with_template("auto")
    short.max_length = 20  # the image alone is 16 tokens; the template adds more before it
    with pytest.raises(ValueError, match="cut an image's tokens"):
        short.encode(TWO_TURNS, [IMG], truncate=True)
    text_only = [{"role": "user", "content": "hello world " * 10}, {"role": "assistant", "content": "yes"}]
    assert len(short.encode(text_only, [], truncate=True).input_ids) == 20
    with pytest.raises(ValueError, match="exceeds max_length 20"):
        short.encode(text_only, [])


def test_prompt_puts_images_first_and_collate_pads(tiny):
    _, p = tiny
    a = p.prompt("What is this?", [IMG])
    b = p.prompt("hi")
    assert a.input_ids.count(p.image_token_id) == 16 and b.pixel_values is None
    left = p.collate([a, b], padding_side="left")
    right = p.collate([a, b], padding_side="right")
    n = len(b.input_ids)
    assert left["attention_mask"][1, -n:].all() and not left["attention_mask"][1, :-n].any()
    assert right["attention_mask"][1, :n].all() and not right["attention_mask"][1, n:].any()
    assert (right["labels"][1, n:] == IGNORE_INDEX).all()
    assert left["pixel_values"].shape[0] == 1


def test_segment_labels_equal_whole_string_tokenization(tiny):
    """Tokenizing segment by segment must give the same ids as the full rendered text."""
    _, p = tiny
    messages = [
        {"role": "user", "content": "What is in the picture?"},
        {"role": "assistant", "content": "A cat sitting on a mat."},
    ]
    enc = p.encode(messages)
    whole = p.tokenizer.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == p.tokenizer(whole, add_special_tokens=False).input_ids
