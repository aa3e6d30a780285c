r"""Math answer grading: the boxed answer of a response against a reference answer.

Pipeline (each stage decides if it can, else hands on):
1. extract the answer (extract_answer): the last \boxed{...} / \fbox{...} (nested braces; also the
   brace-less `\boxed 5`), joined with the boxes before it that belong to the same multi-part answer
   ("\boxed{1} and \boxed{2}" is "1, 2", as Math-Verify and Qwen2.5-Math read it); with answer_line, a
   final "The answer is X" line where there is no box. A reference that is a worked solution gives its
   boxed answer or final-answer line (reference_answer);
2. normalise both sides (\text{} and \mathrm{} unwrapped, \left/\right, spacing commands, \dfrac/\tfrac,
   units, degrees, percent, dollars, thousands separators, trailing periods, `x =` prefixes, ...);
3. split into structure (matrix, tuple/interval, set, bare list, union of intervals) and compare element
   by element: ordered for tuples, intervals and matrices (brackets must agree), unordered for sets,
   bare lists ("1, 2") and unions; a list of tuples is a set of solutions (a repeated tuple counts once),
   NuminaMath's "p=5,q=2;p=7,q=2" is the tuples (5,2),(7,2), and "(0;-2;6)" is a tuple;
4. per element: equal strings; then exact numbers (integers, decimals, a/b, \frac{a}{b}, a\times10^{k})
   compared as Fractions; then a symbolic check with math-verify + sympy in a helper process.

The numeric rule (both the Fraction stage and the sympy stage): equal values are equal; two values that
are both exact terminating decimals (integers, 0.5, 3/8, 2.0001) must be exactly equal, so 2 and 2.0001
differ; otherwise (one side is 1/3, sqrt(2), pi, 1/2004!, ...) the relative difference must be at most
1e-4. math-verify alone compares numbers after rounding to 6 decimal places, which calls 1/2004! and
1/2006! equal (both round to 0): numbers therefore never reach its verify(), only non-numeric objects
(expressions with variables, relations, sets, matrices) do.

Why a helper process for the symbolic stage: math-verify bounds its own work with signal.alarm(), which
raises ValueError outside the main thread, and no signal can interrupt sympy inside one long C call
(9^{9^{9}} builds a 370-million-digit integer inside a single int.__pow__: a bare `9**(9**9)` had not
finished after 20 s here). So parse()/verify() run with parsing_timeout=None / timeout_seconds=None inside a long-lived
child process (address space capped at 4 GiB) and the parent enforces the bound: it waits on the pipe with
a deadline and SIGKILLs the child when the deadline passes, then starts a fresh one for the next check.
This is safe from any thread (subprocess.Popen without preexec_fn; each call checks a worker out of a
locked pool) and from forked processes (a forked child forgets the parent's workers and starts its own).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from skyt1.recipe.verdict import Verdict

REL_TOL = 1e-4                  # relative tolerance for inexact numeric answers
DEFAULT_TIMEOUT_S = 5.0         # bound on one math_equal / grade_math call (symbolic stage included)
WORKER_START_TIMEOUT_S = 60.0   # importing sympy + math-verify in a fresh helper (not counted per check)
WORKER_MEMORY_BYTES = 4 << 30   # RLIMIT_AS of the helper: sympy on a hostile expression must not eat the host
MAX_SYMBOLIC_CHARS = 1000       # longer answers are compared as strings/numbers only
MAX_ANSWER_CHARS = 4000         # longer answers are compared verbatim only
MAX_ITEMS = 64                  # longer lists/sets/matrices are compared as strings only

__all__ = ["Verdict", "extract_boxed", "extract_answer", "reference_answer", "normalize_answer", "math_equal",
           "grade_math", "shutdown_workers"]


# ----------------------------------------------------------------------------------------- extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _closing_braces(text: str) -> dict[int, int]:
    r"""{index of '{': index of the '}' closing it} for every brace pair of text, in one pass (a response
    may hold thousands of boxes, some never closed). Escaped braces (\{, \}) do not count."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


_BARE_BOX_RE = re.compile(r"[^\s$]+")


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
    r"""Every non-empty \boxed / \fbox in text as (start, end, content): content None for a box cut off
    before its closing brace; end is where the text after it starts."""
    found = []
    pairs = None
    for m in _BOXED_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            pairs = _closing_braces(text) if pairs is None else pairs
            close = pairs.get(j)
            if close is None:
                found.append((m.start(), len(text), None))
            else:
                found.append((m.start(), close + 1, text[j + 1:close].strip()))
            continue
        bare = _BARE_BOX_RE.match(text, j)
        if bare is not None:
            found.append((m.start(), bare.end(), bare.group(0).rstrip(".,;")))
    return [(a, b, c) for a, b, c in found if c is None or c]


def extract_boxed(text: str | None) -> str | None:
    r"""Content of the last \boxed{...} or \fbox{...} in text (nested braces kept), or of a brace-less
    `\boxed 5` (up to the next space or '$'). None when there is none, when the last one is cut off before
    its closing brace (a truncated response), or when it is empty."""
    boxes = _boxes(text or "")
    return boxes[-1][2] if boxes else None


# What may sit between two boxes of one multi-part answer: delimiters, spacing, punctuation and a few
# connecting words ("\boxed{1} papers and \boxed{2} bins"). Math-Verify joins boxes closer than 10
# characters, or closer than 70 with "and"/"or"/","/";" between them; we follow it but refuse a gap that
# revises the answer ("\boxed{1} is wrong, the answer is \boxed{2}", "first \boxed{1}, then \boxed{2}").
_GAP_NOISE_RE = re.compile(r"\\text\w*\s*\{|\\(?:quad|qquad|[,;:! ]|\(|\)|\[|\])|[${}]|\\\\")
_GAP_REVISES_RE = re.compile(
    r"\b(?:not?|wrong|incorrect|mistake|answer|actually|wait|instead|but|however|then|so|hence|thus|"
    r"therefore|correct|final|check|recheck)\b", re.I)


def _joins(gap: str) -> bool:
    words = _GAP_NOISE_RE.sub(" ", gap)
    if _GAP_REVISES_RE.search(words):
        return False
    if len(gap) < 10:
        return True
    return len(gap) < 70 and bool(re.search(r"\b(?:and|or)\b|[,;]", words))


def _boxed_answer(text: str, *, cut_ok: bool = False) -> tuple[str | None, int]:
    r"""The answer the boxes of text give and where it starts: the last box, joined (", ") with the boxes
    before it that _joins() connects, consecutive repeats dropped. A last box cut off before its closing
    brace is no answer, unless cut_ok (a reference: then the rest of the text is the box)."""
    boxes = _boxes(text)
    if not boxes:
        return None, -1
    start, _, last = boxes[-1]
    if last is None:
        if not cut_ok:
            return None, start
        brace = text.find("{", start)
        last = text[brace + 1:].strip() if brace >= 0 else ""
        if not last:
            return None, start
    parts = [last]
    for prev, nxt in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        if prev[2] is None or prev[1] > nxt[0] or not _joins(text[prev[1]:nxt[0]]):  # (nested: one box)
            break
        if prev[2] != parts[0]:
            parts.insert(0, prev[2])
        start = prev[0]
    return ", ".join(parts), start


# A stated final answer, for responses without a box (behind the answer_line option): Minerva's
# "Final Answer: The final answer is $X$. I hope it is correct." (Qwen2.5-Math's first rule), then the
# last "the answer is X" / "final answer is X" / "Final Answer: X" (Qwen's and Math-Verify's rules).
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_ANSWER_LINE_RE = re.compile(r"(?i:final answer is|the answer is|final answer\s*:)\s*:?\s*")


def _answer_line(text: str) -> tuple[str | None, int]:
    found = None
    for found in _ANSWER_LINE_RE.finditer(text):
        pass
    if found is None:
        return None, -1
    rest = re.sub(r'^\\?["\u201c]', "", text[found.end():])  # a quoted answer
    if re.match(r"(?i:the final answer is|the answer is)", rest):  # "Final Answer: The final answer is X"
        return None, -1
    span = _MATH_SPAN_RE.match(rest)
    if span is not None:
        # Math spans joined by "and" / "or" / "," form one answer: "$12$ and $13$".
        parts = [next(g for g in span.groups() if g is not None)]
        while (nxt := re.match(r"\s*(?:,?\s*\b(?:and|or)\b|,)\s*", rest[span.end():])) is not None:
            span2 = _MATH_SPAN_RE.match(rest, span.end() + nxt.end())
            if span2 is None:
                break
            parts.append(next(g for g in span2.groups() if g is not None))
            span = span2
        answer = ", ".join(p.strip() for p in parts)
    else:
        # To the end of the sentence: a period before a space or the end (a decimal point has a digit next).
        answer = re.split(r"\n|\.(?=\s|$)|\s+I hope\b", rest, maxsplit=1)[0]
    answer = answer.strip().rstrip(".").strip()
    return (answer or None), found.start()


def _bare_answer(text: str) -> str | None:
    """A response that is nothing but its answer: one math span ("$(5, 8)$") or a short phrase ("28 pct")."""
    t = text.strip()
    span = _MATH_SPAN_RE.fullmatch(t.rstrip(". "))
    if span is not None:
        return next(g for g in span.groups() if g is not None).strip() or None
    if len(t) <= 40 and len(t.split()) <= 3:
        return t.strip("$ ").rstrip(".").strip() or None
    return None


def extract_answer(text: str | None, *, answer_line: bool = False) -> str | None:
    r"""The final answer of a response: its boxed answer (the last \boxed{}, joined with the boxes of the
    same multi-part answer before it). With answer_line, a response without a box, or whose last stated
    "The answer is X" / "Final Answer: ..." line comes after its last box, answers with that line, and a
    response that is only an answer ("$(5, 8)$", "28 pct") answers with itself. None when there is none."""
    if not text:
        return None
    boxed, at = _boxed_answer(text)
    if not answer_line:
        return boxed
    line, line_at = _answer_line(text)
    if line is not None and line_at > at:
        return line
    if boxed is not None:
        return boxed
    return _bare_answer(text)


def reference_answer(reference: str) -> str | None:
    r"""The answer a reference gives: a bare answer as is; of a worked solution, its boxed answer (a last
    box cut off runs to the end of the text) or its final-answer line."""
    if "\\boxed" in reference or "\\fbox" in reference:
        return _boxed_answer(reference, cut_ok=True)[0]
    line, _ = _answer_line(reference)
    return line if line is not None else reference


# -------------------------------------------------------------------------------------- normalisation

_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "textnormal", "textsf", "texttt", "mathrm", "mathbf",
              "mathit", "mathsf", "mathtt", "mathnormal", "mbox", "hbox", "operatorname", "boldsymbol")
_TEXT_CMD_RE = re.compile(r"\\(?:" + "|".join(_TEXT_CMDS) + r")\s*\{")

# Unit words are dropped only when whitespace separates them from what precedes (after \text{} and
# \mathrm{} are unwrapped with spaces around them), so "2m" as a product of 2 and m is left alone.
_UNIT_WORDS = (
    r"cm|mm|km|m|nm|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|kilometres?|"
    r"inch(?:es)?|feet|foot|ft|yards?|yd|miles?|mi|sq|square|cubic|units?|degrees?|deg|radians?|rad|"
    r"seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h|days?|weeks?|months?|years?|yrs?|dollars?|cents?|"
    r"kg|g|grams?|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?|L|ml|mL|mph|kph|km/h|m/s|"
    r"people|persons?|students?|ways|points?|times|cups?|pages?|boxes|marbles|apples|coins|balls"
)
_TRAILING_UNIT_RE = re.compile(r"\s+(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?\d\}?)?\s*\.?\s*$")
_UNICODE = (("\u2212", "-"), ("\u2013", "-"), ("\u00d7", "\\times "), ("\u00b7", "\\cdot "),
            ("\u00f7", "\\div "), ("\u221a", "\\sqrt"), ("\u03c0", "\\pi "), ("\u2264", "\\leq "),
            ("\u2265", "\\geq "), ("\u2260", "\\neq "))
_UNIT_BEFORE_COMMA_RE = re.compile(r"(?<=[\d}])\s+(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?\d\}?)?(?=\s*[,}])")
_PERCENT_RE = re.compile(r"\\?%|\b(?:percent(?:age)?|pct)\b")
_VAR = r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?"
_TUPLE_LHS_RE = re.compile(rf"^\((?:{_VAR},)+{_VAR}\)=(?!=)")
_SPACING_RE = re.compile(r"(\\\\)|\\[,;:! ]|\\quad|\\qquad")
_LHS_RE = re.compile(
    r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?'?|\\[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?|[A-Za-z]\([A-Za-z]\)|[A-Z]{2,3}|"
    r"\|[A-Z]{1,3}\||[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?)=(?!=)")


def _unwrap_text_commands(s: str) -> str:
    # \text{...} may itself hold braces: replace innermost-last by brace matching, never by regex alone.
    for _ in range(64):
        m = _TEXT_CMD_RE.search(s)
        if m is None:
            break
        open_at = m.end() - 1
        close_at = _closing_braces(s).get(open_at, -1)
        if close_at < 0:
            s = s[:m.start()] + s[m.end():]
            continue
        s = s[:m.start()] + " " + s[open_at + 1:close_at] + " " + s[close_at + 1:]
    return s


def normalize_answer(answer: str) -> tuple[str, bool]:
    """Canonical text of an answer and whether it carried a percent sign. Both sides of a comparison go
    through the same steps, so a rule that over-normalises is harmless as long as it is consistent."""
    s = answer.strip()
    if s.startswith(("\\boxed", "\\fbox")):
        inner = extract_boxed(s)
        if inner is not None:
            s = inner
    s = s.replace("\\$", " ").replace("\n", " ")
    for uni, tex in _UNICODE:
        s = s.replace(uni, tex)
    s = s.strip().strip("$").strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2].strip()
    if "\\begin" not in s:
        # A doubled backslash before a command is an escaping slip ("\\frac{1}{5}", as JSON and raw strings
        # produce it), not a line break: only matrices and arrays break lines.
        s = re.sub(r"\\\\(?=[A-Za-z])", r"\\", s)
    # \! (negative thin space) only ever glues digit groups, "1,\!234" and "11,\! 111": drop it and the
    # space after it; other spacing is a space.
    s = re.sub(r",\s*\\!\s*", ",", s)
    s = _SPACING_RE.sub(lambda m: m.group(1) or ("" if m.group(0) == "\\!" else " "), s)
    s = s.replace("~", " ")
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])\s*\.?", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _unwrap_text_commands(s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![A-Za-z])", " ", s)
    percent = bool(_PERCENT_RE.search(s))
    s = _PERCENT_RE.sub(" ", s)
    s = re.sub(r"\s+(?:or|and)\s+|(?<=[)\]])\s*(?:or|and)\s*(?=[(\[])", ",", s)
    s = re.sub(r"\bdollars?\b", " ", s)
    s = s.strip()
    for _ in range(4):
        m = _TRAILING_UNIT_RE.search(s)
        if m is None or not s[:m.start()].strip():
            break
        s = s[:m.start()].rstrip()
    s = _UNIT_BEFORE_COMMA_RE.sub("", s)  # "35 cm, 4": units of the items of a list
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s)  # 14{,}916 and 14 {, }916
    if re.fullmatch(r"[-+]?[1-9]\d{0,2}(,\d{3})+(\.\d+)?", s):
        # Thousands separators: commas with no space after them ("1, 234" stays a list of two).
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\\in", "", s)
    s = _TUPLE_LHS_RE.sub("", s)  # "(x,y)=(5,8),(8,5)", "(p,q)=(3,2)"
    s = re.sub(r"^(?:\\approx|\\sim|\\simeq)", "", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    s = re.sub(r"\\(le|ge)(?![A-Za-z])", r"\\\1q", s)
    s = re.sub(r"\\infinity|∞", r"\\infty", s)
    s = s.replace("\\varnothing", "\\emptyset")
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)
    if s.startswith("+"):
        s = s[1:]
    return s, percent


# ---------------------------------------------------------------------------------------- exact numbers

_DEC = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_NUM_PATTERNS = (
    (re.compile(rf"({_DEC})(?:[eE]([-+]?\d+))?"), "dec"),
    (re.compile(rf"({_DEC})(?:\\times|\\cdot|\*)10\^\{{?([-+]?\d+)\}}?"), "sci"),
    (re.compile(rf"(-?)\\frac\{{({_DEC})\}}\{{({_DEC})\}}"), "frac"),
    (re.compile(rf"({_DEC})/({_DEC})"), "slash"),
    # A whole number written against a fraction is a mixed number: 2\frac{1}{2} is 5/2, not 1.
    (re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}"), "mixed"),
)


def _parse_number(s: str) -> Fraction | None:
    """An exact Fraction for plain numeric answers; None for anything else (left to sympy)."""
    for pattern, kind in _NUM_PATTERNS:
        m = pattern.fullmatch(s)
        if m is None:
            continue
        try:
            if kind in ("dec", "sci"):
                exp = int(m.group(2) or 0)
                if abs(exp) > 1000:
                    return None
                return Fraction(m.group(1)) * Fraction(10) ** exp
            if kind == "mixed":
                value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
                return -value if m.group(1) else value
            if kind == "frac":
                value = Fraction(m.group(2)) / Fraction(m.group(3))
                return -value if m.group(1) else value
            return Fraction(m.group(1)) / Fraction(m.group(2))
        except (ZeroDivisionError, ValueError):
            return None
    return None


def _terminating(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _fractions_equal(x: Fraction, y: Fraction) -> bool:
    if x == y:
        return True
    if _terminating(x) and _terminating(y):
        return False
    return abs(x - y) <= Fraction(REL_TOL) * max(abs(x), abs(y))


# -------------------------------------------------------------------------------------------- structure

@dataclass(frozen=True)
class _Node:
    kind: str                   # scalar | matrix | seq (tuple/interval) | set | list | union
    text: str
    items: tuple = ()           # child nodes (matrix: rows of child nodes)
    brackets: str = ""          # seq: opening + closing bracket, e.g. "(]"


def _split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """Split s at separators that sit outside every bracket, brace and \\begin..\\end environment."""
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    while i < n:
        if s.startswith("\\begin{", i):
            depth += 1
            i = s.find("}", i) + 1 or n
            continue
        if s.startswith("\\end{", i):
            depth -= 1
            i = s.find("}", i) + 1 or n
            continue
        if depth == 0:
            sep = next((t for t in seps if s.startswith(t, i)), None)
            if sep is not None:
                parts.append(s[start:i])
                i += len(sep)
                start = i
                continue
        c = s[i]
        if c == "\\":
            nxt = s[i + 1:i + 2]
            depth += 1 if nxt == "{" else -1 if nxt == "}" else 0
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        i += 1
    parts.append(s[start:])
    return parts


def _balanced(s: str) -> bool:
    depth, i = 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            nxt = s[i + 1:i + 2]
            depth += 1 if nxt == "{" else -1 if nxt == "}" else 0
            i += 2
        else:
            depth += 1 if c in "([{" else -1 if c in ")]}" else 0
            i += 1
        if depth < 0:
            return False
    return depth == 0


_MATRIX_RE = re.compile(r"\\begin\{([pbBvV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)


def _strip_lhs(s: str) -> str:
    m = _LHS_RE.match(s)
    return s[m.end():] if m and m.end() < len(s) else s


def _structure(s: str, depth: int = 0) -> _Node:
    if depth > 8 or not s:
        return _Node("scalar", s)
    m = _MATRIX_RE.fullmatch(s)
    if m:
        rows = [r for r in _split_top(m.group(2), ("\\\\",)) if r.strip()]
        cells = tuple(tuple(_structure(c, depth + 1) for c in _split_top(r, ("&",))) for r in rows)
        return _Node("matrix", s, cells)
    parts = _split_top(s, ("\\cup",))
    if len(parts) > 1:
        return _Node("union", s, tuple(_structure(p, depth + 1) for p in parts))
    if s.startswith("\\{") and s.endswith("\\}") and _balanced(s[2:-2]):
        inner = s[2:-2]
        items = [p for p in _split_top(inner, (",", ";")) if p] if inner else []
        return _Node("set", s, tuple(_structure(_strip_lhs(p), depth + 1) for p in items))
    if s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        # A set written with bare braces, {1,2,3} (the braces of TeX grouping hold no top-level comma).
        items = [p for p in _split_top(s[1:-1], (",", ";")) if p]
        if len(items) >= 2:
            return _Node("set", s, tuple(_structure(_strip_lhs(p), depth + 1) for p in items))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced(s[1:-1]):
        items = _split_top(s[1:-1], (",",))
        if len(items) < 2:
            items = _split_top(s[1:-1], (";",))  # coordinates written (0;-2;6)
        if len(items) >= 2:
            return _Node("seq", s, tuple(_structure(_strip_lhs(p), depth + 1) for p in items), s[0] + s[-1])
    groups = _split_top(s, (";",))
    if len(groups) >= 2 and all(len(_split_top(g, (",",))) >= 2 and all(_LHS_RE.match(a) for a in _split_top(g, (",",)))
                                for g in groups):
        # NuminaMath's solutions as assignments, "p=5,q=2;p=7,q=2": each group is one tuple (5, 2).
        tuples = tuple(_Node("seq", g, tuple(_structure(_strip_lhs(a), depth + 1) for a in _split_top(g, (",",))), "()")
                       for g in groups)
        return _Node("list", s, tuples)
    items = [p for p in _split_top(s, (",", ";"))]
    if len(items) >= 2 and all(items):
        return _Node("list", s, tuple(_structure(_strip_lhs(p), depth + 1) for p in items))
    return _Node("scalar", _strip_lhs(s))


def _spaced(node: _Node) -> str:
    return ", ".join(item.text for item in node.items) if node.kind == "list" else node.text


def _count(node: _Node) -> int:
    if node.kind == "matrix":
        return sum(len(r) for r in node.items)
    return max(1, len(node.items))


# ------------------------------------------------------------------------------------------ comparison

def _solution_set(items: tuple) -> tuple:
    """A list of tuples is a set of solutions, where writing one twice changes nothing; a list of numbers
    may be a multiset (roots counted with multiplicity: "1, 2, 2" is not "1, 2") and is left as it is."""
    if len(items) < 2 or not all(i.kind == "seq" for i in items):
        return items
    seen: dict[str, _Node] = {}
    for i in items:
        seen.setdefault(i.text, i)
    return tuple(seen.values())


class _Comparison:
    """One reference/candidate comparison with a shared deadline and the reason it ended with."""

    def __init__(self, ref_percent: bool, cand_percent: bool, deadline: float):
        self.ref_percent = ref_percent
        self.cand_percent = cand_percent
        self.deadline = deadline
        self.methods: set[str] = set()
        self.timed_out = False

    def nodes(self, r: _Node, c: _Node) -> bool | None:
        """True/False when the structures are comparable, None when they are not (e.g. scalar vs tuple)."""
        unordered = {"set", "list", "union"}
        if r.kind == "scalar" and c.kind == "scalar":
            return self.scalars(r.text, c.text)
        if r.kind == "matrix" and c.kind == "matrix":
            if [len(x) for x in r.items] != [len(x) for x in c.items]:
                return False
            return all(self.nodes(a, b) for ra, rc in zip(r.items, c.items) for a, b in zip(ra, rc))
        if r.kind == "seq" and c.kind == "seq":
            if r.brackets != c.brackets or len(r.items) != len(c.items):
                return False
            return all(self.nodes(a, b) for a, b in zip(r.items, c.items))
        if {r.kind, c.kind} == {"seq", "list"}:
            seq = r if r.kind == "seq" else c
            if seq.brackets != "()" or len(r.items) != len(c.items):
                return False
            return all(self.nodes(a, b) for a, b in zip(r.items, c.items))
        if r.kind in unordered and c.kind in unordered:
            r_items, c_items = _solution_set(r.items), _solution_set(c.items)
            if len(r_items) != len(c_items):
                return False
            left = list(c_items)
            for a in r_items:
                hit = next((i for i, b in enumerate(left) if self.nodes(a, b)), None)
                if hit is None:
                    return False
                left.pop(hit)
            return True
        return None

    def scalars(self, a: str, b: str) -> bool:
        if a == b and not (self.ref_percent ^ self.cand_percent):
            self.methods.add("string")
            return True
        if re.fullmatch(r"[A-Za-z]{3,}", a) and re.fullmatch(r"[A-Za-z]{3,}", b):
            # Word answers ("Monday", "odd"): case does not matter, sympy has nothing to add. (Two
            # letters may be a product, "xy" = "yx", and go on to sympy.)
            self.methods.add("string")
            return a.lower() == b.lower()
        x, y = _parse_number(a), _parse_number(b)
        if x is not None and y is not None:
            self.methods.add("numeric")
            return any(_fractions_equal(u, v) for u, v in self._percent_variants(x, y))
        if a == b:
            self.methods.add("string")
            return True
        if len(a) > MAX_SYMBOLIC_CHARS or len(b) > MAX_SYMBOLIC_CHARS:
            return False
        pairs = [(a, b)]
        if self.ref_percent and not self.cand_percent:
            pairs.append((f"\\frac{{{a}}}{{100}}", b))
        elif self.cand_percent and not self.ref_percent:
            pairs.append((a, f"\\frac{{{b}}}{{100}}"))
        for u, v in pairs:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                return False
            equal, status = _symbolic_equal(u, v, remaining)
            if status == "timeout":
                self.timed_out = True
                return False
            self.methods.add("symbolic" if status in ("numeric", "math-verify") else f"symbolic {status}")
            if equal:
                return True
        return False

    def _percent_variants(self, x: Fraction, y: Fraction) -> list[tuple[Fraction, Fraction]]:
        if self.ref_percent and not self.cand_percent:
            return [(x, y), (x / 100, y)]
        if self.cand_percent and not self.ref_percent:
            return [(x, y), (x, y / 100)]
        return [(x, y)]


def _compare(reference: str, candidate: str, timeout_s: float) -> tuple[bool, str]:
    if len(candidate) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        # Normalising is regex work that grows with length: a huge "answer" is compared verbatim.
        same = candidate.strip() == reference.strip()
        return same, f"{'equal' if same else 'not equal'} (answer over {MAX_ANSWER_CHARS} chars: compared verbatim)"
    ref, ref_pct = normalize_answer(reference)
    cand, cand_pct = normalize_answer(candidate)
    if not cand:
        return False, "empty answer"
    if not ref:
        return False, "empty reference"
    cmp = _Comparison(ref_pct, cand_pct, time.monotonic() + timeout_s)
    if ref == cand and ref_pct == cand_pct:
        return True, "equal (string)"
    ref, cand = _decimal_comma(ref, cand, reference), _decimal_comma(cand, ref, candidate)
    if (_equation(ref) and _equation(cand) and (_strip_lhs(ref) != ref or _strip_lhs(cand) != cand)
            and cmp.scalars(ref, cand)):
        # Two equations: the same line in solved and in general form ("y=-x/2+3/4", "2x+4y-3=0") before
        # the structure pass reads "y=" as a name for the value.
        return True, f"equal ({'+'.join(sorted(cmp.methods))})"
    r_node, c_node = _structure(ref), _structure(cand)
    if _count(r_node) > MAX_ITEMS or _count(c_node) > MAX_ITEMS:
        return False, f"not equal (more than {MAX_ITEMS} items: compared as strings)"
    result = cmp.nodes(r_node, c_node)
    if result is None:
        # Structures disagree (an inequality against an interval, \pm 1 against "1, -1"): let math-verify
        # read the whole answers, it knows relations and sets. Top-level commas get their space back so
        # it cannot read a list "1, 234" as the number 1234.
        result = cmp.scalars(_spaced(r_node), _spaced(c_node))
    how = "+".join(sorted(cmp.methods)) or "structure"
    if result:
        return True, f"equal ({how})"
    if cmp.timed_out:
        return False, f"not equal (symbolic check timed out after {timeout_s:g} s)"
    return False, f"not equal ({how})"


def _decimal_comma(s: str, other: str, raw: str) -> str:
    """s with a decimal comma read as a point ("1000,99", "0,111") when the other side is a number and s is
    two digit groups joined by a comma with no space: never a thousands separator (normalize_answer has
    taken those), and a two-number list could never equal one number anyway."""
    if (re.fullmatch(r"[-+]?\d+,\d+", s) and _parse_number(other) is not None and _parse_number(s) is None
            and not re.search(r",\s", raw)):
        return s.replace(",", ".")
    return s


def _equation(s: str) -> bool:
    return s.count("=") == 1 and len(_split_top(s, (",", ";"))) == 1 and not re.search(r"[<>!]=|=[<>]", s)


def math_equal(reference: str, candidate: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether candidate is the same answer as reference (both bare answers, or \\boxed{...} strings).
    Not symmetric in one respect: math-verify reads its first argument as the gold answer (a gold "1"
    equals "k=1", a gold "a+3z=0" does not equal "0"). The whole call is bounded by timeout_s (a symbolic
    check that would run longer counts as not equal)."""
    return _compare(reference, candidate, timeout_s)[0]


def grade_math(response_text: str, reference: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               answer_line: bool = False) -> Verdict:
    r"""Grade a full response: its boxed answer (extract_answer) against the reference answer (a bare
    answer, or a solution whose boxed answer or final-answer line is the answer). answer_line (off by
    default: Sky-T1's traces always box) also reads a response's final "The answer is X" line."""
    extracted = extract_answer(response_text, answer_line=answer_line)
    if extracted is None:
        if answer_line:
            return Verdict(False, "no \\boxed{} answer or final-answer line in the response", None)
        return Verdict(False, "no \\boxed{} answer in the response", None)
    ref = reference_answer(reference)
    if ref is None or not ref.strip():
        return Verdict(False, "reference answer is empty", extracted)
    ok, reason = _compare(ref, extracted, timeout_s)
    return Verdict(ok, reason, extracted)


# ------------------------------------------------------------------------ symbolic helper (child side)

def _sympy_number_rule(x, y) -> bool | None:
    """The numeric rule of the module docstring on two sympy numbers; None if they do not evaluate."""
    from sympy import Abs, Float, Max, N, Rational

    def exact_decimal(e):
        if isinstance(e, Float):
            return Rational(str(e))
        if isinstance(e, Rational):
            q = int(e.q)
            for p in (2, 5):
                while q % p == 0:
                    q //= p
            return e if q == 1 else None
        return None

    ex, ey = exact_decimal(x), exact_decimal(y)
    if ex is not None and ey is not None:
        return bool(ex == ey)
    # Stay in sympy Floats (30 digits, unbounded exponent): a Python float would flush 1/2004! to 0.
    try:
        ax, ay = N(x, 30), N(y, 30)
        diff = N(Abs(ax - ay), 30)
        scale = N(Max(Abs(ax), Abs(ay)), 30)
        if diff.is_zero:
            return True
        if not all(v.is_extended_real and v.is_finite for v in (diff, scale)):
            return None
        return bool(diff <= Float(REL_TOL) * scale)
    except (TypeError, ValueError, AttributeError):
        return None


def _symbolic_compare(reference: str, candidate: str) -> tuple[bool | None, str]:
    from math_verify import parse, verify
    from math_verify.parser import LatexExtractionConfig
    from sympy import Basic, MatrixBase, Set
    from sympy.core.relational import Relational

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    gold = parse("$" + reference + "$", extraction_config=config, parsing_timeout=None)
    pred = parse("$" + candidate + "$", extraction_config=config, parsing_timeout=None)
    if not gold or not pred:
        return None, "unparsed"
    g, p = gold[0], pred[0]
    numeric = all(isinstance(e, Basic) and not isinstance(e, (Set, Relational, MatrixBase)) and
                  getattr(e, "is_number", False) for e in (g, p))
    if numeric:
        g, p = g.doit(), p.doit()
        rule = _sympy_number_rule(g, p)
        if rule is not None:
            return rule, "numeric"
    # allow_set_relation_comp: without it math-verify equates a gold relation with an answer set
    # ("-2 \\le x \\le 7" against "x \\in [-2,7]") but not a gold set with an answer relation. (Not
    # verify() both ways round: it reads a bare gold number against an equation's right-hand side, so
    # "0" against "a+3z=0" would pass.)
    return bool(verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=None)), "math-verify"


def _serve() -> None:
    """Helper process main loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import logging
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    try:
        # Die with the parent rather than linger on a hostile expression it no longer waits for.
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    logging.disable(logging.CRITICAL)  # math-verify warns about disabled timeouts on every call
    import math_verify  # noqa: F401  (import before announcing readiness: its cost is not a check's)

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            equal, how = _symbolic_compare(req["a"], req["b"])
        except Exception as e:  # noqa: BLE001  (no sympy failure, RecursionError or MemoryError ends the helper)
            equal, how = None, f"error: {type(e).__name__}"
        out.write(json.dumps({"equal": equal, "how": how}).encode() + b"\n")
        out.flush()


# ----------------------------------------------------------------------- symbolic helper (parent side)

class _HelperDied(Exception):
    pass


class _Helper:
    """One helper process and its line-buffered reply pipe."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from skyt1.recipe.math_grader import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True, close_fds=True)
        self.buf = b""
        self.pid_owner = os.getpid()
        ready = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        if ready is None or not json.loads(ready).get("ready"):
            self.kill()
            raise _HelperDied("the math-verify helper did not start")

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: it fails on descriptors >= 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not poller.poll(max(1, int(remaining * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _HelperDied("the math-verify helper exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def ask(self, a: str, b: str, timeout_s: float) -> dict | None:
        """The reply, or None when the deadline passed (the helper is then killed)."""
        try:
            self.proc.stdin.write(json.dumps({"a": a, "b": b}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _HelperDied(str(e)) from None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.pid_owner != os.getpid():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def forget(self) -> None:
        # In a forked child: close our copies of the pipes without flushing or signalling the parent's helper.
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                os.close(f.fileno())
            except OSError:
                pass


class _HelperPool:
    """Idle helpers shared by the threads of one process; a helper is used by one thread at a time."""

    def __init__(self, max_idle: int = 8):
        self.lock = threading.Lock()
        self.idle: list[_Helper] = []
        self.max_idle = max_idle

    def acquire(self) -> _Helper:
        with self.lock:
            while self.idle:
                h = self.idle.pop()
                if h.alive():
                    return h
                h.kill()
        return _Helper()

    def release(self, helper: _Helper) -> None:
        with self.lock:
            if len(self.idle) < self.max_idle and helper.alive():
                self.idle.append(helper)
                return
        helper.kill()

    def shutdown(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for h in idle:
            h.kill()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        idle, self.idle = self.idle, []
        for h in idle:
            h.forget()


_POOL = _HelperPool()
atexit.register(_POOL.shutdown)
os.register_at_fork(after_in_child=_POOL.after_fork)


def shutdown_workers() -> None:
    """Stop the idle symbolic helpers of this process (they are also stopped at exit)."""
    _POOL.shutdown()


def _symbolic_equal(a: str, b: str, timeout_s: float) -> tuple[bool, str]:
    """math-verify/sympy equivalence in a helper process: (equal, status) with status "numeric" or
    "math-verify" when decided, "timeout" when the bound ran out, "unparsed" when sympy could not read
    one side, "error" when the check raised, "unavailable" when no helper could be started."""
    for _attempt in range(2):  # a helper that died while idle is replaced once
        try:
            helper = _POOL.acquire()
        except (_HelperDied, OSError):
            return False, "unavailable"
        try:
            reply = helper.ask(a, b, timeout_s)
        except _HelperDied:
            helper.kill()
            continue
        if reply is None:
            return False, "timeout"
        _POOL.release(helper)
        equal, how = reply.get("equal"), str(reply.get("how"))
        if equal is None:
            return False, "unparsed" if how == "unparsed" else "error"
        return bool(equal), how
    return False, "unavailable"
