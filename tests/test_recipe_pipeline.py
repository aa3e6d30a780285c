"""The recipe's generate / reformat / export, against a real `skyt1-sample serve` and the real openai client.

A tiny random model behind a real server on 127.0.0.1 (ephemeral port): generate and reformat run as
subprocesses, are SIGKILLed mid-run and rerun; every (id, sample_index) must then appear exactly once
and the rows written before the kill must be unchanged. Retry/backoff runs against a small standard
library HTTP server that answers 429 / 5xx / slowly before answering 200.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Drives a recipe module exactly as `python -m skyt1.recipe <cmd>` does (add_arguments + main), for as long
# as the command is not yet listed in skyt1/recipe/__main__.py's COMMANDS.
_RUNNER = ("import argparse, importlib, sys; m = importlib.import_module('skyt1.recipe.' + sys.argv[1]); "
           "p = argparse.ArgumentParser(); m.add_arguments(p); sys.exit(m.main(p.parse_args(sys.argv[2:])))")


def recipe_argv(cmd: str) -> list[str]:
    from skyt1.recipe.__main__ import COMMANDS

    if cmd in COMMANDS:
        return [sys.executable, "-m", "skyt1.recipe", cmd]
    return [sys.executable, "-c", _RUNNER, cmd]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENAI_API_KEY"] = "test-key"
    env.pop("OPENAI_BASE_URL", None)
    return env


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_chat_checkpoint) -> Path:
    return tiny_chat_checkpoint


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """`python -m skyt1.sample serve` on an ephemeral port; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "skyt1.sample", "serve", "--model", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--port", "0", "--served-model-name", "tiny",
                             "--max-num-seqs", "16", "--num-kv-blocks", "2048"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    url, seen = None, []
    while url is None:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"skyt1-sample serve did not start: {''.join(seen)[-2000:]}")
        seen.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        if m:
            url = m.group(1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _problems(path: Path, n: int) -> list[dict]:
    rng = random.Random()
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if i % 4 == 3:
            rows.append({"id": f"c{i}", "domain": "code", "problem": f"Read two integers and print {a} times their sum.",
                         "tests": {"inputs": ["1 2\n"], "outputs": [str(3 * a)]}})
        else:
            rows.append({"id": i, "domain": "math", "problem": f"What is {a} + {b}?", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _lines(path: Path) -> list[str]:
    """Complete lines only (a line being written when read is not yet a row)."""
    if not path.exists():
        return []
    data = path.read_text(encoding="utf-8")
    return data.split("\n")[:-1]


def _kill_after(argv: list[str], output: Path, min_rows: int, total: int) -> list[str]:
    """Start argv, SIGKILL it once output holds >= min_rows complete rows; return those rows."""
    proc = subprocess.Popen(argv, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(_lines(output)) < min_rows:
            if proc.poll() is not None:
                pytest.fail(f"finished or died before the kill: {proc.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no rows appeared in 90 s")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    before = _lines(output)
    assert min_rows <= len(before) < total, "the kill must land mid-run for this test to mean anything"
    return before


def _run(argv: list[str], timeout: float = 120) -> str:
    r = subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


# ----------------------------------------------------- generate + reformat, killed and resumed


def test_generate_then_reformat_killed_and_resumed(tmp_path, served):
    problems = _problems(tmp_path / "problems.jsonl", 40)
    n = 2
    traces = tmp_path / "traces.jsonl"
    gen = recipe_argv("generate") + [
        "--problems", str(tmp_path / "problems.jsonl"), "--output", str(traces), "--n", str(n),
        "--base-url", served, "--model", "tiny", "--max-tokens", "24", "--temperature", "0.9",
        "--concurrency", "4", "--seed", "3", "--system", "Think step by step."]
    before = _kill_after(gen, traces, min_rows=5, total=n * len(problems))
    log = _run(gen)
    after = _lines(traces)
    assert after[:len(before)] == before  # rows written before the kill are untouched
    rows = [json.loads(x) for x in after]
    keys = [(str(r["id"]), r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == n * len(problems)
    assert set(keys) == {(str(p["id"]), s) for p in problems for s in range(n)}
    by_id = {str(p["id"]): p for p in problems}
    for r in rows:
        p = by_id[str(r["id"])]
        assert r["id"] == p["id"] and r["domain"] == p["domain"] and r["problem"] == p["problem"]
        assert r["finish_reason"] in ("stop", "length") and r["model"] == "tiny"
        assert 0 < r["usage"]["completion_tokens"] <= 24 and r["usage"]["prompt_tokens"] > 0
        if p["domain"] == "math":
            assert r["prompt"] == "Return your final response within \\boxed{}. " + p["problem"]
        else:
            assert r["prompt"].endswith(p["problem"]) and "standard input" in r["prompt"]
    assert "[generate] 0 samples to generate" not in log
    # A third run has nothing left to do and leaves the file alone.
    assert "[generate] 0 samples to generate" in _run(gen)
    assert _lines(traces) == after

    out = tmp_path / "reformatted.jsonl"
    ref = recipe_argv("reformat") + [
        "--input", str(traces), "--output", str(out), "--base-url", served, "--model", "tiny",
        "--max-tokens", "16", "--concurrency", "4", "--price-input", "1.5", "--price-output", "6"]
    before = _kill_after(ref, out, min_rows=5, total=len(rows))
    log = _run(ref)
    after = _lines(out)
    assert after[:len(before)] == before
    done = [json.loads(x) for x in after]
    keys = [(str(r["id"]), r["sample_index"]) for r in done]
    assert len(keys) == len(set(keys)) == len(rows)
    src = {(str(r["id"]), r["sample_index"]): r for r in rows}
    for r in done:
        s = src[(str(r["id"]), r["sample_index"])]
        assert r["source_text"] == s["text"] and r["prompt"] == s["prompt"] and r["domain"] == s["domain"]
        # A random model writes no sections: every row is flagged, with the reason, not silently kept.
        assert r["format_ok"] is False and r["format_reason"].startswith(("missing", "rewrite cut off"))
        assert r["reformat"]["model"] == "tiny" and r["reformat"]["usage"]["completion_tokens"] > 0
    m = re.search(r"tokens: (\d+) prompt \+ (\d+) completion = \d+; cost \$([0-9.]+)", log)
    assert m, log
    p_tok, c_tok, cost = int(m.group(1)), int(m.group(2)), float(m.group(3))
    assert p_tok > 0 and c_tok > 0 and cost == pytest.approx((p_tok * 1.5 + c_tok * 6) / 1e6, abs=1e-4)
    assert re.search(r"format: 0 ok, \d+ flagged", log)


def test_generate_local_engine_resumes_with_the_same_samples(tmp_path, tiny_model_dir):
    from skyt1.recipe import generate

    _problems(tmp_path / "p.jsonl", 3)
    out = tmp_path / "t.jsonl"
    import argparse

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    args = p.parse_args(["--problems", str(tmp_path / "p.jsonl"), "--output", str(out), "--n", "2",
                         "--local-model", str(tiny_model_dir), "--max-tokens", "6", "--seed", "11",
                         "--num-kv-blocks", "256", "--max-model-len", "512"])
    assert generate.main(args) == 0
    first = _lines(out)
    assert len(first) == 6
    # a crash: two samples lost and a torn line; the rerun makes exactly those again, identically (seeded)
    out.write_text("\n".join(first[:1] + first[3:]) + "\n" + first[1][:15])
    assert generate.main(args) == 0
    again = _lines(out)
    assert len(again) == 6
    assert sorted(again) == sorted(first)


# ------------------------------------------------------------------------------ retries and backoff

_OK = {"id": "c", "object": "chat.completion", "created": 0, "model": "scripted",
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}


class _Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = list(script)  # (status, headers, delay_s) per request; then 200s
        self.hits: list[float] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.hits.append(time.monotonic())
            status, headers, delay = self.server.script.pop(0) if self.server.script else (200, {}, 0.0)
        if delay:
            time.sleep(delay)
        body = json.dumps(_OK if status == 200 else
                          {"error": {"message": f"scripted {status}", "type": "x", "code": None}}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer (the timeout case)


def _with_server(script, fn):
    server = _Scripted(script)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        return fn(f"http://127.0.0.1:{server.server_address[1]}/v1", server)
    finally:
        server.shutdown()
        server.server_close()


def _complete(url, policy, timeout=5.0):
    from skyt1.recipe.jobs import ChatClient

    async def go():
        c = ChatClient("scripted", base_url=url, api_key="k", concurrency=2, timeout=timeout, retry=policy, seed=0)
        try:
            return await c.complete([{"role": "user", "content": "hi"}], max_tokens=4), c.totals
        finally:
            await c.close()

    return asyncio.run(go())


def test_retries_429_and_5xx_then_succeeds_honouring_retry_after():
    from skyt1.recipe.jobs import RetryPolicy

    def check(url, server):
        res, totals = _complete(url, RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=2.0))
        assert res.text == "fine" and res.attempts == 4 and res.usage() == {"prompt_tokens": 7, "completion_tokens": 2}
        assert len(server.hits) == 4
        assert server.hits[1] - server.hits[0] >= 0.3  # Retry-After: 0.3 was honoured
        assert totals.retries == 3 and totals.failures == 0 and totals.requests == 1
        assert totals.retry_reasons == {"HTTP 429": 2, "HTTP 503": 1}
        assert totals.prompt_tokens == 7 and totals.completion_tokens == 2

    _with_server([(429, {"Retry-After": "0.3"}, 0), (429, {}, 0), (503, {}, 0)], check)


def test_timeout_is_retried_and_bad_request_is_not():
    import openai

    from skyt1.recipe.jobs import RetryPolicy

    def slow_then_ok(url, server):
        res, totals = _complete(url, RetryPolicy(max_attempts=3, base_delay=0.01), timeout=0.4)
        assert res.text == "fine" and res.attempts == 2 and totals.retry_reasons == {"timeout": 1}

    _with_server([(200, {}, 1.5)], slow_then_ok)

    def bad(url, server):
        with pytest.raises(openai.BadRequestError):
            _complete(url, RetryPolicy(max_attempts=5, base_delay=0.01))
        assert len(server.hits) == 1

    _with_server([(400, {}, 0)], bad)

    def exhausted(url, server):
        with pytest.raises(openai.InternalServerError):
            _complete(url, RetryPolicy(max_attempts=3, base_delay=0.01))
        assert len(server.hits) == 3

    _with_server([(500, {}, 0)] * 5, exhausted)


def test_backoff_grows_exponentially_within_jitter_and_cap():
    from skyt1.recipe.jobs import RetryPolicy

    rng = random.Random()
    p = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=10.0, jitter=0.5)
    for attempt in range(8):
        full = min(10.0, 0.5 * 2 ** attempt)
        for _ in range(50):
            d = p.delay(attempt, rng)
            assert full * 0.5 <= d <= full
    assert p.delay(0, rng, retry_after=3.0) == 3.0
    assert p.delay(0, rng, retry_after=99.0) == 10.0  # a server's Retry-After is capped too
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_prices_table_and_flags():
    from skyt1.recipe.jobs import UsageTotals, resolve_prices

    assert resolve_prices("gpt-4o-mini", None, None) == (0.15, 0.60)
    assert resolve_prices("gpt-4o-mini-2024-07-18", None, None) == (0.15, 0.60)
    assert resolve_prices("gpt-4o-mini", 1.0, None) == (1.0, 0.60)
    assert resolve_prices("my-local-model", None, None) == (None, None)
    t = UsageTotals(prompt_tokens=2_000_000, completion_tokens=500_000)
    assert t.cost(0.15, 0.60) == pytest.approx(0.6)
    assert "unknown" in t.summary("my-local-model", None, None)


# --------------------------------------------------------------------------- resumable file, format


def test_resumable_jsonl_cuts_a_torn_line_and_refuses_redoing(tmp_path):
    from skyt1.recipe.jobs import ResumableJsonl

    path = tmp_path / "o.jsonl"
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    with ResumableJsonl(path, key, fsync=False) as out:
        for i in range(3):
            out.append({"id": "x", "sample_index": i, "text": "é" * i})
    good = path.read_bytes()
    path.write_bytes(good + b'{"id": "x", "sample_index": 3, "te')
    with ResumableJsonl(path, key) as out:
        assert out.repaired_bytes == len(b'{"id": "x", "sample_index": 3, "te')
        assert len(out) == 3 and ("x", 2) in out and ("x", 3) not in out
        with pytest.raises(ValueError, match="already written"):
            out.append({"id": "x", "sample_index": 1})
        out.append({"id": "x", "sample_index": 3})
    assert path.read_bytes().startswith(good) and len(_lines(path)) == 4
    # a file that is all torn line
    path.write_bytes(b'{"id": "y"')
    with ResumableJsonl(path, key) as out:
        assert len(out) == 0 and out.repaired_bytes == 10
    assert path.read_bytes() == b""


GOOD_MATH = ("<|begin_of_thought|>\n\nLet me add: 2 + 2 = 4.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
             "The sum is $\\boxed{4}$.\n\n<|end_of_solution|>")
GOOD_CODE = ("<|begin_of_thought|>\nread, add\n<|end_of_thought|>\n<|begin_of_solution|>\n```python\n"
             "a, b = map(int, input().split())\nprint(a + b)\n```\n<|end_of_solution|>")


@pytest.mark.parametrize("text,domain,finish,ok,reason", [
    (GOOD_MATH, "math", "stop", True, "ok"),
    ("Sure! Here it is:\n" + GOOD_MATH + "\nHope this helps.", "math", "stop", True, "ok"),
    (GOOD_MATH.replace("\\boxed{4}", "4"), "math", "stop", False, "no complete \\boxed{}"),
    (GOOD_MATH.replace("\\boxed{4}$.", "\\boxed{4"), "math", "stop", False, "no complete \\boxed{}"),
    (GOOD_MATH, "math", "length", False, "cut off"),
    (GOOD_MATH.replace("<|end_of_solution|>", ""), "math", "stop", False, "missing <|end_of_solution|>"),
    (GOOD_MATH.replace("<|begin_of_thought|>", "", 1), "math", "stop", False, "missing <|begin_of_thought|>"),
    ("<|begin_of_solution|>x<|end_of_solution|><|begin_of_thought|>y<|end_of_thought|>", "science", "stop", False,
     "out of order"),
    (GOOD_MATH + GOOD_MATH, "math", "stop", False, "repeated"),
    ("<|begin_of_thought|>  <|end_of_thought|><|begin_of_solution|>\\boxed{1}<|end_of_solution|>", "math", "stop",
     False, "empty thought"),
    (GOOD_CODE, "code", "stop", True, "ok"),
    (GOOD_CODE.replace("<|end_of_solution|>", "```python\nprint(1)\n```\n<|end_of_solution|>"), "code", "stop",
     False, "2 code blocks"),
    (GOOD_CODE.replace("```python\n", "").replace("```\n", ""), "code", "stop", False, "0 code blocks"),
    (GOOD_MATH.replace("\\boxed{4}", "B"), "science", "stop", True, "ok"),
])
def test_check_format(text, domain, finish, ok, reason):
    from skyt1.recipe.reformat import check_format

    got_ok, got_reason, cleaned = check_format(text, domain, finish)
    assert got_ok is ok and reason in got_reason
    if ok:
        assert cleaned.startswith("<|begin_of_thought|>") and cleaned.endswith("<|end_of_solution|>")


def test_prompt_template_is_filled_in_one_pass(tmp_path):
    from skyt1.recipe.reformat import DOMAIN_RULES, load_prompt, render_prompt

    shipped = load_prompt(None)
    trace = "I think {problem} and {domain_rule} literally."
    text = render_prompt(shipped, trace, "Compute {trace}.", "code")
    assert trace in text and "Compute {trace}." in text and DOMAIN_RULES["code"] in text
    assert "{trace}" not in text.replace("Compute {trace}.", "").replace(trace, "")
    bad = tmp_path / "p.txt"
    bad.write_text("no placeholder here")
    with pytest.raises(ValueError, match=r"\{trace\}"):
        load_prompt(bad)


# ------------------------------------------------------------------------------------------- export


def _verified(tmp_path: Path) -> Path:
    rows = [
        {"id": 1, "sample_index": 0, "domain": "math", "prompt": "Return your final response within \\boxed{}. 2+2?",
         "text": GOOD_MATH, "format_ok": True, "correct": True, "reason": "equal"},
        {"id": 1, "sample_index": 1, "domain": "math", "prompt": "Return your final response within \\boxed{}. 2+2?",
         "text": GOOD_MATH.replace("add", "sum"), "format_ok": True, "correct": True, "reason": "equal"},
        {"id": "c1", "sample_index": 0, "domain": "code", "prompt": "Add two numbers.", "text": GOOD_CODE,
         "format_ok": False, "format_reason": "solution has 2 code blocks, expected exactly one", "correct": True},
        {"id": 2, "sample_index": 0, "domain": "math", "prompt": "p2", "text": GOOD_MATH, "format_ok": True,
         "correct": False, "reason": "4 vs 5"},
        # straight from verify without reformat: the format is checked here
        {"id": 3, "sample_index": 0, "domain": "math", "problem": "What is 2+2?", "text": GOOD_MATH, "correct": True},
        {"id": 4, "sample_index": 0, "domain": "math", "problem": "x", "text": "the answer is \\boxed{4}",
         "correct": True},
        {"id": 5, "sample_index": 0, "domain": "science", "prompt": "p5", "text": "  ", "correct": True},
        {"id": "c2", "sample_index": 0, "domain": "code", "prompt": "Print 1.", "text": GOOD_CODE, "format_ok": True,
         "correct": True},
    ]
    path = tmp_path / "verified.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("one_per_problem", [False, True])
def test_export_writes_sky_t1_rows_and_report(tmp_path, tiny_model_dir, one_per_problem):
    import argparse

    from skyt1.recipe import export
    from skyt1.tokenizer import ChatTokenizer, messages_from_row

    system = "Think in sections, then answer."
    (tmp_path / "system.txt").write_text(system + "\n")
    p = argparse.ArgumentParser()
    export.add_arguments(p)
    argv = ["--input", str(_verified(tmp_path)), "--system-prompt", str(tmp_path / "system.txt"),
            "--output", str(tmp_path / "data.json"), "--report", str(tmp_path / "report.json"),
            "--tokenizer", str(tiny_model_dir), "--cutoff", "40"]
    assert export.main(p.parse_args(argv + (["--one-per-problem"] if one_per_problem else []))) == 0
    data = json.loads((tmp_path / "data.json").read_text())
    expected = [("Return your final response within \\boxed{}. 2+2?", GOOD_MATH)]
    if not one_per_problem:
        expected.append(("Return your final response within \\boxed{}. 2+2?", GOOD_MATH.replace("add", "sum")))
    expected += [("Return your final response within \\boxed{}. What is 2+2?", GOOD_MATH), ("Print 1.", GOOD_CODE)]
    assert data == [{"system": system, "conversations": [{"from": "user", "value": u}, {"from": "assistant", "value": a}]}
                    for u, a in expected]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows_in"] == 8 and report["kept"] == len(expected)
    dropped = report["dropped_by_reason"]
    assert dropped["incorrect"] == 1 and dropped["empty text"] == 1
    assert dropped["format: solution has 2 code blocks, expected exactly one"] == 1
    assert sum(v for k, v in dropped.items() if k.startswith("format: missing")) == 1
    assert dropped.get("another sample of the problem kept", 0) == (1 if one_per_problem else 0)
    assert report["by_domain"]["code"] == {"rows": 2, "kept": 1,
                                           "dropped: format: solution has 2 code blocks, expected exactly one": 1}
    assert report["length_chars"]["assistant"]["max"] == max(len(a) for _, a in expected)
    tok = ChatTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tok.encode_chat(messages_from_row(r))[0]) for r in data]
    assert report["length_tokens"]["row"]["max"] == max(lengths)
    assert report["length_tokens"]["over_cutoff"] == sum(n > 40 for n in lengths)


def test_export_refuses_unverified_rows(tmp_path):
    from skyt1.recipe.export import select_rows

    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"id": 1, "sample_index": 0, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"v\.jsonl:1: no verdict"):
        select_rows(path, False)


def test_generate_rows_through_verify_into_export(tmp_path):
    """The real chain: rows shaped as generate/reformat write them, graded by verify, exported."""
    import argparse

    from skyt1.recipe import export
    from skyt1.recipe.generate import build_user_prompt
    from skyt1.recipe.verify import verify_file

    problems = [{"id": 1, "domain": "math", "problem": "What is 2+2?", "answer": "4"},
                {"id": 2, "domain": "math", "problem": "What is 2+3?", "answer": "5"},
                {"id": "c", "domain": "code", "problem": "Read a and b, print a+b.",
                 "tests": {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    texts = {1: GOOD_MATH, 2: GOOD_MATH, "c": GOOD_CODE}  # problem 2's answer (4) is wrong
    rows = [{"id": p["id"], "sample_index": 0, "domain": p["domain"], "problem": p["problem"],
             "prompt": build_user_prompt(p), "text": texts[p["id"]], "format_ok": True, "format_reason": "ok"}
            for p in problems]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    verify_file(tmp_path / "r.jsonl", tmp_path / "p.jsonl", tmp_path / "v.jsonl", workers=1, log=lambda m: None)
    (tmp_path / "s.txt").write_text("sys")
    p = argparse.ArgumentParser()
    export.add_arguments(p)
    assert export.main(p.parse_args(["--input", str(tmp_path / "v.jsonl"), "--system-prompt", str(tmp_path / "s.txt"),
                                     "--output", str(tmp_path / "d.json")])) == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["conversations"][0]["value"] for r in data] == [build_user_prompt(problems[0]),
                                                              build_user_prompt(problems[2])]
    assert [r["conversations"][1]["value"] for r in data] == [GOOD_MATH, GOOD_CODE]
