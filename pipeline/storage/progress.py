"""`progress.json`: what a running job is doing, rewritten every few seconds.

It holds counters only, so its memory does not grow with the corpus. The rate and ETA are taken over the
last `WINDOW_S` seconds (a rate since the start hides a job that has slowed down or stopped); the tasks in
flight and the oldest running one with its age make a hang visible; retries are counted by cause; the
build adds its GPU workers' states.
"""
from __future__ import annotations

import time
from collections import Counter, deque

from clipforge.pipeline.storage.dataset import write_json
from clipforge.pipeline.storage.fs import Location

PROGRESS_EVERY_S = 5.0
WINDOW_S = 300.0


class ProgressTracker:
    def __init__(self, dest: Location | None, inputs_todo: int, tasks_todo: int, show: bool, unit: str = "video"):
        from tqdm import tqdm

        self.dest, self.inputs_todo, self.tasks_todo = dest, inputs_todo, tasks_todo
        self.bar = tqdm(total=inputs_todo, desc="inputs", unit=unit, disable=not show, smoothing=0.05)
        self.t0 = time.monotonic()
        self.last_write = 0.0
        self.window: deque = deque([(self.t0, 0)])   # (time, inputs done), over the last WINDOW_S
        self.tasks = self.inputs = self.samples = self.videos_decoded = 0
        self.failures: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.stage_counts: dict[str, Counter] = {}
        self.shard_workers: Counter = Counter()
        self.nodes: Counter = Counter()
        self.tokenize_workers: Counter = Counter()
        self.retries_by_cause: Counter = Counter()
        self.duplicates_dropped = 0
        self.running: dict[str, float] = {}
        self.error_messages: list[str] = []
        self.actors: dict = {}
        self.payload: dict = {}
        self.write(force=True)

    # -- the executor's events ---------------------------------------------------------------------
    def task_started(self, name: str) -> None:
        self.running.setdefault(name, time.monotonic())

    def task_finished(self, name: str) -> None:
        self.running.pop(name, None)

    def task_failed(self, name: str, cause: str, err: BaseException) -> None:
        self.running.pop(name, None)
        self.retries_by_cause[cause] += 1
        if len(self.error_messages) < 5:
            self.error_messages.append(" ".join(f"{name}: {type(err).__name__}: {err}".split())[:300])

    # -- results ---------------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        self.tasks += 1
        self.inputs += record.get("inputs", 0)
        self.samples += record.get("samples", 0)
        self.videos_decoded += record.get("videos_decoded", 0)
        self.failures.update(record.get("errors_by_reason", {}))
        run = record.get("run", {})
        self.stage_seconds.update(run.get("seconds", {}))
        for stage, counts in run.get("stage_counts", {}).items():
            self.stage_counts.setdefault(stage, Counter()).update(counts)
        if run.get("worker"):
            self.shard_workers[run["worker"]] += 1
        if run.get("node"):
            self.nodes[run["node"]] += 1
        self.tokenize_workers.update(run.get("tokenize_workers", {}))
        self.bar.update(record.get("inputs", 0))
        now = time.monotonic()
        self.window.append((now, self.inputs))
        while len(self.window) > 2 and now - self.window[1][0] > WINDOW_S:
            self.window.popleft()
        self.write()

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_EVERY_S:
            return
        self.last_write = now
        elapsed = max(now - self.t0, 1e-9)
        t_first, n_first = self.window[0]
        window_s = max(now - t_first, 1e-9)
        rate = (self.inputs - n_first) / window_s
        oldest = min(self.running.items(), key=lambda kv: kv[1], default=None)
        payload = {
            "elapsed_s": round(elapsed, 3), "tasks_done": self.tasks, "tasks_todo": self.tasks_todo,
            "inputs_done": self.inputs, "inputs_todo": self.inputs_todo, "samples": self.samples,
            "videos_decoded": self.videos_decoded,
            "inputs_per_s": round(rate, 3), "rate_window_s": round(window_s, 1),
            "inputs_per_s_since_start": round(self.inputs / elapsed, 3),
            "eta_s": round((self.inputs_todo - self.inputs) / rate, 1) if rate > 0 else None,
            "tasks_running": len(self.running),
            "oldest_running": {"task": oldest[0], "age_s": round(now - oldest[1], 1)} if oldest else None,
            "failures_by_reason": dict(sorted(self.failures.items())),
            "stage_seconds": {k: round(v, 3) for k, v in sorted(self.stage_seconds.items())},
            "stage_inputs_per_s": {k: round(self.inputs / v, 3) for k, v in sorted(self.stage_seconds.items()) if v},
            "stage_counts": {k: dict(sorted(v.items())) for k, v in sorted(self.stage_counts.items())},
            "workers": {"shard": dict(sorted(self.shard_workers.items())),
                        "nodes": dict(sorted(self.nodes.items())),
                        "tokenize": dict(sorted(self.tokenize_workers.items()))},
            "actors": self.actors,
            "retries_by_cause": dict(sorted(self.retries_by_cause.items())),
            "duplicates_dropped": self.duplicates_dropped,
            "task_error_messages": self.error_messages,
        }
        self.payload = payload
        if self.dest is None:
            return
        try:
            write_json(self.dest, "progress.json", payload)
        except OSError:
            pass   # progress is advisory: a full disk or a flaky store must not stop the job

    def close(self) -> None:
        self.bar.close()
        self.write(force=True)
