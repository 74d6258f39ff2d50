import copy

import pytest
import torch
from PIL import Image
from tiny_models import louden

from minillava import generate as generate_module
from minillava.generate import GenerationConfig, Generator, decode, stop_token_ids
from minillava.runtime import parse_dtype

RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))
GREEDY = GenerationConfig(max_new_tokens=12)


def loud(model):
    """A copy whose greedy answers depend on the prompt and image (the stock init answers one constant token)."""
    model = copy.deepcopy(model)
    louden(model)
    return model


def assert_varied(tokens: torch.Tensor) -> None:
    """The rows differ from each other and none is one token repeated, so a row mix-up or a cache bug would
    change what the comparisons see."""
    rows = [tuple(r) for r in tokens.tolist()]
    assert len(set(rows)) == len(rows), rows
    assert all(len(set(r)) > 1 for r in rows), rows


def raw_tokens(gen, samples, cfg=GREEDY, static_cache=None):
    """Greedy token ids per row, without stop handling, for exact comparisons."""
    batch = gen.processor.collate(samples, padding_side="left")
    pad = gen.processor.pad_token_id
    steps = [t for t, _ in decode(gen.model, batch, cfg, stop_ids=[], pad_id=pad, static_cache=static_cache)]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("llm", ["llama", "qwen2", "opt"])
def test_batched_greedy_equals_batch_of_one(build_tiny, llm):
    model, p = build_tiny(llm=llm)
    louden(model)  # answers that depend on the prompt and image: a row mix-up changes them
    gen = Generator(model, p)
    samples = [
        p.prompt("What is in the picture? describe it in detail", [RED]),
        p.prompt("hi", [BLUE]),
        p.prompt("no image here, just text"),
        p.prompt("<image> compare <image>", [RED, BLUE]),
    ]
    batched = raw_tokens(gen, samples)
    assert_varied(batched)
    for i, s in enumerate(samples):
        assert torch.equal(raw_tokens(gen, [s])[0], batched[i]), f"row {i}"


def test_prefill_sees_the_image(tiny):
    model, p = tiny
    a, b = (p.collate([p.prompt("What is this?", [im])], padding_side="left") for im in (RED, BLUE))
    la = model(**a, logits_to_keep=1).logits
    lb = model(**b, logits_to_keep=1).logits
    assert la.shape[1] == 1 and not torch.allclose(la, lb, atol=1e-4)


def test_kv_cache_decoding_equals_full_recompute(tiny):
    model, p = loud(tiny[0]), tiny[1]
    gen = Generator(model, p)
    prompts = [p.prompt("What is in the picture?", [RED]), p.prompt("What is in the picture?", [BLUE])]
    answers = torch.cat([raw_tokens(gen, [s], GenerationConfig(max_new_tokens=6)) for s in prompts])
    assert_varied(answers)  # the image changes the answer: a stale or wrong cache entry would show
    for s, tokens in zip(prompts, answers.tolist(), strict=True):
        ids = list(s.input_ids)
        with torch.no_grad():
            for t in tokens:
                batch = p.collate([type(s)(ids, [-100] * len(ids), s.pixel_values)])
                logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[0, -1]
                logits[p.image_token_id] = -float("inf")
                assert int(logits.argmax()) == t
                ids.append(t)


def test_stream_joins_to_generate_and_returns_only_new_text(tiny):
    gen = Generator(*tiny)
    cfg = GenerationConfig(max_new_tokens=16)
    full = gen.generate("What is this?", [RED], cfg)
    pieces = list(gen.stream("What is this?", [RED], cfg))
    assert "".join(pieces) == full and len(pieces) >= 1
    assert "What is this?" not in full


def test_stop_strings_and_tokens(tiny):
    gen = Generator(*tiny)
    cfg = GenerationConfig(max_new_tokens=16)
    full = gen.generate("What is this?", [RED], cfg)
    assert len(full) > 2
    stop = full[1:3]
    cut = gen.generate("What is this?", [RED], GenerationConfig(max_new_tokens=16, stop=[stop]))
    assert cut == full[: full.find(stop)]
    assert "".join(gen.stream("What is this?", [RED], GenerationConfig(max_new_tokens=16, stop=[stop]))) == cut
    ids = stop_token_ids(gen.processor)
    tok = gen.processor.tokenizer
    assert tok.eos_token_id in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids


def forced_decode(tokens: list[int]):
    """A stand-in for `decode` that answers `tokens` one a step, whatever the model would say."""

    def fake(model, batch, cfg, stop_ids, pad_id, static_cache=None):
        for t in tokens[: cfg.max_new_tokens]:
            yield torch.tensor([t]), torch.zeros(1, dtype=torch.bool)

    return fake


def char_tokens(tok, text: str) -> list[int]:
    """One token per character, so every prefix of `text` is a decoded state the stream passes through."""
    return [i for c in text for i in tok(c, add_special_tokens=False).input_ids]


@pytest.mark.parametrize(
    ("stop", "want"),
    [(["ab", "xab"], "hello "), (["xab", "ab"], "hello "), (["lo xa!", "o x"], "hell"), (["zz", "xa"], "hello ")],
)
def test_stream_with_overlapping_stop_strings_equals_generate(tiny, monkeypatch, stop, want):
    """A stop string that starts earlier may still complete after a shorter one matched the tail: the stream
    must hold back the longest tail that starts any stop, or it emits text (the "x") that generate cuts."""
    gen = Generator(*tiny)
    monkeypatch.setattr(generate_module, "decode", forced_decode(char_tokens(gen.processor.tokenizer, "hello xab!")))
    cfg = GenerationConfig(max_new_tokens=16, stop=stop)
    assert gen.generate("hi", None, cfg) == want
    pieces = list(gen.stream("hi", None, cfg))
    assert "".join(pieces) == want, pieces


def test_generation_stops_at_eos(tiny):
    model, p = tiny
    model = copy.deepcopy(model)
    eos = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make the end-of-turn token the certain next token
        model.llm.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.llm.config.vocab_size))
        model.llm.get_output_embeddings().bias[eos] = 1e4
    gen = Generator(model, p)
    batch = p.collate([p.prompt("hi")], padding_side="left")
    steps = list(decode(model, batch, GenerationConfig(max_new_tokens=10), gen.stop_ids, p.pad_token_id))
    assert len(steps) == 1 and gen.generate("hi") == ""


def test_sampling_is_seeded(tiny):
    gen = Generator(*tiny)
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    a = raw_tokens(gen, [gen.processor.prompt("hi", [RED])], cfg)
    b = raw_tokens(gen, [gen.processor.prompt("hi", [RED])], cfg)
    c = raw_tokens(
        gen, [gen.processor.prompt("hi", [RED])], GenerationConfig(max_new_tokens=10, temperature=1.5, seed=8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bfloat16_generation_follows_float32_where_float32_is_decisive(tiny):
    """bf16 rounds activations to 8 bits of mantissa, and how the CPU computes (AVX2, AVX-512 BF16, AMX) moves
    its logits by a little; so compare where that cannot matter. While bf16 has produced the float32 answer so
    far, each step where float32's best token leads the runner-up by more than DECISIVE logits (several times
    bf16's error) must give the same token in bf16; the first step is such a step, so the check never is empty.
    """
    decisive = 1.0  # logits; bf16's error on this model is ~0.15 here
    model, p = loud(tiny[0]), tiny[1]
    s = p.prompt("hi", [RED])
    answer = raw_tokens(Generator(model, p), [s])[0].tolist()
    ids = list(s.input_ids) + answer
    batch = p.collate([type(s)(ids, [-100] * len(ids), s.pixel_values)])
    with torch.no_grad():  # position t predicts answer token t - len(prompt) + 1
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[0]
    logits = logits[len(s.input_ids) - 1 : -1]
    logits[:, p.image_token_id] = -float("inf")
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    assert margins[0] > decisive, margins  # the fixture's float32 answer starts decisively

    half = Generator(copy.deepcopy(model).to(torch.bfloat16), p)
    bf16 = raw_tokens(half, [s])[0].tolist()
    compared = 0
    for want, got, margin in zip(answer, bf16, margins, strict=True):
        if margin > decisive:
            assert got == want, (answer, bf16, margins)
            compared += 1
        if got != want:  # a near tie went the other way: the answers part, later steps see other prefixes
            break
    assert compared >= 1
    assert isinstance(half.generate("hi", [RED], GREEDY), str)  # the text path runs in bf16 too


def test_precision_rules():
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        parse_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=0)


@pytest.mark.parametrize("llm", ["llama", "qwen2", "opt"])
def test_static_cache_decode_equals_dynamic_cache_decode(build_tiny, llm):
    """The StaticCache step (what a CUDA graph replays) run eagerly: same tokens as the DynamicCache path,
    alone and in a left-padded batch of rows of different lengths, with and without images."""
    model, p = build_tiny(llm=llm)
    louden(model)  # answers that depend on the prompt and image
    gen = Generator(model, p)
    samples = [
        p.prompt("What is in the picture? describe it in detail", [RED]),
        p.prompt("hi", [BLUE]),
        p.prompt("no image here, just text"),
        p.prompt("<image> compare <image>", [RED, BLUE]),
    ]
    dynamic = raw_tokens(gen, samples, static_cache=False)
    assert torch.equal(raw_tokens(gen, samples, static_cache=True), dynamic)
    assert len({tuple(r) for r in dynamic.tolist()}) > 1  # the rows differ: the check can fail
    for i in (0, 2):
        assert torch.equal(raw_tokens(gen, [samples[i]], static_cache=True)[0], dynamic[i]), f"row {i}"


def test_static_cache_decode_stops_streams_and_samples(tiny):
    model, p = tiny
    gen = Generator(model, p)
    s = [p.prompt("hi", [RED])]
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    assert torch.equal(raw_tokens(gen, s, sampled, static_cache=True), raw_tokens(gen, s, sampled, static_cache=False))
    batch = p.collate(s, padding_side="left")
    first = int(raw_tokens(gen, s, GenerationConfig(max_new_tokens=1))[0, 0])
    steps = list(decode(model, batch, GenerationConfig(max_new_tokens=10), [first], p.pad_token_id, static_cache=True))
    assert len(steps) == 1 and int(steps[0][0][0]) == first  # a stop id ends the decode


def test_cuda_graphs_off_on_the_cpu(tiny):
    model, p = tiny
    batch = p.collate([p.prompt("hi")], padding_side="left")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA model"):
        next(decode(model, batch, GenerationConfig(max_new_tokens=2, cuda_graphs=True), [], p.pad_token_id))
    auto = [t for t, _ in decode(model, batch, GenerationConfig(max_new_tokens=4), [], p.pad_token_id)]
    off = GenerationConfig(max_new_tokens=4, cuda_graphs=False)
    assert torch.equal(torch.stack(auto), torch.stack([t for t, _ in decode(model, batch, off, [], p.pad_token_id)]))


def test_static_cache_refuses_sliding_window_layers(build_tiny):
    model, p = build_tiny(llm="qwen2")
    text = model.llm.config
    text.use_sliding_window, text.sliding_window, text.layer_types = True, 4, ["full_attention", "sliding_attention"]
    batch = p.collate([p.prompt("hi")], padding_side="left")
    with pytest.raises(ValueError, match="no sliding window"):
        next(decode(model, batch, GREEDY, [], p.pad_token_id, static_cache=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_the_first_maximum_as_argmax_does(dtype):
    logits = torch.randn(5, 4099).to(dtype)
    logits[1, [7, 3000]] = 50.0  # a tie: the first one wins
    logits[2, 4098] = 60.0  # the last column
    logits[3] = -float("inf")
    logits[3, 11] = -1.0  # everything else masked, as the image slot is
    picked = generate_module.greedy(logits)
    assert picked.dtype == torch.long and picked.tolist() == logits.argmax(-1).tolist()
    assert picked[1] == 7 and picked[2] == 4098 and picked[3] == 11


def test_decode_pads_a_row_after_its_stop_token_and_yields_masks_that_keep_their_values(build_tiny):
    model, p = build_tiny()
    louden(model)
    gen = Generator(model, p)
    samples = [p.prompt("What is in the picture?", [RED]), p.prompt("hi", [BLUE])]
    free = raw_tokens(gen, samples, GenerationConfig(max_new_tokens=8))  # (2, 8) no stops
    stop = int(free[0, 2])  # row 0 stops at its third token; row 1 only if it says the same token
    batch = p.collate(samples, padding_side="left")
    steps = list(decode(model, batch, GenerationConfig(max_new_tokens=8), [stop], pad_id=p.pad_token_id))
    tokens = torch.stack([t for t, _ in steps], 1)
    masks = torch.stack([f for _, f in steps], 1)  # finished before each step, as yielded (no later changes)
    cut = [next((i for i, t in enumerate(row.tolist()) if t == stop), None) for row in free]
    for r, at in enumerate(cut):
        if at is None:
            assert tokens[r].tolist() == free[r, : tokens.shape[1]].tolist() and not masks[r].any()
            continue
        assert tokens[r, : at + 1].tolist() == free[r, : at + 1].tolist()
        assert set(tokens[r, at + 1 :].tolist()) <= {p.pad_token_id}
        assert masks[r].tolist() == [i > at for i in range(tokens.shape[1])]
    assert tokens.shape[1] == (8 if None in cut else max(cut) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_never_picks_the_image_slot_even_where_it_scores_highest(tiny, dtype):
    model, p = loud(tiny[0]).to(dtype), tiny[1]
    gen = Generator(model, p)
    samples = [p.prompt("What is in the picture?", [RED]), p.prompt("hi")]
    plain = raw_tokens(gen, samples)
    head = model.llm.get_output_embeddings()

    def favour_image_slot(_module, _args, logits):  # the image slot leads every row by far
        logits[..., p.image_token_id] = logits.max(-1).values + 100.0
        return logits

    hook = head.register_forward_hook(favour_image_slot)
    try:
        tokens = raw_tokens(gen, samples)
    finally:
        hook.remove()
    assert p.image_token_id not in tokens.flatten().tolist()
    assert torch.equal(tokens, plain)  # the next best token, as if the slot were not there
