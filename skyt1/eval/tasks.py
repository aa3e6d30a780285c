"""Benchmark tasks: each reads its file(s) as published and gives Problems (prompt, reference, grouping).

- math500: MATH-500 test.jsonl (problem, answer, subject, level, unique_id); breakdown by level, subject.
- aime24: AIME 2024 jsonl (id, problem, answer, url); breakdown by contest (AIME I / II, from the url).
- amc23: AMC 12 2023 jsonl (id, problem or question, answer stored as a float such as 27.0).
- olympiadbench: the open-ended English maths competition subset (question, final_answer: a list of
  strings, answer_type, unit, is_multiple_answer, subfield, context); breakdown by subfield, answer_type.
- gpqa_diamond: gpqa_diamond.csv (Question, Correct Answer, Incorrect Answer 1..3, Subdomain,
  High-level domain, Record ID), options shuffled per question (gpqa.py); breakdown by domain, subdomain.
- livecodebench: code_generation_lite test*.jsonl rows (livecodebench.py), public + private tests;
  breakdown by difficulty (the published figures are per difficulty), platform.

Math prompts are Sky-T1's: "Return your final response within \\boxed{}. " + the problem.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from skyt1.eval import gpqa as gpqa_mod
from skyt1.eval import livecodebench as lcb_mod
from skyt1.recipe.jobs import iter_jsonl

BOXED_PREFIX = "Return your final response within \\boxed{}. "


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str                          # the user message
    kind: str                            # "math" | "choice" | "code"
    reference: Any                       # math: answer text; choice: letter; code: LcbProblem
    groups: dict[str, str] = field(default_factory=dict)    # breakdown keys -> values
    audit: dict[str, Any] = field(default_factory=dict)     # small facts copied into every sample row

    @property
    def reference_text(self) -> str:
        if self.kind == "code":
            return f"{len(self.reference.tests)} tests"
        return str(self.reference)


def _rows(paths: list[Path]) -> Iterator[tuple[Path, int, dict, str]]:
    """(path, line number, row, "path:line" for messages) over every row of every file; an empty file fails."""
    for path in paths:
        rows = list(iter_jsonl(path))
        if not rows:
            raise ValueError(f"{path}: no rows")
        for lineno, row in rows:
            yield path, lineno, row, f"{path}:{lineno}"


def _competition(row: dict, where: str) -> tuple[str, str]:
    """(problem, answer text) of an AIME/AMC row: `problem` or `question`, a string or numeric answer."""
    problem = row.get("problem") or _need(row, "question", where)
    return problem, _number_text(_need(row, "answer", where, (str, int, float)))


def _need(row: dict, key: str, where: str, types: tuple = (str,)) -> Any:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], types):
        raise ValueError(f"{where}: field {key!r} has type {type(row[key]).__name__}")
    return row[key]


def _number_text(x: Any) -> str:
    """AMC answers are stored as floats (27.0): write integers as integers."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _strip_dollars(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$") and "$" not in s[1:-1]:
        s = s[1:-1].strip()
    return s


def olympiad_reference(final_answer: Any, where: str) -> str:
    """OlympiadBench's final_answer (a list of strings, each maybe "$a$,$b$") -> one answer text.

    Several answers ("$69$,$84$", or a list of several strings) become "69, 84", which the grader
    compares as an unordered list."""
    if isinstance(final_answer, str):
        final_answer = [final_answer]
    if not isinstance(final_answer, list) or not final_answer or not all(isinstance(a, str) for a in final_answer):
        raise ValueError(f"{where}: field 'final_answer' must be a non-empty list of strings")
    parts: list[str] = []
    for a in final_answer:
        # "$69$,$84$": split at "$,$" boundaries only, a comma inside one math span stays
        pieces = re.split(r"\$\s*,\s*\$", a.strip())
        if len(pieces) > 1:
            pieces = [pieces[0] + "$"] + ["$" + p + "$" for p in pieces[1:-1]] + ["$" + pieces[-1]]
        parts.extend(_strip_dollars(p) for p in pieces)
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"{where}: field 'final_answer' is empty")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------- loaders


def load_math500(paths: list[Path]) -> list[Problem]:
    out = []
    for path, lineno, row, where in _rows(paths):
        problem = _need(row, "problem", where)
        answer = _need(row, "answer", where)
        pid = str(row.get("unique_id") or f"{path.stem}-{lineno}")
        out.append(Problem(pid, BOXED_PREFIX + problem, "math", answer,
                           groups={"subject": str(row.get("subject", "")), "level": str(row.get("level", ""))}))
    return out


def load_aime24(paths: list[Path]) -> list[Problem]:
    out = []
    for path, lineno, row, where in _rows(paths):
        # AI-MO/aimo-validation-aime rows use lower-case keys, Maxwell-Jia/AIME_2024 capitalised ones
        row = {**{k.lower(): v for k, v in row.items()}, **row}
        problem, answer = _competition(row, where)
        m = re.search(r"AIME_(I+)_", str(row.get("url", "")))
        groups = {"contest": f"AIME {m.group(1)}"} if m else {}
        out.append(Problem(str(row.get("id", f"{path.stem}-{lineno}")), BOXED_PREFIX + problem, "math", answer,
                           groups=groups))
    return out


def load_amc23(paths: list[Path]) -> list[Problem]:
    out = []
    for path, lineno, row, where in _rows(paths):
        problem, answer = _competition(row, where)
        out.append(Problem(str(row.get("id", f"{path.stem}-{lineno}")), BOXED_PREFIX + problem, "math", answer))
    return out


def load_olympiadbench(paths: list[Path]) -> list[Problem]:
    out = []
    for path, lineno, row, where in _rows(paths):
        question = _need(row, "question", where)
        context = row.get("context")
        if isinstance(context, str) and context.strip():
            question = context.strip() + "\n\n" + question
        reference = olympiad_reference(_need(row, "final_answer", where, (list, str)), where)
        audit = {"answer_type": row.get("answer_type"), "unit": row.get("unit"),
                 "is_multiple_answer": row.get("is_multiple_answer")}
        out.append(Problem(str(row.get("id", f"{path.stem}-{lineno}")), BOXED_PREFIX + question, "math",
                           reference, groups={"subfield": str(row.get("subfield", "")),
                                              "answer_type": str(row.get("answer_type", ""))},
                           audit={k: v for k, v in audit.items() if v is not None}))
    return out


def load_gpqa_diamond(paths: list[Path]) -> list[Problem]:
    out = []
    for path in paths:
        for p in gpqa_mod.load_gpqa(path):
            out.append(Problem(p.id, gpqa_mod.build_prompt(p), "choice", p.answer,
                               groups={"domain": p.domain, "subdomain": p.subdomain},
                               audit={"options": list(p.options)}))
    return out


def load_livecodebench(paths: list[Path]) -> list[Problem]:
    out = []
    seen: set[str] = set()
    for _path, _lineno, row, where in _rows(paths):
        p = lcb_mod.parse_row(row, where)
        if p.question_id in seen:
            raise ValueError(f"{where}: question_id {p.question_id!r} appears twice in the data files")
        seen.add(p.question_id)
        out.append(Problem(p.question_id, lcb_mod.build_prompt(p), "code", p,
                           groups={"difficulty": p.difficulty, "platform": p.platform},
                           audit={"contest_date": p.contest_date, "call_based": p.call_based}))
    return out


TASKS: dict[str, Callable[[list[Path]], list[Problem]]] = {
    "math500": load_math500,
    "aime24": load_aime24,
    "amc23": load_amc23,
    "olympiadbench": load_olympiadbench,
    "gpqa_diamond": load_gpqa_diamond,
    "livecodebench": load_livecodebench,
}
# The breakdowns a report shows, in order.
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "math500": ("level", "subject"),
    "aime24": ("contest",),
    "amc23": (),
    "olympiadbench": ("subfield", "answer_type"),
    "gpqa_diamond": ("domain", "subdomain"),
    "livecodebench": ("difficulty", "platform"),
}


def load_task(task: str, paths: list[str | Path]) -> list[Problem]:
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; choose from {sorted(TASKS)}")
    problems = TASKS[task]([Path(p) for p in paths])
    ids: set[str] = set()
    for p in problems:
        if p.id in ids:
            raise ValueError(f"task {task}: problem id {p.id!r} repeats in {[str(x) for x in paths]}")
        ids.add(p.id)
    return problems
