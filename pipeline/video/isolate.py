"""Run a function in a child process that can be killed: the only cure for a decoder that hangs.

decord's `get_batch` can hang on some corrupt files (dmlc/decord #269) and its memory grows on long
high-resolution videos; neither can be stopped from inside Python. `IsolatedCall` keeps one persistent
child (spawned once, reused for every call, so the cost is paid once per stage instance), gives each call
a time limit and an address-space limit, and replaces the child when it is killed or dies.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback


def _child_main(conn, fn, memory_limit_mb):
    if memory_limit_mb:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args)))
        except MemoryError:
            conn.send(("failure", "worker_crash", "memory limit exceeded while decoding"))
        except Exception as err:   # noqa: BLE001 — every failure must come back as a value
            reason = getattr(err, "reason", None) or "decode_error"
            message = str(err) or type(err).__name__
            if reason == "decode_error" and not hasattr(err, "reason"):
                message = f"{type(err).__name__}: {message} ({traceback.format_exc(limit=-1).strip().splitlines()[-2].strip()})"
            conn.send(("failure", reason, message))


class IsolatedCall:
    """`call(*args)` → ("ok", result) or ("failure", reason, message); never raises for the callee's sake."""

    def __init__(self, fn, timeout_s: float, memory_limit_mb: int | None = None):
        self.fn, self.timeout_s, self.memory_limit_mb = fn, timeout_s, memory_limit_mb
        # spawn, not fork: the parent may be a Ray worker with threads, and fork copies their locks.
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None

    def _start(self):
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child, self.fn, self.memory_limit_mb), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def __call__(self, *args):
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send(args)
            if not self._conn.poll(self.timeout_s):
                self.close()
                return ("failure", "timeout", f"no result after {self.timeout_s:g} s; worker killed")
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self.close()
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
