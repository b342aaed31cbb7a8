"""An OpenAI-compatible HTTP front end over the serving loop (`moejax serve`).

`api` turns OpenAI request bodies into `Request`s and builds OpenAI-shaped responses and errors;
`chat` renders chat messages into a prompt; `metrics` keeps the Prometheus metrics; `app` is the
Starlette application and the uvicorn server. They need the `serve` extra (`pip install 'moejax[serve]'`):
`require_serve_extra()` says which of its packages is missing before anything imports them.
"""

from __future__ import annotations

import importlib

from moejax.errors import MoejaxError

SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client", "jinja2")


def require_serve_extra() -> None:
    """Raises MoejaxError naming the missing packages of the `serve` extra, if any."""
    missing = []
    for name in SERVE_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MoejaxError(f"serving over HTTP needs {', '.join(missing)}: pip install 'moejax[serve]'")
