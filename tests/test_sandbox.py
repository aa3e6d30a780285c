"""The code sandbox and the test runner: correct programs pass, and hostile ones (infinite loop, fork
bomb, 10 GB allocation, socket connect, writes outside the folder, 100 MB of output) are stopped or
refused within the limits."""
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from skyt1.recipe.code_tests import extract_last_code_block, outputs_match, parse_tests, results_match, \
    run_code_tests
from skyt1.recipe.sandbox import SandboxLimits, SandboxPolicy, isolation_report, run_sandboxed

GRACE = SandboxLimits().startup_grace_s
SLACK = 2.0  # kill, reap and a loaded 2-core CI machine


def _live_pids_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    text = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] != "Z":
                pids.append(int(name))
    return pids


# ------------------------------------------------------------------------------------------ test runner

SUM_STDIO = "import sys\ndata = sys.stdin.read().split()\nprint(sum(int(x) for x in data[1:]))\n"


def test_stdio_tests_pass_and_fail():
    tests = {"inputs": ["3\n1 2 3\n", "2\n10 -4\n"], "outputs": ["6\n", "6"]}
    v = run_code_tests(SUM_STDIO, tests, timeout_s=2.0)
    assert v.correct, v.reason
    assert v.details["passed"] == 2 and v.details["total"] == 2
    v = run_code_tests(SUM_STDIO, {"inputs": ["1\n5\n", "2\n1 1\n"], "outputs": ["5", "3"]}, timeout_s=2.0)
    assert not v.correct and v.reason.startswith("test 1: wrong answer") and v.details["failed_test"] == 1
    # JSON string form (as APPS stores it) and float tolerance
    v = run_code_tests("print(1/3)", '{"inputs": [""], "outputs": ["0.333333333"]}', timeout_s=2.0)
    assert v.correct, v.reason
    v = run_code_tests("print(0.3)", {"inputs": [""], "outputs": ["0.333333333"]}, timeout_s=2.0)
    assert not v.correct


def test_call_based_tests():
    apps = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}  # APPS wraps outputs
    assert run_code_tests("def add(a, b):\n    return a + b\n", apps, timeout_s=2.0).correct
    v = run_code_tests("def add(a, b):\n    return a - b\n", apps, timeout_s=2.0)
    assert not v.correct and "wrong answer" in v.reason
    lcb = {"fn_name": "twoSum", "inputs": ["[2, 7, 11, 15]\n9", "[3, 3]\n6"], "outputs": ["[0, 1]", "[0, 1]"]}
    code = ("class Solution:\n    def twoSum(self, nums, target):\n        print('debug noise')\n"
            "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
            "                return (seen[target - x], i)\n            seen[x] = i\n")
    v = run_code_tests(code, lcb, timeout_s=2.0)
    assert v.correct, v.reason
    v = run_code_tests("def other():\n    pass\n", apps, timeout_s=2.0)
    assert not v.correct and "no function" in v.reason
    v = run_code_tests("def add(a, b):\n    return a +\n", apps, timeout_s=2.0)
    assert not v.correct and v.reason.startswith("syntax error")


def test_matching_rules():
    assert outputs_match("1 2\n3\n", "1 2 3")
    assert outputs_match("0.5000001", "0.5")
    assert not outputs_match("0.51", "0.5")
    assert not outputs_match("YES", "yes")
    assert not outputs_match("1 2", "1 2 3")
    assert results_match([1, 2], [1, 2]) and results_match(3, [3]) and not results_match(3, [3, 4])
    assert not results_match(True, 1) and results_match(2, 2.0000000001)
    with pytest.raises(ValueError, match="inputs but"):
        parse_tests({"inputs": ["1"], "outputs": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_tests("{inputs")


def test_extract_last_code_block():
    text = ("Try:\n```python\nprint(1)\n```\nthen the input\n```\n3\n```\nand the final:\n```Python\n"
            "print(2)\n```\n```cpp\nint main(){}\n```\n")
    assert extract_last_code_block(text) == "print(2)\n"
    assert extract_last_code_block("```\nprint(3)\n```") == "print(3)\n"
    assert extract_last_code_block("no code") is None
    assert extract_last_code_block("```cpp\nint main(){}\n```") is None


# --------------------------------------------------------------------------------------- hostile code

def test_infinite_loop_is_stopped():
    t0 = time.monotonic()
    v = run_code_tests("while True:\n    pass\n", {"inputs": ["", ""], "outputs": ["", ""]}, timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert not v.correct and "time limit" in v.reason.lower(), v.reason
    assert v.details["failed_test"] == 0  # the second test never ran
    assert elapsed < 1.0 + GRACE + SLACK, elapsed


FORK_COUNT = """
import os, time
n = 0
for _ in range(10000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, flush=True)
time.sleep(60)
"""

FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.parametrize("program,policy", [(FORK_COUNT, SandboxPolicy()), (FORK_BOMB, SandboxPolicy()),
                                            (FORK_COUNT, SandboxPolicy(private_uid=False))],
                         ids=["count", "exponential", "count-without-private-uid"])
def test_fork_bomb_is_bounded(program, policy):
    limits = SandboxLimits(timeout_s=1.0, max_processes=16)
    t0 = time.monotonic()
    r = run_sandboxed(program, limits=limits, policy=policy)
    elapsed = time.monotonic() - t0
    assert r.status in ("timeout", "cpu"), r
    assert elapsed < 1.0 + GRACE + SLACK, elapsed
    if program is FORK_COUNT:
        forks = int(r.stdout.split()[0])
        assert 0 <= forks < limits.max_processes, forks
    if "uid" in r.isolation:
        assert _live_pids_of_uid(r.isolation["uid"]) == []  # every process it made is gone


def test_10gb_allocation_is_refused():
    t0 = time.monotonic()
    v = run_code_tests("x = bytearray(10 * 1024 ** 3)\nprint(len(x))\n", {"inputs": [""], "outputs": ["0"]},
                       timeout_s=2.0, memory_mb=512)
    assert not v.correct and "memory limit" in v.reason, v.reason
    assert time.monotonic() - t0 < 2.0 + GRACE + SLACK


CONNECT = """
import socket, sys
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", int(sys.stdin.read())))
    s.sendall(b"escaped")
    print("CONNECTED")
except Exception as e:
    print("refused", type(e).__name__, e)
"""


@pytest.mark.parametrize("policy", [SandboxPolicy(), SandboxPolicy(audit_network=False),
                                    SandboxPolicy(network_namespace=False)],
                         ids=["default", "namespace-only", "audit-hook-only"])
def test_socket_connect_is_refused(policy):
    if not policy.audit_network and isolation_report().get("network") == "none":
        pytest.skip("no network namespace here: only the audit hook holds the network")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        # Control: outside the sandbox the same program does reach the listener.
        plain = subprocess.run([sys.executable, "-c", CONNECT], input=str(port).encode(), capture_output=True,
                               timeout=30)
        assert b"CONNECTED" in plain.stdout
        listener.accept()[0].close()
        listener.setblocking(False)
        r = run_sandboxed(CONNECT, stdin=str(port).encode(), limits=SandboxLimits(timeout_s=3.0), policy=policy)
        assert r.status == "ok", r
        assert b"CONNECTED" not in r.stdout and b"refused" in r.stdout, r.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the listener


def test_writes_outside_the_folder_are_refused(tmp_path):
    targets = [tmp_path / "outside.txt", f"/tmp/skyt1-sandbox-escape-{uuid.uuid4().hex}.txt"]
    program = "\n".join([
        "import os",
        "for path in %r:" % [str(t) for t in targets],
        "    try:",
        "        with open(path, 'w') as f:",
        "            f.write('escaped')",
        "        print('WROTE', path)",
        "    except OSError as e:",
        "        print('refused', type(e).__name__)",
        "with open('inside.txt', 'w') as f:",
        "    f.write('fine')",
        "print(open(os.path.join(os.environ['TMPDIR'], 'inside.txt')).read(), os.getcwd() == os.environ['HOME'])",
    ])
    r = run_sandboxed(program, limits=SandboxLimits(timeout_s=3.0))
    assert r.status == "ok", r
    assert b"WROTE" not in r.stdout and r.stdout.count(b"refused") == 2, r.stdout
    assert b"fine True" in r.stdout  # its own folder is writable, and is cwd, HOME and TMPDIR
    for t in targets:
        assert not os.path.exists(t)
    # With the audit hook off, the kernel alone still refuses (Landlock), world-writable /tmp included.
    r = run_sandboxed(program, limits=SandboxLimits(timeout_s=3.0), policy=SandboxPolicy(audit_files=False))
    assert r.status == "ok", r
    assert b"WROTE" not in r.stdout and r.stdout.count(b"refused") == 2, r.stdout
    for t in targets:
        assert not os.path.exists(t)


def test_100mb_of_output_is_cut_off():
    t0 = time.monotonic()
    r = run_sandboxed("import sys\nsys.stdout.write('x' * (100 << 20))\n",
                      limits=SandboxLimits(timeout_s=5.0, max_output_bytes=1 << 20))
    assert r.status == "output", r.status
    assert len(r.stdout) <= (1 << 20) + 1
    assert time.monotonic() - t0 < 5.0 + GRACE + SLACK
    v = run_code_tests("print('y' * (100 << 20))", {"inputs": [""], "outputs": ["y"]}, timeout_s=5.0)
    assert not v.correct and "output limit" in v.reason
