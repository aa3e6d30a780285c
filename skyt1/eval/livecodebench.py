"""LiveCodeBench code_generation_lite rows: fields, test decoding, prompt.

A row (one JSON line of the official release files test.jsonl, test2.jsonl, ...):
  question_title, question_content, platform (leetcode|codeforces|atcoder), question_id, contest_id,
  contest_date (ISO), starter_code, difficulty (easy|medium|hard),
  public_test_cases   a JSON string: [{"input": str, "output": str, "testtype": "stdin"|"functional"}, ...]
  private_test_cases  the same list, either as a JSON string or, in the official release, as
                      base64(zlib(pickle(json string))); decoded here with an unpickler that accepts
                      nothing but plain data (no classes, no callables), so a hostile file cannot run code
  metadata            a JSON string; {"func_name": "..."} for call-based (LeetCode) problems

Functional tests give one JSON value per input line (the positional arguments of Solution().func_name)
and one JSON value as the expected output.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import zlib
from dataclasses import dataclass
from typing import Any

MAX_DECOMPRESSED_BYTES = 1 << 30  # the largest official private-test blob is ~100 MB; refuse bombs


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles str/bytes/numbers/lists/dicts/tuples only: any global lookup (the route to code) fails."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: test data must be plain data")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: test data must be plain data")


def decode_test_cases(value: Any, where: str) -> list[dict]:
    """public/private_test_cases -> list of {"input", "output", "testtype"}; `where` names the row."""
    if isinstance(value, list):
        cases = value
    elif isinstance(value, str):
        try:
            cases = json.loads(value)
        except json.JSONDecodeError:
            cases = json.loads(_decode_compressed(value, where))
    else:
        raise ValueError(f"{where}: test cases must be a JSON string or a list, got {type(value).__name__}")
    if not isinstance(cases, list):
        raise ValueError(f"{where}: test cases decode to {type(cases).__name__}, expected a list")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("input"), str) \
                or not isinstance(case.get("output"), str):
            raise ValueError(f"{where}: test case {i} must be an object with string 'input' and 'output'")
        if case.get("testtype", "stdin") not in ("stdin", "functional"):
            raise ValueError(f"{where}: test case {i} has testtype {case.get('testtype')!r}; "
                             f"expected 'stdin' or 'functional'")
    return cases


def _decode_compressed(value: str, where: str) -> str:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"{where}: test cases are neither JSON nor base64 ({e})") from None
    d = zlib.decompressobj()
    try:
        data = d.decompress(raw, MAX_DECOMPRESSED_BYTES)
    except zlib.error as e:
        raise ValueError(f"{where}: test cases are base64 but not zlib data ({e})") from None
    if d.unconsumed_tail:
        raise ValueError(f"{where}: compressed test cases expand past {MAX_DECOMPRESSED_BYTES} bytes")
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is bad data
        raise ValueError(f"{where}: compressed test cases are not a plain pickle: {e}") from None
    if isinstance(obj, bytes):
        obj = obj.decode("utf-8")
    if not isinstance(obj, str):
        raise ValueError(f"{where}: the pickle holds {type(obj).__name__}, expected the JSON text of the tests")
    return obj


def encode_test_cases(cases: list[dict]) -> str:
    """The official compressed form (what the release files hold for private tests); used by tests."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode("ascii")


@dataclass(frozen=True)
class LcbProblem:
    question_id: str
    title: str
    content: str
    platform: str
    difficulty: str
    contest_date: str
    starter_code: str
    func_name: str | None
    tests: tuple[dict, ...]   # public then private, as decoded

    @property
    def call_based(self) -> bool:
        return self.func_name is not None


def parse_row(row: dict, where: str) -> LcbProblem:
    for key in ("question_content", "public_test_cases", "difficulty"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r} (is this a code_generation_lite row?)")
    difficulty = str(row["difficulty"]).lower()
    if difficulty not in ("easy", "medium", "hard"):
        raise ValueError(f"{where}: difficulty {row['difficulty']!r} is not easy/medium/hard")
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field 'metadata' is not JSON ({e.msg})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: field 'metadata' must be an object")
    public = decode_test_cases(row["public_test_cases"], f"{where} public_test_cases")
    private = decode_test_cases(row.get("private_test_cases") or "[]", f"{where} private_test_cases")
    tests = tuple(public + private)
    if not tests:
        raise ValueError(f"{where}: no test cases")
    types = {t.get("testtype", "stdin") for t in tests}
    if len(types) > 1:
        raise ValueError(f"{where}: mixes stdin and functional test cases")
    func_name = metadata.get("func_name")
    if "functional" in types and not func_name:
        raise ValueError(f"{where}: functional tests but metadata has no func_name")
    if "stdin" in types:
        func_name = None
    return LcbProblem(
        question_id=str(row.get("question_id", row.get("id", ""))) or where,
        title=str(row.get("question_title", "")),
        content=str(row["question_content"]),
        platform=str(row.get("platform", "")),
        difficulty=difficulty,
        contest_date=str(row.get("contest_date", "")),
        starter_code=str(row.get("starter_code") or ""),
        func_name=func_name,
        tests=tests,
    )


def build_prompt(p: LcbProblem) -> str:
    """Our prompt: the statement, how the program is run, and where the code goes."""
    if p.call_based:
        return (f"{p.content.strip()}\n\n"
                f"Complete the starter code below. Your solution is called as "
                f"`Solution().{p.func_name}(...)` with the arguments of each test, and its return value is "
                f"compared with the expected one. Give the complete class in a single ```python code block at "
                f"the end of your answer.\n\n```python\n{p.starter_code.rstrip()}\n```")
    return (f"{p.content.strip()}\n\n"
            f"Write a complete Python 3 program that reads the input from standard input and writes the answer "
            f"to standard output. Give it in a single ```python code block at the end of your answer.")
