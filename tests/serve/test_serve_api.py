"""The OpenAI-compatible API, driven by the official `openai` client against a live uvicorn server."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from serve_helpers import API_KEY, MODEL_NAME, ask, data_url, image_message, png_bytes, start_server

openai = pytest.importorskip("openai")

from minillava.generate import GenerationConfig, Generator  # noqa: E402
from minillava.model import MiniLlava  # noqa: E402

RED, BLUE = png_bytes(color=(200, 30, 30)), png_bytes((24, 48), color=(20, 40, 220))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    (d / "red.png").write_bytes(RED)
    return d


@pytest.fixture(scope="module")
def server(serve_dir, images_dir, one_thread):
    with start_server(
        serve_dir, max_batch_size=4, max_images=2, max_image_bytes=200_000, max_image_pixels=1_000_000,
        default_max_tokens=16, allow_local_images=images_dir,
    ) as live:  # fmt: skip
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(serve_dir):
    """The same weights in-process: what `Generator.generate` answers one request at a time."""
    return Generator(*MiniLlava.from_pretrained(serve_dir))


def expected(reference: Generator, text: str, images: list[bytes], max_tokens: int, stop=()) -> str:
    content = "\n".join(["<image>"] * len(images) + [text])
    pil = [Image.open(io.BytesIO(b)) for b in images]
    cfg = GenerationConfig(max_new_tokens=max_tokens, stop=list(stop))
    return reference.generate([{"role": "user", "content": content}], pil, cfg)


def streamed(client, text, *images, **kw):
    stream = ask(client, text, *images, stream=True, **kw)
    chunks = list(stream)
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---- happy paths ------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["max_batch_size"] == 4


def test_completion_with_image_equals_generator(client, reference):
    r = ask(client, "What is in the picture?", RED, max_tokens=10)
    want = expected(reference, "What is in the picture?", [RED], 10)
    assert r.choices[0].message.content == want and want
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion" and r.model == MODEL_NAME
    enc = reference.processor.encode(
        [{"role": "user", "content": "<image>\nWhat is in the picture?"}], [RED], add_generation_prompt=True
    )
    assert r.usage.prompt_tokens == len(enc.input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 10


def test_stream_with_image_joins_to_the_plain_answer(client, reference):
    chunks, text = streamed(client, "describe the image", BLUE, max_tokens=14, stream_options={"include_usage": True})
    assert (
        text
        == expected(reference, "describe the image", [BLUE], 14)
        == ask(client, "describe the image", BLUE, max_tokens=14).choices[0].message.content
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed, in pieces
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 16  # 16 image tokens + text
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_text_only_history_and_system_message(client, reference):
    messages = [
        {"role": "system", "content": "You are terse."},
        *image_message("hi", data_url(RED)),
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": "and the colour?"},
    ]  # fmt: skip
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    conv = [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "<image>\nhi"},
        {"role": "assistant", "content": "a red square"}, {"role": "user", "content": "and the colour?"},
    ]  # fmt: skip
    want = reference.generate(conv, [Image.open(io.BytesIO(RED))], GenerationConfig(max_new_tokens=8))
    assert r.choices[0].message.content == want


def test_max_tokens_and_stop(client, reference):
    full = ask(client, "The capital of France is", max_tokens=12).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[2:4]
    r = ask(client, "The capital of France is", max_tokens=12, stop=[stop, "zzzz"])
    assert (
        r.choices[0].message.content
        == full[: full.find(stop)]
        == expected(reference, "The capital of France is", [], 12, [stop])
    )
    assert r.choices[0].finish_reason == "stop"
    _, text = streamed(client, "The capital of France is", max_tokens=12, stop=stop)
    assert text == full[: full.find(stop)]
    short = ask(client, "The capital of France is", max_tokens=3)
    assert short.usage.completion_tokens <= 3
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible(client):
    a = ask(client, "hello", temperature=1.0, top_p=0.9, seed=7, max_tokens=10).choices[0].message.content
    b = ask(client, "hello", temperature=1.0, top_p=0.9, seed=7, max_tokens=10).choices[0].message.content
    assert a == b
    greedy = ask(client, "hello", max_tokens=10).choices[0].message.content
    assert ask(client, "hello", temperature=1e-30, max_tokens=10).choices[0].message.content == greedy


def test_concurrent_requests_equal_sequential(client, server, reference):
    jobs = [
        ("What is in the picture?", [RED], 10, False), ("describe the image", [BLUE], 14, True),
        ("yes no one two", [], 9, False), ("hello world", [RED, BLUE], 12, True),
        ("The capital of France is", [], 16, False), ("a small green triangle", [BLUE], 11, False),
        ("What is in the picture?", [BLUE], 13, True), ("hello", [], 10, False),
    ]  # fmt: skip

    def run(job):
        text, imgs, n, stream = job
        return (
            streamed(client, text, *imgs, max_tokens=n)[1]
            if stream
            else ask(client, text, *imgs, max_tokens=n).choices[0].message.content
        )

    before = httpx.get(server.url + "/health").json()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    after = httpx.get(server.url + "/health").json()
    alone = [run(job) for job in jobs]
    assert together == alone == [expected(reference, t, i, n) for t, i, n, _ in jobs]
    assert after["max_batch"] > 1, after  # they really were batched
    assert after["batches"] - before["batches"] < len(jobs)


def test_local_image_inside_the_allowed_dir(client, images_dir, reference):
    url = (images_dir / "red.png").as_uri()
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=image_message("What is in the picture?", url), max_tokens=10, temperature=0
    )
    assert r.choices[0].message.content == expected(reference, "What is in the picture?", [RED], 10)


# ---- errors -----------------------------------------------------------------------------------------
def raw(server, body, key: str | None = API_KEY, path="/v1/chat/completions", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(
            server.url + path, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=30, **kw
        )
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def check_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None, says: str = ""):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    assert says in err["message"], err
    return err


def chat(content, **kw) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


PART = "messages[0].content[0]"


def img_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_api_key(server):
    for key in (None, "wrong"):
        check_error(raw(server, chat("hi"), key=key), 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=image_message("x", "data:image/png;base64,AAAA"))
    assert e.value.body["code"] == "invalid_image"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "body, status, code, param, says",
    [
        (b"{not json", 400, "invalid_json", None, "not valid JSON"),
        (b"[1, 2]", 400, "invalid_value", None, "JSON object"),
        ({"model": MODEL_NAME}, 400, "invalid_value", "messages", "required"),
        ({"model": MODEL_NAME, "messages": []}, 400, "invalid_value", "messages", ""),
        (chat("hi", max_tokens="5"), 400, "invalid_value", "max_tokens", ""),
        (chat("hi", max_tokens=0), 400, "invalid_value", "max_tokens", ""),
        (chat("hi", temperature=3), 400, "invalid_value", "temperature", ""),
        (chat("hi", stream="yes"), 400, "invalid_value", "stream", ""),
        (chat(42), 400, "invalid_value", None, ""),
        (chat([{"type": "audio", "data": "x"}]), 400, "invalid_value", None, ""),
        ({"model": MODEL_NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", None, ""),
        (chat("hi", n=2), 400, "invalid_value", "n", "n=1"),
        (chat("hi", seed=2**70), 400, "invalid_value", "seed", ""),
        (chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop", ""),
        ({**chat("hi"), "model": "nope"}, 404, "model_not_found", "model", "nope"),
        (chat("look: <image>"), 400, "invalid_value", "messages[0].content", "image token"),
        ({"model": MODEL_NAME, "messages": [{"role": "assistant", "content": [img_part(data_url(RED))]}]}, 400,
         "invalid_value", PART, "user messages"),
        (chat([img_part(data_url(RED))] * 3), 400, "too_many_images", "messages", "3 images"),
        (chat([img_part("data:text/plain;base64,aGVsbG8=")]), 400, "invalid_image_format", PART, "text/plain"),
        (chat([img_part("data:image/png,rawbytes")]), 400, "invalid_image_url", None, "base64"),
        (chat([img_part("data:image/png;base64,***notbase64***")]), 400, "invalid_image_url", None, "base64"),
        (chat([img_part(data_url(b"definitely not an image"))]), 400, "invalid_image", PART, "not a readable image"),
        (chat([img_part(data_url(png_bytes(fmt="PCX")))]), 400, "invalid_image_format", None, "PCX"),
        (chat([img_part(data_url(RED[: len(RED) // 2]))]), 400, "invalid_image", PART, "not a readable image"),
        (chat([img_part("https://example.com/cat.png")]), 400, "remote_images_disabled", None, "--allow-remote-images"),
        (chat([img_part("ftp://example.com/cat.png")]), 400, "invalid_image_url", None, ""),
        (chat([img_part("file:///etc/passwd")]), 400, "image_path_not_allowed", None, "outside"),
        (chat([img_part("/etc/../etc/passwd")]), 400, "image_path_not_allowed", None, "outside"),
        (chat([img_part(data_url(png_bytes((300, 300), noise=True)))]), 413, "image_too_large", PART, "bytes"),
        (chat([img_part(data_url(png_bytes((1200, 1000))))]), 413, "image_too_large", PART, "pixels"),
        (chat("yes no " * 1500), 400, "context_length_exceeded", "messages", "max_length"),
        (chat("hi", max_tokens=600), 400, "context_length_exceeded", "messages", "maximum context length"),
    ],
)  # fmt: skip
def test_bad_requests(server, body, status, code, param, says):
    check_error(raw(server, body), status, code, param, says)


def test_symlink_out_of_the_allowed_dir_is_refused(server, images_dir, tmp_path):
    (tmp_path / "secret.png").write_bytes(RED)
    link = images_dir / "link.png"
    link.symlink_to(tmp_path / "secret.png")
    check_error(raw(server, chat([img_part(link.as_uri())])), 400, "image_path_not_allowed")


def test_body_over_the_limit_is_413(server):
    check_error(raw(server, b'{"pad": "' + b"x" * 3_000_000 + b'"}'), 413, "request_too_large")


def test_unknown_route_and_method(server):
    check_error(httpx.get(server.url + "/v1/nothing"), 404)
    check_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_client_disconnect_mid_stream_frees_its_row(server, client):
    before = httpx.get(server.url + "/health").json()
    body = chat("hello", max_tokens=400, temperature=0, stream=True)
    with httpx.Client(timeout=30) as http, http.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if '"content"' in line and '"content": ""' not in line)
    health = wait_idle(server)
    assert health["cancelled"] == before["cancelled"] + 1, health
    assert health["completed"] == before["completed"], health  # stopped, not run to max_tokens
    assert ask(client, "hello", max_tokens=4).choices[0].message.content is not None  # still serving


def test_client_timeout_on_a_plain_request_frees_its_row(server):
    """450 tokens take 0.4 s or more on the tiny model (a CPU with AVX-512); the server looks for a hung-up
    client every 50 ms, so it notices the 0.1 s timeout long before the answer is done."""
    before = httpx.get(server.url + "/health").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions", json=chat("hello", max_tokens=450, temperature=0),
            headers={"Authorization": f"Bearer {API_KEY}"}, timeout=httpx.Timeout(30, read=0.1),
        )  # fmt: skip
    health = wait_idle(server)
    assert health["cancelled"] == before["cancelled"] + 1, health
    assert health["completed"] == before["completed"], health


def wait_idle(server, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        health = httpx.get(server.url + "/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return health
    raise AssertionError(f"server still busy: {health}")


def test_server_survives_garbage(server, client):
    unclosed = b'{"model": "tiny", "messages": [{"role": "user", "content": ' * 50
    junk = [
        b"",
        b"null",
        b"\xff\xfe\x00",
        unclosed,
        b"1" * 10000,
        b'{"messages": "' + b"[" * 100_000 + b'"}',
        b"[" * 100_000,
    ]
    for body in junk:
        assert 400 <= raw(server, body).status_code < 500
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert ask(client, "hello", RED, max_tokens=3).choices[0].message.content is not None


def test_remote_images_only_when_allowed(serve_dir, one_thread, reference):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = RED if self.path == "/red.png" else b"nope"
            self.send_response(200 if self.path == "/red.png" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with start_server(serve_dir, allow_remote_images=True, api_key=None) as live:
            c = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
            messages = image_message("What is in the picture?", base + "/red.png")
            r = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
            assert r.choices[0].message.content == expected(reference, "What is in the picture?", [RED], 10)
            check_error(raw(live, chat([img_part(base + "/missing.png")]), key=None), 400, "image_fetch_failed")
    finally:
        files.shutdown()
