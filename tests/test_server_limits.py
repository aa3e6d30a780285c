"""The server under hostile or careless clients, on 127.0.0.1 against a real server with small limits:
request smuggling, slowloris, fake huge bodies, an n=1000 request, a full queue, clients that leave, a
request past its timeout, and /metrics. Every probe is bounded in count and time."""
import json
import select
import socket
import threading
import time

import pytest

from skyt1.sample.server import ServerConfig
from test_server import client, raw_post, serving

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402  (the format's own parser)

LIMITS = ServerConfig(max_n=4, max_prompts=3, max_body_bytes=64 * 1024, max_queued=4, idle_timeout=1.0,
                      body_timeout=2.0)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("tok"), LIMITS, max_num_seqs=4) as s:
        yield s


def talk(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout: then b"<open>" is appended)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(raw)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data
    except socket.timeout:
        return out + b"<open>"
    finally:
        s.close()


def normal_request_seconds(port: int) -> float:
    t = time.monotonic()
    r = client(port).completions.create(model="m", prompt="1 + 1 =", max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8
    return time.monotonic() - t


def baseline(port: int) -> float:
    return min(normal_request_seconds(port) for _ in range(3))


def test_smuggling_framings_are_refused(limited):
    llm, port, engine = limited
    follow = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"Content-Length: -5\r\n", b"Content-Length: 5\r\nContent-Length: 7\r\n",
                 b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"Content-Length: 1e3\r\n"):
        got = talk(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\n" + follow)
        # one 400 and a closed connection: the smuggled GET is never answered
        assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.1 ") == 1 and not got.endswith(b"<open>"), got


def test_slowloris_connections_neither_stall_nor_stay(limited):
    llm, port, engine = limited
    base = baseline(port)
    socks = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            socks.append(s)
        assert normal_request_seconds(port) < 2 * base + 1.0  # generous: a hang guard, not a benchmark
        # dribble one header byte per connection every 0.25 s: each byte used to reset the timer
        opened = time.monotonic()
        open_ = set(range(len(socks)))
        while open_ and time.monotonic() - opened < 8:
            for i in list(open_):
                try:
                    socks[i].sendall(b"X")
                except OSError:
                    open_.discard(i)
            readable, _, _ = select.select([socks[i] for i in open_], [], [], 0.25)
            for s in readable:
                try:
                    if s.recv(4096) == b"":
                        open_.discard(socks.index(s))
                except OSError:
                    open_.discard(socks.index(s))
        assert not open_, f"{len(open_)} of 150 slow connections still open after 8 s (--idle-timeout 1 s)"
        assert time.monotonic() - opened > 0.5  # closed by the timeout, not at once
    finally:
        for s in socks:
            s.close()
    # an idle kept-alive connection is closed too, after its response
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    got, t = b"", time.monotonic()
    while (data := s.recv(4096)):
        got += data
    assert got.startswith(b"HTTP/1.1 200 ") and time.monotonic() - t < 8
    s.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:  # the server runs in this process
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_huge_bodies_are_refused_without_reading_them(limited):
    llm, port, engine = limited
    before = _rss_bytes()
    for _ in range(3):  # announced 8 GB: refused from the header, the connection closed
        got = talk(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 8000000000\r\n\r\n" + b"x" * 65536)
        assert got.startswith(b"HTTP/1.1 413 ") and b"--max-body-bytes" in got and not got.endswith(b"<open>")
    # a chunked body has no length up front: refused as soon as it passes the limit
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = 0
    try:
        while sent < 4 * 2**20 and not select.select([s], [], [], 0)[0]:
            s.sendall(b"4000\r\n" + b"y" * 0x4000 + b"\r\n")
            sent += 0x4000
    except OSError:
        pass  # the server closed while we were still sending
    got = s.recv(65536)
    s.close()
    assert got.startswith(b"HTTP/1.1 413 ")  # (what was sent partly sits in loopback socket buffers)
    assert _rss_bytes() - before < 200 * 2**20
    with pytest.raises(openai.APIStatusError) as e:  # and through the client
        client(port).completions.create(model="m", prompt="x" * 70000, max_tokens=2)
    assert e.value.status_code == 413


def test_huge_n_and_prompt_counts_are_refused_and_do_not_slow_others(limited):
    llm, port, engine = limited
    base = baseline(port)
    stop = threading.Event()
    refusals = []

    def flood():
        c = client(port)
        while not stop.is_set():
            try:
                c.completions.create(model="m", prompt="hi", max_tokens=100, n=1000)
            except openai.BadRequestError as e:
                refusals.append(e.body)

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        worst = max(normal_request_seconds(port) for _ in range(3))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert refusals and all(r["param"] == "n" and "--max-n" in r["message"] for r in refusals)
    assert worst < 2 * base + 1.0, (worst, base)  # generous: a hang guard, not a benchmark
    with pytest.raises(openai.BadRequestError, match="max-prompts"):
        client(port).completions.create(model="m", prompt=["a", "b", "c", "d"], max_tokens=2)
    assert not engine.has_unfinished()


def _metrics(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {s.name + (s.labels.get("le", "") and f"[{s.labels['le']}]"): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _long_request(port: int, stream: bool, n: int = 4) -> socket.socket:
    body = json.dumps({"model": "m", "prompt": "go", "n": n, "max_tokens": 180, "ignore_eos": True,
                       "temperature": 0, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def _wait(cond, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_queue_bound_gives_429_and_metrics_show_it(limited):
    llm, port, engine = limited
    # The engine steps only while the gate is open: B's place in the queue does not depend on how fast
    # A runs on a loaded machine.
    gate, real_step = threading.Event(), engine.step
    gate.set()

    def gated_step():
        gate.wait(30)
        return real_step()

    engine.step = gated_step
    a = _long_request(port, stream=True)  # fills the 4 batch slots
    b = None
    try:
        # A's first step is over and published (so no count of A's samples as waiting is left over)
        assert _wait(lambda: _metrics(port)["skyt1_num_requests_running"] == 1)
        assert len(engine.scheduler.running) == 4
        gate.clear()  # A cannot finish now
        b = _long_request(port, stream=False)  # waits: 4 samples queued, the bound
        assert _wait(lambda: _metrics(port)["skyt1_num_samples_queued"] == 4)
        with pytest.raises(openai.RateLimitError, match="max-queued"):
            client(port).completions.create(model="m", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max-queued"):  # 2 x 4 samples can never fit in 4
            client(port).completions.create(model="m", prompt=["a", "b"], n=4, max_tokens=2)
        gate.set()
        assert _wait(lambda: _metrics(port)["skyt1_num_requests_waiting"] == 1)
        m = _metrics(port)
        assert m["skyt1_num_requests_running"] == 1 and m["skyt1_requests_rejected_total"] >= 1
        assert m["skyt1_kv_blocks_used"] >= 4 and m["skyt1_kv_blocks_used"] + m["skyt1_kv_blocks_free"] == 128
    finally:
        gate.set()
        engine.step = real_step
        a.close()
        if b is not None:
            b.close()
    assert _wait(lambda: not engine.has_unfinished())  # both were aborted when their clients left
    r = client(port).completions.create(model="m", prompt="hi", max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    m = _metrics(port)
    assert m["skyt1_num_requests_running"] == 0 and m["skyt1_num_samples_queued"] == 0
    assert m["skyt1_generation_tokens_total"] >= r.usage.completion_tokens
    assert m["skyt1_time_to_first_token_seconds_count"] >= 1
    buckets = [v for k, v in m.items() if k.startswith("skyt1_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == m["skyt1_time_to_first_token_seconds_count"]


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_the_generation(limited, stream):
    """The issue's case: a client that leaves must not leave its 4 x 180 tokens generating."""
    llm, port, engine = limited
    aborted = []
    real_abort = engine.abort

    def spy(request_id):
        aborted.append(request_id in engine.requests)  # still running when aborted?
        real_abort(request_id)

    engine.abort = spy
    try:
        start = engine.num_generated_tokens
        s = _long_request(port, stream=stream)
        assert _wait(lambda: engine.num_generated_tokens - start >= 8)
        s.close()
        assert _wait(lambda: not engine.has_unfinished())
        generated = engine.num_generated_tokens - start
    finally:
        engine.abort = real_abort
    assert aborted and aborted[0], "the request was not aborted while it ran"
    assert generated < 4 * 180, generated
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_slow_body_gets_408(limited):
    llm, port, engine = limited
    t = time.monotonic()
    got = talk(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    assert got.startswith(b"HTTP/1.1 408 ") and b"--body-timeout" in got and not got.endswith(b"<open>")
    assert 1.5 < time.monotonic() - t < 8


def test_request_timeout_gives_504_and_aborts(tmp_path):
    with serving(tmp_path, ServerConfig(request_timeout=0.3), max_num_seqs=4) as (llm, port, engine):
        real_step = engine.step

        def slow_step():  # >= 180 x 5 ms: the request cannot finish within 0.3 s, however fast the machine
            time.sleep(0.005)
            return real_step()

        engine.step = slow_step
        t = time.monotonic()
        status, data = raw_post(port, "/v1/completions", json.dumps(
            {"prompt": "go", "n": 4, "max_tokens": 180, "ignore_eos": True}).encode())
        assert status == 504 and "--request-timeout" in data["error"]["message"]
        assert time.monotonic() - t < 5
        assert _wait(lambda: not engine.has_unfinished(), 10)
        assert engine.num_generated_tokens < 4 * 180


def test_bad_limits_fail_before_the_model_loads(capsys):
    from skyt1.sample.cli import main

    for flag, value in (("--max-n", "0"), ("--idle-timeout", "-1"), ("--max-body-bytes", "0")):
        assert main(["serve", "--model", "/nonexistent", flag, value]) == 2
        assert flag.removeprefix("--").replace("-", "_") in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_queued"):
        ServerConfig(max_queued=0)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_stepping_between_the_prompts_of_one_request(limited, stream):
    """The engine may finish prompt 0 before it takes prompt 1 from its inbox: prompt 0's output must
    not be mistaken for prompt 1's acceptance (the request then waited for ever)."""
    llm, port, engine = limited
    loop = next(t for t in threading.enumerate() if t.name == "skyt1-engine" and t.engine is engine)
    real_submit = loop.submit

    def late_second(request_id, *args, **kwargs):
        if request_id.endswith("-1"):
            time.sleep(0.3)  # on the event loop: prompt 0 runs to its end meanwhile
        return real_submit(request_id, *args, **kwargs)

    loop.submit = late_second
    try:
        r = client(port).with_options(timeout=20).completions.create(
            model="m", prompt=["a", "b"], max_tokens=1, temperature=0, stream=stream)
        indices = sorted(c.choices[0].index for c in r if c.choices) if stream else [c.index for c in r.choices]
    finally:
        loop.submit = real_submit
    assert indices == [0, 1]


def test_connections_beyond_the_cap_get_503_and_the_cap_frees_when_they_close(tmp_path):
    with serving(tmp_path, ServerConfig(max_connections=3, idle_timeout=30.0), max_num_seqs=4) as (llm, port, _e):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.3)  # the server has accepted them
            got = talk(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 503 "), got[:200]
        finally:
            for s in idle:
                s.close()
        assert _wait(lambda: talk(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                     .startswith(b"HTTP/1.1 200 "), 10)
