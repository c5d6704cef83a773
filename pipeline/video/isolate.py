"""Run a function in a child process that can be killed: the only cure for a decoder that hangs.

decord's `get_batch` can hang on some corrupt files (dmlc/decord #269) and its memory grows on long
high-resolution videos; neither can be stopped from inside Python. `IsolatedCall` keeps one persistent
child (spawned once, reused for every call, so the cost is paid once per stage instance) and guarantees:

- **the limit is the call's own**: the child reports "ready" after its imports and `init` have run, and
  only then does a call's clock start, so spawn and import time on a loaded machine never count against
  a video;
- **limits**: wall-clock time per call (the child is killed and replaced), CPU time per call
  (RLIMIT_CPU, re-armed before each call; the kernel kills a child that spins past it even if the parent
  is stuck), address space (RLIMIT_AS);
- **no orphans**: on Linux the child asks the kernel for SIGKILL when its parent dies
  (prctl PR_SET_PDEATHSIG), and a watchdog thread exits the child when its parent pid changes (the
  fallback where prctl is missing; it cannot help a child stuck holding the GIL, prctl can);
- **no credentials**: the child removes from its environment every variable that may hold one
  (`scrub_environment`: names starting with AWS_, GOOGLE_, GCS_, AZURE_, HF_, or containing TOKEN, SECRET,
  PASSWORD, PASSWD, CREDENTIAL, KEY, AUTH; fetching happens in the parent, the child reads local files
  only), before its imports and `init`, and on Linux wipes their bytes from its initial environment block
  too, so /proc/<child>/environ no longer shows them. (A spawned child cannot be given its own
  environment by multiprocessing; it inherits the parent's and scrubs it first thing);
- **first to go**: on Linux the child sets its oom_score_adj to 1000, so the OOM killer takes a decoder
  before the worker that runs it;
- **honest reasons**: an `InputFailure` (bad input, e.g. `DecodeFailure`) comes back with its own
  reason; any other exception is a bug in our code and comes back as the retryable `internal_error`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback

from clipforge.pipeline.errors import InputFailure

PR_SET_PDEATHSIG = 1          # from <linux/prctl.h>
WATCHDOG_PERIOD_S = 1.0
# Environment variables the child must not keep: names starting with one of these, or containing one of
# the words (both case-insensitive).
SECRET_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HF_")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "KEY", "AUTH")




def die_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid` ends, by prctl where the kernel has it, and by a watchdog."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass   # the watchdog below still applies
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:   # reparented: the parent is gone
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(SECRET_PREFIXES) or any(word in upper for word in SECRET_WORDS)


def scrub_environment() -> list[str]:
    """Remove every credential-like variable from this process's environment (os.environ and the C
    environment, so libraries and subprocesses do not see them either); on Linux also overwrite them in
    the initial environment block the kernel shows as /proc/self/environ. Returns the removed names."""
    removed = [name for name in list(os.environ) if is_secret_name(name)]
    for name in removed:
        del os.environ[name]   # unsetenv too
    if removed and sys.platform.startswith("linux"):
        try:
            _wipe_initial_environ(set(removed))
        except Exception:   # noqa: BLE001 — best effort: os.environ and the C environment are clean already
            pass
    return removed


def _wipe_initial_environ(names: set) -> None:
    """Zero the `NAME=value` strings of `names` in the environment block that execve left on the stack
    (unsetenv only drops the pointers to them). Touches memory only after checking that the kernel's
    env_start..env_end lies in a writable mapping and holds exactly what /proc/self/environ shows."""
    import ctypes

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[50 - 3]), int(fields[51 - 3])   # fields 50 and 51 of proc(5); [0] is field 3
    if not 0 < start < end:
        return
    writable = False
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= start and end <= high and perms.startswith("rw"):
                writable = True
                break
    if not writable:
        return
    with open("/proc/self/environ", "rb") as f:
        shown = f.read()
    block = ctypes.string_at(start, end - start)
    if block != shown:
        return
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.split(b"=", 1)[0].decode("utf-8", "replace")
        if entry and name in names and name not in os.environ:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


def oom_kill_first() -> None:
    """Ask the Linux OOM killer to take this process first (best effort)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _arm_cpu_limit(seconds: float | None) -> None:
    """RLIMIT_CPU counts the process's whole life, so each call gets `seconds` on top of what is used."""
    if not seconds:
        return
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    soft = int(used + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _child_main(conn, fn, memory_limit_mb, cpu_limit_s, parent_pid, init):
    import resource

    scrub_environment()   # first: before the decoders are imported and before any input is read
    oom_kill_first()
    die_with_parent(parent_pid)
    # a child killed by SIGXCPU would otherwise leave a core file in the working directory
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_limit_mb:
        limit = int(memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if init is not None:
        init()   # imports and warm-up: paid here, before "ready", never inside a call's time limit
    conn.send(("ready", os.getpid()))
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        _arm_cpu_limit(cpu_limit_s)
        try:
            conn.send(("ok", fn(*args)))
        except MemoryError:
            conn.send(("failure", "worker_crash", "memory limit exceeded while decoding"))
        except InputFailure as err:
            conn.send(("failure", err.reason, str(err) or type(err).__name__))
        except Exception as err:   # noqa: BLE001 — a bug in our code: retryable, with where it happened
            where = traceback.format_exc(limit=-1).strip().splitlines()
            location = where[-2].strip() if len(where) >= 2 else ""
            conn.send(("failure", "internal_error", f"{type(err).__name__}: {err} ({location})"))


class IsolatedCall:
    """`call(*args)` → ("ok", result) or ("failure", reason, message); never raises for the callee's sake.

    timeout_s: wall-clock seconds per call, counted from when the call is handed to a ready child.
    cpu_limit_s: CPU seconds per call (all the child's threads together); None for no limit.
    start_timeout_s: how long a child may take to spawn, import and run `init` before it counts as crashed.
    init: a picklable callable run once in each child before it reports ready (e.g. import decoders).
    """

    def __init__(self, fn, timeout_s: float, memory_limit_mb: int | None = None, cpu_limit_s: float | None = None,
                 start_timeout_s: float = 300.0, init=None):
        self.fn, self.timeout_s, self.memory_limit_mb = fn, timeout_s, memory_limit_mb
        self.cpu_limit_s, self.start_timeout_s, self.init = cpu_limit_s, start_timeout_s, init
        # spawn, not fork: the parent may be a Ray worker with threads, and fork copies their locks.
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None

    @property
    def pid(self) -> int | None:
        """The current child's pid (None before the first call or after `close`)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> tuple | None:
        """Spawn the child and wait until it is ready; returns a failure tuple when it cannot start."""
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, daemon=True,
                                       args=(child, self.fn, self.memory_limit_mb, self.cpu_limit_s, os.getpid(),
                                             self.init))
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            if parent.poll(self.start_timeout_s):
                message = parent.recv()
                if message[0] == "ready":
                    return None
        except (EOFError, OSError):
            pass
        code = self._proc.exitcode
        self.close()
        return ("failure", "worker_crash", f"decode worker did not start (exit code {code})")

    def __call__(self, *args):
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self.close()
            failed = self.start()
            if failed is not None:
                return failed
        try:
            self._conn.send(args)
            # the clock starts here: the child is ready, so only the call itself is timed
            if not self._conn.poll(self.timeout_s):
                self.close()
                return ("failure", "timeout", f"no result after {self.timeout_s:g} s; worker killed")
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self._proc.join(timeout=5)
            code = self._proc.exitcode
            self.close()
            if code == -signal.SIGXCPU:
                return ("failure", "timeout", f"CPU-time limit of {self.cpu_limit_s:g} s exceeded; worker killed")
            return ("failure", "worker_crash", f"decode worker died (exit code {code})")

    def close(self):
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 — interpreter shutdown
            pass
