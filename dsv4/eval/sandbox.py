"""Run untrusted Python (a HumanEval candidate + its test) in a separate, limited process.

The candidate never runs in the caller's process. `run_program` writes it into a fresh temporary directory and starts
`python -I -S` there (isolated mode: no user site, no PYTHON* variables, no `site` imports; the standard library still
imports) with stdin closed and a minimal environment. A small bootstrap in the child, before it compiles the candidate:
  - sets resource limits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), size of any written file (RLIMIT_FSIZE),
    number of processes (RLIMIT_NPROC, counted per user by the kernel, so the allowance is added to the user's current
    count), no core files;
  - points fd 1 and 2 at /dev/null, so output spam costs nothing, and keeps a private copy of the original stdout pipe
    on which it reports one JSON line: passed, or failed with the exception;
  - replaces `socket.socket` (and `_socket.socket`, `socketpair`, `create_server`) with versions that raise, so
    `socket.create_connection` and everything built on sockets fails.
The parent waits with a wall-clock timeout and kills the child's whole process group (the child is a session leader)
on timeout and after every run, so forked helpers do not outlive their candidate.

Limits are set in the child's bootstrap rather than in `preexec_fn`: `preexec_fn` is unsafe when the parent has
threads, and `humaneval.evaluate` runs sandboxes from a thread pool.

When run by root (as in containers), the bootstrap then drops to `nobody` (uid 65534) before the candidate runs,
because the kernel does not apply RLIMIT_NPROC to root and root may write anywhere; the temporary directory is
chowned to `nobody` so the candidate can still write there. This needs an interpreter `nobody` can read
(`Limits.python`, e.g. /usr/bin/python3); one under root's home (pyenv) is not, and then the candidate stays root.

Isolation is best effort, good against buggy model output, not against an adversary that targets this harness:
  - network: where `unshare` can make one (`unshare -n` as root, `unshare -rn` where unprivileged user namespaces
    are enabled) the child runs in an empty network namespace (loopback down). An unprivileged user on many
    systems cannot create one; then only the socket patch applies, which `ctypes` or `os.exec*` of another program
    can get around.
  - files: relative paths land in the temporary directory, deleted afterwards. Absolute paths are not blocked (no
    mount namespace / chroot); when dropped to `nobody`, file permissions keep the candidate out of root's files.
  - process count: RLIMIT_NPROC only binds a non-root user; as root without the drop, only the wall-clock kill of
    the process group bounds a fork bomb.
  - the candidate runs in the same process as the bootstrap, so it could in principle forge the result line.
Status: "passed", "failed" (the program raised: wrong answer, syntax error, MemoryError, ...), "timeout" (wall clock
or CPU limit) or "error" (the child died without reporting, e.g. killed by a signal or `os._exit`).
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child as `python -I -S -c BOOTSTRAP LIMITS_JSON`, cwd = a fresh temporary directory holding candidate.py.
BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1]); del sys.argv[1:]
report = os.fdopen(os.dup(1), "w")

def tasks_of_user(uid):  # RLIMIT_NPROC counts every thread of the real user id
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    n += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
    return n

def limit(name, soft, hard=None):
    hard = soft if hard is None else hard
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError):
        pass

uid = cfg["run_as"]
limit("RLIMIT_AS", cfg["memory_bytes"])
limit("RLIMIT_CPU", cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
limit("RLIMIT_FSIZE", cfg["file_bytes"])
limit("RLIMIT_NPROC", tasks_of_user(os.getuid() if uid is None else uid) + (uid is not None) + cfg["max_processes"])
limit("RLIMIT_CORE", 0)
if uid is not None:  # root does not obey RLIMIT_NPROC and may write anywhere: become an unprivileged user
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)

import socket, _socket
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = _socket.socket = _NoSocket
socket.socketpair = _socket.socketpair = socket.create_server = _no_network

try:
    with open("candidate.py") as f:
        source = f.read()
    exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__"})
except BaseException as e:
    result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
else:
    result = {"status": "passed", "reason": ""}
report.write(json.dumps(result) + "\n")
report.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0              # wall-clock seconds
    cpu_seconds: int = 5              # CPU time; SIGXCPU at this, SIGKILL one second later
    memory_bytes: int = 1 << 30       # address space of the child
    file_bytes: int = 10 << 20        # largest file the child may write
    max_processes: int = 16           # processes/threads the child may add
    network_namespace: bool = True    # run in an empty network namespace when `unshare` can make one here
    drop_root: bool = True            # when run by root: run the candidate as `nobody` (uid 65534) if it can
    python: str = sys.executable      # any Python >= 3.8 will do: candidates use only the standard library


@dataclass(frozen=True)
class Result:
    status: str                       # "passed" | "failed" | "timeout" | "error"
    reason: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


NOBODY = 65534


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that starts a process in a new, empty network namespace here, or () if none works:
    `unshare -n` as root, `unshare -rn` (a user namespace too) where unprivileged user namespaces are enabled."""
    prefix = ("unshare", "-n", "--") if os.geteuid() == 0 else ("unshare", "-rn", "--")
    if shutil.which("unshare") is None:
        return ()
    try:
        ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else ()


@functools.cache
def can_run_as_nobody(python: str) -> bool:
    """True if we are root and `nobody` can run `python` and import the standard library (not so for an
    interpreter under root's home directory, e.g. pyenv's)."""
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run([python, "-I", "-S", "-c", "import json, hashlib, collections, socket, resource"],
                              user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(pipe, limit: int = 1 << 16) -> bytes:
    """What the child left in a pipe, without blocking on writers that escaped the process group."""
    os.set_blocking(pipe.fileno(), False)
    try:
        return os.read(pipe.fileno(), limit) or b""
    except BlockingIOError:
        return b""
    finally:
        pipe.close()


def _describe_exit(returncode: int, stderr: bytes) -> Result:
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return Result("timeout", "CPU time limit")
        return Result("error", f"killed by {sig.name}")
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return Result("error", f"exited with code {returncode} without a result {tail[0][:200]}".rstrip())


def run_program(program: str, limits: Limits = Limits()) -> Result:
    """Run `program` (Python source) in a sandboxed child process; passed iff it runs to the end without raising."""
    run_as = NOBODY if limits.drop_root and can_run_as_nobody(limits.python) else None
    cfg = {"memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds, "file_bytes": limits.file_bytes,
           "max_processes": limits.max_processes, "run_as": run_as}
    argv = [limits.python, "-I", "-S", "-c", BOOTSTRAP, json.dumps(cfg)]
    if limits.network_namespace:
        argv = [*network_namespace_prefix(), *argv]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsv4-sandbox-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "candidate.py"), "w") as f:
            f.write(program)
        if run_as is not None:
            os.chown(tmp, run_as, run_as)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "http_proxy": "http://0.0.0.0:9", "https_proxy": "http://0.0.0.0:9", "no_proxy": ""}
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            # wait for the process, not for EOF: forked helpers may hold the pipes open
            proc.wait(timeout=limits.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # the candidate and whatever it forked into its group
            proc.wait()
        out, err = _read_available(proc.stdout), _read_available(proc.stderr)
        seconds = time.perf_counter() - t0
    if timed_out:
        return Result("timeout", f"wall clock > {limits.timeout:g}s", seconds)
    for line in out.decode(errors="replace").splitlines()[::-1]:
        try:
            msg = json.loads(line)
            return Result(msg["status"], msg["reason"], seconds)
        except (ValueError, KeyError, TypeError):
            continue
    r = _describe_exit(proc.returncode, err)
    return Result(r.status, r.reason, seconds)
