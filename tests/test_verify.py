"""`python -m skyt1.recipe verify`: every sample kept with its verdict, hostile code does not stop the run,
resuming skips finished samples, and bad rows are reported with file and line."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyt1.recipe.__main__ import COMMANDS, main
from skyt1.recipe.verify import CheckOptions, grade, load_problems, verify_file

REPO = Path(__file__).resolve().parents[1]

PROBLEMS = [
    {"id": "m1", "problem": "1/2 as a decimal?", "domain": "math", "answer": "0.5"},
    {"id": 7, "problem": "Solve x^2=1.", "domain": "math", "answer": r"\pm 1"},
    {"id": "c1", "problem": "Sum the numbers.", "domain": "code",
     "tests": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]})},
    {"id": "s1", "problem": "Which? (A) .. (D) ..", "domain": "science", "answer": "C"},
    {"id": "s2", "problem": "Speed of the wave?", "domain": "science", "answer": r"3\times10^{8}"},
]

GOOD = "```python\nprint(sum(map(int, input().split())))\n```"
SAMPLES = [
    # (id, sample_index, text, expected correct)
    ("m1", 0, r"So it is \boxed{\frac{1}{2}}.", True),
    ("m1", 1, r"\boxed{0.25}", False),
    (7, 0, r"x = \boxed{1, -1}", True),
    ("c1", 0, "```python\nwhile True:\n    pass\n```", False),           # infinite loop
    ("c1", 1, GOOD, True),                                               # graded after the loop
    ("c1", 2, "```python\nimport sys\nsys.stdout.write('9' * (100 << 20))\n```", False),  # output flood
    ("c1", 3, "```python\nx = bytearray(10 * 1024 ** 3)\n```", False),   # 10 GB allocation
    ("c1", 4, GOOD, True),
    ("c1", 5, "I would write a program but I will not.", False),
    ("s1", 0, "Weighing both, the answer is (C).", True),
    ("s1", 1, "Answer: B", False),
    ("s2", 0, r"$\boxed{300000000}$ m/s", True),
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _samples():
    return [{"id": i, "sample_index": k, "text": t} for i, k, t, _ in SAMPLES]


def _expected():
    return {(str(i), k): ok for i, k, _, ok in SAMPLES}


def _read(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keyed = {(str(r["id"]), r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows), "a sample was written twice"
    return keyed


def test_cli_grades_every_sample_and_carries_on(tmp_path):
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    samples = _write_jsonl(tmp_path / "samples.jsonl", _samples())
    out = tmp_path / "verified.jsonl"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "skyt1.recipe", "verify", "--input", str(samples),
                           "--problems", str(problems), "--output", str(out), "--workers", "2",
                           "--code-timeout", "1", "--math-timeout", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 90
    rows = _read(out)
    assert set(rows) == set(_expected())
    for key, ok in _expected().items():
        r = rows[key]
        assert r["correct"] is ok, (key, r["reason"])
        assert isinstance(r["reason"], str) and r["reason"]
        assert r["text"] == next(t for i, k, t, _ in SAMPLES if (str(i), k) == key)
    assert "time limit" in rows[("c1", 0)]["reason"].lower()
    assert "output limit" in rows[("c1", 2)]["reason"]
    assert "memory limit" in rows[("c1", 3)]["reason"]
    assert rows[("c1", 5)]["reason"].startswith("no Python code block")
    assert rows[("s1", 0)]["check"] == "choice" and rows[("s2", 0)]["check"] == "math"
    assert rows[("m1", 0)]["extracted"] == r"\frac{1}{2}"
    assert "math" in proc.stderr and "correct" in proc.stderr  # the per-domain summary


def test_resume_skips_finished_and_repairs_a_torn_line(tmp_path):
    problems = _write_jsonl(tmp_path / "problems.jsonl", [p for p in PROBLEMS if p["domain"] != "code"])
    samples = [s for s in _samples() if s["id"] != "c1"]
    samples_path = _write_jsonl(tmp_path / "samples.jsonl", samples)
    out = tmp_path / "verified.jsonl"
    # A previous run finished the first two samples (one with a verdict we can recognise as not redone)
    # and was killed while writing the third.
    done = [dict(samples[0], correct=False, reason="from the first run"), dict(samples[1], correct=False,
                                                                               reason="from the first run")]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "7", "sample_ind')
    counts = verify_file(samples_path, problems, out, workers=1, options=CheckOptions(), log=lambda m: None)
    assert counts["skipped_done"] == 2 and counts["graded"] == len(samples) - 2
    rows = _read(out)
    assert len(rows) == len(samples)
    assert rows[("m1", 0)]["reason"] == "from the first run"
    assert rows[("7", 0)]["correct"] is True
    # A second resume has nothing left to do.
    counts = verify_file(samples_path, problems, out, workers=1, options=CheckOptions(), log=lambda m: None)
    assert counts["graded"] == 0 and counts["skipped_done"] == len(samples)


@pytest.mark.parametrize("which,content,message", [
    ("problems", '{"id": "a", "problem": "p", "domain": "math", "answer": "1"}\n{"id": "b", "problem": "p"}\n',
     "problems.jsonl:2: 'domain' must be one of"),
    ("problems", '{"id": "a", "domain": "code", "tests": {"inputs": ["1"], "outputs": []}}\n',
     "problems.jsonl:1: field 'tests'"),
    ("problems", '{"id": "a", "domain": "math"}\n', "problems.jsonl:1: a math problem needs"),
    ("problems", '\n{"id": "a", "domain": "math", "answer": "1"}\n{"id": "a", "domain": "math", "answer": "2"}\n',
     "problems.jsonl:3: duplicate problem id"),
    ("samples", '{"id": "m1", "sample_index": 0, "text": "x"}\n{not json\n', "samples.jsonl:2: not valid JSON"),
    ("samples", '{"id": "zz", "sample_index": 0, "text": "x"}\n', "samples.jsonl:1: id 'zz' is not in"),
    ("samples", '{"id": "m1", "sample_index": -1, "text": "x"}\n', "samples.jsonl:1: 'sample_index'"),
    ("samples", '{"id": "m1", "sample_index": 0, "text": null}\n', "samples.jsonl:1: 'text' must be"),
])
def test_bad_rows_name_file_and_line(tmp_path, capsys, which, content, message):
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS[:1])
    samples = _write_jsonl(tmp_path / "samples.jsonl", _samples()[:1])
    (tmp_path / f"{which}.jsonl").write_text(content)
    out = tmp_path / "verified.jsonl"
    rc = main(["verify", "--input", str(samples), "--problems", str(problems), "--output", str(out),
               "--workers", "1"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""  # nothing graded before the input was validated


def test_every_registered_command_is_complete():
    import importlib

    assert "verify" in COMMANDS
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main), name
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_answer_forms(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"id": 1, "problem": "p", "domain": "math", "answer": 42},
        {"id": 2, "problem": "p", "domain": "math", "answer": ["3", "-3"]},
        {"id": 3, "problem": "p", "domain": "science", "answer": "(B)"},
    ])
    problems = load_problems(path)
    assert problems["1"].answer == "42" and problems["3"].kind == "choice"
    assert grade(problems["2"], r"\boxed{-3, 3}", CheckOptions()).correct
    assert not grade(problems["2"], r"\boxed{3}", CheckOptions()).correct
    assert grade(problems["3"], r"\boxed{B}", CheckOptions()).correct
