r"""Multiple-choice grading (GPQA style): the letter a response chose, against the reference letter.

The chosen letter is, in order of trust: the last \boxed{} that holds a single option letter
(\boxed{C}, \boxed{\text{(C)}}); else the last explicit answer statement ("Answer: (C)",
"the answer is C", "**Answer:** C"); else the last standalone option letter (not part of a word, so the
"A" of "Apple" never counts; the article "A" can, which is why the first two rules come first).
"""
from __future__ import annotations

import re

from skyt1.recipe.math_grader import extract_boxed, normalize_answer
from skyt1.recipe.verdict import Verdict

__all__ = ["extract_choice", "grade_choice", "reference_letter"]

_ALL_LETTERS = "ABCDEFGHIJ"


def _letters_re(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def reference_letter(reference: str) -> str | None:
    """The option letter a reference names ("C", "(C)", "C.", "\\boxed{C}"), or None if it is not one."""
    text = reference.strip()
    if "\\boxed" in text:
        text = extract_boxed(text) or ""
    m = re.fullmatch(r"\(?\s*([A-J])\s*\)?\.?", normalize_answer(text)[0])
    return m.group(1) if m else None


def extract_choice(text: str | None, letters: str = "ABCD") -> str | None:
    """The option letter the response chose, or None."""
    if not text:
        return None
    cls = _letters_re(letters)
    boxed = extract_boxed(text)
    if boxed is not None:
        m = re.fullmatch(rf"\(?({cls})\)?(?:[.:)]\S*.*)?", normalize_answer(boxed)[0])
        if m:
            return m.group(1)
    stated = None
    for stated in re.finditer(
            rf"(?i:answer)(?:\s+is)?\s*(?:\*\*)?\s*[:：]?\s*(?:\*\*)?\s*(?:(?i:option)\s+)?[\(\[]?\s*({cls})\s*[\)\]]?"
            rf"(?![A-Za-z0-9])", text):
        pass
    if stated is not None:
        return stated.group(1)
    last = None
    for last in re.finditer(rf"(?<![A-Za-z0-9_\\])({cls})(?![A-Za-z0-9_])", text):
        pass
    return last.group(1) if last is not None else None


def grade_choice(response_text: str, reference: str) -> Verdict:
    """Verdict for a multiple-choice response. The options offered run from A to the later of D and the
    reference letter (GPQA has four)."""
    ref = reference_letter(reference)
    if ref is None:
        raise ValueError(f"multiple-choice reference must be an option letter A-J, got {reference!r}")
    letters = _ALL_LETTERS[:max(4, _ALL_LETTERS.index(ref) + 1)]
    chosen = extract_choice(response_text, letters)
    if chosen is None:
        return Verdict(False, "no option letter in the response", None)
    if chosen == ref:
        return Verdict(True, f"chose {chosen}", chosen)
    return Verdict(False, f"chose {chosen}, reference {ref}", chosen)
