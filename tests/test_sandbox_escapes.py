"""Escapes from the code sandbox, tried as a hostile solution would (loopback only, bounded in count and
time): each is blocked in the default mode and in the fallback (root that cannot switch uid), and,
where it is safe to try, the same probe run unconfined shows that it does escape (so the test can fail).
Also: killing `verify` (SIGTERM, SIGINT, SIGKILL) leaves nothing it started running."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from skyt1.recipe.sandbox import SandboxLimits, SandboxPolicy, SandboxUnavailable, check_sandbox, \
    isolation_report, run_sandboxed

REPO = Path(__file__).resolve().parents[1]
LIMITS = SandboxLimits(timeout_s=3.0, max_processes=16)
DEFAULT, FALLBACK = SandboxPolicy(), SandboxPolicy(private_uid=False)
# What a root container without CAP_SYS_ADMIN gets: no uid switch, no namespaces (Landlock + seccomp).
NO_NAMESPACES = SandboxPolicy(private_uid=False, pid_namespace=False, network_namespace=False)
MODES = pytest.mark.parametrize("policy", [DEFAULT, FALLBACK, NO_NAMESPACES],
                                ids=["default", "fallback-no-uid-switch", "fallback-no-namespaces"])


def _run(program: str, policy: SandboxPolicy, stdin: str = "", limits: SandboxLimits = LIMITS):
    r = run_sandboxed(program, stdin=stdin.encode(), limits=limits, policy=policy)
    assert r.status in ("ok", "error"), (r.status, r.stderr[-500:])  # ran, was not refused
    assert not r.isolation["missing"], r.isolation
    return r


def _unconfined(program: str, stdin: str = "", argv: tuple = (), cwd=None) -> bytes:
    return subprocess.run([sys.executable, "-c", program, *argv], input=stdin.encode(), capture_output=True,
                          timeout=30, cwd=cwd).stdout


def _alive_with(text: str) -> list[int]:
    """Live processes whose command line holds text (the run's folder is in the launcher's config, which
    every process forked from the program inherits)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text.encode() in cmdline and state != "Z":
                pids.append(int(name))
    return pids


@pytest.fixture
def sleeper():
    """A process of ours the probes try to kill and trace (never the test process itself)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------ the grader's files, root files, environ

CHEAT = r"""
import json, os
def args_of(pid):
    with open("/proc/%s/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")
pids = [os.getppid()]
try:
    pids += [p for p in os.listdir("/proc") if p.isdigit()]
except OSError as e:
    print("blocked: /proc", type(e).__name__)
for pid in pids:
    try:
        args = args_of(pid)
    except OSError:
        continue
    if b"--problems" in args:
        with open(args[args.index(b"--problems") + 1].decode()) as f:
            for line in f:
                print(json.loads(line)["tests"]["outputs"][0])
        break
"""


def _verify_files(tmp_path: Path, secret: str, code: str, n: int = 1):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p", "domain": "code", "problem": "print the secret",
                                    "tests": {"inputs": [""], "outputs": [secret]}}) + "\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": "p", "sample_index": i, "text": f"```python\n{code}```"}) + "\n"
                               for i in range(n)))
    return problems, samples


def test_solution_cannot_read_the_problems_file_through_proc(tmp_path):
    secret = uuid.uuid4().hex
    problems, samples = _verify_files(tmp_path, secret, CHEAT)
    # Control: unconfined, under a parent whose command line names the problems file, the cheat works.
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CHEAT!r}])"
    assert secret.encode() in _unconfined(parent, argv=("--problems", str(problems)))
    out = tmp_path / "verified.jsonl"
    r = subprocess.run([sys.executable, "-m", "skyt1.recipe", "verify", "--input", str(samples), "--problems",
                        str(problems), "--output", str(out), "--workers", "2", "--code-timeout", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())
    assert row["correct"] is False and "wrong answer" in row["reason"], row


ROOT_FILE = """
import os, sys
paths = sys.stdin.read().split()
for path in paths:
    try:
        with open(path) as f:
            print("ESCAPED", path, f.read()[:40])
    except OSError as e:
        print("blocked", path, type(e).__name__)
try:  # a hard link into its own folder would make the file readable there
    os.link(paths[0], "linked")
    print("ESCAPED link", open("linked").read()[:40])
except OSError as e:
    print("blocked link", type(e).__name__)
"""


@MODES
def test_root_only_files_and_the_parents_environ_are_unreadable(policy, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash")
    secret.chmod(0o600)
    paths = [str(secret), "/etc/shadow", f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/cmdline",
             "/proc/1/environ"]
    assert _unconfined(ROOT_FILE, " ".join(paths), cwd=tmp_path).count(b"ESCAPED") >= 4  # control: root reads them
    r = _run(ROOT_FILE, policy, " ".join(paths))
    assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == len(paths) + 1, r.stdout


LAYERS = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
caps = (ctypes.c_uint32 * 6)()
libc.capget(ctypes.byref(Hdr(0x20080522, 0)), caps)
print(libc.prctl(39, 0, 0, 0, 0), libc.prctl(21, 0, 0, 0, 0), caps[0] | caps[3] << 32, os.getpid())
"""


@MODES
def test_kernel_layers_hold_from_the_first_line(policy):
    """no_new_privs, a seccomp filter, no capability (but CAP_DAC_READ_SEARCH with the private uid) and,
    with a PID namespace, pid 1: what the program sees of its own confinement."""
    r = _run(LAYERS, policy)
    no_new_privs, seccomp_mode, caps, pid = map(int, r.stdout.split())
    assert no_new_privs == 1 and seccomp_mode == 2  # PR_GET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER
    assert caps == (1 << 2 if "uid" in r.isolation else 0), hex(caps)
    assert (pid == 1) == r.isolation["pid_namespace"] == policy.pid_namespace
    assert isinstance(r.isolation["landlock"], int) and r.isolation["landlock"] >= 1


# ------------------------------------------------------------------------------------ unix sockets

UNIX = r"""
import ctypes, socket, sys
path, abstract = sys.stdin.read().split()
libc = ctypes.CDLL(None, use_errno=True)
class Addr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("path", ctypes.c_char * 108)]
for name in (path, "\0" + abstract):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(name)
        s.sendall(b"escaped")
        print("ESCAPED socket module", repr(name))
    except OSError as e:
        print("blocked socket module", type(e).__name__)
    fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM, straight to the kernel
    if fd < 0:
        print("blocked raw socket", ctypes.get_errno())
        continue
    raw, addr = name.encode(), Addr(1)
    ctypes.memmove(ctypes.addressof(addr) + 2, raw, len(raw))  # keeps the abstract name's leading NUL
    if libc.connect(fd, ctypes.byref(addr), 2 + len(raw)) == 0:
        print("ESCAPED raw connect", repr(name))
    else:
        print("blocked raw connect", ctypes.get_errno())
"""


@MODES
def test_unix_sockets_on_disk_and_abstract_cannot_be_reached(policy, tmp_path):
    path, abstract = str(tmp_path / "grader.sock"), f"skyt1-test-{uuid.uuid4().hex}"
    listeners = []
    for name in (path, "\0" + abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(name)
        s.listen(8)
        s.setblocking(False)
        listeners.append(s)
    try:
        assert _unconfined(UNIX, f"{path} {abstract}").count(b"ESCAPED") == 4  # control
        for s in listeners:
            while True:
                try:
                    s.accept()[0].close()
                except BlockingIOError:
                    break
        r = _run(UNIX, policy, f"{path} {abstract}")
        assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == 4, r.stdout
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()  # nothing ever reached the listener
    finally:
        for s in listeners:
            s.close()


def test_landlock_alone_scopes_abstract_sockets(tmp_path):
    """With the seccomp filter off (unsafe mode), Landlock's scope still refuses the abstract socket."""
    if not isinstance(isolation_report().get("landlock"), int) or isolation_report()["landlock"] < 6:
        pytest.skip(f"Landlock ABI < 6 has no abstract-socket scope: {isolation_report().get('landlock')}")
    abstract = f"skyt1-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("\0" + abstract)
        s.listen(8)
        r = run_sandboxed(UNIX, stdin=f"{tmp_path / 'none.sock'} {abstract}".encode(), limits=LIMITS,
                          policy=SandboxPolicy(seccomp=False, unsafe=True))
        assert r.isolation["missing"] == ["seccomp"]
        assert b"ESCAPED" not in r.stdout and b"blocked raw connect 1" in r.stdout, r.stdout  # EPERM


# ----------------------------------------------------------------- the audit hook is not the boundary

AUDIT_OFF = r"""
import sys
harness = sys._getframe(1).f_globals   # the harness's globals: turn its hook into a no-op
harness["busy"].append(1)
harness["cfg"]["audit_files"] = False
target = sys.stdin.read().strip()
try:
    with open(target, "w") as f:
        f.write("escaped")
    print("ESCAPED")
except OSError as e:
    print("blocked", type(e).__name__)
"""


@MODES
def test_turning_off_the_audit_hook_does_not_open_the_filesystem(policy, tmp_path):
    target = tmp_path / "outside.txt"
    # Control: without Landlock the same trick does write outside the folder.
    r = run_sandboxed(AUDIT_OFF, stdin=str(target).encode(), limits=LIMITS,
                      policy=SandboxPolicy(landlock=False, private_uid=False, unsafe=True))
    assert b"ESCAPED" in r.stdout and target.exists(), r
    target.unlink()
    r = _run(AUDIT_OFF, policy, str(target))
    assert b"blocked PermissionError" in r.stdout, r.stdout
    assert not target.exists()


# ------------------------------------------------------------------ signals, ptrace, rlimits, forks

KILL = r"""
import os, signal, sys
pid = int(sys.stdin.read())
for target in (pid, os.getppid()):
    if target <= 1:
        print("blocked: no parent visible", target)
        continue
    try:
        os.kill(target, signal.SIGKILL)
        print("ESCAPED kill", target)
    except OSError as e:
        print("blocked kill", type(e).__name__)
"""


@MODES
def test_killing_processes_outside(policy, sleeper):
    r = _run(KILL, policy, str(sleeper.pid))
    assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == 2, r.stdout
    time.sleep(0.1)
    assert sleeper.poll() is None  # still alive


PTRACE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.stdin.read())
for request in (16, 0x4206):  # PTRACE_ATTACH, PTRACE_SEIZE
    if libc.ptrace(ctypes.c_long(request), ctypes.c_long(pid), None, None) == 0:
        print("ESCAPED ptrace", request)
    else:
        print("blocked ptrace", ctypes.get_errno())
class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local, remote = Iov(ctypes.cast(buf, ctypes.c_void_p), 8), Iov(0x400000, 8)
n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
print("ESCAPED process_vm_readv" if n >= 0 else "blocked process_vm_readv %d" % ctypes.get_errno())
"""


@MODES
def test_ptrace_attach(policy, sleeper):
    r = _run(PTRACE, policy, str(sleeper.pid))
    assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == 3, r.stdout
    state = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state != "t" and sleeper.poll() is None  # not traced, not stopped


RLIMIT = r"""
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
for res in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE):
    before = resource.getrlimit(res)
    try:
        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (OSError, ValueError) as e:
        pass
    new = (ctypes.c_uint64 * 2)(2 ** 64 - 1, 2 ** 64 - 1)
    libc.prlimit64(0, res, ctypes.byref(new), None)  # raw, past Python
    after = resource.getrlimit(res)
    print("ESCAPED" if after != before else "blocked", res, before, after)
"""


@MODES
def test_rlimits_cannot_be_raised(policy):
    r = _run(RLIMIT, policy)
    assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == 4, r.stdout


FORK_LOOP = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
n = 0
for _ in range(200):
    pid = libc.fork()      # straight to libc: no audit event
    if pid == 0:
        libc.pause()
        libc._exit(0)
    if pid < 0:
        break
    n += 1
print(n, os.getcwd(), flush=True)
"""

DAEMON = r"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
print(os.getcwd(), flush=True)
try:
    pid = os.fork()
except OSError as e:
    print("blocked fork", type(e).__name__)
    pid = -1
if pid == 0:
    os.setsid()
    if libc.fork() == 0:
        libc.setsid()
        for _ in range(300):
            time.sleep(0.1)
        os._exit(0)
    os._exit(0)
time.sleep(0.2)
"""


@MODES
def test_fork_loop_past_the_cap_and_daemons_leave_nothing(policy):
    r = _run(FORK_LOOP, policy)
    forks, folder = r.stdout.split()
    assert 0 <= int(forks) < LIMITS.max_processes, r.stdout
    if policy.private_uid and r.isolation.get("processes") == "private-uid+nproc":
        assert int(forks) > 0  # the cap, not a refusal, stopped it
    assert _alive_with(folder.decode()) == []
    r = _run(DAEMON, policy)
    folder = r.stdout.split()[0].decode()
    assert folder.startswith(("/tmp", os.environ.get("TMPDIR", "/tmp"))), r
    assert _alive_with(folder) == []  # the double-forked, setsid daemon died with the run


# ---------------------------------------------------------------------------------------- network

NETNS = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
port, pid = map(int, sys.stdin.read().split())
for path in ("/proc/1/ns/net", "/proc/%d/ns/net" % pid):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        print("blocked open", path, type(e).__name__)
        fd = -1
    print("ESCAPED setns" if libc.setns(fd, 0x40000000) == 0 else "blocked setns %d" % ctypes.get_errno())
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(b"escaped")
    print("ESCAPED connect")
except OSError as e:
    print("blocked connect", type(e).__name__)
"""


@MODES
def test_host_network_cannot_be_reentered(policy):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        stdin = f"{listener.getsockname()[1]} {os.getpid()}"
        assert b"ESCAPED connect" in _unconfined(NETNS, stdin)  # control
        listener.accept()[0].close()
        r = _run(NETNS, policy, stdin)
        assert b"ESCAPED" not in r.stdout and r.stdout.count(b"blocked") == 5, r.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()


# --------------------------------------------------------------------------- refusing, not pretending

def test_a_missing_required_layer_refuses_to_run():
    for off in ("landlock", "seccomp"):
        policy = SandboxPolicy(**{off: False})
        r = run_sandboxed("print('ran')", limits=LIMITS, policy=policy)
        assert r.status == "setup" and r.stdout == b"", r
        assert off.encode() in r.stderr and b"--unsafe-sandbox" in r.stderr
        with pytest.raises(SandboxUnavailable, match=off):
            check_sandbox(policy)
    r = run_sandboxed("print('ran')", limits=LIMITS, policy=SandboxPolicy(landlock=False, unsafe=True))
    assert r.status == "ok" and r.stdout == b"ran\n" and r.isolation["missing"] == ["landlock"]


# ------------------------------------------------------------------- killing verify leaves nothing

HANG = r"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat[0] != "Z":
                children.setdefault(int(stat[1]), []).append(int(name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 2), (signal.SIGKILL, 2), (signal.SIGINT, 1)],
                         ids=["sigterm-pool", "sigkill-pool", "sigint-inline"])
def test_killing_verify_leaves_nothing_running(tmp_path, sig, workers):
    problems, samples = _verify_files(tmp_path, "x", HANG, n=4)
    proc = subprocess.Popen([sys.executable, "-m", "skyt1.recipe", "verify", "--input", str(samples),
                             "--problems", str(problems), "--output", str(tmp_path / "out.jsonl"),
                             "--workers", str(workers), "--code-timeout", "60"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Wait until every worker runs a program that has left a setsid daemon: launcher, program and
        # daemon are 3 live processes per running check.
        deadline, seen = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            seen |= _descendants(proc.pid)
            running = [p for p in seen if _alive(p) and b"skyt1-sbx-" in _cmdline(p)]
            if len(running) >= 3 * workers:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail(f"the sandboxed programs did not start: {sorted(seen)}")
        time.sleep(0.3)
        seen |= _descendants(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in seen if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
