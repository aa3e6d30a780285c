"""OpenAI-compatible HTTP server over one engine (standard library only).

Routes: GET /v1/models, GET /health, POST /v1/chat/completions, POST /v1/completions; streaming as
server-sent events (chunked transfer encoding), or one JSON body. Any model name is accepted.

Threads: ThreadingHTTPServer gives each connection a thread, which parses and tokenizes the request and
hands it to the single engine thread (EngineLoop) through a queue; the engine thread owns the engine,
steps it while anything is running (so concurrent requests share each batch) and pushes each request's
updates into that request's own queue. A client that goes away (a failed write, or its socket reading
EOF while we wait) has its request aborted; the others keep running.

Errors are {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed JSON, bad
field, prompt + max_tokens beyond the context), 404 for an unknown route, 500 if the engine fails.
"""
from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skyt1.sample.engine import LLMEngine, RequestOutput, StepUpdate
from skyt1.sample.params import SamplingParams


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- the engine thread -----------------------------------------------------------------------------
class EngineLoop(threading.Thread):
    """Owns the engine. Messages put on a request's queue: StepUpdate, ("done", RequestOutput),
    ("error", status, message)."""

    def __init__(self, engine: LLMEngine):
        super().__init__(name="skyt1-engine", daemon=True)
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self._live: dict[str, tuple[Any, queue.Queue]] = {}  # request id -> (Request, sink)
        self._stopping = threading.Event()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: queue.Queue,
               prompt: str | None = None, stream: bool = False) -> None:
        self.inbox.put(("add", request_id, prompt_ids, params, prompt, stream, sink))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        self._stopping.set()
        self.inbox.put(("wake",))

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, rid, ids, params, prompt, stream, sink = msg
            try:
                req = self.engine.add_request(rid, ids, params, prompt, stream=stream)
            except ValueError as e:
                sink.put(("error", 400, str(e)))
                return
            except Exception as e:  # a bug must fail this request, not the engine thread
                traceback.print_exc()
                sink.put(("error", 500, f"{type(e).__name__}: {e}"))
                return
            self._live[rid] = (req, sink)
        elif msg[0] == "abort":
            self.engine.abort(msg[1])
            self._live.pop(msg[1], None)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                # Block only when idle; otherwise take what has arrived and keep stepping.
                msg = self.inbox.get(timeout=0.5) if not self.engine.has_unfinished() else self.inbox.get_nowait()
                self._handle(msg)
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                updates = self.engine.step()
            except Exception as e:  # an engine failure must reach every waiting client, not kill the thread
                traceback.print_exc()
                for rid, (_, sink) in list(self._live.items()):
                    self.engine.abort(rid)
                    sink.put(("error", 500, f"engine failure: {type(e).__name__}: {e}"))
                self._live.clear()
                continue
            touched = set()
            for u in updates:
                entry = self._live.get(u.request_id)
                if entry is not None:
                    entry[1].put(u)
                    touched.add(u.request_id)
            for rid in touched:
                req, sink = self._live[rid]
                if req.finished:
                    sink.put(("done", self.engine.request_output(req)))
                    del self._live[rid]


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


def sampling_params_from(body: dict, chat: bool) -> SamplingParams:
    num = (int, float)
    max_tokens = _get(body, "max_completion_tokens", (int,)) if chat else None
    max_tokens = max_tokens if max_tokens is not None else _get(body, "max_tokens", (int,))
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if chat:
        logprobs = None
        if _get(body, "logprobs", (bool,), False):
            logprobs = _get(body, "top_logprobs", (int,), 0)
    else:
        logprobs = _get(body, "logprobs", (int,))
    try:
        return SamplingParams(
            n=_get(body, "n", (int,), 1),
            temperature=_get(body, "temperature", num, 1.0),
            top_p=_get(body, "top_p", num, 1.0),
            top_k=_get(body, "top_k", (int,), 0),
            min_p=_get(body, "min_p", num, 0.0),
            repetition_penalty=_get(body, "repetition_penalty", num, 1.0),
            presence_penalty=_get(body, "presence_penalty", num, 0.0),
            frequency_penalty=_get(body, "frequency_penalty", num, 0.0),
            seed=_get(body, "seed", (int,)),
            max_tokens=max_tokens,
            stop=stop or (),
            stop_token_ids=tuple(_get(body, "stop_token_ids", (list,), [])),
            ignore_eos=_get(body, "ignore_eos", (bool,), False),
            logprobs=logprobs,
            include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
            skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, loop: EngineLoop, model_name: str):
        self.loop = loop
        self.engine = loop.engine
        self.model_name = model_name
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt: str, *args) -> None:  # quiet: one line per request on stderr is noise at scale
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "server_error")
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _client_gone(self) -> bool:
        """True when the peer closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _content_length(self) -> int:
        try:
            return max(0, int(self.headers.get("Content-Length", "0")))
        except ValueError:
            self.close_connection = True  # cannot tell where the next request starts
            raise BadRequest("bad Content-Length header") from None

    def _skip_body(self) -> None:
        try:
            self.rfile.read(self._content_length())
        except BadRequest:
            pass

    def _read_body(self) -> dict:
        length = self._content_length()
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # -- routes -----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "skyt1"}]})
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._skip_body()  # consumed, so the kept-alive connection stays in step
            self._error(404, f"no route POST {self.path}")
            return
        try:
            body = self._read_body()
            chat = path == "/v1/chat/completions"
            prompts = self._chat_prompt(body) if chat else self._completion_prompts(body)
            params = sampling_params_from(body, chat)
            max_len = self.server.engine.max_model_len
            for ids, _ in prompts:
                if len(ids) + (params.max_tokens or 1) > max_len:
                    raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                     f"context length ({max_len} tokens)", "max_tokens")
            stream = _get(body, "stream", (bool,), False)
            opts = _get(body, "stream_options", (dict,), {}) or {}
        except BadRequest as e:
            self._error(400, str(e), e.param)
            return
        model = body.get("model") if isinstance(body.get("model"), str) else self.server.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        sub_ids = [rid if len(prompts) == 1 else f"{rid}-{i}" for i in range(len(prompts))]
        sink: queue.Queue = queue.Queue()
        for sub, (ids, text) in zip(sub_ids, prompts):
            self.server.loop.submit(sub, ids, params, sink, text, stream=stream)
        try:
            if stream:
                self._stream(rid, sub_ids, prompts, params, chat, model, sink, bool(opts.get("include_usage")))
            else:
                self._complete(rid, sub_ids, params, chat, model, sink)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            for sub in sub_ids:
                self.server.loop.abort(sub)
            self.close_connection = True

    def _chat_prompt(self, body: dict) -> list[tuple[list[int], str | None]]:
        from skyt1.tokenizer import messages_from_row

        tok = self.server.engine.tokenizer
        if "messages" not in body:
            raise BadRequest("missing field 'messages'", "messages")
        try:
            messages = messages_from_row({"messages": body["messages"]}, source="request", require_assistant=False)
            if not messages or messages[-1]["role"] != "user":
                raise BadRequest("'messages' must end with a user message", "messages")
            return [(tok.encode_prompt(messages), None)]
        except BadRequest:
            raise
        except ValueError as e:
            raise BadRequest(str(e).removeprefix("request: "), "messages") from None

    def _completion_prompts(self, body: dict) -> list[tuple[list[int], str | None]]:
        tok = self.server.engine.tokenizer
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("'prompt' must be a string, a list of strings, or token ids", "prompt")
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p:
                    raise BadRequest(f"prompt[{i}] is empty", "prompt")
                out.append((tok.encode(p), p))
            elif isinstance(p, list) and p and all(_is_token(t) for t in p):
                V = self.server.engine.model.cfg.vocab_size
                if not all(0 <= t < V for t in p):
                    raise BadRequest(f"prompt[{i}]: token ids must be in [0, {V})", "prompt")
                out.append((list(p), None))
            else:
                raise BadRequest(f"prompt[{i}] must be a non-empty string or a list of token ids", "prompt")
        return out

    def _wait(self, sink: queue.Queue):
        """Next message for this request; raises ConnectionAbortedError if the client went away."""
        while True:
            try:
                return sink.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():
                    raise ConnectionAbortedError("client disconnected")

    def _complete(self, rid, sub_ids, params, chat, model, sink) -> None:
        results: dict[str, RequestOutput] = {}
        while len(results) < len(sub_ids):
            msg = self._wait(sink)
            if isinstance(msg, tuple) and msg[0] == "error":
                for sub in sub_ids:
                    self.server.loop.abort(sub)
                self._error(msg[1], msg[2])
                return
            if isinstance(msg, tuple) and msg[0] == "done":
                results[msg[1].request_id] = msg[1]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p_idx, sub in enumerate(sub_ids):
            out = results[sub]
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choice: dict[str, Any] = {"index": p_idx * params.n + c.index, "finish_reason": c.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    choice["logprobs"] = self._chat_logprobs(c.logprobs)
                else:
                    choice["text"] = c.text
                    choice["logprobs"] = self._completion_logprobs(c.logprobs)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        self._send_json(200, {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def _stream(self, rid, sub_ids, prompts, params, chat, model, sink, include_usage) -> None:
        first = self._wait(sink)  # an immediate rejection still gets a plain JSON error
        if isinstance(first, tuple) and first[0] == "error":
            for sub in sub_ids:
                self.server.loop.abort(sub)
            self._error(first[1], first[2])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        index_of = {sub: i for i, sub in enumerate(sub_ids)}

        def send(payload: dict | str) -> None:
            data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        if chat:
            for p_idx in range(len(sub_ids)):
                for i in range(params.n):
                    send({"id": rid, "object": obj, "created": created, "model": model, "choices": [
                        {"index": p_idx * params.n + i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}]})
        done, completion_tokens = 0, 0
        msg = first
        while True:
            if isinstance(msg, tuple) and msg[0] == "error":
                send({"error": {"message": msg[2], "type": "server_error", "param": None, "code": None}})
                break
            if isinstance(msg, tuple) and msg[0] == "done":
                done += 1
                if done == len(sub_ids):
                    break
            elif isinstance(msg, StepUpdate):
                completion_tokens += len(msg.token_ids)
                if msg.text or msg.finished:
                    index = index_of[msg.request_id] * params.n + msg.index
                    lp = msg.logprobs if params.logprobs is not None else None
                    if chat:
                        choice = {"index": index, "delta": {"content": msg.text} if msg.text else {},
                                  "logprobs": self._chat_logprobs(lp), "finish_reason": msg.finish_reason}
                    else:
                        choice = {"index": index, "text": msg.text, "logprobs": self._completion_logprobs(lp),
                                  "finish_reason": msg.finish_reason}
                    send({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})
            msg = self._wait(sink)
        if include_usage:
            prompt_tokens = sum(len(ids) for ids, _ in prompts)
            send({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- logprobs in OpenAI's two formats ---------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        return self.server.engine.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None
        content = []
        for e in entries:
            tok = self._token_str(e["token_id"])
            content.append({"token": tok, "logprob": e["logprob"], "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": (t := self._token_str(i)), "logprob": lp,
                                              "bytes": list(t.encode())} for i, lp in e["top"]]})
        return {"content": content}

    def _completion_logprobs(self, entries: list[dict] | None) -> dict | None:
        if entries is None:
            return None
        tokens = [self._token_str(e["token_id"]) for e in entries]
        offsets, off = [], 0
        for t in tokens:
            offsets.append(off)
            off += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token_str(i): lp for i, lp in e["top"]} for e in entries],
                "text_offset": offsets}


def build_server(engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "skyt1") -> Server:
    """A server with its engine thread started; call serve_forever() (or run it in a thread) and
    stop_server() at the end."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer (chat template and text)")
    loop = EngineLoop(engine)
    loop.start()
    return Server((host, port), loop, model_name)


def stop_server(server: Server) -> None:
    server.shutdown()
    server.server_close()
    server.loop.stop()
    server.loop.join(timeout=10)
