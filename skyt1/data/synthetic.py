"""Data the project makes itself: an arithmetic chat set in Sky-T1's row format, and a tiny byte-level BPE
tokenizer with Qwen's chat special tokens, so the CPU demo needs no download.

The answers follow Sky-T1's two-section format (thought, then solution with a \\boxed{} answer) and
spell the arithmetic out digit by digit, so their length grows with the operands: documents of a few
dozen to a few hundred tokens, enough spread to exercise the packer.
"""
from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from skyt1.tokenizer import ENDOFTEXT, IM_END, IM_START

SYSTEM_PROMPT = ("Your role as an assistant involves thoroughly exploring questions through a systematic thinking "
                 "process before giving the final precise and accurate solution. Put your reasoning between "
                 "<|begin_of_thought|> and <|end_of_thought|>, then the solution between <|begin_of_solution|> "
                 "and <|end_of_solution|>.")
BOXED_PREFIX = "Return your final response within \\boxed{}. "


def _add_steps(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        s = x + y + carry
        steps.append(f"Digit {k + 1}: {x} + {y}" + (f" + carry {carry}" if carry else "") + f" = {s}, "
                     f"write {s % 10}" + (f", carry {s // 10}." if s >= 10 else "."))
        carry = s // 10
    if carry:
        steps.append(f"The final carry {carry} becomes the leading digit.")
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    if a < b:
        return [f"{a} is smaller than {b}, so the result is negative: compute {b} - {a} and negate it."] + \
            _sub_steps(b, a)
    steps, borrow = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for k in range(len(da)):
        x = int(da[k]) - borrow
        y = int(db[k]) if k < len(db) else 0
        if x < y:
            steps.append(f"Digit {k + 1}: {x} is less than {y}, borrow: {x + 10} - {y} = {x + 10 - y}.")
            borrow = 1
        else:
            steps.append(f"Digit {k + 1}: {x} - {y} = {x - y}.")
            borrow = 0
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    steps, total = [], 0
    for k, d in enumerate(str(b)[::-1]):
        part = a * int(d) * 10 ** k
        total += part
        steps.append(f"{a} x {d}" + (f" x {10 ** k}" if k else "") + f" = {part}; running sum {total}.")
    return steps


def make_arithmetic_row(rng: random.Random, max_digits: int = 4) -> dict:
    """One Sky-T1-format row: {"system", "conversations": [user question, assistant answer]}."""
    op = rng.choice("+-*")
    a = rng.randrange(1, 10 ** rng.randint(1, max_digits))
    b = rng.randrange(1, 10 ** rng.randint(1, max_digits if op != "*" else max(1, max_digits - 1)))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "\\times"}[op]
    steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
    name = {"+": "add", "-": "subtract", "*": "multiply"}[op]
    thought = (f"I need to {name} {a} and {b}. Work through it step by step.\n\n" + "\n\n".join(steps)
               + f"\n\nSo the result is {result}. Check: " + {
                   "+": f"{result} - {b} = {result - b}, which is {a}.",
                   "-": f"{result} + {b} = {result + b}, which is {a}.",
                   "*": f"{result} / {b} = {a}."}[op])
    answer = (f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
              f"${a} {sym} {b} = {result}$\n\n\\boxed{{{result}}}\n\n<|end_of_solution|>")
    return {"system": SYSTEM_PROMPT,
            "conversations": [{"from": "user", "value": f"{BOXED_PREFIX}What is ${a} {sym} {b}$?"},
                              {"from": "assistant", "value": answer}]}


def make_arithmetic_rows(n: int, seed: int = 0, max_digits: int = 4) -> list[dict]:
    rng = random.Random(seed)
    return [make_arithmetic_row(rng, max_digits) for _ in range(n)]


def write_arithmetic_json(path: str | Path, n: int, seed: int = 0, max_digits: int = 4) -> Path:
    """Write n rows as a JSON array (Sky-T1's file format), one row per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_arithmetic_rows(n, seed, max_digits)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    return path


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, rows: list[dict] | None = None,
                         seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer (Qwen2's pre-tokenizer) on synthetic chats; write out_dir/tokenizer.json.

    Special tokens <|endoftext|>, <|im_start|>, <|im_end|> get ids 0, 1, 2. Training is deterministic
    for the same rows, so the file (and its hash) is reproducible. Returns out_dir.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from skyt1.tokenizer import QWEN25_DEFAULT_SYSTEM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else make_arithmetic_rows(2000, seed)
    # Qwen2's split pattern; the ByteLevel step then maps bytes to printable characters.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def corpus():
        yield QWEN25_DEFAULT_SYSTEM
        for r in rows:
            yield "system\n" + r.get("system", "")
            for turn in r["conversations"]:
                yield ("user" if turn["from"] in ("user", "human") else "assistant") + "\n" + turn["value"]

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@dataclass(frozen=True)
class SyntheticData:
    rows: Path        # the JSON array of rows
    tokenizer: Path   # folder holding tokenizer.json
    dataset: Path     # the built dataset folder


def make_synthetic_dataset(out_dir: str | Path, n: int = 1000, seed: int = 0, tokenizer: str | Path | None = None,
                           max_seq_len: int = 1024, end_token: str = "im_end", workers: int = 1,
                           progress: bool = False) -> SyntheticData:
    """Everything the tiny CPU demo needs: out_dir/rows.json (n arithmetic rows), out_dir/tokenizer/ (the tiny
    BPE, unless a tokenizer folder or file is given) and out_dir/dataset/. Re-running is a no-op."""
    from skyt1.data.build import BuildOptions, build_dataset, build_lock, remove_stale_temporaries

    out_dir = Path(out_dir)
    rows = out_dir / "rows.json"
    # Runs sharing this folder take turns: the second finds everything built and only checks it.
    with build_lock(out_dir, progress):
        for staged in (rows, out_dir / "tokenizer"):  # what a killed run of this left behind
            remove_stale_temporaries(staged)
        tmp = rows.with_name(f".rows.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        write_arithmetic_json(tmp, n, seed)
        if rows.is_file() and rows.read_bytes() == tmp.read_bytes():
            tmp.unlink()  # keep the old file so its hash, and hence the build, stay the same
        else:
            os.replace(tmp, rows)
        if tokenizer is None:
            tokenizer = out_dir / "tokenizer"
            if not (tokenizer / "tokenizer.json").is_file():
                staged = build_tiny_tokenizer(out_dir / f".tokenizer.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                              seed=seed)
                tokenizer.mkdir(parents=True, exist_ok=True)
                os.replace(staged / "tokenizer.json", tokenizer / "tokenizer.json")
                staged.rmdir()
        build_dataset([rows], tokenizer, out_dir / "dataset",
                      BuildOptions(max_seq_len=max_seq_len, end_token=end_token), workers=workers, progress=progress)
    return SyntheticData(rows, Path(tokenizer), out_dir / "dataset")
