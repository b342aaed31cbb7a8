"""The Starlette application of `moejax serve` over a ServingLoop, and the uvicorn server that runs it.

Endpoints: POST /v1/completions and /v1/chat/completions (whole answers, or `stream: true` as server-sent
events of OpenAI's chunks ending with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus).
Errors are OpenAI error objects: 400 for a bad request (`param` names the field), 429 with Retry-After when
the queue is full, 503 while shutting down, 500 when the engine fails a request (in a stream: an error
chunk); the server keeps serving. A client that disconnects has its request cancelled (its slot freed).
The engine thread hands each Output to the event loop (`call_soon_threadsafe`); nothing here blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moejax.errors import MoejaxError, ParameterError
from moejax.serving.http import api
from moejax.serving.http.chat import ChatTemplate, checked_messages
from moejax.serving.http.metrics import CONTENT_TYPE, ServerMetrics
from moejax.serving.requests import Output, QueueFull, Request, RequestRefused, ShuttingDown

# HTTP status of a refusal -> its outcome in the requests metric.
REFUSAL_OUTCOMES = {400: "refused", 429: "queue_full", 503: "shutting_down"}


# The answers' system_fingerprint (OpenAI: the backend configuration) when the routing is approximate.
APPROXIMATE_FINGERPRINT = "moejax-approximate-routing-predicted"


def log_to_stderr(line: str) -> None:
    print(f"moejax: {line}", file=sys.stderr, flush=True)


def build_app(loop, tokenizer, model: str, *, context: int, chat_template: ChatTemplate | None = None,
              log: Callable[[str], None] = log_to_stderr) -> Starlette:
    """The application serving `loop` (a ServingLoop, not started: the application starts it, and at shutdown
    drains it) as `model`. tokenizer: the engine's (None: token id prompts only); context: positions of a
    sequence, prompt and new tokens (the engine's max_seq_len); chat_template: default the plain one;
    log: takes one line per request."""
    frontend = _Frontend(loop, tokenizer, model, context, chat_template or ChatTemplate(tokenizer), log)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.shutdown, drain=True)

    routes = [
        Route("/v1/completions", frontend.completions, methods=["POST"]),
        Route("/v1/chat/completions", frontend.chat, methods=["POST"]),
        Route("/v1/models", frontend.models),
        Route("/health", frontend.health),
        Route("/metrics", frontend.metrics_text),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.loop = loop
    return app


class _Frontend:
    def __init__(self, loop, tokenizer, model: str, context: int, chat_template: ChatTemplate, log):
        self.loop, self.tokenizer, self.model, self.context = loop, tokenizer, model, context
        self.chat_template, self.log = chat_template, log
        self.metrics = ServerMetrics(loop)
        self.created = int(time.time())

    async def completions(self, http_request):
        return await self._answer(http_request, chat=False)

    async def chat(self, http_request):
        return await self._answer(http_request, chat=True)

    async def models(self, http_request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "moejax"}]})

    async def health(self, http_request):
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, http_request):
        return Response(await asyncio.to_thread(self.metrics.text), media_type=CONTENT_TYPE)  # the loop's lock

    async def _answer(self, http_request, chat: bool):
        endpoint = http_request.url.path
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            body = api.parse_body(await http_request.body())
            if chat:
                api.check_model(body, self.model)
                prompt_ids = self.chat_template.prompt_ids(checked_messages(body.get("messages")))
                asked = api.chat_request(body, prompt_ids, model=self.model, context=self.context, request_id=request_id)
            else:
                asked = api.completion_request(body, model=self.model, tokenizer=self.tokenizer, context=self.context,
                                               request_id=request_id)
            handle, outputs = await self._submit(asked, endpoint)
        except api.ApiError as err:
            self.metrics.requests.labels(REFUSAL_OUTCOMES.get(err.status, "refused")).inc()
            self.log(f"{request_id} {endpoint}: {err.status}" + (f" ({err.param})" if err.param else "") + f": {err.message}")
            return JSONResponse(err.body(), err.status, headers=err.headers)
        reply = api.Reply(chat, request_id, self.model, APPROXIMATE_FINGERPRINT if self.loop.approximate_routing else None)
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handle))
        if asked.stream:
            return StreamingResponse(self._events(reply, asked, handle, outputs, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(reply, handle, outputs, watcher)

    async def _submit(self, asked: api.Asked, endpoint: str):
        """Submits the request -> (its handle, an asyncio queue of its Outputs); raises ApiError for refusals. The
        submission runs in a worker thread: with `--scheduler slo --predictor` it predicts the prompt's experts."""
        aio = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def received(output: Output) -> None:  # in the event loop
            if output.finish_reason is not None:
                self.metrics.finished(output)
                self._log_finished(asked.request, endpoint, output)
            outputs.put_nowait(output)

        def on_output(output: Output) -> None:  # in the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening any more
                aio.call_soon_threadsafe(received, output)

        try:
            return await asyncio.to_thread(self.loop.submit, asked.request, on_output), outputs
        except RequestRefused as err:
            raise api.bad_field(api.api_field(err.field, asked.fields), str(err)) from None
        except ParameterError as err:  # a Request value the loop checks
            raise api.bad_field(api.api_field(err.parameters[0], asked.fields), err.render(asked.fields)) from None
        except QueueFull as err:
            raise api.ApiError(429, str(err), code="queue_full", kind="rate_limit_error",
                               headers={"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}) from None
        except ShuttingDown as err:
            raise api.ApiError(503, str(err), code="shutting_down", kind="server_error") from None

    def _log_finished(self, request: Request, endpoint: str, output: Output) -> None:
        ttft = "-" if output.ttft_s is None else f"{output.ttft_s * 1e3:.1f} ms"
        self.log(f"{request.id} {endpoint}: {output.prompt_tokens} prompt + {output.completion_tokens} new tokens, "
                 f"ttft {ttft}, {output.finish_reason}" + (f": {output.error}" if output.error else ""))

    async def _whole(self, reply: api.Reply, handle, outputs: asyncio.Queue, watcher: asyncio.Task):
        pieces, output = [], None
        try:
            while output is None or output.finish_reason is None:
                output = await outputs.get()
                pieces.append(output.text or "")
        finally:
            watcher.cancel()
            if output is None or output.finish_reason is None:
                handle.cancel()
        if output.finish_reason in FAILURES:
            err = _failure(output)
            return JSONResponse(err.body(), err.status, headers=err.headers)
        return JSONResponse(reply.whole("".join(pieces), output.finish_reason,
                                        api.usage(output.prompt_tokens, output.completion_tokens)))

    async def _events(self, reply: api.Reply, asked: api.Asked, handle, outputs: asyncio.Queue, watcher: asyncio.Task):
        """The server-sent events of a stream."""
        done = False
        try:
            opening = reply.opening()
            if opening is not None:
                yield _event(opening)
            while not done:
                output = await outputs.get()
                done = output.finish_reason is not None
                if output.finish_reason in FAILURES:
                    yield _event(_failure(output).body())
                    break
                if output.text:
                    yield _event(reply.chunk(output.text))
                if done:
                    yield _event(reply.chunk(None, output.finish_reason))
                    if asked.include_usage:
                        yield _event(reply.usage_chunk(api.usage(output.prompt_tokens, output.completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not done:
                handle.cancel()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


FAILURES = ("error", "expired")  # finish reasons answered with an error object instead of a completion


def _failure(output: Output) -> api.ApiError:
    """The error object of a request that ended in one of FAILURES: the engine failed on it (500), or the `slo`
    scheduler refused it while it was queued, its TTFT objective passed (429: the server is overloaded)."""
    if output.finish_reason == "expired":
        return api.ApiError(429, output.error, code="slo_expired", kind="rate_limit_error",
                            headers={"Retry-After": "1"})
    return api.ApiError(500, f"the engine failed on this request: {output.error}", code="engine_error", kind="server_error")


async def _cancel_on_disconnect(http_request, handle) -> None:
    """Cancels the request when its client goes away (the body is read: the next message is the disconnect)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _http_error(http_request, exc: HTTPException):
    """Starlette's own errors (404, 405) as OpenAI error objects."""
    err = api.ApiError(exc.status_code, f"{http_request.method} {http_request.url.path}: {exc.detail}")
    return JSONResponse(err.body(), exc.status_code, headers=exc.headers)


async def _internal_error(http_request, exc: Exception):
    """A bug of the server as an OpenAI error object (uvicorn logs the traceback)."""
    err = api.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
    return JSONResponse(err.body(), 500)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free port); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def uvicorn_server(app: Starlette) -> uvicorn.Server:
    """A uvicorn server for `app` that, told to exit, waits for every request in flight however long it takes."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                         timeout_graceful_shutdown=None))


def run(app: Starlette, sock: socket.socket) -> None:
    """Serves `app` on `sock` until SIGINT or SIGTERM; then it takes no new connection, lets every request in
    flight finish, drains the loop (the application's shutdown) and returns."""
    server = uvicorn_server(app)
    # uvicorn handles both signals while it runs and raises the one it got again once it is done; by then
    # the shutdown is complete, so that signal is dropped.
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if server.force_exit:  # a second Ctrl-C skips the application's shutdown: cancel what is left
            app.state.loop.shutdown(drain=False)
    if not server.started:
        raise MoejaxError("the server did not start (see the error above)")
