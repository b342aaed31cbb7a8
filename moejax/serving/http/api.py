"""OpenAI's completion and chat completion request bodies -> a `Request`; OpenAI-shaped answers and errors.

Fields read: model (must name the served model), prompt (a string or a list of token ids; one prompt per
request) or messages, max_tokens (chat: max_completion_tokens first; default 16 for completions, the rest
of the context for chat), temperature (0: greedy; default 1, as OpenAI's), top_p, seed (default: a random
one), stop (a string or a list of at most 4), n (1 only), stream, stream_options.include_usage; `user` is
ignored. Extensions: top_k (0: off), ignore_eos, task (the request's task label, for the trace prefetcher
and the `slo` scheduler) and slo ({"ttft_s": s, "tpot_s": s}). Fields that would change the answer in a
way this server does not do (logprobs, echo, penalties, tools, ...) are refused unless they hold their
neutral value, so no answer silently ignores what was asked. Other fields are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time

from moejax.engine.slots import SamplingParams
from moejax.errors import ParameterError, is_integer
from moejax.serving.requests import SLO, Request

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
# Fields refused unless they hold one of these values.
NEUTRAL_VALUES = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answer: HTTP `status`, a message, the request field at fault (`param`) and OpenAI's error
    type and code; `headers` go with it (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class Asked:
    """A checked request: what to submit, and how to answer."""

    request: Request
    stream: bool
    include_usage: bool  # a stream ends with a chunk holding the usage
    fields: dict  # Request parameter -> the request field that set it, where they differ (prompt, max_tokens)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def completion_request(body: dict, *, model: str, tokenizer, context: int, request_id: str) -> Asked:
    """A /v1/completions body -> Asked; raises ApiError. context: positions of a sequence (prompt + new tokens)."""
    _check_common(body, model)
    prompt_ids = _prompt_ids(body.get("prompt"), tokenizer)
    return _asked(body, prompt_ids, "prompt", "max_tokens", DEFAULT_COMPLETION_TOKENS, context, request_id)


def chat_request(body: dict, prompt_ids: list[int], *, model: str, context: int, request_id: str) -> Asked:
    """A /v1/chat/completions body whose messages made `prompt_ids` -> Asked; raises ApiError."""
    _check_common(body, model)
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _asked(body, prompt_ids, "messages", max_field, None, context, request_id)


def check_model(body: dict, model: str) -> None:
    name = body.get("model")
    if not isinstance(name, str):
        raise bad_field("model", f"model is required: this server serves {model!r}", code="missing")
    if name != model:
        raise bad_field("model", f"model {name!r} is not served here; this server serves {model!r}", code="model_not_found")


def _check_common(body: dict, model: str) -> None:
    check_model(body, model)
    if body.get("n") not in (None, 1):
        raise bad_field("n", f"n must be 1: this server makes one choice per request (got {body['n']!r})", code="unsupported")
    for name, neutral in NEUTRAL_VALUES.items():
        if body.get(name) not in neutral:
            raise bad_field(name, f"{name} is not supported by this server (got {body[name]!r})", code="unsupported")


def _prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_field("prompt", "this model has no tokenizer: give the prompt as a list of token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(is_integer(t) for t in prompt):
        ids = prompt
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_field("prompt", f"this server takes one prompt per request, not {len(prompt)}: send each in its own "
                        "request", code="unsupported")
    else:
        raise bad_field("prompt", "prompt is required: a string or a list of token ids")
    if not ids:
        raise bad_field("prompt", "prompt is empty")
    return ids


def _asked(body: dict, prompt_ids: list[int], prompt_field: str, max_field: str, default_max: int | None,
           context: int, request_id: str) -> Asked:
    room = context - len(prompt_ids)
    if room < 1:
        raise bad_field(prompt_field, f"the prompt has {len(prompt_ids)} tokens but the context holds {context}, one "
                        "of them for a new token", code="context_length_exceeded")
    max_tokens = _integer(body, max_field, 1)
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif max_tokens > room:
        raise bad_field(max_field, f"{max_field} {max_tokens} is too large: the context holds {context} tokens and the "
                        f"prompt takes {len(prompt_ids)}, which leaves {room}", code="context_length_exceeded")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (stream and isinstance(options, dict)):
        raise bad_field("stream_options", "stream_options is an object, and only for stream: true")
    fields = {"prompt_ids": prompt_field, "max_tokens": max_field}
    try:
        request = Request(prompt_ids, max_tokens=max_tokens, sampling=_sampling(body), stop=_stop(body),
                          ignore_eos=_boolean(body, "ignore_eos"), task=_string(body, "task"), slo=_slo(body),
                          id=request_id)
    except ParameterError as err:
        raise bad_field(api_field(err.parameters[0], fields), err.render(fields)) from None
    return Asked(request, stream, bool(options and options.get("include_usage")), fields)


# Request and SamplingParams parameters -> the request field that sets them (for errors of the loop, too).
API_FIELDS = {"sampling": "temperature", "greedy": "temperature", "stop_token_ids": "stop", "ttft_s": "slo", "tpot_s": "slo"}


def api_field(parameter: str | None, fields: dict) -> str | None:
    """The request field for a Request parameter; `fields` names the prompt and max_tokens fields."""
    return fields.get(parameter) or API_FIELDS.get(parameter, parameter)


def _sampling(body: dict) -> SamplingParams | None:
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0) or 0
    seed = body.get("seed")
    if seed is not None and not is_integer(seed):
        raise bad_field("seed", f"seed must be an integer (got {seed!r})")
    if temperature == 0:
        return None  # greedy
    return SamplingParams(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=secrets.randbits(32) if seed is None else seed)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise bad_field("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them "
                        f"(got {body['stop']!r})")
    return tuple(stop)


def _slo(body: dict) -> SLO:
    slo = body.get("slo")
    if slo is None:
        return SLO()
    if not isinstance(slo, dict) or set(slo) - {"ttft_s", "tpot_s"} or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in slo.values()):
        raise bad_field("slo", f"slo must be an object with numbers ttft_s and/or tpot_s, in seconds (got {slo!r})")
    return SLO(**slo)


def _integer(body: dict, name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is not None and not (is_integer(value) and value >= minimum):
        raise bad_field(name, f"{name} must be an integer >= {minimum} (got {value!r})")
    return value


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (low < value if low_open else low <= value) and value <= high):
        raise bad_field(name, f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}] (got {value!r})")
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_field(name, f"{name} must be true or false (got {value!r})")
    return bool(value)


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name, f"{name} must be a string (got {value!r})")
    return value


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The OpenAI shapes of one answer, whole or as stream chunks; `chat`: a chat completion."""

    def __init__(self, chat: bool, request_id: str, model: str, fingerprint: str | None = None):
        self.chat, self.id, self.model, self.created = chat, request_id, model, int(time.time())
        self.fingerprint = fingerprint

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return head if self.fingerprint is None else {**head, "system_fingerprint": self.fingerprint}

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        answer = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {**self._head(False), "choices": [{"index": 0, **answer, "logprobs": None, "finish_reason": finish_reason}],
                "usage": counts}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            answer = {"delta": delta | ({} if text is None else {"content": text})}
        else:
            answer = {"text": text or ""}
        return {**self._head(True), "choices": [{"index": 0, **answer, "logprobs": None, "finish_reason": finish_reason}]}

    def opening(self) -> dict | None:
        """The chunk a stream begins with (chat: the assistant role), or None."""
        return self.chunk("", role=True) if self.chat else None

    def usage_chunk(self, counts: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": counts}
