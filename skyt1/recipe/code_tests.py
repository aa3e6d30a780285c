"""Code verification: the last fenced Python block of a response, run against a problem's tests in the
sandbox (one fresh sandboxed process per test; the first failing test ends the run).

Test formats (a dict, or the same as a JSON string, as APPS/TACO store it):
- stdin/stdout: {"inputs": [str, ...], "outputs": [str, ...]}; an input or output given as a list of
  lines is joined with newlines. The output matches when its whitespace-separated tokens equal the
  expected ones, numbers compared with a tolerance of 1e-6 (absolute or relative).
- call-based: {"fn_name": name, "inputs": [...], "outputs": [...]}. APPS/TACO give each input as a list of
  arguments and each output as the value (often wrapped in a one-element list, which is accepted too);
  LiveCodeBench gives each input as a string of newline-separated JSON arguments and each output as a
  JSON string. The program may define `name` at top level or as a method of `class Solution`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from skyt1.recipe.sandbox import RunResult, SandboxLimits, SandboxPolicy, run_sandboxed
from skyt1.recipe.verdict import Verdict

NUMBER_TOL = 1e-6

__all__ = ["Verdict", "TestCase", "extract_last_code_block", "parse_tests", "run_code_tests", "grade_code",
           "outputs_match", "results_match"]

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)```", re.S)
_PYTHON_TAGS = {"python", "python3", "py", "py3", "python2"}


def extract_last_code_block(text: str | None) -> str | None:
    """The last ```python (or ```py) fenced block; if the response has none, its last unlabelled block.
    Blocks in other languages are never taken. None when there is no such block or it is empty."""
    if not text:
        return None
    tagged, untagged = None, None
    for m in _FENCE_RE.finditer(text):
        tag = m.group(1).lower()
        if tag in _PYTHON_TAGS:
            tagged = m.group(2)
        elif tag == "":
            untagged = m.group(2)
    code = tagged if tagged is not None else untagged
    if code is None or not code.strip():
        return None
    return code


@dataclass(frozen=True)
class TestCase:
    """stdio: stdin/expected_stdout set. call: args/expected set (fn_name shared by all tests)."""

    stdin: str | None = None
    expected_stdout: str | None = None
    args: list | None = None
    expected: Any = None


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "\n".join(value)
    raise ValueError(f"{what} must be a string or a list of strings, got {type(value).__name__}")


def parse_tests(tests: dict | str) -> tuple[str | None, list[TestCase]]:
    """(fn_name or None, test cases) from an APPS/TACO/LiveCodeBench-style tests object."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"tests is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(tests, dict):
        raise ValueError(f"tests must be an object with 'inputs' and 'outputs', got {type(tests).__name__}")
    for key in ("inputs", "outputs"):
        if not isinstance(tests.get(key), list):
            raise ValueError(f"tests['{key}'] must be a list")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if len(inputs) != len(outputs):
        raise ValueError(f"tests has {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("tests has no test cases")
    fn_name = tests.get("fn_name") or tests.get("func_name")
    if fn_name is not None and not (isinstance(fn_name, str) and fn_name.isidentifier()):
        raise ValueError(f"tests['fn_name'] must be a Python identifier, got {fn_name!r}")
    cases = []
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        if fn_name is None:
            cases.append(TestCase(stdin=_text(inp, f"tests['inputs'][{i}]"),
                                  expected_stdout=_text(out, f"tests['outputs'][{i}]")))
        elif isinstance(inp, str):
            try:
                args = [json.loads(line) for line in inp.split("\n") if line.strip()]
                expected = json.loads(out) if isinstance(out, str) else out
            except json.JSONDecodeError as e:
                raise ValueError(f"tests case {i}: call-based input/output given as a string must be JSON "
                                 f"({e.msg})") from None
            cases.append(TestCase(args=args, expected=expected))
        elif isinstance(inp, list):
            cases.append(TestCase(args=inp, expected=out))
        else:
            raise ValueError(f"tests['inputs'][{i}] must be a list of arguments or a string of JSON lines")
    return fn_name, cases


_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def outputs_match(got: str, expected: str) -> bool:
    """Whitespace-insensitive token comparison; numeric tokens within NUMBER_TOL (absolute or relative)."""
    g, e = got.split(), expected.split()
    if g == e:
        return True
    if len(g) != len(e):
        return False
    for a, b in zip(g, e):
        if a == b:
            continue
        if not (_NUMBER_RE.fullmatch(a) and _NUMBER_RE.fullmatch(b)):
            return False
        if not math.isclose(float(a), float(b), rel_tol=NUMBER_TOL, abs_tol=NUMBER_TOL):
            return False
    return True


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        return math.isclose(a, b, rel_tol=NUMBER_TOL, abs_tol=NUMBER_TOL)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    return a == b


def results_match(got: Any, expected: Any) -> bool:
    """Return value against expected (tuples arrive as lists); APPS's one-element wrapping is accepted."""
    if _values_equal(got, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _values_equal(got, expected[0])


def _short(value: Any, n: int = 80) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=repr)
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def _failure(i: int, r: RunResult, limits: SandboxLimits) -> str:
    if r.status == "timeout":
        return f"test {i}: time limit exceeded ({limits.timeout_s:g} s)"
    if r.status == "cpu":
        return f"test {i}: CPU time limit exceeded ({limits.timeout_s:g} s)"
    if r.status == "memory":
        return f"test {i}: memory limit exceeded ({limits.memory_mb} MB)"
    if r.status == "output":
        return f"test {i}: output limit exceeded"
    if r.status == "setup":
        return f"sandbox could not start: {r.stderr.decode('utf-8', 'replace')[-400:]}"  # says what is missing
    lines = [x for x in r.stderr.decode("utf-8", "replace").splitlines() if x.strip()]
    return f"test {i}: runtime error (exit code {r.returncode}): {lines[-1][:200] if lines else 'no message'}"


def run_code_tests(code: str, tests: dict | str, *, timeout_s: float = 6.0, memory_mb: int = 1024,
                   policy: SandboxPolicy = SandboxPolicy()) -> Verdict:
    """Run `code` against every test (stops at the first failure). timeout_s bounds each test's CPU time
    and, plus a 1 s start-up grace, its wall clock; memory_mb its address space. Only the program and
    each test's input enter the sandbox; the expected outputs stay in this process."""
    fn_name, cases = parse_tests(tests)
    details: dict[str, Any] = {"total": len(cases), "passed": 0, "mode": "call" if fn_name else "stdio"}
    if not code or not code.strip():
        return Verdict(False, "no code to run", code, details)
    try:
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        return Verdict(False, f"syntax error: {type(e).__name__}: {e}"[:300], code, details)
    wall = 0.0
    for i, case in enumerate(cases):
        if fn_name is None:
            expected_len = len(case.expected_stdout.encode())
            limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb,
                                   max_output_bytes=min(max(1 << 20, 4 * expected_len + (64 << 10)), 64 << 20))
            r = run_sandboxed(code, stdin=case.stdin.encode(), limits=limits, policy=policy)
        else:
            limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
            r = run_sandboxed(code, call={"fn_name": fn_name, "args": case.args}, limits=limits, policy=policy)
        wall += r.wall_s
        details["isolation"] = r.isolation
        details["wall_s"] = round(wall, 3)
        if r.status != "ok":
            details["failed_test"] = i
            return Verdict(False, _failure(i, r, limits), code, details)
        if fn_name is None:
            got = r.stdout.decode("utf-8", "replace")
            if not outputs_match(got, case.expected_stdout):
                details["failed_test"] = i
                return Verdict(False, f"test {i}: wrong answer: expected {_short(case.expected_stdout)}, "
                                      f"got {_short(got)}", code, details)
        else:
            try:
                reply = json.loads(r.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
            except (ValueError, IndexError):
                details["failed_test"] = i
                return Verdict(False, f"test {i}: no result from the call", code, details)
            if not reply.get("ok"):
                details["failed_test"] = i
                return Verdict(False, f"test {i}: runtime error: {reply.get('error', '?')[:200]}", code, details)
            if not results_match(reply.get("result"), case.expected):
                details["failed_test"] = i
                return Verdict(False, f"test {i}: wrong answer: expected {_short(case.expected)}, "
                                      f"got {_short(reply.get('result'))}", code, details)
        details["passed"] = i + 1
    return Verdict(True, f"passed all {len(cases)} tests", code, details)


def grade_code(response_text: str, tests: dict | str, *, timeout_s: float = 6.0, memory_mb: int = 1024,
               policy: SandboxPolicy = SandboxPolicy()) -> Verdict:
    """Extract the last Python block of a response and run it against the tests."""
    code = extract_last_code_block(response_text)
    if code is None:
        return Verdict(False, "no Python code block in the response", None, {})
    return run_code_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb, policy=policy)
