"""Evaluation: metrics against brute force, task loaders (GPQA shuffle, LiveCodeBench decoding), scoring
with the recipe graders, and whole runs on a tiny model (in-process engine) and through an OpenAI-compatible
endpoint (a standard-library server on 127.0.0.1 and the real openai client)."""
from __future__ import annotations

import base64
import csv
import itertools
import json
import pickle
import random
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import comb
from pathlib import Path

import numpy as np
import pytest

MATH_FILES = ("math500", "aime24", "amc23", "olympiadbench")


# ------------------------------------------------------------------------------------------ metrics


def test_pass_at_k_matches_brute_force():
    from skyt1.eval.metrics import pass_at_k

    rng = random.Random()
    for _ in range(60):
        n = rng.randint(1, 9)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summary_accuracy_interval_and_breakdown():
    from skyt1.eval.metrics import breakdown, default_ks, summarize

    rng = np.random.default_rng()
    p_true = rng.uniform(0, 1, size=60)
    scores = {f"q{i}": [float(x) for x in rng.random(8) < p] for i, p in enumerate(p_true)}
    s = summarize(scores)
    flat = [x for v in scores.values() for x in v]
    assert s["accuracy"] == pytest.approx(np.mean(flat)) and s["samples"] == 480 and s["problems"] == 60
    lo, hi = s["ci95_bootstrap"]
    assert lo < s["accuracy"] < hi and hi - lo < 0.4
    nlo, nhi = s["ci95_normal"]
    assert abs((nhi - nlo) - (hi - lo)) < 0.1  # two estimates of the same spread
    assert summarize(scores) == s  # fixed bootstrap seed: the report is reproducible
    assert list(s["pass_at_k"]) == ["pass@1", "pass@2", "pass@4", "pass@8"] and default_ks(6) == [1, 2, 4, 6]
    assert s["pass_at_k"]["pass@1"] == pytest.approx(s["accuracy"])
    assert s["pass_at_k"]["pass@8"] == pytest.approx(np.mean([max(v) for v in scores.values()]))
    assert "pass_at_k" not in summarize({"a": [1.0], "b": [0.0]})
    rows = [{"id": pid, "score": x, "groups": {"level": str(1 + int(pid[1:]) % 3)}}
            for pid, v in scores.items() for x in v]
    b = breakdown(rows, "level")
    assert list(b) == ["1", "2", "3"] and sum(g["samples"] for g in b.values()) == 480
    for g, v in b.items():
        mine = [x for r in rows if r["groups"]["level"] == g for x in [r["score"]]]
        assert v["accuracy"] == pytest.approx(np.mean(mine))


# --------------------------------------------------------------------------------------------- GPQA

GPQA_COLUMNS = ["Pre-Revision Question", "Pre-Revision Correct Answer", "Question", "Correct Answer",
                "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3", "Explanation", "Subdomain",
                "High-level domain", "Record ID"]


def _gpqa_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=GPQA_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _gpqa_rows(n: int) -> list[dict]:
    rng = random.Random()
    rows = []
    for i in range(n):
        tag = rng.randrange(10**9)
        rows.append({"Pre-Revision Question": "old", "Pre-Revision Correct Answer": "old",
                     "Question": f"Question {i} ({tag}): which holds?\nSecond line, \"quoted\", with commas.",
                     "Correct Answer": f"right {tag}", "Incorrect Answer 1": f"wrong a {tag}",
                     "Incorrect Answer 2": f"wrong b {tag}", "Incorrect Answer 3": f"wrong c {tag}",
                     "Explanation": "because", "Subdomain": ["Physics (general)", "Organic Chemistry"][i % 2],
                     "High-level domain": ["Physics", "Chemistry"][i % 2], "Record ID": f"rec{tag}"})
    return rows


def test_gpqa_shuffle_is_deterministic_per_question(tmp_path):
    from skyt1.eval.gpqa import load_gpqa

    rows = _gpqa_rows(40)
    a = load_gpqa(_gpqa_csv(tmp_path / "a.csv", rows))
    b = load_gpqa(_gpqa_csv(tmp_path / "b.csv", rows[::-1]))
    assert {p.id: (p.options, p.answer) for p in a} == {p.id: (p.options, p.answer) for p in b}
    assert a == load_gpqa(tmp_path / "a.csv")
    for p, r in zip(a, rows):
        assert p.id == r["Record ID"] and p.question == r["Question"].strip()
        assert p.options["ABCD".index(p.answer)] == r["Correct Answer"]
        assert sorted(p.options) == sorted([r["Correct Answer"]] + [r[f"Incorrect Answer {i}"] for i in (1, 2, 3)])
    assert len({p.answer for p in a}) >= 3  # not every correct option lands on the same letter
    other = load_gpqa(tmp_path / "a.csv", seed=1)
    assert [p.options for p in other] != [p.options for p in a]
    bad = dict(rows[0])
    del bad["Correct Answer"]
    with (tmp_path / "bad.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in GPQA_COLUMNS if c != "Correct Answer"])
        w.writeheader()
        w.writerow(bad)
    with pytest.raises(ValueError, match="Correct Answer"):
        load_gpqa(tmp_path / "bad.csv")


def test_gpqa_prompt_and_letter_grading(tmp_path):
    from skyt1.eval.run import ScoreOptions, score_sample
    from skyt1.eval.tasks import load_task

    problems = load_task("gpqa_diamond", [_gpqa_csv(tmp_path / "g.csv", _gpqa_rows(6))])
    for p in problems:
        assert p.prompt.startswith("Return your final response within \\boxed{}")
        for letter, option in zip("ABCD", p.audit["options"]):
            assert f"\n{letter}) {option}" in p.prompt
        wrong = "ABCD"[("ABCD".index(p.reference) + 1) % 4]
        assert score_sample(p, f"Thinking... so \\boxed{{{p.reference}}}", ScoreOptions())["score"] == 1.0
        assert score_sample(p, f"The answer is \\boxed{{{wrong}}}", ScoreOptions())["score"] == 0.0


# ------------------------------------------------------------------------------------ LiveCodeBench


def _official_compress(cases: list[dict]) -> str:
    # What the code_generation_lite release does to private tests.
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def _lcb_rows() -> list[dict]:
    k = random.randint(2, 9)
    stdin_public = [{"input": "1 2\n", "output": f"{3 * k}\n", "testtype": "stdin"}]
    stdin_private = [{"input": f"{a} {b}\n", "output": f"{(a + b) * k}\n", "testtype": "stdin"}
                     for a, b in [(5, 7), (4, -9), (0, 0)]]
    call_tests = [{"input": f"[{', '.join(map(str, xs))}]\n{t}", "output": json.dumps(sum(x * t for x in xs)),
                   "testtype": "functional"} for xs, t in [([1, 2], 3), ([5], k), ([], 4)]]
    return [
        {"question_title": "Scaled sum", "question_content": f"Print (a + b) * {k}.", "platform": "atcoder",
         "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2023-08-01T00:00:00",
         "starter_code": "", "difficulty": "easy", "public_test_cases": json.dumps(stdin_public),
         "private_test_cases": _official_compress(stdin_private), "metadata": "{}"},
        {"question_title": "Weighted", "question_content": "Return sum(x * t for x in nums).", "platform": "leetcode",
         "question_id": "3001", "contest_id": "weekly-1", "contest_date": "2023-09-01T00:00:00",
         "starter_code": "class Solution:\n    def weighted(self, nums: List[int], t: int) -> int:\n        ",
         "difficulty": "medium", "public_test_cases": json.dumps(call_tests[:1]),
         "private_test_cases": _official_compress(call_tests[1:]), "metadata": json.dumps({"func_name": "weighted"})},
    ], k


def test_livecodebench_rows_decode_and_refuse_hostile_pickles(tmp_path):
    from skyt1.eval.livecodebench import decode_test_cases, encode_test_cases, parse_row

    rows, k = _lcb_rows()
    a = parse_row(rows[0], "r0")
    assert not a.call_based and a.difficulty == "easy" and len(a.tests) == 4
    assert a.tests[2] == {"input": "4 -9\n", "output": f"{-5 * k}\n", "testtype": "stdin"}
    b = parse_row(rows[1], "r1")
    assert b.call_based and b.func_name == "weighted" and len(b.tests) == 3
    cases = json.loads(rows[1]["public_test_cases"])
    assert decode_test_cases(encode_test_cases(cases), "x") == cases

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(ValueError, match="refusing"):
        decode_test_cases(evil, "row 7 private_test_cases")
    assert not marker.exists()
    not_text = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(ValueError, match="expected the JSON text"):
        decode_test_cases(not_text, "r")
    with pytest.raises(ValueError, match="neither JSON nor base64"):
        decode_test_cases("{not json", "r")
    broken = dict(rows[1], metadata="{}")
    with pytest.raises(ValueError, match="func_name"):
        parse_row(broken, "r1")


def test_livecodebench_scoring_runs_public_and_private_tests(tmp_path):
    from skyt1.eval.run import ScoreOptions, score_sample
    from skyt1.eval.tasks import load_task

    rows, k = _lcb_rows()
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stdin_p, call_p = load_task("livecodebench", [path])
    assert "standard input" in stdin_p.prompt and "Solution().weighted" in call_p.prompt
    opts = ScoreOptions(code_timeout_s=5.0)
    good = f"Here:\n```python\na, b = map(int, input().split())\nprint((a + b) * {k})\n```"
    # passes the public test (1 2), fails a private one (negative number)
    public_only = f"```python\na, b = map(int, input().split())\nprint(abs(a + b) * {k})\n```"
    assert score_sample(stdin_p, good, opts)["score"] == 1.0
    r = score_sample(stdin_p, public_only, opts)
    assert r["score"] == 0.0 and r["details"]["failed_test"] == 2 and "wrong answer" in r["reason"]
    call_good = ("```python\nclass Solution:\n    def weighted(self, nums, t):\n"
                 "        return sum(x * t for x in nums)\n```")
    assert score_sample(call_p, call_good, opts)["score"] == 1.0
    assert score_sample(call_p, call_good.replace("x * t", "x + t"), opts)["score"] == 0.0
    assert score_sample(call_p, "no code at all", opts)["reason"].startswith("no Python code block")


# ------------------------------------------------------------------------------ real benchmark files


@pytest.mark.parametrize("task", MATH_FILES)
def test_benchmark_file_loads_and_its_answers_grade(task, shared_eval_dir):
    from skyt1.eval.run import ScoreOptions, score_sample
    from skyt1.eval.tasks import load_task

    path = shared_eval_dir / f"{task}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    problems = load_task(task, [path])
    assert len(problems) == {"math500": 500, "aime24": 30, "amc23": 40, "olympiadbench": 675}[task]
    assert all(p.prompt.startswith("Return your final response within \\boxed{}. ") for p in problems)
    picked = random.Random().sample(problems, 8)
    for p, other in zip(picked, picked[1:] + picked[:1]):
        assert score_sample(p, f"... so the answer is $\\boxed{{{p.reference}}}$.", ScoreOptions())["score"] == 1.0
        assert score_sample(p, "\\boxed{987654321}", ScoreOptions())["score"] == 0.0
        if p.reference.isdigit() and other.reference.isdigit() and int(p.reference) != int(other.reference):
            assert score_sample(p, f"\\boxed{{{other.reference}}}", ScoreOptions())["score"] == 0.0


# --------------------------------------------------------------------------- whole runs, tiny model


@pytest.fixture(scope="module")
def tiny_llm(tiny_chat_checkpoint):
    from skyt1.sample import LLM

    return tiny_chat_checkpoint, LLM(tiny_chat_checkpoint, device="cpu", num_kv_blocks=1024, max_num_seqs=16)


def _eval_args(argv: list[str]):
    from skyt1.sample.cli import build_parser

    return build_parser().parse_args(["eval"] + argv)


def _task_files(tmp_path: Path, shared: Path | None) -> dict[str, Path]:
    files = {}
    if shared is not None:
        files.update({t: shared / f"{t}.jsonl" for t in MATH_FILES if (shared / f"{t}.jsonl").is_file()})
    files["gpqa_diamond"] = _gpqa_csv(tmp_path / "gpqa_diamond.csv", _gpqa_rows(3))
    rows, _ = _lcb_rows()
    files["livecodebench"] = tmp_path / "lcb.jsonl"
    files["livecodebench"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_eval_tiny_model_on_every_task(tmp_path, tiny_llm, request, capsys):
    from skyt1.eval.run import evaluate

    try:
        shared = request.getfixturevalue("shared_eval_dir")
    except pytest.skip.Exception:
        shared = None
    model_dir, llm = tiny_llm
    files = _task_files(tmp_path, shared)
    if shared is not None:
        assert set(MATH_FILES) <= set(files)
    for task, path in files.items():
        out = tmp_path / f"{task}.jsonl"
        argv = ["--model", str(model_dir), "--task", task, "--data", str(path), "--limit", "2", "--n", "2",
                "--max-tokens", "6", "--seed", "5", "--output", str(out), "--workers", "2"]
        report = evaluate(_eval_args(argv), lambda: llm)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(
            (pid, s) for pid in {r["id"] for r in rows} for s in range(2)) and len(rows) == 4
        for r in rows:
            assert r["task"] == task and r["score"] in (0.0, 1.0) and isinstance(r["reason"], str)
            assert 0 < r["completion_tokens"] <= 6 and r["response"] is not None and r["run"]["seed"] == 5
        o = report["overall"]
        assert o["samples"] == 4 and o["problems"] == 2 and report["complete_problems"] == 2
        assert o["accuracy"] == pytest.approx(np.mean([r["score"] for r in rows]))
        assert "pass@2" in o["pass_at_k"]
        printed = capsys.readouterr().out
        assert f"task {task}" in printed
        if task in ("math500", "aime24", "gpqa_diamond", "olympiadbench", "livecodebench"):
            assert "Sky-T1-32B-Preview" in printed and report["published"]
        saved = json.loads(Path(str(out) + ".report.json").read_text())
        assert saved["overall"] == json.loads(json.dumps(o))
        # resuming: nothing left to sample, same rows; other settings are refused, not mixed in
        before = out.read_text()
        again = evaluate(_eval_args(argv), lambda: pytest.fail("nothing should be sampled"))
        assert out.read_text() == before and again["overall"] == report["overall"]
        with pytest.raises(ValueError, match="temperature"):
            evaluate(_eval_args(argv + ["--temperature", "0.3"]), lambda: llm)
    capsys.readouterr()


def test_eval_resume_fills_only_missing_samples(tmp_path, tiny_llm):
    from skyt1.eval.run import evaluate

    model_dir, llm = tiny_llm
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i),
                                        "subject": "Algebra", "level": 1 + i % 2, "unique_id": f"u{i}"}) + "\n"
                            for i in range(3)))
    out = tmp_path / "o.jsonl"
    argv = ["--model", str(model_dir), "--task", "math500", "--data", str(data), "--n", "3", "--max-tokens", "5",
            "--seed", "9", "--output", str(out), "--temperature", "1.0"]
    evaluate(_eval_args(argv), lambda: llm)
    full = {(r["id"], r["sample_index"]): r for r in map(json.loads, out.read_text().splitlines())}
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a kill: rows lost, a torn line
    report = evaluate(_eval_args(argv), lambda: llm)
    resumed = {(r["id"], r["sample_index"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(out.read_text().splitlines()) == 9 and resumed.keys() == full.keys()
    for key in full:  # per-problem seeds: a resumed sample is the sample the full run made
        assert resumed[key]["response"] == full[key]["response"]
    assert set(report["breakdown"]["level"]) == {"1", "2"}


# ------------------------------------------------------------------- endpoint, through the CLI


class _Answering(ThreadingHTTPServer):
    daemon_threads = True


def _answering_handler(answers: dict[str, list[str]]):
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            with lock:
                key = next(k for k in answers if k in prompt)
                text = answers[key].pop(0)
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    return H


def test_eval_cli_against_an_openai_compatible_endpoint(tmp_path, capsys):
    from skyt1.sample import cli

    data = tmp_path / "amc.jsonl"
    probs = [(f"Problem number {i}: compute {i} squared.", float(i * i)) for i in range(4)]
    data.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, (p, a) in enumerate(probs)))
    # problems 0 and 1 always right, problem 2 right once in two, problem 3 never
    answers = {"Problem number 0:": ["\\boxed{0}"] * 2, "Problem number 1:": ["so \\boxed{1}."] * 2,
               "Problem number 2:": ["\\boxed{4}", "\\boxed{5}"], "Problem number 3:": ["9"] * 2}
    server = _Answering(("127.0.0.1", 0), _answering_handler(answers))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "r.jsonl"
        rc = cli.main(["eval", "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "remote",
                       "--task", "amc23", "--data", str(data), "--n", "2", "--concurrency", "1",
                       "--output", str(out)])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["overall"]["accuracy"] == pytest.approx(5 / 8)
    assert report["overall"]["pass_at_k"] == {"pass@1": pytest.approx(5 / 8), "pass@2": pytest.approx(3 / 4)}
    assert report["settings"]["model"] == "remote"
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["reason"] for r in rows if r["id"] == "3"} == {"no \\boxed{} answer in the response"}
    assert "accuracy 62.50%" in capsys.readouterr().out


def test_eval_refuses_code_tasks_before_sampling_where_a_sandbox_layer_is_missing(tmp_path, monkeypatch, capsys):
    import functools

    import skyt1.recipe.sandbox as sandbox
    from skyt1.eval.cli import run

    # A machine without Landlock, as the sandbox sees it: the real check runs and refuses.
    monkeypatch.setattr(sandbox, "SandboxPolicy", functools.partial(sandbox.SandboxPolicy, landlock=False))
    rows, _ = _lcb_rows()
    data = tmp_path / "lcb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    sampled = []
    args = _eval_args(["--model", str(tmp_path), "--task", "livecodebench", "--data", str(data), "--n", "1",
                       "--output", str(out)])
    monkeypatch.setattr("skyt1.eval.cli.llm_from_args", lambda _a: sampled.append(1))
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "landlock" in err and "--unsafe-sandbox" in err
    assert not sampled and not out.exists()  # refused before any sampling or output
    # --unsafe-sandbox passes the check (the run then samples: stop it at the engine's creation).
    args = _eval_args(["--model", str(tmp_path), "--task", "livecodebench", "--data", str(data), "--n", "1",
                       "--output", str(out), "--unsafe-sandbox"])

    def no_engine(_a):
        raise RuntimeError("engine reached")

    monkeypatch.setattr("skyt1.eval.cli.llm_from_args", no_engine)
    with pytest.raises(RuntimeError, match="engine reached"):
        run(args)
