"""Helpers for the server tests: uvicorn on 127.0.0.1 in a background thread, and image payloads."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from PIL import Image

from minillava.serve.app import ServeSettings, create_app
from minillava.serve.cli import load_for_serving

API_KEY = "sk-test-key"
MODEL_NAME = "tiny"


class LiveServer:
    """uvicorn on a random free loopback port, in a daemon thread."""

    def __init__(self, app, shutdown_timeout: float = 2) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def start_server(directory: Path, shutdown_timeout: float = 2, **settings) -> LiveServer:
    model, processor = load_for_serving(str(directory), "float32", "cpu")
    defaults = dict(model_name=MODEL_NAME, api_key=API_KEY, batch_wait_ms=30)
    app = create_app(model, processor, ServeSettings(**{**defaults, **settings}))
    return LiveServer(app, shutdown_timeout)


def png_bytes(size=(40, 30), color=(200, 30, 30), noise: bool = False, fmt: str = "PNG") -> bytes:
    if noise:
        img = Image.frombytes(
            "RGB", size, torch.randint(0, 256, (size[0] * size[1] * 3,), dtype=torch.uint8).numpy().tobytes()
        )
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def ask(client, text: str, *images: bytes, **kw):
    """One chat completion through the openai client: the images as data URLs before the text, greedy."""
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(model=MODEL_NAME, messages=image_message(text, *map(data_url, images)), **kw)
