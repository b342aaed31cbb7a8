"""`moejax serve`: the official openai client against a live server on loopback with the shipped model.

One server per module (uvicorn in a thread on a free 127.0.0.1 port, over a ServingLoop); its answers are
checked against `engine.generate` run alone before the server starts. A subprocess server checks SIGTERM.
"""

import concurrent.futures
import dataclasses
import gc
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import moejax
from moejax.cli import main as moejax_cli
from moejax.engine.slots import SamplingParams
from moejax.errors import MoejaxError
from moejax.serving.http.api import DEFAULT_COMPLETION_TOKENS, ApiError, chat_request, completion_request
from moejax.serving.http.app import build_app, listen, url, uvicorn_server
from moejax.serving.http.chat import ChatTemplate
from moejax.serving.loop import ServingLoop
from moejax.serving.requests import SLO, Request
from moejax.tokenizer import load_tokenizer
from test_python_api import SERVER_URL, readme_python_blocks

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-moe"
CONTEXT = 96
MAX_BATCH, MAX_QUEUE = 2, 8
PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
PLAIN_CHAT = "system: Be brief.\nuser: Hi\nassistant:"
SEED = 3  # generate() seeds prompt 0 of a batch with seed * 65537 (mod 2**32); a request gives that directly
TIMEOUT_S = 60


@dataclasses.dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    engine: object
    loop: ServingLoop
    log: list  # the server's request log lines
    greedy: str  # PROMPT, 8 greedy tokens, as generate() makes them alone
    chat: str  # CHAT through the plain template, 6 greedy tokens
    sampled: str  # PROMPT, 8 tokens at temperature 0.8 with SEED

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.base}{path}", content=content, timeout=TIMEOUT_S, **kwargs)

    def metrics(self) -> dict:
        """/metrics as {sample with its labels: value}."""
        response = httpx.get(f"{self.base}/metrics", timeout=TIMEOUT_S)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        samples = (line.rsplit(" ", 1) for line in response.text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def finished(self, request_id: str) -> str:
        """The server's log line of a finished request (waits for it, bounded)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            lines = [line for line in list(self.log) if line.startswith(f"{request_id} ") and "tokens" in line]
            if lines:
                return lines[0]
            time.sleep(0.02)
        pytest.fail(f"no log line for {request_id}: {self.log}")


@pytest.fixture(scope="module")
def served():
    engine = moejax.load(moejax.SHIPPED_CHECKPOINT, slots=MAX_BATCH, max_seq_len=CONTEXT)
    greedy = engine.generate(PROMPT, max_new_tokens=8).text[0]
    chat = engine.generate(PLAIN_CHAT, max_new_tokens=6).text[0]
    sampled = engine.generate(PROMPT, max_new_tokens=8, temperature=0.8, seed=SEED).text[0]
    loop = ServingLoop(engine, max_queue=MAX_QUEUE, max_batch=MAX_BATCH)
    log = []
    app = build_app(loop, engine.tokenizer, MODEL, context=engine.max_seq_len, chat_template=ChatTemplate(engine.tokenizer),
                    log=log.append)
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield Served(url(sock), engine, loop, log, greedy, chat, sampled)
    server.should_exit = True
    thread.join(TIMEOUT_S)
    sock.close()
    assert not thread.is_alive()


def test_a_completion_is_what_generate_makes_alone(served):
    client = served.client()
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == MODEL
    assert answer.choices[0].text == served.greedy and answer.choices[0].finish_reason == "length"
    prompt_tokens = len(served.engine.tokenizer.encode(PROMPT))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == \
           (prompt_tokens, 8, prompt_tokens + 8)
    by_ids = client.completions.create(model=MODEL, prompt=served.engine.tokenizer.encode(PROMPT), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == served.greedy
    sampled = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=SEED * 65537)
               for _ in range(2)]
    assert [s.choices[0].text for s in sampled] == [served.sampled] * 2
    assert f"{answer.id} /v1/completions: {prompt_tokens} prompt + 8 new tokens" in served.finished(answer.id)


def test_a_chat_completion_uses_the_plain_template(served):
    answer = served.client().chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == served.chat
    assert answer.usage.prompt_tokens == len(served.engine.tokenizer.encode(PLAIN_CHAT))


def test_streams_are_the_whole_answers_in_chunks(served):
    client = served.client()
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == served.greedy
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and len({c.id for c in chunks}) == 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == served.chat
    assert chunks[-1].choices[0].finish_reason == "length"
    with httpx.stream("POST", f"{served.base}/v1/completions", timeout=TIMEOUT_S,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


TOO_LONG = list(range(5, 5 + CONTEXT))
BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-moe", "prompt": ', None),
    ("/v1/completions", b'["a list"]', None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": TOO_LONG}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 4096]}, "prompt"),  # outside the vocabulary (the loop refuses it)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -1}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "slo": {"ttft_s": -1}}, "slo"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "other", "messages": CHAT}, "model"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_400_naming_the_field(served, path, body, param):
    response = served.post(path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_the_openai_client_sees_errors_as_its_exceptions(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert bad.value.body["param"] == "model" and bad.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="x")


def test_the_request_fields_reach_the_loop_as_asked():
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 4,
            "seed": 11, "stop": ["\n\n", "END"], "ignore_eos": True, "task": "code", "slo": {"ttft_s": 0.5}, "user": "x",
            "stream": True, "stream_options": {"include_usage": True}}
    asked = completion_request(body, model=MODEL, tokenizer=None, context=CONTEXT, request_id="cmpl-1")
    assert asked.stream and asked.include_usage
    assert asked.request == Request((5, 6, 7), max_tokens=9, sampling=SamplingParams(False, 0.5, 4, 0.9, 11),
                                    stop=("\n\n", "END"), ignore_eos=True, task="code", slo=SLO(ttft_s=0.5), id="cmpl-1",
                                    arrival=asked.request.arrival)
    greedy = completion_request({"model": MODEL, "prompt": [5], "temperature": 0, "stop": "x"}, model=MODEL,
                                tokenizer=None, context=CONTEXT, request_id="cmpl-2")
    assert greedy.request.sampling is None and greedy.request.stop == ("x",) and not greedy.stream
    assert greedy.request.max_tokens == DEFAULT_COMPLETION_TOKENS
    chat = chat_request({"model": MODEL, "max_tokens": 5, "max_completion_tokens": 7}, [5, 6], model=MODEL,
                        context=CONTEXT, request_id="chatcmpl-1")
    assert chat.request.max_tokens == 7 and chat.fields["max_tokens"] == "max_completion_tokens"
    assert chat_request({"model": MODEL}, [5, 6], model=MODEL, context=CONTEXT,
                        request_id="chatcmpl-2").request.max_tokens == CONTEXT - 2  # the rest of the context


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client().models.list()] == [MODEL]
    assert httpx.get(f"{served.base}/health").json() == {"status": "ok"}
    before = served.metrics()
    served.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    served.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    values = served.metrics()
    grown = {name: values[name] - before.get(name, 0) for name in values}
    assert grown['moejax_requests_total{outcome="length"}'] == 1 and grown['moejax_requests_total{outcome="refused"}'] == 1
    assert grown["moejax_generation_tokens_total"] == 3
    assert grown["moejax_prompt_tokens_total"] == len(served.engine.tokenizer.encode(PROMPT))
    assert grown["moejax_time_to_first_token_seconds_count"] == 1 == grown["moejax_time_per_output_token_seconds_count"]
    for name in ("moejax_queue_depth", "moejax_running_requests", "moejax_expert_cache_hit_rate",
                 "moejax_expert_bytes_moved_total", "moejax_stall_seconds_total", "moejax_prefetch_precision"):
        assert name in values
    assert values["moejax_expert_cache_hit_rate"] == 1.0  # resident: every expert is on the device


def test_a_full_queue_is_a_429_with_retry_after(served, monkeypatch):
    gate = threading.Event()
    begin_prefill = served.engine.begin_prefill

    def held_prefill(*args, **kwargs):
        gate.wait(TIMEOUT_S)
        return begin_prefill(*args, **kwargs)

    monkeypatch.setattr(served.engine, "begin_prefill", held_prefill)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    streams, refused = [], None
    with httpx.Client(base_url=served.base, timeout=TIMEOUT_S) as client:
        try:
            for _ in range(MAX_BATCH + MAX_QUEUE + 1):  # a stream's headers come once the request is admitted
                response = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
                if response.status_code != 200:
                    refused = response
                    break
                streams.append(response)
        finally:
            gate.set()
        assert refused is not None and MAX_QUEUE <= len(streams) <= MAX_QUEUE + MAX_BATCH
        refused.read()
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        for response in streams:  # every admitted request still gets its whole answer
            events = [line for line in response.iter_lines() if line]
            response.close()
            assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]


def test_a_client_that_disconnects_mid_stream_has_its_request_cancelled(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 10, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.base, timeout=TIMEOUT_S) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    request_id = json.loads(line[len("data: "):])["id"]
                    break
    line = served.finished(request_id)
    assert line.endswith("cancelled"), line
    assert int(re.search(r"\+ (\d+) new tokens", line).group(1)) < CONTEXT - 10
    deadline = time.monotonic() + TIMEOUT_S
    while served.metrics()["moejax_running_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.metrics()["moejax_running_requests"] == 0  # its slot is free


def test_an_engine_error_fails_that_request_and_the_server_keeps_serving(served, monkeypatch):
    poisoned = [7, 7, 7]
    begin_prefill = served.engine.begin_prefill

    def failing_prefill(slot, token_ids, *args, **kwargs):
        if list(token_ids) == poisoned:
            raise RuntimeError("injected fault")
        return begin_prefill(slot, token_ids, *args, **kwargs)

    monkeypatch.setattr(served.engine, "begin_prefill", failing_prefill)
    response = served.post("/v1/completions", {"model": MODEL, "prompt": poisoned, "max_tokens": 4})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    with pytest.raises(openai.APIError, match="injected fault"):
        list(served.client().completions.create(model=MODEL, prompt=poisoned, max_tokens=4, stream=True))
    answer = served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == served.greedy


def test_a_request_expired_in_the_queue_is_a_429_and_the_server_keeps_serving(served, monkeypatch):
    """A queued request the scheduler refuses once its TTFT objective has passed (`slo`'s expiry, forced here
    for requests of max_tokens 3) gets an error object instead of a completion, streamed or not."""
    monkeypatch.setattr(served.loop.scheduler, "expired", lambda waiting, now: [
        (entry, "slo.ttft_s passed while queued (test)") for entry in waiting if entry.max_tokens == 3])
    response = served.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1, response.text
    error = response.json()["error"]
    assert error["code"] == "slo_expired" and "passed while queued" in error["message"]
    with pytest.raises(openai.APIError, match="passed while queued"):
        list(served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True))
    assert served.metrics()['moejax_requests_total{outcome="expired"}'] >= 2
    answer = served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == served.greedy


CLIENTS, REQUESTS_EACH = 8, 3


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the RSS from /proc")
def test_concurrent_streaming_clients_each_get_a_whole_answer_or_a_clean_error(served):
    def client_run(requests: int) -> list:
        client, results = served.client(), []
        for _ in range(requests):
            try:
                chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                        stream=True))
                results.append(("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason))
            except openai.APIStatusError as err:  # a clean refusal
                results.append(("refused", err.status_code))
        return results

    def round_of(requests: int) -> list:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client_run, requests) for _ in range(CLIENTS)]
            return [r for f in futures for r in f.result(timeout=TIMEOUT_S)]

    round_of(1)  # warm: threads, connections, the programs of every batch size
    grown = []
    for _ in range(5):
        gc.collect()
        before, started = _rss_bytes(), time.monotonic()
        results = round_of(REQUESTS_EACH)
        gc.collect()
        grown.append(_rss_bytes() - before)
        assert len(results) == CLIENTS * REQUESTS_EACH and time.monotonic() - started < TIMEOUT_S
        assert all(r == (served.greedy, "length") or r == ("refused", 429) for r in results), results
        assert sum(r == (served.greedy, "length") for r in results) >= CLIENTS
    # Flat: a leak grows in every round of 24 requests. This process also holds the clients, and its RSS grows in
    # steps now and then (26-73 MiB in one round of eight, the same before and after a change to the loop, and
    # not again), so the test asks the median round, garbage collected, to stay flat.
    assert sorted(grown)[2] < 16 * 2**20, f"RSS grew by {[round(g / 2**20, 1) for g in grown]} MiB in five rounds"


def test_sigterm_lets_the_requests_in_flight_finish_then_exits_0():
    process = subprocess.Popen(
        [sys.executable, "-m", "moejax", "serve", "--port", "0", "--max-seq-len", str(CONTEXT), "--max-batch", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        first, found, deadline = "", None, time.monotonic() + 300
        while found is None and process.poll() is None and time.monotonic() < deadline:  # a warm-up line comes first
            ready, _, _ = select.select([process.stderr], [], [], max(deadline - time.monotonic(), 0))
            line = process.stderr.readline() if ready else ""
            first += line
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert found, first + (process.stderr.read() if process.poll() is not None else "")
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        admitted, streaming, signalled = [threading.Event() for _ in range(3)], threading.Event(), threading.Event()
        events = [[], [], []]  # per request: (sent after the signal, event); more requests than --max-batch

        def stream(n: int) -> None:
            with httpx.stream("POST", f"{found.group(1)}/v1/completions", json=body, timeout=TIMEOUT_S) as response:
                admitted[n].set()  # a stream's headers come once the request is admitted
                for line in response.iter_lines():
                    if line:
                        events[n].append((signalled.is_set(), line))
                        streaming.set()

        clients = [threading.Thread(target=stream, args=(n,)) for n in range(3)]
        for client in clients:
            client.start()
        assert all(event.wait(TIMEOUT_S) for event in admitted) and streaming.wait(TIMEOUT_S)
        signalled.set()
        process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(TIMEOUT_S)
        for sent in events:
            lines = [line for _, line in sent]
            assert lines[-1] == "data: [DONE]", lines
            assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 24
            assert json.loads(lines[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert sum(after for sent in events for after, _ in sent) > 3  # the streams went on after the signal
        assert process.wait(TIMEOUT_S) == 0
        log = process.stderr.read()
        assert len(re.findall(r"cmpl-\w+ /v1/completions: \d+ prompt \+ 24 new tokens, ttft [\d.]+ ms, length", log)) == 3, log
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert moejax_cli(["serve"]) == 2
    assert "uvicorn: pip install 'moejax[serve]'" in capsys.readouterr().err


def test_serve_refuses_a_warmup_of_no_tokens(capsys):
    assert moejax_cli(["serve", "--port", "0", "--warmup-longest", "0"]) == 2
    assert "--warmup-longest must be >= 1 (got 0)" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so(capsys):
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert moejax_cli(["serve", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_a_checkpoint_chat_template_is_rendered_and_tokenized_as_written(tmp_path):
    tokenizer = load_tokenizer(moejax.SHIPPED_CHECKPOINT)
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    chat = ChatTemplate.from_checkpoint(tmp_path, tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = chat.prompt_ids(messages)
    assert ids == tokenizer.encode("<s>[user] Hi\n[assistant] Hello\n[assistant]", add_special_tokens=False)
    assert ids.count(tokenizer.token_id("<s>")) == 1  # the template's BOS, none added
    with pytest.raises(ApiError, match="no system") as refused:
        chat.prompt_ids([{"role": "system", "content": "x"}])
    assert refused.value.param == "messages"
    assert ChatTemplate.from_checkpoint(moejax.SHIPPED_CHECKPOINT, tokenizer).template is None  # the plain one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    (tmp_path / "chat_template.jinja").write_text(template)  # newer HF checkpoints keep it in its own file
    assert ChatTemplate.from_checkpoint(tmp_path, tokenizer).prompt_ids(messages) == ids
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(MoejaxError, match="chat_template.jinja: its chat_template does not parse"):
        ChatTemplate.from_checkpoint(tmp_path, tokenizer)


def test_the_readme_client_examples_run_against_the_server(served, capsys):
    blocks = [block for block in readme_python_blocks() if SERVER_URL in block]
    assert blocks
    for block in blocks:
        exec(compile(block.replace(SERVER_URL, served.base), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_a_cached_server_of_batches_defaults_to_the_activation_policy():
    """LRU thrashes once a batch's step needs more experts than the cache holds; serve picks 'activation' then."""
    from moejax.serving.loop import serving_cache_policy

    assert serving_cache_policy("cached", None, 8) == "activation"
    assert serving_cache_policy("cached", "lfu", 8) == "lfu"  # what the user asked for
    assert serving_cache_policy("cached", None, 1) is None and serving_cache_policy("resident", None, 8) is None
