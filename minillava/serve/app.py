"""An OpenAI-compatible HTTP API for a minillava model: `/v1/chat/completions`, `/v1/models`, `/health`, `/`.

Everything a client sends is checked here, at the edge, before it reaches the batcher: the JSON body
(pydantic, strict types), every image (source allowed? bytes and pixels under the limits? a format we
decode? actually decodable?), and the prompt length against the context. Failures are OpenAI-style
error bodies `{"error": {"message", "type", "param", "code"}}`; nothing a request sends can stop the
server from serving the next one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillava.generate import Generator
from minillava.images import ImageError, load_image
from minillava.model import MiniLlava
from minillava.processor import Encoded, Processor
from minillava.serve.batching import BatchEngine, ContinuousEngine, Finished, Job, QueueFull, TokenLogprob

log = logging.getLogger("minillava.serve")

# Formats Pillow decodes in-process. Others it knows (EPS via Ghostscript, ...) are refused on purpose.
IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF"}


@dataclass
class ServeSettings:
    model_name: str = "minillava"
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    api_key: str | None = None
    allow_local_images: str | Path | None = None  # a directory; file paths outside it are refused
    allow_remote_images: bool = False  # http(s) image URLs fetched by the server
    max_images: int = 4  # per request
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int | None = None  # None: the processor's max_pixels
    default_max_tokens: int = 512  # when the request names none (still capped by the context)
    remote_timeout_s: float = 10.0
    # characters of text per request, checked before tokenizing; None: 32 per token of context (no real
    # tokenizer averages that many, so only prompts that could never fit are refused without tokenizing)
    max_text_chars: int | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: same-origin only (the page at / needs none)
    # "continuous": requests join the running batch at the next decode step; "static": a batch runs to its end
    batching: Literal["continuous", "static"] = "continuous"
    # continuous: newcomers' prompts are prefilled this many tokens at a time, the running batch decoding one
    # token between chunks, so a long prompt does not stall everyone's next token; 0: a prompt at once
    prefill_chunk: int = 256


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# `<_io.BytesIO object at 0x7f...>` and the like, from exception messages: internals, not for clients
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    message = _OBJECT_REPR.sub("the data", message)
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request schema ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]  # null (an assistant's tool call) is refused: there are no tools
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    # unknown top-level fields are refused (a field we do not know is a field we would silently drop)
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's limits; needs logprobs: true
    # identifiers with no effect on the answer, accepted like `user`
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Strict):
    """`/v1/completions`: a verbatim text prompt (no chat template, no images)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy form: how many alternatives (OpenAI: up to 5)


def _is_neutral(value: Any, *allowed: Any) -> bool:
    """A field sent with its no-op value (null, false, 0, empty) or one of `allowed`: nothing to honour."""
    return value is None or value is False or value == 0 or value == {} or value == [] or value in allowed


# Known OpenAI fields this server does not honour: refused with 400 unless sent with a no-op value, so a
# client never gets an answer that silently ignored what it asked for. field -> (no-op values, why)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((), "tool calling is not supported"),
    "tool_choice": (("none",), "tool calling is not supported"),
    "functions": ((), "function calling is not supported"),
    "function_call": (("none",), "function calling is not supported"),
    "parallel_tool_calls": ((), "tool calling is not supported"),
    "response_format": (({"type": "text"},), 'only {"type": "text"} is supported (no JSON mode)'),
    "logit_bias": ((), "logit_bias is not supported"),
    "frequency_penalty": ((), "frequency_penalty is not supported (only 0)"),
    "presence_penalty": ((), "presence_penalty is not supported (only 0)"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported"),
    "verbosity": ((), "verbosity is not supported"),
    "web_search_options": ((), "web search is not supported"),
    "store": ((), "stored completions are not supported"),
    "metadata": ((), "metadata is only for stored completions, which are not supported"),
    "service_tier": (("auto", "default"), "service tiers are not supported"),
    # /v1/completions only
    "echo": ((), "echo is not supported"),
    "suffix": (("",), "suffix (insertion) is not supported"),
    "best_of": ((1,), "best_of is not supported (only 1)"),
}


def refuse_unsupported(data: dict) -> None:
    for name, (allowed, why) in UNSUPPORTED.items():
        if name in data and not _is_neutral(data[name], *allowed):
            raise ApiError(400, f"{name}: {why}", name, "unsupported_parameter")


# ---- images -----------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.DOTALL)


class ImageFetcher:
    """An image URL -> bytes, under the server's policy and byte limit."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.local_root = Path(settings.allow_local_images).resolve() if settings.allow_local_images else None

    def fetch(self, url: str, param: str) -> bytes:
        if url.startswith("data:"):
            return self._data_url(url, param)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.settings.allow_remote_images:
                raise ApiError(
                    400, f"{param}: http(s) image URLs are disabled on this server; send the image as a base64 data: "
                    "URL (or start the server with --allow-remote-images)", param, "remote_images_disabled",
                )  # fmt: skip
            return self._remote(url, param)
        if scheme == "file" or url.startswith("/"):
            return self._local(url, param)
        raise ApiError(400, f"{param}: unsupported image URL (use a base64 data: URL)", param, "invalid_image_url")

    def _too_big(self, size: int, param: str) -> ApiError:
        limit = self.settings.max_image_bytes
        return ApiError(
            413, f"{param}: image is {size} bytes, over the limit of {limit} bytes", param, "image_too_large"
        )

    def _data_url(self, url: str, param: str) -> bytes:
        m = _DATA_URL.match(url)
        if not m:
            raise ApiError(400, f"{param}: malformed data: URL", param, "invalid_image_url")
        mime = m["mime"].strip().lower()
        if mime and not mime.startswith("image/"):
            raise ApiError(
                400, f"{param}: data: URL has media type {mime!r}, not an image", param, "invalid_image_format"
            )
        if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
            raise ApiError(400, f"{param}: data: URL must be base64-encoded (;base64,)", param, "invalid_image_url")
        payload = url[m.end() :]
        if len(payload) * 3 // 4 > self.settings.max_image_bytes + 3:
            raise self._too_big(len(payload) * 3 // 4, param)
        payload = re.sub(r"\s+", "", payload)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{param}: invalid base64 in data: URL ({e})", param, "invalid_image_url") from None
        if len(data) > self.settings.max_image_bytes:
            raise self._too_big(len(data), param)
        return data

    def _local(self, url: str, param: str) -> bytes:
        if self.local_root is None:
            raise ApiError(
                400, f"{param}: local image paths are disabled on this server (start it with --allow-local-images "
                "DIR)", param, "local_images_disabled",
            )  # fmt: skip
        raw = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
        try:
            path = Path(raw).resolve()
        except (OSError, RuntimeError, ValueError):
            raise ApiError(400, f"{param}: invalid file path", param, "invalid_image_url") from None
        if not path.is_relative_to(self.local_root):
            raise ApiError(
                400, f"{param}: {raw} is outside the allowed image directory", param, "image_path_not_allowed"
            )
        try:
            size = path.stat().st_size
            if size > self.settings.max_image_bytes:
                raise self._too_big(size, param)
            return path.read_bytes()
        except OSError as e:
            raise ApiError(400, f"{param}: cannot read {raw}: {e.strerror or e}", param, "invalid_image_url") from None

    def _remote(self, url: str, param: str) -> bytes:
        limit = self.settings.max_image_bytes
        req = urllib.request.Request(url, headers={"User-Agent": "minillava-serve"})
        try:
            with _HTTP_ONLY.open(req, timeout=self.settings.remote_timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limit:
                    raise self._too_big(int(length), param)
                data = resp.read(limit + 1)
        except ApiError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ApiError(400, f"{param}: cannot fetch image: {reason}", param, "image_fetch_failed") from None
        if len(data) > limit:
            raise self._too_big(len(data), param)
        return data


class _HTTPRedirectsOnly(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# No ftp:, file: or data: handlers, and redirects only to http(s).
_HTTP_ONLY = urllib.request.OpenerDirector()
for _handler in (
    urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HTTPRedirectsOnly(),
    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler(),
):  # fmt: skip
    _HTTP_ONLY.add_handler(_handler)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB PIL image; 413 over the pixel limit, 400 for anything unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            fmt, (w, h) = probe.format, probe.size
    except Image.DecompressionBombError as e:  # a header size over Pillow's own limit: too large, not corrupt
        raise _bomb(param, e) from None
    except Exception as e:
        if _BOMB_WORDS.search(str(e)):  # e.g. a PNG text chunk that inflates past Pillow's limit
            raise _bomb(param, e) from None
        raise ApiError(
            400, f"{param}: not a readable image ({type(e).__name__}: {e})", param, "invalid_image"
        ) from None
    if fmt not in IMAGE_FORMATS:
        raise ApiError(
            400, f"{param}: unsupported image format {fmt}; use one of {', '.join(sorted(IMAGE_FORMATS))}",
            param, "invalid_image_format",
        )  # fmt: skip
    if w * h > max_pixels:
        raise ApiError(
            413, f"{param}: image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", param,
            "image_too_large",
        )  # fmt: skip
    try:
        return load_image(data, name=param, max_pixels=max_pixels)
    except Image.DecompressionBombError as e:
        raise _bomb(param, e) from None
    except ImageError as e:
        if _BOMB_WORDS.search(str(e)):  # e.g. a PNG text chunk that inflates past Pillow's limit
            raise _bomb(param, e) from None
        raise ApiError(400, str(e), param, "invalid_image") from None
    except Exception as e:  # a decoder bug must not become a 500
        raise ApiError(
            400, f"{param}: not a readable image ({type(e).__name__}: {e})", param, "invalid_image"
        ) from None


# Pillow's words for data that decompresses past its limits (DecompressionBombError, PNG's MAX_TEXT_CHUNK, ...)
_BOMB_WORDS = re.compile(r"decompression bomb|decompressed data too large", re.IGNORECASE)


def _bomb(param: str, e: Exception) -> ApiError:
    return ApiError(413, f"{param}: image decompresses past the server's limits ({e})", param, "image_too_large")


# ---- the app ----------------------------------------------------------------------------------------
class ChatService:
    """The work behind one completion request, minus HTTP."""

    def __init__(self, model: MiniLlava, processor: Processor, settings: ServeSettings) -> None:
        self.settings = settings
        self.processor = processor
        self.model = model
        limit = settings.max_image_pixels or processor.max_pixels
        processor.max_pixels = max(processor.max_pixels, limit)  # its own check must not be stricter
        self.max_pixels = limit
        positions = getattr(getattr(model.llm, "config", None), "max_position_embeddings", None)
        self.context = min(processor.max_length, positions) if positions else processor.max_length
        generator = Generator(model, processor)
        batching = (generator, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.max_queue)
        if settings.batching == "continuous" and ContinuousEngine.supports(generator):
            self.engine: BatchEngine = ContinuousEngine(*batching, prefill_chunk=settings.prefill_chunk)
        else:
            if settings.batching == "continuous":
                log.info("continuous batching needs a torch model (fusion splice, full-attention layers): static "
                         "batches")  # fmt: skip
            self.engine = BatchEngine(*batching)
        self.fetcher = ImageFetcher(settings)
        self.max_text = settings.max_text_chars or 32 * self.context
        self.max_body = settings.max_images * (settings.max_image_bytes * 4 // 3 + 1024) + 2**20 + 4 * self.max_text

    def check_text_length(self, texts: list[str]) -> None:
        """Refuse long text before tokenizing: a huge prompt must not hold the tokenizer (and its lock)."""
        chars = sum(len(t) for t in texts)
        if chars > self.max_text:
            raise ApiError(
                413, f"the request has {chars} characters of text, over the limit of {self.max_text}",
                "messages", "text_too_long",
            )  # fmt: skip

    def to_messages(self, req: ChatRequest) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
        """OpenAI messages -> minillava messages with `<image>` markers, and the image URLs in order."""
        token = self.processor.image_token
        messages: list[dict[str, str]] = []
        images: list[tuple[str, str]] = []
        parts = [p for m in req.messages for p in _parts(m)]
        self.check_text_length([p if isinstance(p, str) else p.text for p in parts if not isinstance(p, ImagePart)])
        for i, m in enumerate(req.messages):
            parts = _parts(m)
            pieces = []
            for j, part in enumerate(parts):
                param = f"messages[{i}].content" if isinstance(part, str) else f"messages[{i}].content[{j}]"
                if isinstance(part, ImagePart):
                    if m.role != "user":
                        raise ApiError(
                            400, f"{param}: images are only accepted in user messages", param, "invalid_value"
                        )
                    images.append((part.image_url.url, param))
                    pieces.append(token)
                    continue
                text = part if isinstance(part, str) else part.text
                if token in text:
                    raise ApiError(
                        400, f"{param}: text may not contain the image token {token!r}; send images as image_url parts",
                        param, "invalid_value",
                    )  # fmt: skip
                pieces.append(text)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": "\n".join(pieces)})
        if len(images) > self.settings.max_images:
            raise ApiError(
                400, f"{len(images)} images in this request, over the limit of {self.settings.max_images}",
                "messages", "too_many_images",
            )  # fmt: skip
        return messages, images

    def check_common(self, req: ChatRequest | CompletionRequest) -> list[str]:
        """Checks both endpoints share; the stop strings."""
        if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs to be true", "top_logprobs", "invalid_value")
        if req.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", "n", "invalid_value")
        if req.model != self.settings.model_name:
            raise ApiError(
                404, f"The model `{req.model}` does not exist; this server serves `{self.settings.model_name}`",
                "model", "model_not_found",
            )  # fmt: skip
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences", "stop", "invalid_value")
        return stops

    def prepare(self, req: ChatRequest) -> Job:
        """Everything that may fail on the request's account, run in a worker thread (images are slow)."""
        stops = self.check_common(req)
        messages, refs = self.to_messages(req)
        images = [decode_image(self.fetcher.fetch(url, param), param, self.max_pixels) for url, param in refs]
        try:
            return self.job(req, lambda: self.engine.encode(messages, images), stops)
        finally:
            for image in images:  # their pixels now live in the prompt's tensor; free the decoded copies now
                image.close()

    def prepare_completion(self, req: CompletionRequest) -> Job:
        stops = self.check_common(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request is supported", "prompt", "invalid_value")
        self.check_text_length(prompts)
        if self.processor.image_token in prompts[0]:
            raise ApiError(
                400, f"prompt: may not contain the image token {self.processor.image_token!r} (/v1/completions is "
                "text-only; send images to /v1/chat/completions)", "prompt", "invalid_value",
            )  # fmt: skip
        return self.job(req, lambda: self.engine.encode_text(prompts[0]), stops, "prompt")

    def job(
        self, req: ChatRequest | CompletionRequest, encode: Callable[[], Encoded], stops: list[str],
        param: str = "messages",
    ) -> Job:  # fmt: skip
        """Encode the prompt, check it against the context -> a job for the batcher."""
        try:
            encoded = encode()
        except ImageError as e:
            raise ApiError(400, str(e), "messages", "invalid_image") from None
        except Exception as e:  # ValueError from the processor; jinja2 errors from a chat template's checks
            if not isinstance(e, ValueError) and not type(e).__module__.startswith("jinja2"):
                raise
            code = "context_length_exceeded" if "max_length" in str(e) else "invalid_value"
            raise ApiError(400, f"cannot build the prompt: {e}", param, code) from None
        prompt = len(encoded.input_ids)
        room = self.context - prompt
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{prompt + (asked or 1)} tokens ({prompt} in the {param}, {asked or 1} in the completion).",
                param, "context_length_exceeded",
            )  # fmt: skip
        return Job(
            encoded,
            max_tokens=asked or min(self.settings.default_max_tokens, room),
            # below 1e-5, 1/temperature overflows float32 logits: treat it as the greedy limit it is
            temperature=1.0 if req.temperature is None else req.temperature if req.temperature >= 1e-5 else 0.0,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=stops,
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=_logprobs_asked(req),
        )


def _logprobs_asked(req: ChatRequest | CompletionRequest) -> int | None:
    """None: no logprobs; n: each token's logprob and its n most likely alternatives."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


# a logprob JSON can carry: OpenAI's floor for "never" (a token at -inf, such as the image slot)
_LOGPROB_FLOOR = -9999.0


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """`choices[].logprobs` of /v1/chat/completions."""

    def one(token: str, data: list[int] | None, logprob: float) -> dict:
        return {"token": token, "logprob": max(logprob, _LOGPROB_FLOOR), "bytes": data}

    return {
        "content": [{**one(t.token, t.bytes, t.logprob), "top_logprobs": [one(*alt) for alt in t.top]} for t in tokens],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict:
    """`choices[].logprobs` of /v1/completions (legacy): `top_logprobs` holds the asked-for alternatives and,
    as OpenAI's does, the chosen token; `text_offset` counts characters of the token strings from `offset`."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [max(t.logprob, _LOGPROB_FLOOR) for t in tokens],
        "top_logprobs": [
            {**{tok: max(lp, _LOGPROB_FLOOR) for tok, _, lp in t.top}, t.token: max(t.logprob, _LOGPROB_FLOOR)}
            for t in tokens
        ],
        "text_offset": offsets,
    }


def _parts(m: ChatMessage) -> list[str | TextPart | ImagePart]:
    return [m.content] if isinstance(m.content, str) else list(m.content)


def parse_request(data: Any, schema: type[BaseModel] = ChatRequest) -> Any:
    """A JSON body -> `schema`, or a 400 naming the field, in OpenAI's `param` style (`messages[0].content`)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_value")
    refuse_unsupported(data)
    data = {k: v for k, v in data.items() if k not in UNSUPPORTED}  # what is left of them are no-ops
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "list": "a list"}


def validation_error(e: ValidationError) -> ApiError:
    """The most specific of pydantic's errors, without its union-branch names (`str`, `list[...]`)."""
    found = [(_param_of(err["loc"]), err) for err in e.errors()]
    param, err = max(found, key=lambda f: len(f[0]))  # the deepest is the most specific
    branches = [_branch_of(x["loc"]) for p, x in found if p == param]
    if err["type"] == "extra_forbidden":
        message = f"{param}: unknown field (not an OpenAI parameter this server knows)"
    elif err.get("input", ...) is None and err["type"].endswith("_type"):
        message = f"{param}: must not be null"
    elif len(branches) > 1 and all(branches):  # every branch of a union failed at the same place
        message = f"{param}: must be {' or '.join(_TYPE_WORDS.get(b, b) for b in branches)}"
    else:
        message = f"{param}: {err['msg']}" if param else err["msg"]
    return ApiError(400, message, param or None, "invalid_value")


def _param_of(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[tagged-union[...]]', 0, 'text', 'text') -> 'messages[0].content[0].text'."""
    out, tag_next = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "tagged-union[" in part:
            tag_next = True  # after its index comes the tag value (the part's "type"), not a field
        elif tag_next and out.endswith("]"):
            tag_next = False
        elif part.isidentifier() and part not in _TYPE_WORDS:
            out += f".{part}" if out else part
    return out


def _branch_of(loc: tuple) -> str | None:
    """The union branch a pydantic error belongs to, as a plain type word: 'str', 'list', ..."""
    for part in reversed(loc):
        if isinstance(part, str) and (part in _TYPE_WORDS or not part.isidentifier()):
            return part.split("[", 1)[0]
    return None


def create_app(model: MiniLlava, processor: Processor, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    service = ChatService(model, processor, settings)
    engine = service.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="minillava", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.engine = engine
    if settings.allowed_origins:  # without it, browsers allow same-origin calls only (the page at / is one)
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        )  # fmt: skip
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}  # a full queue drains in about a batch's time
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), 500)

    def check_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            message = "Missing API key" if not header else "Incorrect API key provided"
            raise ApiError(401, message, None, "invalid_api_key")

    async def read_json(request: Request) -> Any:
        # Only application/json: a cross-site form or text/plain POST (which a browser sends without a CORS
        # preflight) must not reach the model, even on a server with no key.
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415, f"Content-Type must be application/json, not {media or 'missing'}", None, "unsupported_media_type"
            )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > service.max_body:
            raise ApiError(413, f"request body over the limit of {service.max_body} bytes", None, "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > service.max_body:
                raise ApiError(
                    413, f"request body over the limit of {service.max_body} bytes", None, "request_too_large"
                )
        return bytes(body)

    def parse_json(body: bytes, schema: type[BaseModel]) -> Any:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        return parse_request(data, schema)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("minillava.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {
            "status": "ok" if ok else "error", "model": settings.model_name, "queued": engine.queued,
            "running": engine.running, "max_batch_size": engine.max_batch_size,
            "batching": "continuous" if isinstance(engine, ContinuousEngine) else "static", **engine.stats,
            "batch_sizes": {str(k): v for k, v in sorted(engine.batch_sizes.items())},
        }  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.exposition(engine), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "minillava"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request)
        if model_id != settings.model_name:
            raise ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return model_card()

    async def accept(request: Request, schema: type[BaseModel], prepare: Callable[[Any], Job]) -> Job:
        """Check, parse and prepare a request off the event loop, then queue its job."""
        check_key(request)
        body = await read_json(request)
        engine.expect()  # a batch forming now may wait for this request's validation
        try:
            job = await run_in_threadpool(lambda: prepare(parse_json(body, schema)))
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(
                503, f"the server is overloaded ({e}); retry later", None, "overloaded", "server_error"
            ) from None
        finally:
            engine.expected()
        return job

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = await accept(request, ChatRequest, service.prepare)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            return stream_response(job, rid, now, request, chat=True)
        result = await wait_for_result(job, request)
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
            "system_fingerprint": None,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "logprobs": None if result.logprobs is None else chat_logprobs(result.logprobs),
                "finish_reason": result.finish_reason,
            }],
            "usage": usage_of(result),
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        job = await accept(request, CompletionRequest, service.prepare_completion)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if job.stream:
            return stream_response(job, rid, now, request, chat=False)
        result = await wait_for_result(job, request)
        return {
            "id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
            "system_fingerprint": None,
            "choices": [{
                "index": 0, "text": result.text,
                "logprobs": None if result.logprobs is None else completion_logprobs(result.logprobs),
                "finish_reason": result.finish_reason,
            }],
            "usage": usage_of(result),
        }  # fmt: skip

    async def wait_for_result(job: Job, request: Request) -> Finished:
        """The job's result; a client that hangs up meanwhile cancels it."""
        events = job.events()
        nxt = asyncio.ensure_future(anext(events))
        try:
            while True:
                # a hung-up client's batch row is freed within 50 ms (a check is a look at the socket)
                done, _ = await asyncio.wait({nxt}, timeout=0.05)
                if not done:
                    if await request.is_disconnected():
                        job.cancel()
                        raise ApiError(499, "client closed the request", None, "client_closed_request")
                    continue
                kind, value = nxt.result()
                if kind == "done":
                    return value  # type: ignore[return-value]
                if kind == "error":
                    raise ApiError(500, str(value), None, "generation_failed", "server_error")
                nxt = asyncio.ensure_future(anext(events))
        finally:
            job.cancel()  # no-op once finished
            if not nxt.done():
                nxt.cancel()

    def stream_response(job: Job, rid: str, now: int, request: Request, chat: bool) -> StreamingResponse:
        return StreamingResponse(
            sse(job, rid, now, chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def sse(job: Job, rid: str, now: int, chat: bool):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        offset = 0  # legacy logprobs: where the next token starts in the streamed text

        def chunk(text: str | None, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            nonlocal offset, pending
            logprobs = None
            if job.logprobs is not None and (pending or text):  # this chunk's tokens (the text's, or the last)
                logprobs = chat_logprobs(pending) if chat else completion_logprobs(pending, offset)
                offset += sum(len(t.token) for t in pending)
                pending = []
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body: dict[str, Any] = {
                "id": rid, "object": kind_name, "created": now, "model": settings.model_name,
                "system_fingerprint": None, "choices": [choice] if choices else [],
            }  # fmt: skip
            if job.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        pending: list[TokenLogprob] = []  # logprobs of the tokens of the next text delta
        try:
            if chat:
                first = json.loads(chunk("")[6:])
                first["choices"][0]["delta"]["role"] = "assistant"
                yield f"data: {json.dumps(first)}\n\n"
            async for kind, value in job.events():
                if kind == "logprobs":
                    pending += value  # type: ignore[arg-type]
                elif kind == "delta":
                    yield chunk(value)  # type: ignore[arg-type]
                elif kind == "done":
                    yield chunk(None, value.finish_reason)  # type: ignore[union-attr]
                    if job.include_usage:
                        yield chunk(None, usage=usage_of(value), choices=False)  # type: ignore[arg-type]
                else:
                    err = error_body(str(value), "server_error", None, "generation_failed")
                    yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client hung up (or we are done): its row stops being generated

    return app


def usage_of(result: Finished) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
