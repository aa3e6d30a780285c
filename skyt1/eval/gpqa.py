"""GPQA (diamond) from the official CSV (or JSONL rows with the same keys): columns Question, Correct
Answer, Incorrect Answer 1..3, plus Subdomain, High-level domain and Record ID. The four options are
shuffled per question with a seed made of a fixed base seed and the question's Record ID (or its row
number when the file has none), so the letter of the correct option depends neither on the row order
nor on the Python process.
"""
from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from skyt1.recipe.jobs import iter_jsonl

LETTERS = "ABCD"
REQUIRED = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
DEFAULT_SEED = 0


@dataclass(frozen=True)
class GpqaProblem:
    id: str
    question: str
    options: tuple[str, str, str, str]   # after the shuffle, in A..D order
    answer: str                           # the correct letter
    domain: str
    subdomain: str


def shuffle_options(correct: str, incorrect: list[str], key: str, seed: int = DEFAULT_SEED
                    ) -> tuple[tuple[str, str, str, str], str]:
    """Deterministic per-question shuffle: (options in A..D order, letter of the correct one)."""
    # random.Random(str) would also be stable, but a digest spells out exactly what the seed is.
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    options = [correct] + list(incorrect)
    order = list(range(4))
    rng.shuffle(order)
    shuffled = tuple(options[i] for i in order)
    return shuffled, LETTERS[order.index(0)]  # type: ignore[return-value]


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected the official GPQA CSV "
                             f"(gpqa_diamond.csv) with columns {list(REQUIRED)}")
        # Row numbers as a spreadsheet shows them: the header is row 1.
        return [(i + 2, row) for i, row in enumerate(reader)]


def load_gpqa(path: str | Path, seed: int = DEFAULT_SEED) -> list[GpqaProblem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (GPQA diamond CSV)")
    problems = []
    seen: set[str] = set()
    for rowno, row in _rows(path):
        where = f"{path}:{rowno}"
        for c in REQUIRED:
            value = row.get(c)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: column {c!r} is empty")
        key = str(row.get("Record ID") or f"row{rowno}").strip()
        if key in seen:
            raise ValueError(f"{where}: Record ID {key!r} repeats")
        seen.add(key)
        options, answer = shuffle_options(row["Correct Answer"].strip(),
                                          [row[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)], key, seed)
        problems.append(GpqaProblem(id=key, question=row["Question"].strip(), options=options, answer=answer,
                                    domain=str(row.get("High-level domain") or "").strip(),
                                    subdomain=str(row.get("Subdomain") or "").strip()))
    if not problems:
        raise ValueError(f"{path}: no questions")
    return problems


def build_prompt(p: GpqaProblem) -> str:
    choices = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, p.options))
    return (f"Return your final response within \\boxed{{}} and only include the letter choice "
            f"(A, B, C, or D) as your final response. {p.question}\n\n{choices}")
