"""Serving: an OpenAI-compatible API with batched generation and a web chat page (`minillava serve`).

FastAPI and uvicorn are optional dependencies (`pip install 'minillava[serve]'`), imported only when
the app is built, so `minillava --help` works without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from minillava.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
