"""Input ids equal the LLM's own tokenization of the whole prompt, for every template and tokenizer family.

The processor tokenizes the rendered conversation once and labels tokens by character spans; these tests hold
it to `tokenizer(full_text)` (the text built here independently, LLaVA's way) and to the tokenizer's own
`apply_chat_template`, with labels on the answers and their end-of-turn only. All tokenizers are trained here,
offline: byte-level BPE (GPT-2 / SmolLM2 / OPT style, `tokenizers`) and SentencePiece BPE loaded as transformers'
Llama tokenizer with `legacy=True` and `legacy=False` (the `sentencepiece` package).
"""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_models import CORPUS, make_sentencepiece, make_tokenizer

from minillava.images import ImageTransform
from minillava.processor import IGNORE_INDEX, Processor, _tokenize_with_spans
from minillava.templates import VICUNA_SYSTEM

N_IMG = 4  # placeholders per image
IMG = Image.new("RGB", (40, 30), (200, 10, 10))
CONV = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
    {"role": "user", "content": "how are you today?"},
    {"role": "assistant", "content": "yes"},
]
WITH_SYSTEM = [{"role": "system", "content": "You answer briefly."}, *CONV]
# Llama-2-chat's template (BOS before every user turn, `[INST]`, answers ` a </s>`), as its checkpoints ship it.
LLAMA2_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


# ---- tokenizers, trained here --------------------------------------------------------------------------------------
def _with_image_token(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.fixture(scope="module")
def bpe(family):
    """SmolLM2 / Qwen style: byte-level BPE, no BOS, ChatML chat template."""
    return family("bpe")


@pytest.fixture(scope="module")
def gpt2(family):
    """GPT-2 style: byte-level BPE, no BOS, no chat template."""
    return family("gpt2")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    text = [*CORPUS, VICUNA_SYSTEM, "[INST] You answer briefly. [/INST] USER: ASSISTANT:"] * 5
    return make_sentencepiece(tmp_path_factory.mktemp("sp"), text)


def _llama(sp_model, legacy: bool, chat_template: str | None = None):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(sp_model, legacy=legacy, add_bos_token=True, add_eos_token=False)
    tok.chat_template = chat_template
    assert tok("a").input_ids[0] == tok.bos_token_id  # a Llama tokenizer: BOS in front of every text
    assert len(tok("What is in the picture?").input_ids) < 12  # real merges, not one token per character
    return _with_image_token(tok)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "nonlegacy"])
def llama(request, sp_model):
    return _llama(sp_model, request.param)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "nonlegacy"])
def llama2_chat(request, sp_model):
    return _llama(sp_model, request.param, LLAMA2_CHAT)


@pytest.fixture(scope="module")
def family(tmp_path_factory, sp_model):
    """Every tokenizer family by name, built once: llama-legacy, llama-nonlegacy, gpt2, opt, bpe."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            if name.startswith("llama"):
                built[name] = _llama(sp_model, legacy=name == "llama-legacy")
            else:
                d = tmp_path_factory.mktemp(name)
                tok = make_tokenizer(d, chat_template=name == "bpe", bos=name == "opt")
                built[name] = _with_image_token(tok)
        return built[name]

    return get


FAMILIES = ["llama-legacy", "llama-nonlegacy", "gpt2", "opt", "bpe"]


# ---- the prompt text, built independently of minillava --------------------------------------------------------------
def llava_vicuna_v1(messages, eos: str) -> str:
    """LLaVA's `conv_vicuna_v1.get_prompt()`: sep ' ', sep2 eos, roles USER / ASSISTANT."""
    system = VICUNA_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    seps, ret = [" ", eos], system + " "
    for i, m in enumerate(messages):
        role = {"user": "USER", "assistant": "ASSISTANT"}[m["role"]]
        ret += f"{role}: {m['content']}{seps[i % 2]}"
    return ret + ("ASSISTANT:" if messages[-1]["role"] == "user" else "")


def chatml(messages, generation: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation else "")


def plain(messages, eos: str) -> str:
    return "".join(
        "<image>" * m["content"].count("<image>") if m["role"] == "user" else m["content"] + eos for m in messages
    )


# ---- helpers ---------------------------------------------------------------------------------------------------------
def processor(tok, template: str) -> Processor:
    return Processor(tok, ImageTransform(32, aspect="resize"), N_IMG, template=template)


def collapse(p: Processor, ids: list[int]) -> list[int]:
    """Our ids with each image's N placeholders folded back into the one `<image>` id the text had."""
    out, k = [], 0
    while k < len(ids):
        out.append(ids[k])
        if ids[k] == p.image_token_id:
            assert ids[k : k + N_IMG] == [p.image_token_id] * N_IMG
            k += N_IMG
        else:
            k += 1
    return out


def ids_of(tok, text: str) -> list[int]:
    """The tokenizer's own ids for the whole text, special tokens as it adds them (BOS unless the text has it)."""
    return tok(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token))).input_ids


def chat_ids(tok, messages, generation: bool) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def supervised_runs(tok, enc) -> list[list[int]]:
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == t
            cur.append(t)
    return [*runs, cur] if cur else runs


def check(p: Processor, messages, text: str, answers: list[str], images=(IMG,)):
    """ids == tokenizer(text) (images folded) for the conversation and its generation prompt; labels on answers."""
    tok = p.tokenizer
    enc = p.encode(messages, list(images))
    assert collapse(p, enc.input_ids) == ids_of(tok, text), tok.convert_ids_to_tokens(collapse(p, enc.input_ids))
    runs = supervised_runs(tok, enc)
    assert [tok.decode(r).strip() for r in runs] == answers
    # the supervised ids are exactly the tokenizer's ids of the answer texts as they stand in the prompt
    assert sum(len(r) for r in runs) == sum(lab != IGNORE_INDEX for lab in enc.labels)
    assert all(enc.labels[i] == IGNORE_INDEX for i, t in enumerate(enc.input_ids) if t == p.image_token_id)
    return enc


# ---- vicuna_v1 (LLaVA-1.5's recipe) -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("messages", [CONV, WITH_SYSTEM], ids=["default-system", "own-system"])
def test_vicuna_v1_ids_equal_the_tokenizer_on_llava_text(family, name, messages):
    tok = family(name)
    p = processor(tok, "vicuna_v1")
    eos = tok.eos_token
    text = llava_vicuna_v1(messages, eos)
    assert text.count(f"{eos}USER: ") == 1 and " ASSISTANT: A cat" in text
    check(p, messages, text, [f"A cat sitting on a mat.{eos}", f"yes{eos}"])
    gen = p.encode(messages[:-1], [IMG], add_generation_prompt=True)
    assert collapse(p, gen.input_ids) == ids_of(tok, llava_vicuna_v1(messages[:-1], eos))
    assert [tok.decode(r).strip() for r in supervised_runs(tok, gen)] == [f"A cat sitting on a mat.{eos}"]


def test_vicuna_v1_llama_has_no_stray_pieces(llama):
    """What segment-wise tokenization got wrong: a lone '▁' before the prompt and each answer, '▁USER' after </s>."""
    p = processor(llama, "vicuna_v1")
    enc = p.encode(CONV, [IMG])
    pieces = llama.convert_ids_to_tokens(enc.input_ids)
    assert pieces.count("▁") == llama.convert_ids_to_tokens(ids_of(llama, llava_vicuna_v1(CONV, "</s>"))).count("▁")
    first_answer = enc.labels.index(next(lab for lab in enc.labels if lab != IGNORE_INDEX))
    assert pieces[first_answer] != "▁"
    after_eos = pieces[pieces.index("</s>") + 1]
    # sentencepiece itself: legacy adds a '▁' after special tokens, non-legacy does not
    assert after_eos.startswith("▁") == llama.legacy


def test_a_saved_processor_tokenizes_as_the_one_it_was_saved_from(llama, tmp_path):
    """transformers 5 saves a Llama tokenizer without its `legacy` flag and reloads it non-legacy: a legacy model's
    prompts (a `▁` after every special token) would come back in other tokens. save_pretrained keeps the flag."""
    p = processor(llama, "vicuna_v1")
    p.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.tokenizer.legacy == llama.legacy
    assert loaded.encode(CONV, [IMG]).input_ids == p.encode(CONV, [IMG]).input_ids


def test_vicuna_v1_refuses_a_system_message_after_the_first_turn(gpt2):
    p = processor(gpt2, "vicuna_v1")
    mid = [CONV[0], CONV[1], {"role": "system", "content": "be terse"}, *CONV[2:]]
    with pytest.raises(ValueError, match="role 'system'"):
        p.encode(mid, [IMG])
    with pytest.raises(ValueError, match="role 'tool'"):
        p.encode([*CONV[:2], {"role": "tool", "content": "x"}], [IMG])


# ---- the tokenizer's own chat template ----------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["auto", "chatml"])
def test_chatml_ids_equal_apply_chat_template(bpe, template):
    p = processor(bpe, template)
    for messages in (CONV, WITH_SYSTEM):
        enc = check(p, messages, chatml(messages, False), ["A cat sitting on a mat.<|im_end|>", "yes<|im_end|>"])
        assert collapse(p, enc.input_ids) == chat_ids(bpe, messages, False)
        gen = p.encode(messages[:-1], [IMG], add_generation_prompt=True)
        assert collapse(p, gen.input_ids) == chat_ids(bpe, messages[:-1], True)
        assert collapse(p, gen.input_ids) == ids_of(bpe, chatml(messages[:-1], True))


def test_llama2_chat_template_ids_equal_apply_chat_template(llama2_chat):
    p = processor(llama2_chat, "auto")
    text = llama2_chat.apply_chat_template(CONV, tokenize=False)
    assert text.count("<s>[INST] ") == 2
    enc = check(p, CONV, text, ["A cat sitting on a mat. </s>", "yes </s>"])
    assert collapse(p, enc.input_ids) == chat_ids(llama2_chat, CONV, False)
    assert collapse(p, enc.input_ids).count(llama2_chat.bos_token_id) == 2  # the template's BOS, none added on top
    gen = p.encode(CONV[:3], [IMG], add_generation_prompt=True)
    assert collapse(p, gen.input_ids) == chat_ids(llama2_chat, CONV[:3], True)


# Zephyr's (TinyLlama-Chat's) template writes no BOS, while its Llama tokenizer puts one in front of every text
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # fmt: skip


def test_a_chat_template_without_bos_gets_none_added(sp_model):
    tok = _llama(sp_model, legacy=False, chat_template=ZEPHYR)
    p = processor(tok, "auto")
    enc = p.encode(CONV, [IMG])
    assert collapse(p, enc.input_ids) == chat_ids(tok, CONV, False) and enc.input_ids[0] != tok.bos_token_id
    gen = p.encode(CONV[:3], [IMG], add_generation_prompt=True)
    assert collapse(p, gen.input_ids) == chat_ids(tok, CONV[:3], True)
    # raw text and our own templates still get the tokenizer's BOS, as tokenizer(text) and LLaVA give it
    assert p.encode_raw("<image>\nhi", [IMG]).input_ids[0] == tok.bos_token_id
    assert processor(tok, "vicuna_v1").encode(CONV, [IMG]).input_ids[0] == tok.bos_token_id


@pytest.mark.parametrize("name", ["llama-legacy", "llama-nonlegacy", "gpt2", "opt"])
def test_plain_template_ids_equal_the_tokenizer(family, name):
    tok = family(name)
    p = processor(tok, "plain")
    messages = [{"role": "user", "content": "<image>\nignored"}, {"role": "assistant", "content": "a red square"}]
    check(p, messages, plain(messages, tok.eos_token), [f"a red square{tok.eos_token}"])


def test_two_images_and_text_only_turns(bpe):
    p = processor(bpe, "chatml")
    messages = [
        {"role": "user", "content": "<image> and <image>: same?"},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "colour"},
    ]
    enc = check(p, messages, chatml(messages, False), ["no<|im_end|>", "colour<|im_end|>"], images=(IMG, IMG))
    assert enc.input_ids.count(p.image_token_id) == 2 * N_IMG


# ---- tokenizers without offsets ------------------------------------------------------------------------------------
class _NoOffsets:
    """A tokenizer seen as a slow one: same ids, but no offset mapping (`is_fast` False)."""

    is_fast = False

    def __init__(self, tok) -> None:
        self._tok = tok

    def __call__(self, text, **kw):
        assert "return_offsets_mapping" not in kw
        return self._tok(text, **kw)


@pytest.mark.parametrize("name", ["llama-legacy", "llama-nonlegacy", "gpt2", "opt", "bpe"])
@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_the_prefix_edge_path_labels_what_the_offset_path_labels(family, name, template):
    """Slow tokenizers place each answer's edges at the common prefix of the ids; on real conversations, whose
    answers start and end on token boundaries, that must supervise exactly the tokens the offsets do."""
    tok = family(name)
    p = processor(tok, template)
    segments = p.template.render(WITH_SYSTEM, False)
    text = "".join(s.text for s in segments)
    spans, pos = [], 0
    for s in segments:
        if s.supervised:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    fast_ids, fast_flags = _tokenize_with_spans(tok, text, spans)
    slow_ids, slow_flags = _tokenize_with_spans(_NoOffsets(tok), text, spans)
    assert slow_ids == fast_ids and slow_flags == fast_flags and sum(fast_flags) > 0
