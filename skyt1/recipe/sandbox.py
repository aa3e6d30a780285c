"""Run untrusted Python (a model's solution) in a sandbox: one fresh process per run, killed with all its
children at the end.

What holds the program, strongest layer first (each layer is tried, and the weaker one stands in when the
stronger is not permitted; `RunResult.isolation` says which held for a run):

- network: a new, empty network namespace (unshare(CLONE_NEWNET); non-root: CLONE_NEWUSER+CLONE_NEWNET),
  where no interface is up, not even loopback; plus an audit hook refusing socket connect/bind/sendto/
  sendmsg and name lookups. Fallback: the audit hook alone.
- processes: as root, a private random uid (setuid after start, keeping only CAP_DAC_READ_SEARCH so the
  interpreter's files stay readable) with RLIMIT_NPROC (threads count too); at the end every live process
  of that uid is killed, even one that left the process group. Fallbacks: non-root, RLIMIT_NPROC = the
  user's current task count + the limit (a budget shared with the user's other processes); root that
  cannot switch uid (RLIMIT_NPROC does not bind root), an audit hook refusing fork/exec/spawn.
- files: the private uid owns only the run's folder, so the kernel refuses writes to anything of root's;
  an audit hook refuses writes, renames and deletes outside the folder (this also guards world-writable
  places such as /tmp); RLIMIT_FSIZE caps a file. Fallback: the audit hook and RLIMIT_FSIZE.
- time: the wall clock (timeout + start-up grace) enforced by the parent; RLIMIT_CPU in the child.
- memory: RLIMIT_AS.
- output: the parent reads at most max_output_bytes of stdout (max_stderr_bytes of stderr), then kills.
- leftovers: own session and process group (start_new_session), killed with SIGKILL; folder deleted.

The folder is cwd, HOME and TMPDIR of the program. The child runs `python -I` (no user site, no PYTHON*
variables, the folder not on sys.path) with a small harness that sets up the layers in its own process
before the program's first line, so the parent needs no preexec_fn and is safe to call from threads.
Once per process a probe program checks that the standard library still imports under the kernel
layers; a layer that breaks it (a uid switch where the interpreter sits under root-only /root and
CAP_DAC_READ_SEARCH is not in the bounding set; a user namespace that hides the capability that made it
readable) is dropped and its fallback applies.
Measured on the development machine (root, Linux 6.18): every kernel layer holds; as uid 1000 the user
namespace broke imports (the interpreter was readable only through an ambient capability), so the probe
fell back to the audit hook for the network and RLIMIT_NPROC held processes. A root CI container with
Docker's default capabilities lacks CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH, so it should get the audit-hook
network guard, and the private uid wherever Python is world-readable (e.g. /usr/local); not measured.
Audit hooks stop Python-level calls only; code that makes raw syscalls through ctypes is held by the
kernel layers alone. The threat model is a careless or confused model, not a targeted exploit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = ["SandboxLimits", "SandboxPolicy", "RunResult", "run_sandboxed", "isolation_report"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 6.0          # CPU-time limit of the program and, plus startup_grace_s, its wall clock
    memory_mb: int = 1024           # address space (RLIMIT_AS)
    max_output_bytes: int = 32 << 20
    max_stderr_bytes: int = 1 << 20
    max_file_mb: int = 64           # largest file it may write (RLIMIT_FSIZE)
    max_processes: int = 32         # processes + threads (RLIMIT_NPROC)
    startup_grace_s: float = 1.0    # interpreter start and sandbox set-up, on top of timeout_s

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_output_bytes", "max_stderr_bytes", "max_file_mb",
                     "max_processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.startup_grace_s < 0:
            raise ValueError(f"SandboxLimits.startup_grace_s must be >= 0, got {self.startup_grace_s!r}")


@dataclass(frozen=True)
class SandboxPolicy:
    """Which layers to try. All on by default; tests turn one off to prove another holds alone."""

    network_namespace: bool = True
    private_uid: bool = True
    audit_network: bool = True      # refuse sockets from Python even inside an empty network namespace
    audit_files: bool = True


@dataclass(frozen=True)
class RunResult:
    """status: ok (exit 0) | error (other exit) | timeout (wall clock) | cpu (RLIMIT_CPU) | memory
    (MemoryError or killed at the address-space limit) | output (output limit) | setup (the sandbox
    itself could not start)."""

    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    isolation: dict = field(default_factory=dict)


_MARKER = b"\x00SKYT1-SANDBOX "

# The harness runs as `python -I -c HARNESS CONFIG_JSON` in the run's folder. It sets up every layer in
# its own process before the program's first line, then runs the program from solution.py.
HARNESS = r'''
import ctypes, io, json, os, resource, sys
cfg = json.loads(sys.argv[1])
d = cfg["dir"]
rep = {}
libc = ctypes.CDLL(None, use_errno=True)
root = os.geteuid() == 0
tasks = 0
if not root:
    # RLIMIT_NPROC counts every task of the real uid, ours included: count them now, before a user
    # namespace would show every process as the overflow uid.
    me = os.getuid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/" + pid + "/status") as f:
                st = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in st.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == me:
            tasks += int(fields.get("Threads", "1"))
net = "none"
if cfg["netns"]:
    if libc.unshare(0x40000000) == 0:
        net = "netns"
    elif not root and libc.unshare(0x10000000 | 0x40000000) == 0:
        net = "userns+netns"
rep["network"] = net
uid = cfg.get("uid")
dropped = False
if uid is not None and root:
    try:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        dropped = True
        # Keep CAP_DAC_READ_SEARCH alone: the interpreter may live under a folder only root can read
        # (/root/.pyenv), and the program must import from it; writing stays refused.
        class _Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class _Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        caps = (_Data * 2)()
        caps[0].effective = caps[0].permitted = 1 << 2
        rep["read_anywhere"] = libc.capset(ctypes.byref(_Hdr(0x20080522, 0)), caps) == 0
        libc.prctl(8, 0, 0, 0, 0)
    except OSError as e:
        rep["uid_error"] = str(e)

def _lim(res, soft, hard=None):
    hard = soft if hard is None else hard
    cur_soft, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    try:
        resource.setrlimit(res, (soft, hard))
        return True
    except (ValueError, OSError):
        rep.setdefault("rlimit_failed", []).append(res)
        return False

_lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
_lim(resource.RLIMIT_AS, cfg["as_bytes"])
_lim(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
_lim(resource.RLIMIT_CORE, 0)
block_proc = False
if dropped:
    _lim(resource.RLIMIT_NPROC, cfg["nproc"])
    rep["processes"] = "private-uid+nproc"
elif not root:
    _lim(resource.RLIMIT_NPROC, tasks + cfg["nproc"])
    rep["processes"] = "shared-uid+nproc"
else:
    block_proc = True
    rep["processes"] = "audit-hook"
block_net = cfg["audit_net"] or net == "none"
rep["audit"] = {"network": block_net, "files": cfg["audit_files"], "processes": block_proc}

real = os.path.realpath(d)
allowed = (real + os.sep, )
devices = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
busy = []

def _outside(path):
    if isinstance(path, int) or path is None:
        return False
    try:
        p = os.path.realpath(os.path.join(real, os.fsdecode(path)))
    except Exception:
        return True
    return not (p == real or p.startswith(allowed) or p in devices)

PROC_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.spawn", "os.exec",
               "subprocess.Popen", "pty.spawn", "os.startfile"}
NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
              "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex"}
PATH_EVENTS = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,), "os.chmod": (0,),
               "os.chown": (0,), "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
               "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}

def _hook(event, args):
    if busy:
        return
    if block_proc and event in PROC_EVENTS:
        raise PermissionError("sandbox: creating processes is not allowed")
    if block_net and event in NET_EVENTS:
        raise PermissionError("sandbox: network access is not allowed")
    if not cfg["audit_files"]:
        return
    busy.append(1)
    try:
        if event == "open":
            if len(args) > 2 and isinstance(args[2], int) and args[2] & WRITE and _outside(args[0]):
                raise PermissionError("sandbox: writing outside the sandbox folder is not allowed: %r" % (args[0],))
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and _outside(args[i]):
                    raise PermissionError("sandbox: changing files outside the sandbox folder is not allowed")
    finally:
        busy.pop()

mode = cfg["mode"]
with open(os.path.join(d, "solution.py"), encoding="utf-8") as f:
    src = f.read()
if mode == "call":
    with open(os.path.join(d, "call.json"), encoding="utf-8") as f:
        call = json.load(f)
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
sys.stderr.buffer.write(b"\x00SKYT1-SANDBOX " + json.dumps(rep).encode() + b"\n")
sys.stderr.flush()
sys.addaudithook(_hook)
sys.argv = ["solution.py"]
if mode == "stdio":
    g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": os.path.join(d, "solution.py")}
    exec(compile(src, "solution.py", "exec"), g)
else:
    g = {"__name__": "solution", "__builtins__": __builtins__, "__file__": os.path.join(d, "solution.py")}
    def _default(o):
        if isinstance(o, (set, frozenset)):
            try:
                return sorted(o)
            except TypeError:
                return list(o)
        return {"__unserializable__": repr(o)[:200]}
    try:
        exec(compile(src, "solution.py", "exec"), g)
        name = call["fn_name"]
        cls = g.get("Solution")
        if isinstance(cls, type) and hasattr(cls, name):
            fn = getattr(cls(), name)
        elif callable(g.get(name)):
            fn = g[name]
        else:
            raise NameError("no function or Solution method named %r" % name)
        out = {"ok": True, "result": fn(*call["args"])}
    except BaseException as e:
        out = {"ok": False, "error": (type(e).__name__ + ": " + str(e))[:500]}
    try:
        data = json.dumps(out, default=_default)
    except (ValueError, TypeError, RecursionError) as e:
        data = json.dumps({"ok": False, "error": "result not serialisable: " + str(e)[:200]})
    os.write(result_fd, data.encode() + b"\n")
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os._exit(0)
'''


def _uid_range() -> tuple[int, int] | None:
    """A block of uids the current user namespace maps, away from real accounts; None if none is free."""
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return None
    for inside, _outside, count in ranges:
        lo, hi = max(inside, 100_000), min(inside + count, 100_000 + (1 << 20))
        if hi - lo >= 1000:
            return lo, hi
    return None


_UID_RANGE = _uid_range()
_RNG = random.SystemRandom()


def _tasks_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is uid."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read(1024)
        except OSError:
            continue
        state = uid_line = ""
        for line in status.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uid_line = line
                break
        if uid_line and state != "Z" and int(uid_line.split()[1]) == uid:
            pids.append(int(name))
    return pids


def _kill_everything(pgid: int, uid: int | None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    # A process that called setsid() left the group; the private uid still names all of them. Repeat
    # because a fork may land between the scan and the kill.
    for _ in range(50):
        pids = _tasks_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _drain(fd: int, buf: bytearray, cap: int) -> tuple[int, bool]:
    """Read what is ready on a non-blocking fd: (bytes read, end of file seen). buf keeps at most cap."""
    total = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return total, False
        except OSError:
            return total, True
        if not chunk:
            return total, True
        total += len(chunk)
        if len(buf) < cap:
            buf += chunk[:cap - len(buf)]
        if total >= cap:
            return total, False


def run_sandboxed(code: str, *, stdin: bytes = b"", call: dict | None = None,
                  limits: SandboxLimits = SandboxLimits(), policy: SandboxPolicy = SandboxPolicy()) -> RunResult:
    """Run `code` once. stdio mode (call=None): `stdin` is its standard input, RunResult.stdout its output.
    Call mode (call={"fn_name": name, "args": [...]}): the program is imported (as module "solution", its
    prints discarded), then `Solution().name(*args)` (LeetCode style) or `name(*args)` is called and
    RunResult.stdout holds one JSON line {"ok": true, "result": ...} or {"ok": false, "error": "..."}."""
    use_netns, use_uid = _working_layers(policy.network_namespace, policy.private_uid)
    policy = dataclasses.replace(policy, network_namespace=use_netns)
    uid = _RNG.randrange(*_UID_RANGE) if use_uid else None
    return _run(code, stdin, call, limits, policy, uid)


_PROBE = "import bisect, datetime, decimal, fractions, heapq, socket, statistics\nprint('ok')"


@lru_cache(maxsize=8)
def _working_layers(network_namespace: bool, private_uid: bool) -> tuple[bool, bool]:
    """The strongest of the requested kernel layers under which a program can still import the standard
    library, checked once per process: the interpreter may sit under a folder only root reads
    (/root/.pyenv) while CAP_DAC_READ_SEARCH is outside the container's bounding set, or (non-root) a user
    namespace may hide the capability that made it readable. A layer that breaks imports is dropped and
    its audit-hook fallback stands in."""
    can_uid = private_uid and os.geteuid() == 0 and _UID_RANGE is not None
    tried = []
    for layers in ((network_namespace, can_uid), (network_namespace, False), (False, False)):
        if layers in tried:
            continue
        tried.append(layers)
        uid = _RNG.randrange(*_UID_RANGE) if layers[1] else None
        r = _run(_PROBE, b"", None, SandboxLimits(timeout_s=10.0), SandboxPolicy(network_namespace=layers[0]), uid)
        if r.status == "ok" and r.stdout.strip() == b"ok":
            return layers
    return False, False


def _run(code: str, stdin: bytes, call: dict | None, limits: SandboxLimits, policy: SandboxPolicy,
         uid: int | None) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="skyt1-sbx-")  # under $TMPDIR (/tmp): traversable by the private uid
    t0 = time.monotonic()
    proc = None
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if call is not None:
            with open(os.path.join(workdir, "call.json"), "w", encoding="utf-8") as f:
                json.dump({"fn_name": call["fn_name"], "args": list(call["args"])}, f)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin if call is None else b"")
        if uid is not None:
            for name in os.listdir(workdir):
                os.chown(os.path.join(workdir, name), uid, uid)
            os.chown(workdir, uid, uid)
        cfg = {
            "dir": workdir, "uid": uid, "mode": "stdio" if call is None else "call",
            "netns": policy.network_namespace, "audit_net": policy.audit_network,
            "audit_files": policy.audit_files, "cpu_s": max(1, int(-(-limits.timeout_s // 1))),
            "as_bytes": limits.memory_mb << 20, "fsize_bytes": limits.max_file_mb << 20,
            "nproc": limits.max_processes,
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "TMP": workdir,
               "TEMP": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen([sys.executable, "-I", "-c", HARNESS, json.dumps(cfg)], stdin=stdin_file,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True)
        status, out, err = _collect(proc, t0 + limits.timeout_s + limits.startup_grace_s, limits)
        _kill_everything(proc.pid, uid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        wall = time.monotonic() - t0
        isolation, err = _split_report(bytes(err))
        if uid is not None:
            isolation["uid"] = uid
        rc = proc.returncode
        if status is None:
            status = _classify(rc, err, isolation)
        return RunResult(status, rc, bytes(out), err, wall, isolation)
    except OSError as e:
        return RunResult("setup", None, b"", str(e).encode(), time.monotonic() - t0, {})
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_everything(proc.pid, uid)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, limits: SandboxLimits):
    """Read stdout/stderr until the process exits, the deadline passes or an output cap is hit.
    Returns (status or None, stdout bytes, stderr head)."""
    out, err = bytearray(), bytearray()
    totals = {proc.stdout.fileno(): 0, proc.stderr.fileno(): 0}
    caps = {proc.stdout.fileno(): limits.max_output_bytes, proc.stderr.fileno(): limits.max_stderr_bytes}
    bufs = {proc.stdout.fileno(): (out, limits.max_output_bytes + 1), proc.stderr.fileno(): (err, 64 << 10)}
    sel = selectors.DefaultSelector()
    for fd in totals:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)

    def read(fd: int) -> bool:
        n, eof = _drain(fd, *bufs[fd])
        totals[fd] += n
        return eof

    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", out, err
            events = sel.select(timeout=min(remaining, 0.05))
            for key, _ in events:
                if read(key.fd):
                    sel.unregister(key.fd)
            if any(totals[fd] > caps[fd] for fd in totals):
                return "output", out, err
            if not events and proc.poll() is not None:
                # The program exited but a child it left may hold the pipes open: take what is buffered.
                for fd in list(sel.get_map()):
                    read(fd)
                if any(totals[fd] > caps[fd] for fd in totals):
                    return "output", out, err
                break
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "timeout", out, err
        return None, out, err
    finally:
        sel.close()


def _split_report(err: bytes) -> tuple[dict, bytes]:
    if err.startswith(_MARKER):
        line, _, rest = err.partition(b"\n")
        try:
            return json.loads(line[len(_MARKER):]), rest
        except ValueError:
            return {}, rest
    return {}, err


def _classify(rc: int | None, err: bytes, isolation: dict) -> str:
    if rc == 0:
        return "ok"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (we only SIGKILL after deciding a status).
        return "cpu"
    if not isolation:
        return "setup"  # the harness died before the program's first line
    if b"MemoryError" in err or b"Cannot allocate memory" in err:
        return "memory"
    return "error"


@lru_cache(maxsize=1)
def isolation_report() -> dict:
    """Which layers hold in this environment (one trivial sandboxed run, cached)."""
    return dict(run_sandboxed("pass", limits=SandboxLimits(timeout_s=5.0)).isolation)
