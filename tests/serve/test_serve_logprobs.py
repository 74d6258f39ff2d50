"""OpenAI `logprobs` on both endpoints and both batching modes, checked against the model's own forward pass."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import API_KEY, MODEL_NAME, data_url, image_message, png_bytes, start_server

from minillava.generate import Generator
from minillava.model import MiniLlava

RED = png_bytes(color=(200, 30, 30))
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TOL = 1e-4


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(request, serve_dir, one_thread):
    # two rows per batch and a long wait: two requests sent together always share a batch
    with start_server(serve_dir, max_batch_size=2, batch_wait_ms=300, batching=request.param) as live:
        engine = live.app.state.engine
        assert (type(engine).__name__ == "ContinuousEngine") == (request.param == "continuous")
        yield live


@pytest.fixture(scope="module")
def reference(serve_dir):
    return Generator(*MiniLlava.from_pretrained(serve_dir))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (what the tiny byte-level BPE tokenizer's pieces use)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = keep + [256 + n for n in range(256 - len(keep))]
    return {chr(c): b for b, c in zip(keep + [b for b in range(256) if b not in keep], chars, strict=True)}


@pytest.fixture(scope="module")
def vocab(reference):
    """Token bytes (None: a special token, keyed by its text instead) -> id, and id -> bytes."""
    tok = reference.processor.tokenizer
    table = _byte_decoder()
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    by_id = {}
    for i in range(len(tok)):
        piece = tok.convert_ids_to_tokens(i)
        by_id[i] = None if i in special else bytes(table[c] for c in piece)
        if by_id[i] is not None:  # the table is right: the tokenizer's own decoder agrees
            assert by_id[i].decode("utf-8", "replace") == tok.decode([i])
    lookup = {(b if b is not None else tok.convert_ids_to_tokens(i)): i for i, b in by_id.items()}
    return lookup, by_id


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=HEADERS, timeout=120)


def chat(server, text: str, images=(), **kw) -> dict:
    r = post(server, "/v1/chat/completions", {"messages": image_message(text, *map(data_url, images)), **kw})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(vocab, entries: list[dict]) -> list[int]:
    lookup, _ = vocab
    return [lookup[bytes(e["bytes"]) if e["bytes"] is not None else e["token"]] for e in entries]


@torch.inference_mode()
def model_logprobs(reference: Generator, prompt, images, answer: list[int], raw: bool = False) -> torch.Tensor:
    """log_softmax of the model's logits at each answer position, in one forward pass over prompt + answer
    (no cache, no batching): (len(answer), V), the image slot excluded as the sampler excludes it."""
    from PIL import Image

    pil = [Image.open(__import__("io").BytesIO(b)) for b in images]
    enc = reference.encode(prompt, pil or None, raw)
    batch = reference.processor.collate([enc], padding_side="left")
    ids = torch.tensor([enc.input_ids + answer])
    out = reference.model(
        ids, torch.ones_like(ids), batch["pixel_values"], image_sizes=batch.get("image_sizes"),
        image_counts=batch.get("image_counts"),
    )  # fmt: skip
    start = len(enc.input_ids) - 1
    logits = out.logits[0, start : start + len(answer)].float()
    logits[:, reference.model.config.image_token_id] = -float("inf")
    return logits.log_softmax(-1)


def check_against_model(reference, vocab, prompt, images, entries, top: int, greedy: bool, raw=False) -> None:
    _, by_id = vocab
    answer = ids_of(vocab, entries)
    want = model_logprobs(reference, prompt, images, answer, raw)
    for i, (e, token) in enumerate(zip(entries, answer, strict=True)):
        assert abs(e["logprob"] - float(want[i, token])) < TOL, (i, e["logprob"], float(want[i, token]))
        if greedy:
            assert token == int(want[i].argmax())
        values, best = want[i].topk(top)
        alts = e["top_logprobs"]
        assert len(alts) == top
        assert [ids_of(vocab, [a])[0] for a in alts] == best.tolist()
        assert all(abs(a["logprob"] - float(v)) < TOL for a, v in zip(alts, values, strict=True))
        assert all(
            a["bytes"] == (None if by_id[t] is None else list(by_id[t]))
            for a, t in zip(alts, best.tolist(), strict=True)
        )
        if greedy and top:
            assert alts[0]["token"] == e["token"] and alts[0]["logprob"] == e["logprob"]


def joined(entries: list[dict]) -> bytes:
    return b"".join(bytes(e["bytes"] or []) for e in entries)  # special tokens (bytes null) add no text


def test_greedy_chat_logprobs_equal_the_models_forward_pass(server, reference, vocab):
    prompt, images = "<image>\nWhat is in the picture?", [RED]
    r = chat(server, "What is in the picture?", [RED], max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    choice = r["choices"][0]
    entries = choice["logprobs"]["content"]
    assert entries and len(entries) <= 12 and choice["message"]["content"]
    if choice["finish_reason"] == "length":
        assert len(entries) == r["usage"]["completion_tokens"] == 12
    else:  # the end-of-turn token that closed the answer is not one of its tokens
        assert len(entries) == r["usage"]["completion_tokens"] - 1
    check_against_model(reference, vocab, [{"role": "user", "content": prompt}], images, entries, 5, greedy=True)
    # the text is the tokens' bytes; the token strings too where each token is whole UTF-8 characters
    text = choice["message"]["content"]
    assert joined(entries).decode("utf-8", "replace") == text
    if all(e["bytes"] is not None and bytes(e["bytes"]).decode("utf-8", "ignore") == e["token"] for e in entries):
        assert "".join(e["token"] for e in entries) == text


def test_sampled_chat_logprobs_are_the_untempered_distribution(server, reference, vocab):
    """Sampling at temperature 0.7: the logprobs reported are still log_softmax of the raw logits."""
    kw = dict(max_tokens=10, temperature=0.7, seed=3, logprobs=True, top_logprobs=2)
    r = chat(server, "hello world", **kw)
    entries = r["choices"][0]["logprobs"]["content"]
    check_against_model(reference, vocab, [{"role": "user", "content": "hello world"}], [], entries, 2, greedy=False)


def test_stop_strings_cut_the_logprobs_with_the_text(server, vocab):
    kw = dict(max_tokens=16, temperature=0, logprobs=True)
    full = chat(server, "describe the image", [RED], **kw)["choices"][0]
    text, entries = full["message"]["content"], full["logprobs"]["content"]
    # a stop string that starts on a token boundary and ends inside the next token: the text is cut before
    # token j; tokens j and j + 1 were generated (the stop is seen at j + 1) but are not reported
    whole = [bytes(e["bytes"] or b"").decode("utf-8", "strict") if _utf8(e) else None for e in entries]
    stop = None
    for j in range(1, len(entries) - 1):
        if whole[j] and whole[j + 1] and None not in whole[:j]:
            candidate = whole[j] + whole[j + 1][0]
            if text.find(candidate) == len("".join(whole[:j])):
                stop = candidate
                break
    assert stop is not None, entries
    cut = chat(server, "describe the image", [RED], stop=[stop], **kw)["choices"][0]
    kept = cut["logprobs"]["content"]
    assert cut["message"]["content"] == text[: text.find(stop)]
    # exactly the tokens that put text in the answer: the last may run into the stop string, not past it
    assert kept == entries[:j]
    assert joined(kept).decode("utf-8", "replace").startswith(cut["message"]["content"])
    assert len(joined(kept[:-1]).decode("utf-8", "replace")) < len(cut["message"]["content"])


def _utf8(entry: dict) -> bool:
    try:
        bytes(entry["bytes"] or b"").decode("utf-8", "strict")
    except UnicodeDecodeError:
        return False
    return entry["bytes"] is not None


def sse(server, path: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", server.url + path, json={"model": MODEL_NAME, "stream": True, **body}, headers=HEADERS, timeout=120
    ) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_logprobs_equal_the_whole_answers(server, stop):
    kw = dict(max_tokens=14, temperature=0, logprobs=True, top_logprobs=3, stop=stop)
    messages = image_message("describe the image", data_url(RED))
    whole = chat(server, "describe the image", [RED], **kw)["choices"][0]
    chunks = sse(server, "/v1/chat/completions", {"messages": messages, **kw})
    text, entries = "", []
    for c in chunks:
        choice = c["choices"][0]
        text += choice["delta"].get("content") or ""
        if choice["logprobs"] is not None:  # each chunk: the tokens of its text (the last may run on past it)
            entries += choice["logprobs"]["content"]
    assert text == whole["message"]["content"]
    assert entries == whole["logprobs"]["content"]
    assert sum(1 for c in chunks if c["choices"][0]["logprobs"]) > 1  # really spread over the chunks


def test_a_batch_mixing_logprobs_and_plain_requests(server):
    engine = server.app.state.engine
    a = dict(text="What is in the picture?", images=[RED], max_tokens=10, temperature=0, logprobs=True, top_logprobs=4)
    b = dict(text="The capital of France is", max_tokens=12, temperature=0)

    def ask(kw):
        kw = dict(kw)
        return chat(server, kw.pop("text"), kw.pop("images", ()), **kw)["choices"][0]

    solo_a, solo_b = ask(a), ask(b)
    for first, second in [(a, b), (b, a)]:  # the logprobs row first in the batch, then second
        before = engine.stats["max_batch"]
        engine.stats["max_batch"] = 0
        with ThreadPoolExecutor(2) as pool:
            one = pool.submit(ask, first)
            time.sleep(0.05)  # well inside the batch's 300 ms wait: queued second
            two = pool.submit(ask, second)
            both_a, both_b = (one.result(), two.result()) if first is a else (two.result(), one.result())
        assert engine.stats["max_batch"] == 2  # they did share a batch
        engine.stats["max_batch"] = max(before, 2)
        assert both_b["message"]["content"] == solo_b["message"]["content"] and both_b["logprobs"] is None
        assert both_a["message"]["content"] == solo_a["message"]["content"]
        got, want = both_a["logprobs"]["content"], solo_a["logprobs"]["content"]
        assert [e["token"] for e in got] == [e["token"] for e in want]
        for g, w in zip(got, want, strict=True):  # left padding changes the arithmetic a little, not the answer
            assert abs(g["logprob"] - w["logprob"]) < TOL
            assert [t["token"] for t in g["top_logprobs"]] == [t["token"] for t in w["top_logprobs"]]
            assert all(
                abs(x["logprob"] - y["logprob"]) < TOL
                for x, y in zip(g["top_logprobs"], w["top_logprobs"], strict=True)
            )


def test_legacy_completions_logprobs(server, reference, vocab):
    prompt = "The capital of France is"
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    tokens = lp["tokens"]
    assert tokens and len(tokens) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    # the token strings map back to ids (the tiny tokenizer's pieces are whole characters, or special)
    lookup, by_id = vocab

    def text(token: int) -> str:
        data = by_id[token]
        tok = reference.processor.tokenizer
        return tok.convert_ids_to_tokens(token) if data is None else data.decode("utf-8", "replace")

    answer = [lookup.get(t.encode(), lookup.get(t)) for t in tokens]
    assert None not in answer, tokens
    want = model_logprobs(reference, prompt, [], answer, raw=True)
    for i, (token, logprob, top) in enumerate(zip(answer, lp["token_logprobs"], lp["top_logprobs"], strict=True)):
        assert abs(logprob - float(want[i, token])) < TOL and token == int(want[i].argmax())
        values, best = want[i].topk(3)
        # the 3 most likely and the chosen one (here, greedy, the first of them), by their texts (a dict: pieces
        # of multi-byte characters all read U+FFFD and share a key, the last one's value, as in OpenAI's)
        expect = {
            text(t): v for t, v in [*zip(best.tolist(), values.tolist(), strict=True), (token, float(want[i, token]))]
        }
        assert top.keys() == expect.keys() and all(abs(top[k] - v) < TOL for k, v in expect.items())
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert lp["text_offset"] == offsets
    assert "".join(tokens) == choice["text"] or any("\ufffd" in t or t in ("<s>", "<pad>") for t in tokens)
    # streamed: the same, chunk by chunk, offsets running on
    chunks = sse(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    merged = {k: [] for k in lp}
    for c in chunks:
        for k, v in (c["choices"][0]["logprobs"] or {}).items():
            merged[k] += v
    assert merged == lp
    # logprobs 0: no alternatives, just the chosen token
    r0 = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0})
    lp0 = r0.json()["choices"][0]["logprobs"]
    assert lp0["top_logprobs"] == [{t: v} for t, v in zip(lp0["tokens"], lp0["token_logprobs"], strict=True)]
    assert lp0["tokens"] == tokens


def test_without_logprobs_none_are_returned(server):
    assert chat(server, "hello", max_tokens=3)["choices"][0]["logprobs"] is None
    assert chat(server, "hello", max_tokens=3, logprobs=False)["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 2, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_logprobs_values_are_400s(server, path, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = post(server, path, {**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "\n" not in err["message"] and "Traceback" not in err["message"] and err["message"].startswith(param)


def test_the_openai_client_reads_them(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    c = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs) >= 1
