"""The math grader: a hand-checked table of (reference, candidate, expected) pairs, extraction of the last
\\boxed{}, and the time bound of the symbolic stage from threads and forked processes."""
import multiprocessing as mp
import threading
import time

import pytest

from skyt1.recipe.math_grader import extract_boxed, grade_math, math_equal, normalize_answer

# (reference, candidate, expected). Each row was checked by hand; the comment says why when it is subtle.
TABLE = [
    # fractions
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", r"\dfrac{1}{2}", True),
    (r"\frac{1}{2}", r"\tfrac12", True),
    (r"\frac{1}{2}", "1/2", True),
    (r"\frac{3}{4}", r"\frac{6}{8}", True),
    (r"\frac{3}{4}", "0.75", True),
    (r"\frac{3}{4}", "0.7", False),
    (r"-\frac{1}{3}", r"\frac{-1}{3}", True),
    (r"-\frac{1}{3}", r"\frac{1}{3}", False),
    (r"\frac{1}{3}", "0.33333", True),            # inexact reference: relative error 1e-5 <= 1e-4
    (r"\frac{1}{3}", "0.33", False),              # relative error 1e-2
    (r"\frac{2}{3}", r"\frac{4}{6}", True),
    (r"\frac{9}{4}", "2.25", True),
    (r"\frac{1}{7}", "0.142857", True),
    (r"\frac{1}{7}", "0.1429", False),            # relative error 2e-4
    (r"\frac{1}{2004!}", r"\frac{1}{2006!}", False),   # both round to 0 at 6 decimals: the classic trap
    (r"\frac{1}{2004!}", r"\dfrac{1}{2004!}", True),
    (r"\frac{2005 \cdot 2006}{2006!}", r"\frac{1}{2004!}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", True),
    (r"\frac{x+1}{x-1}", r"\frac{1+x}{x-1}", True),
    (r"\frac{a}{b}", "a/b", True),
    (r"\frac{5}{2}", r"2\frac{1}{2}", True),       # a mixed number, not 2 * 1/2
    (r"-2\frac{1}{2}", "-2.5", True),
    (r"\frac{1}{2}", r"2\frac{1}{2}", False),
    # integers and decimals
    ("2", "2.0", True),
    ("2", "2.0001", False),                       # both exact decimals: must be exactly equal
    ("2", "2.00", True),
    ("0.5", ".5", True),
    ("1000000", "1,000,000", True),
    ("1000000", "10^6", True),
    ("12345", r"12{,}345", True),
    ("1234", r"1,\!234", True),
    ("1, 234", "234, 1", True),                   # a space after the comma: a list, not 1234
    ("1234", "1, 234", False),
    ("1000", r"1\,000", True),                    # SI thin-space thousands
    ("3", "-3", False),
    ("100000", "100001", False),                  # relative error 1e-5 but both exact: different
    (r"10^{100}", r"10^{100}+1", False),          # exact integers differ by 1
    ("1.5", r"\frac{3}{2}", True),
    (r"2.5\times10^{3}", "2500", True),
    ("0", "0.0", True),
    ("12", "12.", True),
    ("-5", "- 5", True),
    (r"2^{10}", "1024", True),
    ("-3", "\u22123", True),                        # unicode minus
    ("0.5", r"\approx 0.5", True),
    # radicals
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\sqrt{2}", "1.41421", True),
    (r"\sqrt{2}", "1.41", False),
    (r"\sqrt[3]{2}", "2^{1/3}", True),
    (r"3\sqrt{3}", r"\sqrt{27}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"2\sqrt{3}", r"3\sqrt{2}", False),
    (r"\sqrt{12}", r"2\sqrt3", True),
    (r"1+\sqrt{5}", r"\sqrt{5}+1", True),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{1-\sqrt{5}}{2}", False),
    (r"5\sqrt{2}", r"5 \sqrt 2", True),
    # constants
    (r"\pi", "3.14", False),                      # relative error 5e-4
    (r"2\pi", r"\pi \cdot 2", True),
    (r"\frac{\pi}{4}", r"0.25\pi", True),
    (r"\log_2 8", "3", True),
    # intervals
    ("(1,2]", "(1, 2]", True),
    ("(1,2]", "[1,2]", False),
    ("(0,1)", "(0,1]", False),
    (r"[2,\infty)", r"[2, \infty)", True),
    (r"(-\infty, 3)", r"\left(-\infty,3\right)", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(2,\infty)\cup(-\infty,1)", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty,1]\cup(2,\infty)", False),
    (r"[0,\frac{1}{2}]", "[0, 0.5]", True),
    (r"x \in [1,3]", "[1,3]", True),
    (r"\left[ -1, 1 \right]", "[-1,1]", True),
    (r"\infty", r"-\infty", False),
    # matrices and vectors
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}", True),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}", False),
    (r"\begin{pmatrix} \frac12 \\ -1 \end{pmatrix}", r"\begin{pmatrix}0.5\\-1\end{pmatrix}", True),
    (r"\begin{pmatrix}1\\2\\3\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
    (r"\begin{pmatrix}\sqrt{2}\\1\end{pmatrix}", r"\begin{pmatrix}\sqrt2 \\ 1\end{pmatrix}", True),
    (r"\begin{pmatrix} 2 & 0 \\ 0 & 2 \end{pmatrix}", r"\begin{bmatrix}2&0\\0&2\end{bmatrix}", True),
    # units
    ("10", r"10\text{ cm}", True),
    ("10", r"10 \text{cm}", True),
    ("5", r"5\mbox{ meters}", True),
    ("12", r"12 \text{ square units}", True),
    ("3", r"3\mathrm{~m}", True),
    ("20", r"\$20", True),
    ("20", r"20 \text{ dollars}", True),
    ("4.5", r"4.5\text{ hours}", True),
    ("10", r"11\text{ cm}", False),
    ("36", r"36\text{ m}^2", True),
    ("6", r"6 \text{ ways}", True),
    # degrees
    ("30", r"30^\circ", True),
    (r"30^\circ", "30", True),
    ("45", r"45^{\circ}", True),
    ("90", "90°", True),
    ("30", r"60^\circ", False),
    ("120", r"120 \text{ degrees}", True),
    # percentages (a percent sign on one side allows the value or the value / 100)
    (r"50\%", "50", True),
    (r"50\%", "0.5", True),
    ("50", r"50\%", True),
    (r"12.5\%", "12.5", True),
    (r"25\%", "0.3", False),
    ("50", "0.5", False),                         # no percent sign anywhere: 50 is not 0.5
    (r"10\%", r"10 \text{ percent}", True),
    # multiple answers: bare lists and sets unordered, tuples ordered
    ("1,2", "2,1", True),
    ("1, 2", "1, 3", False),
    (r"x=1 \text{ or } x=2", "2, 1", True),
    (r"\{1, 2, 3\}", r"\{3,2,1\}", True),
    (r"\{1,2,3\}", r"\{1,2\}", False),
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2),(3,4)", "(3,4),(1,2)", True),
    ("-2, 3", "3, -2", True),
    ("-2, 3", "-2", False),
    (r"\frac{1}{2}, 2", "2, 0.5", True),
    ("x=2, y=3", "(2,3)", True),
    (r"1 \text{ and } 2", "1,2", True),
    ("1, 2, 2", "1, 2", False),
    # \text{} wrappers and words
    (r"\text{Monday}", "Monday", True),
    (r"\text{(C)}", "C", True),
    (r"\text{odd}", r"\text{even}", False),
    (r"\textbf{5}", "5", True),
    (r"\text{no solution}", r"\text{No solution}", True),
    (r"\text{yes}", "Yes", True),
    (r"\mathrm{A}", "A", True),
    (r"\emptyset", r"\varnothing", True),
    # expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "x^2-1", False),
    ("2x+3", "3+2x", True),
    ("y=2x+3", "2x+3", True),
    ("f(x)=x^2", "x^2", True),
    (r"\frac{x}{2}", "0.5x", True),
    (r"\sin^2 x + \cos^2 x", "1", True),
    ("xy", "yx", True),                               # two letters are a product, not a word
    ("2\u03c0", r"2\pi", True),
    ("2\u221a3", r"\sqrt{12}", True),
    # boxed references and empty answers
    ("3", r"\boxed{3}", True),
    ("0", "", False),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 100


@pytest.mark.parametrize("reference,candidate,expected", TABLE)
def test_math_equal_table(reference, candidate, expected):
    assert math_equal(reference, candidate) is expected, (reference, candidate, normalize_answer(reference),
                                                        normalize_answer(candidate))


@pytest.mark.parametrize("text,expected", [
    (r"so the answer is \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),
    (r"The answer is \boxed 5.", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed {x^{2}}", "x^{2}"),
    (r"cut off: \boxed{\frac{1}{2", None),
    ("no box at all", None),
    (r"\boxed{}", None),
    (r"$\boxed{\text{(B)}}$", r"\text{(B)}"),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_grade_math_responses():
    v = grade_math(r"Thus $x = \boxed{\dfrac{1}{2}}$.", "0.5")
    assert v.correct and v.extracted == r"\dfrac{1}{2}" and v.reason.startswith("equal")
    v = grade_math(r"\boxed{1} is wrong, the answer is \boxed{2}", "1")
    assert not v.correct and v.extracted == "2"
    v = grade_math("I could not solve it.", "7")
    assert not v.correct and v.extracted is None and "no \\boxed" in v.reason
    # The reference may itself be a solution whose last \boxed{} is the answer.
    assert grade_math(r"\boxed{10}", r"Adding gives $\boxed{10}$.").correct


# A hang guard, not a speed bound: unbounded, 9^{9^9} runs for minutes; bounded at 1 s it returns after that
# second plus the start of a fresh helper (importing sympy and math-verify: seconds on a loaded 2-core box).
HANG_GUARD_S = 15.0


def test_symbolic_stage_is_bounded_and_recovers():
    # 9^{9^9} is one long C-level int power that no signal interrupts: the helper is killed at the bound.
    t0 = time.monotonic()
    v = grade_math(r"\boxed{9^{9^{9}}}", "1", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert not v.correct and "timed out" in v.reason
    assert elapsed < HANG_GUARD_S, elapsed
    # The next symbolic check gets a fresh helper.
    assert math_equal("x^2-1", "(x-1)(x+1)")


def test_from_threads():
    # math-verify's own timeout (signal.alarm) fails outside the main thread; ours must hold there too.
    pairs = [("x^2-1", "(x-1)(x+1)", True), (r"\frac{1}{2004!}", r"\frac{1}{2006!}", False),
             (r"\sqrt{12}", r"2\sqrt3", True), ("2x+3", "2x+4", False)]
    results = [None] * len(pairs)
    hang = {}

    def work(i):
        a, b, _ = pairs[i]
        results[i] = math_equal(a, b)

    def hanging():
        t0 = time.monotonic()
        hang["result"] = math_equal("1", r"9^{9^{9}}", timeout_s=1.0)
        hang["elapsed"] = time.monotonic() - t0

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    threads.append(threading.Thread(target=hanging))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [e for _, _, e in pairs]
    assert hang["result"] is False and hang["elapsed"] < HANG_GUARD_S, hang


def _child(q):
    q.put([math_equal("x^2-1", "(x-1)(x+1)"), math_equal(r"\sqrt{2}", "1.41")])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_from_child_processes(method):
    math_equal("x+1", "1+x")  # the parent holds a helper before forking: the child must not share it
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) == [True, False]
    finally:
        p.join(30)
    assert math_equal("x+1", "1+x")  # and the parent's helper still works
