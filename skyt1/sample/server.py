"""OpenAI-compatible HTTP server over one engine, on uvicorn + starlette (the ASGI stack vLLM and SGLang
use), so HTTP parsing, keep-alive and framing are a maintained parser's (h11), not ours.

Routes: GET /v1/models, /health, /metrics (Prometheus text); POST /v1/chat/completions, /v1/completions,
streaming as server-sent events or one JSON body. Any model name is accepted.

Threads: the event loop (uvicorn) reads, validates and tokenizes each request (tokenizing in its thread
pool), then hands it to the one engine thread (EngineLoop), which owns the engine, steps it while anything
runs (so concurrent requests share each batch) and sends each request's messages back to the event loop
once per step. A client that goes away, streaming or not, has its request aborted at the next step: the
handler waits on the engine's messages and on the connection's http.disconnect together.

Limits (ServerConfig, `skyt1-sample serve --help`): n per request, prompts per request, body bytes
(refused from the Content-Length header before reading, or as soon as a chunked body passes it), samples
queued in the engine (429 beyond), the time to send a request head (slowloris) and to idle on a kept-alive
connection, the time to send the body, and a request's total time.

Errors are {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed JSON,
text that is not valid Unicode, a bad or unsupported field: a field this server does not implement is
refused by name rather than ignored; response_format json_object / json_schema go through xgrammar,
skyt1/sample/structured.py), 404 unknown route, 408 body too slow, 413 body too large, 429 queue
full, 500 engine failure, 504 request past --request-timeout (its generation is aborted).
"""
from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from skyt1.sample.engine import LLMEngine, RequestOutput, StepUpdate
from skyt1.sample.params import SamplingParams
from skyt1.sample.structured import StructuredOutputs

MIN_LOGPROB = -9999.0  # vLLM's floor: JSON has no -inf


@dataclass(frozen=True)
class ServerConfig:
    max_n: int = 128                         # samples per prompt (OpenAI's own cap on n)
    max_prompts: int = 256                   # prompts in one /v1/completions request
    max_body_bytes: int = 32 * 2**20         # request body
    max_queued: int = 1024                   # samples waiting for a batch slot; 429 past it
    max_connections: int = 1024              # open connections (or requests in flight); 503 past it
    idle_timeout: float = 5.0                # s: a kept-alive connection idles, or a new one sends its head
    body_timeout: float = 60.0               # s: to send the whole body once the head is in
    request_timeout: float | None = None     # s: a request's whole run (None: no limit); then 504 and abort
    graceful_timeout: float = 5.0            # s: open requests may finish at shutdown

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts", "max_body_bytes", "max_queued", "max_connections"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"server option {name!r} must be a positive integer, got {v!r}")
        for name in ("idle_timeout", "body_timeout", "request_timeout", "graceful_timeout"):
            v = getattr(self, name)
            if v is None and name == "request_timeout":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"server option {name!r} must be a positive number of seconds, got {v!r}")


def add_server_arguments(p) -> None:
    """`skyt1-sample serve` limits (an argparse parser); defaults are ServerConfig's."""
    d = ServerConfig()
    g = p.add_argument_group("server limits")
    g.add_argument("--max-n", type=int, default=d.max_n, help="samples per prompt (n)")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one /v1/completions request")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size (413 above)")
    g.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="samples waiting for a batch slot; a request that would queue more gets 429")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections (or requests in flight); a request beyond them gets 503")
    g.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="seconds a connection may idle, or take to send a request head")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout, help="seconds to send a request body")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a request may run in all (default: no limit); then 504 and its generation stops")


def server_config_from_args(args) -> ServerConfig:
    return ServerConfig(max_n=args.max_n, max_prompts=args.max_prompts, max_body_bytes=args.max_body_bytes,
                        max_queued=args.max_queued, max_connections=args.max_connections,
                        idle_timeout=args.idle_timeout, body_timeout=args.body_timeout,
                        request_timeout=args.request_timeout)


class BadRequest(ValueError):
    """close: the body was not read to its end, so the connection must not carry another request."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, close: bool = False):
        super().__init__(message)
        self.param = param
        self.status = status
        self.close = close


# -- messages from the engine thread to the event loop ---------------------------------------------
class Sink:
    """One HTTP request's inbox. The engine thread never touches the asyncio queue directly: it batches
    (sink, message) pairs per step and hands them over with one call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wants_updates: bool):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.wants_updates = wants_updates  # a non-streaming request needs only "added"/"done"/"error"


def _deliver(items: list[tuple[Sink, Any]]) -> None:
    for sink, msg in items:
        sink.queue.put_nowait(msg)


@dataclass
class _Live:
    request: Any
    sink: Sink
    submitted: float
    first_token: bool = False


# Time-to-first-token buckets (s), vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


@dataclass
class Stats:
    """What /metrics reports; written by the engine thread only, read by the event loop (plain numbers
    and a list swapped whole, so a reader never sees a half-built value)."""
    running_requests: int = 0
    waiting_requests: int = 0
    waiting_seqs: int = 0
    generation_tokens: int = 0
    prompt_tokens: int = 0
    tokens_per_s: float = 0.0
    requests_finished: int = 0
    requests_aborted: int = 0
    ttft_counts: list = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0


class EngineLoop(threading.Thread):
    """Owns the engine. Messages put on a request's sink: ("added", request_id), StepUpdate (streaming
    sinks only), ("done", RequestOutput), ("error", status, message)."""

    def __init__(self, engine: LLMEngine):
        super().__init__(name="skyt1-engine", daemon=True)
        self.engine = engine
        self.inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._live: dict[str, _Live] = {}
        self._stopping = threading.Event()
        self._out: list[tuple[Sink, Any]] = []
        self._inbox_samples = 0  # samples submitted but not yet handed to the engine
        self._lock = threading.Lock()
        self.stats = Stats()
        self._rate: collections.deque = collections.deque(maxlen=64)  # (time, generated tokens)

    # -- called from the event loop ---------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               prompt: str | None = None, stream: bool = False) -> None:
        with self._lock:
            self._inbox_samples += params.n
        self.inbox.append(("add", request_id, prompt_ids, params, prompt, stream, sink, time.monotonic()))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.inbox.append(("abort", request_id))
        self._wake.set()

    def queued_samples(self) -> int:
        return self._inbox_samples + self.stats.waiting_seqs

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------
    def _send(self, sink: Sink, msg: Any) -> None:
        self._out.append((sink, msg))

    def _flush(self) -> None:
        if not self._out:
            return
        by_loop: dict[Any, list] = {}
        for sink, msg in self._out:
            by_loop.setdefault(sink.loop, []).append((sink, msg))
        self._out = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop has closed (server shutting down): nobody to tell
                pass

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, rid, ids, params, prompt, stream, sink, submitted = msg
            try:
                req = self.engine.add_request(rid, ids, params, prompt, stream=stream)
            except ValueError as e:
                self._send(sink, ("error", 400, str(e)))
                return
            except Exception as e:  # a bug must fail this request, not the engine thread
                traceback.print_exc()
                self._send(sink, ("error", 500, f"{type(e).__name__}: {e}"))
                return
            finally:
                # Count the samples as waiting before they leave the inbox count, so the queue bound
                # never sees them nowhere (the full stats are published after the next step).
                self.stats.waiting_seqs = len(self.engine.scheduler.waiting)
                with self._lock:
                    self._inbox_samples -= params.n
            self._live[rid] = _Live(req, sink, submitted)
            self._send(sink, ("added", rid))
        elif msg[0] == "abort":
            if msg[1] in self._live:
                self.engine.abort(msg[1])
                del self._live[msg[1]]
                self.stats.requests_aborted += 1

    def _observe_ttft(self, live: _Live, now: float) -> None:
        live.first_token = True
        ttft = now - live.submitted
        s = self.stats
        counts = list(s.ttft_counts)
        for i, edge in enumerate(TTFT_BUCKETS):
            if ttft <= edge:
                counts[i] += 1
        s.ttft_counts, s.ttft_sum, s.ttft_count = counts, s.ttft_sum + ttft, s.ttft_count + 1

    def _publish(self) -> None:
        sch, s = self.engine.scheduler, self.stats
        running = {q.request.request_id for q in sch.running}
        waiting = {q.request.request_id for q in sch.waiting} - running
        s.running_requests, s.waiting_requests, s.waiting_seqs = len(running), len(waiting), len(sch.waiting)
        s.generation_tokens = self.engine.num_generated_tokens
        s.prompt_tokens = self.engine.num_prefill_tokens
        now = time.monotonic()
        self._rate.append((now, s.generation_tokens))
        while len(self._rate) > 2 and now - self._rate[0][0] > 10.0:  # a ~10 s window
            self._rate.popleft()
        t0, n0 = self._rate[0]
        s.tokens_per_s = (s.generation_tokens - n0) / (now - t0) if now > t0 else 0.0

    def run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_unfinished() and not self.inbox:
                self._publish()
                self._wake.wait(timeout=0.5)
            self._wake.clear()
            while self.inbox:
                self._handle(self.inbox.popleft())
            if self.engine.has_unfinished():
                self._step()
            self._flush()

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as e:  # an engine failure must reach every waiting client, not kill the thread
            traceback.print_exc()
            for rid, live in self._live.items():
                self.engine.abort(rid)
                self._send(live.sink, ("error", 500, f"engine failure: {type(e).__name__}: {e}"))
            self._live.clear()
            return
        now = time.monotonic()
        touched = set()
        for u in updates:
            live = self._live.get(u.request_id)
            if live is None:
                continue
            if not live.first_token:
                self._observe_ttft(live, now)
            if live.sink.wants_updates:
                self._send(live.sink, u)
            touched.add(u.request_id)
        for rid in touched:
            live = self._live[rid]
            if live.request.finished:
                self._send(live.sink, ("done", self.engine.request_output(live.request)))
                del self._live[rid]
                self.stats.requests_finished += 1
        self._publish()


# -- request parsing -------------------------------------------------------------------------------
def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _get(body: dict, key: str, types: tuple, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"'{key}' must be {' or '.join(t.__name__ for t in types)}, got a boolean", key)
    if not isinstance(value, types):
        raise BadRequest(f"'{key}' must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}", key)
    return value


SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                   "logprobs", "prompt_logprobs", "logit_bias", "include_stop_str_in_output",
                   "skip_special_tokens"}
# "user" only tags the request for the caller's own bookkeeping: accepting it changes no output.
COMMON_FIELDS = SAMPLING_FIELDS | {"model", "stream", "stream_options", "user", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
# Unimplemented fields whose value asks for exactly what the server does anyway.
NO_OP_VALUES = {"echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
                "parallel_tool_calls": (False,)}


def check_fields(body: dict, chat: bool) -> None:
    """Every field is implemented, null, or a no-op value; anything else is refused by name."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key, value in body.items():
        if key in known or value is None or value in NO_OP_VALUES.get(key, ()):
            continue
        if key == "best_of" and _is_token(value) and value == body.get("n", 1):
            continue  # best_of = n: no extra samples to rank
        raise BadRequest(f"'{key}' is not supported by this server; remove it or send null", key)


LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_text(value: Any, where: str) -> None:
    """A JSON string may carry a lone surrogate ("\\ud800"), which is no Unicode text: refuse it here,
    naming where, instead of failing in the tokenizer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"{where} is not valid Unicode text: lone surrogate {value[e.start]!r} at character "
                             f"{e.start}", where.split("[", 1)[0].split(".", 1)[0]) from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if not isinstance(v, (int, float)):  # token id lists can be long
                check_text(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, f"{where} key")
            check_text(v, f"{where}.{k}")


def sampling_params_from(body: dict, chat: bool, max_n: int) -> SamplingParams:
    num = (int, float)
    max_tokens = _get(body, "max_completion_tokens", (int,)) if chat else None
    max_tokens = max_tokens if max_tokens is not None else _get(body, "max_tokens", (int,))
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if chat:
        logprobs = None
        top = _get(body, "top_logprobs", (int,))
        if _get(body, "logprobs", (bool,), False):
            logprobs = top if top is not None else 0
        elif top is not None:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        logprobs = _get(body, "logprobs", (int,))
    n = _get(body, "n", (int,), 1)
    if n > max_n:
        raise BadRequest(f"'n' is {n}, above this server's limit of {max_n} (--max-n)", "n")
    bias = _get(body, "logit_bias", (dict,), {})
    try:
        return SamplingParams(
            n=n,
            temperature=_get(body, "temperature", num, 1.0),
            top_p=_get(body, "top_p", num, 1.0),
            top_k=_get(body, "top_k", (int,), 0),
            min_p=_get(body, "min_p", num, 0.0),
            repetition_penalty=_get(body, "repetition_penalty", num, 1.0),
            presence_penalty=_get(body, "presence_penalty", num, 0.0),
            frequency_penalty=_get(body, "frequency_penalty", num, 0.0),
            seed=_get(body, "seed", (int,)),
            max_tokens=max_tokens,
            min_tokens=_get(body, "min_tokens", (int,), 0),
            stop=stop or (),
            stop_token_ids=tuple(_get(body, "stop_token_ids", (list,), [])),
            ignore_eos=_get(body, "ignore_eos", (bool,), False),
            logprobs=logprobs,
            prompt_logprobs=_get(body, "prompt_logprobs", (int,)),
            logit_bias=bias,
            include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
            skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
        )
    except ValueError as e:
        msg = str(e)
        param = msg.split("'")[1] if msg.startswith("sampling parameter '") else None
        if chat and param == "logprobs":  # chat's count is top_logprobs
            msg, param = msg.replace("'logprobs'", "'top_logprobs'"), "top_logprobs"
        raise BadRequest(msg, param) from None


@dataclass
class Parsed:
    chat: bool
    model: str
    prompts: list[tuple[list[int], str | None]]
    params: SamplingParams
    stream: bool
    include_usage: bool


class OpenAIServer:
    """The ASGI app's state: the engine loop, the tokenizer, the limits."""

    def __init__(self, loop: EngineLoop, model_name: str, config: ServerConfig):
        self.loop = loop
        self.engine = loop.engine
        self.tokenizer = loop.engine.tokenizer
        self.model_name = model_name
        self.config = config
        self.num_rejected = 0  # 429s
        self.structured = StructuredOutputs(self.tokenizer, self.engine.model.cfg.vocab_size, self.engine.eos_token_ids)
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_found})

    # -- plumbing ---------------------------------------------------------------------------------
    @staticmethod
    def error(status: int, message: str, param: str | None = None, close: bool = False) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout_error",
                413: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error"}.get(status, "server_error")
        headers = {"connection": "close"} if close else None
        if status == 429:
            headers = {"retry-after": "1"}
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status, headers=headers)

    async def _not_found(self, request: HTTPRequest, exc: Exception) -> Response:
        return self.error(404, f"no route {request.method} {request.url.path}")

    async def _read_body(self, request: HTTPRequest) -> bytes:
        """The body, refused (connection closed, since its remainder is never read) past max_body_bytes
        or body_timeout; the header's length is checked before a byte is read, so a client announcing
        8 GB costs nothing."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and "transfer-encoding" in request.headers:
            # h11 lets chunked framing win (RFC 9112), but a proxy in front may have framed it by the length:
            # the classic request-smuggling disagreement. Refuse it and close (RFC 9112 6.1).
            raise BadRequest("both Content-Length and Transfer-Encoding are set", close=True)
        if length is not None and int(length) > limit:  # h11 has already checked it is a number
            raise BadRequest(f"request body of {int(length)} bytes is above this server's limit of {limit} bytes "
                             f"(--max-body-bytes)", status=413, close=True)
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"request body is above this server's limit of {limit} bytes "
                                     f"(--max-body-bytes)", status=413, close=True)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.config.body_timeout)
        except TimeoutError:
            raise BadRequest(f"request body not received within {self.config.body_timeout:g} s (--body-timeout)",
                             status=408, close=True) from None
        return b"".join(chunks)

    # -- routes -----------------------------------------------------------------------------------
    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "skyt1"}]})

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(render_metrics(self), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: HTTPRequest, chat: bool) -> Response:
        try:
            raw = await self._read_body(request)
            parsed = await run_in_threadpool(self._parse, raw, chat)
        except BadRequest as e:
            return self.error(e.status, str(e), e.param, close=e.close)
        except ClientDisconnect:  # left while sending its body
            return Response(status_code=499)
        queued, new, bound = self.loop.queued_samples(), len(parsed.prompts) * parsed.params.n, self.config.max_queued
        if new > bound:  # could never fit: no point in retrying
            return self.error(400, f"{len(parsed.prompts)} prompt(s) x n={parsed.params.n} = {new} samples, above "
                                   f"this server's queue of {bound} (--max-queued)", "n")
        if queued + new > bound:
            self.num_rejected += 1
            return self.error(429, f"the server's queue is full ({queued} samples waiting, --max-queued {bound}); "
                                   f"retry later")
        deadline = None if self.config.request_timeout is None else time.monotonic() + self.config.request_timeout
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        subs = [rid if len(parsed.prompts) == 1 else f"{rid}-{i}" for i in range(len(parsed.prompts))]
        sink = Sink(asyncio.get_running_loop(), wants_updates=parsed.stream)
        for sub, (ids, text) in zip(subs, parsed.prompts):
            self.loop.submit(sub, ids, parsed.params, sink, text, stream=parsed.stream)
        waiter = _Waiter(sink, request, deadline)
        try:
            added, early = 0, []
            while added < len(subs):  # every prompt accepted by the engine, or the first refusal
                msg = await waiter.next()
                if isinstance(msg, tuple) and msg[0] == "error":
                    self._abort(subs)
                    waiter.close()
                    return self.error(msg[1], msg[2])
                if isinstance(msg, tuple) and msg[0] == "added":
                    added += 1
                else:  # the engine may step an early prompt before it takes the next one from its inbox
                    early.append(msg)
            waiter.pending.extend(early)
        except (_ClientGone, _TimedOut) as e:
            self._abort(subs)
            waiter.close()
            return self.error(504, str(e)) if isinstance(e, _TimedOut) else Response(status_code=499)
        if parsed.stream:
            return StreamingResponse(self._stream(rid, subs, parsed, waiter), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return await self._complete(rid, subs, parsed, waiter)

    def _abort(self, subs: list[str]) -> None:
        for sub in subs:
            self.loop.abort(sub)

    def _parse(self, raw: bytes, chat: bool) -> Parsed:
        """Runs in the thread pool: JSON, validation and tokenization stay off the event loop."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
        if LONE_SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape can put a surrogate in a str
            for key, value in body.items():
                check_text(key, "a field name")
                check_text(value, key)
        check_fields(body, chat)
        stream = _get(body, "stream", (bool,), False)
        opts = _get(body, "stream_options", (dict,))
        if opts is not None and not stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
        unknown = set(opts or {}) - {"include_usage"}
        if unknown:
            raise BadRequest(f"stream_options {sorted(unknown)} not supported (only 'include_usage')", "stream_options")
        params = sampling_params_from(body, chat, self.config.max_n)
        if stream and params.prompt_logprobs is not None:
            raise BadRequest("'prompt_logprobs' is not supported with 'stream': true", "prompt_logprobs")
        prompts = self._chat_prompt(body) if chat else self._completion_prompts(body)
        max_len = self.engine.max_model_len
        for ids, _ in prompts:
            if len(ids) + (params.max_tokens or 1) > max_len:
                raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"context length ({max_len} tokens)", "max_tokens")
        V = self.engine.model.cfg.vocab_size
        if any(t >= V for t, _ in params.logit_bias):
            raise BadRequest(f"'logit_bias' token ids must be in [0, {V})", "logit_bias")
        fmt = _get(body, "response_format", (dict,))
        if fmt is not None and fmt.get("type") != "text":
            try:
                params = params.replace(grammar=self.structured.compile(fmt))
            except ValueError as e:
                raise BadRequest(str(e), "response_format") from None
        model = body.get("model") if isinstance(body.get("model"), str) else self.model_name
        return Parsed(chat, model, prompts, params, stream, bool((opts or {}).get("include_usage")))

    def _chat_prompt(self, body: dict) -> list[tuple[list[int], str | None]]:
        from skyt1.tokenizer import messages_from_row

        if "messages" not in body:
            raise BadRequest("missing field 'messages'", "messages")
        try:
            messages = messages_from_row({"messages": body["messages"]}, source="request", require_assistant=False)
            if not messages or messages[-1]["role"] != "user":
                raise BadRequest("'messages' must end with a user message", "messages")
            return [(self.tokenizer.encode_prompt(messages), None)]
        except BadRequest:
            raise
        except ValueError as e:
            raise BadRequest(str(e).removeprefix("request: "), "messages") from None

    def _completion_prompts(self, body: dict) -> list[tuple[list[int], str | None]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("'prompt' must be a string, a list of strings, or token ids", "prompt")
        if len(prompt) > self.config.max_prompts:
            raise BadRequest(f"{len(prompt)} prompts, above this server's limit of {self.config.max_prompts} "
                             f"(--max-prompts)", "prompt")
        out = []
        V = self.engine.model.cfg.vocab_size
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p:
                    raise BadRequest(f"prompt[{i}] is empty", "prompt")
                out.append((self.tokenizer.encode(p), p))
            elif isinstance(p, list) and p and all(_is_token(t) for t in p):
                if not all(0 <= t < V for t in p):
                    raise BadRequest(f"prompt[{i}]: token ids must be in [0, {V})", "prompt")
                out.append((list(p), None))
            else:
                raise BadRequest(f"prompt[{i}] must be a non-empty string or a list of token ids", "prompt")
        return out

    async def _complete(self, rid: str, subs: list[str], p: Parsed, waiter: "_Waiter") -> Response:
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(subs):
                msg = await waiter.next()
                if msg[0] == "error":  # a non-streaming sink gets tuples only
                    self._abort(subs)
                    return self.error(msg[1], msg[2])
                if msg[0] == "done":
                    results[msg[1].request_id] = msg[1]
        except _TimedOut as e:
            self._abort(subs)
            return self.error(504, str(e))
        except _ClientGone:
            self._abort(subs)
            return Response(status_code=499)  # nobody reads it: uvicorn drops it on the closed connection
        finally:
            waiter.close()
        choices, prompt_tokens, completion_tokens = [], 0, 0
        n = p.params.n
        for p_idx, sub in enumerate(subs):
            out = results[sub]
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choice: dict[str, Any] = {"index": p_idx * n + c.index, "finish_reason": c.finish_reason}
                if p.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    choice["logprobs"] = self._chat_logprobs(c.logprobs)
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = self._completion_logprobs(c.logprobs)
                    if out.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = self._prompt_logprobs(out.prompt_logprobs)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        body = {"id": rid, "object": "chat.completion" if p.chat else "text_completion", "created": int(time.time()),
                "model": p.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        if p.chat and results[subs[0]].prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(results[subs[0]].prompt_logprobs)
        return JSONResponse(body)

    async def _stream(self, rid: str, subs: list[str], p: Parsed, waiter: "_Waiter"):
        """Server-sent events. A client that goes away cancels this generator (starlette watches the
        connection while it streams); `finally` then aborts what is still running."""
        created = int(time.time())
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        index_of = {sub: i for i, sub in enumerate(subs)}
        n = p.params.n

        def event(payload: dict | str) -> str:
            return "data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n"

        def chunk(choices: list[dict], **extra) -> str:
            return event({"id": rid, "object": obj, "created": created, "model": p.model, "choices": choices, **extra})

        done, completion_tokens = 0, 0
        waiter.close()  # from here starlette watches the connection (and cancels this generator)
        try:
            if p.chat:
                for p_idx in range(len(subs)):
                    for i in range(n):
                        yield chunk([{"index": p_idx * n + i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
            while done < len(subs):
                try:
                    msg = await waiter.next(watch_client=False)  # starlette watches the client here
                except _TimedOut as e:
                    yield event({"error": {"message": str(e), "type": "timeout_error", "param": None, "code": None}})
                    return
                if isinstance(msg, StepUpdate):
                    completion_tokens += len(msg.token_ids)
                    if not (msg.text or msg.finished):
                        continue
                    index = index_of[msg.request_id] * n + msg.index
                    lp = msg.logprobs if p.params.logprobs is not None else None
                    if p.chat:
                        choice = {"index": index, "delta": {"content": msg.text} if msg.text else {},
                                  "logprobs": self._chat_logprobs(lp), "finish_reason": msg.finish_reason}
                    else:
                        choice = {"index": index, "text": msg.text, "logprobs": self._completion_logprobs(lp),
                                  "finish_reason": msg.finish_reason}
                    yield chunk([choice])
                elif msg[0] == "error":
                    yield event({"error": {"message": msg[2], "type": "server_error", "param": None, "code": None}})
                    return
                elif msg[0] == "done":
                    done += 1
            if p.include_usage:
                prompt_tokens = sum(len(ids) for ids, _ in p.prompts)
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens})
            yield event("[DONE]")
        finally:
            if done < len(subs):
                self._abort(subs)
            waiter.close()

    # -- logprobs in OpenAI's two formats ---------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[dict] | None) -> dict | None:
        """OpenAI's chat format: the sampled token and exactly top_logprobs alternatives; `bytes` are the
        token's own bytes (a piece of a UTF-8 character included), `token` its text as decoded alone."""
        if entries is None:
            return None

        def item(i: int, lp: float) -> dict:
            text = self._token_str(i)
            try:
                raw = self.tokenizer.token_bytes(i)
            except KeyError:  # a padding row of the embedding (Qwen's 152064 > its 151665 tokens)
                raw = text.encode()
            return {"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": list(raw)}

        return {"content": [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(i, lp) for i, lp in e["top"]]}
                            for e in entries]}

    def _completion_logprobs(self, entries: list[dict] | None) -> dict | None:
        """The legacy completions format. top_logprobs holds the sampled token and the top k, as OpenAI
        and vLLM (k or k + 1 entries; logprobs=0: the sampled token alone)."""
        if entries is None:
            return None
        tokens = [self._token_str(e["token_id"]) for e in entries]
        offsets, off = [], 0
        for t in tokens:
            offsets.append(off)
            off += len(t)
        top = []
        for tok, e in zip(tokens, entries):
            d = {tok: max(e["logprob"], MIN_LOGPROB)}
            for i, lp in e["top"]:
                d.setdefault(self._token_str(i), max(lp, MIN_LOGPROB))
            top.append(d)
        return {"tokens": tokens, "token_logprobs": [max(e["logprob"], MIN_LOGPROB) for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    def _prompt_logprobs(self, entries: list[dict | None]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} for the prompt token and the top k."""
        out: list[dict | None] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            d = {str(e["token_id"]): {"logprob": max(e["logprob"], MIN_LOGPROB), "rank": e["rank"],
                                      "decoded_token": self._token_str(e["token_id"])}}
            for r, (i, lp) in enumerate(e["top"], 1):
                d.setdefault(str(i), {"logprob": max(lp, MIN_LOGPROB), "rank": r, "decoded_token": self._token_str(i)})
            out.append(d)
        return out


class _ClientGone(Exception):
    pass


class _TimedOut(Exception):
    pass


class _Waiter:
    """Next engine message for one request, racing the client's disconnect and the request deadline."""

    def __init__(self, sink: Sink, request: HTTPRequest, deadline: float | None):
        self.sink = sink
        self.deadline = deadline
        self.pending: collections.deque = collections.deque()  # taken already, handed out again first
        self._disconnect = asyncio.ensure_future(self._watch(request.receive))

    @staticmethod
    async def _watch(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def next(self, watch_client: bool = True):
        if self.pending:
            return self.pending.popleft()
        if not self.sink.queue.empty():
            return self.sink.queue.get_nowait()
        if watch_client and self._disconnect.done():
            raise _ClientGone()
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        get = asyncio.ensure_future(self.sink.queue.get())
        waits = {get, self._disconnect} if watch_client else {get}
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self._disconnect in done:
            raise _ClientGone()
        raise _TimedOut("request did not finish within --request-timeout; its generation was aborted")

    def close(self) -> None:
        if not self._disconnect.done():
            self._disconnect.cancel()


# -- /metrics --------------------------------------------------------------------------------------
def render_metrics(server: OpenAIServer) -> str:
    """Prometheus text exposition format 0.0.4."""
    s = server.loop.stats
    bm = server.engine.block_manager
    free = bm.num_free
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, value: float) -> None:
        lines.extend([f"# HELP skyt1_{name} {help}", f"# TYPE skyt1_{name} {kind}", f"skyt1_{name} {value}"])

    metric("num_requests_running", "gauge", "Requests with a sample in the running batch.", s.running_requests)
    metric("num_requests_waiting", "gauge", "Requests waiting for a batch slot.", s.waiting_requests)
    metric("num_samples_queued", "gauge", "Samples queued (the --max-queued bound).", server.loop.queued_samples())
    metric("kv_blocks_used", "gauge", "KV cache blocks in use.", bm.num_blocks - free)
    metric("kv_blocks_free", "gauge", "KV cache blocks free (prefix-cached blocks included).", free)
    metric("generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens)
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled (recomputes included).", s.prompt_tokens)
    metric("generation_tokens_per_second", "gauge", "Generated tokens per second over the last ~10 s.",
           round(s.tokens_per_s, 3))
    metric("requests_finished_total", "counter", "Requests finished.", s.requests_finished)
    metric("requests_aborted_total", "counter", "Requests aborted (client gone or timed out).", s.requests_aborted)
    metric("requests_rejected_total", "counter", "Requests refused with 429 (queue full).", server.num_rejected)
    name = "skyt1_time_to_first_token_seconds"
    lines += [f"# HELP {name} Time from a request's arrival at the engine to its first token.",
              f"# TYPE {name} histogram"]
    counts, total, count = s.ttft_counts, s.ttft_sum, s.ttft_count  # read once: the engine thread swaps them
    lines += [f'{name}_bucket{{le="{edge}"}} {c}' for edge, c in zip(TTFT_BUCKETS, counts)]
    lines += [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {total}", f"{name}_count {count}"]
    return "\n".join(lines) + "\n"


# -- the HTTP server -------------------------------------------------------------------------------
class _HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head. uvicorn arms its keep-alive timer only
    after a response and cancels it at the first byte received, so a client that connects and then sends
    its headers one byte at a time (slowloris) would hold a connection for ever. Here every connection
    must deliver a complete request head within timeout_keep_alive (--idle-timeout) of connecting or of
    its previous response, or it is closed."""

    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request head has arrived
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)


class Server:
    """uvicorn serving the app on a socket bound at construction (port 0 picks a free one: see
    server_address). serve_forever() blocks (run it in a thread, or in the main thread where Ctrl-C
    stops it); stop_server() ends both it and the engine thread."""

    def __init__(self, app: OpenAIServer, host: str, port: int):
        self.openai = app
        self.loop = app.loop
        self.engine = app.engine
        self.sock = socket.create_server((host, port), backlog=2048)
        self.server_address = self.sock.getsockname()
        cfg = app.config
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            app.app, http=_HeadDeadlineH11, ws="none", lifespan="off", log_level="warning", access_log=False,
            timeout_keep_alive=cfg.idle_timeout, timeout_graceful_shutdown=cfg.graceful_timeout,
            limit_concurrency=cfg.max_connections,  # uvicorn answers 503 past it, before the app runs
            h11_max_incomplete_event_size=64 * 1024))  # a request head (line + headers) above 64 KiB is refused
        self._done = threading.Event()
        self._started = False

    def serve_forever(self) -> None:
        self._started = True
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._started:
            self._done.wait(timeout=self.openai.config.graceful_timeout + 10)


def build_server(engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "skyt1",
                 config: ServerConfig | None = None) -> Server:
    """A server with its engine thread started; call serve_forever() (or run it in a thread) and
    stop_server() at the end."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer (chat template and text)")
    loop = EngineLoop(engine)
    loop.start()
    return Server(OpenAIServer(loop, model_name, config or ServerConfig()), host, port)


def stop_server(server: Server) -> None:
    server.shutdown()
    server.sock.close()
    server.loop.stop()
    server.loop.join(timeout=10)
