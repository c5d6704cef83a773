"""The one executor: retries, deadlines and failure results, in process and on a real local Ray; and the
progress it reports."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from clipforge.jobs.executor import run_tasks
from clipforge.pipeline.storage.fs import Location
from clipforge.pipeline.storage.progress import ProgressTracker


def test_local_runner_retries_then_turns_a_task_into_its_failure_result():
    calls: dict = {}

    def work(context, d):
        calls[d["n"]] = calls.get(d["n"], 0) + 1
        if d["n"] == 1 and calls[1] < 3:
            raise OSError("SlowDown")      # fails twice, then works
        if d["n"] == 2:
            raise RuntimeError("a bug")    # fails every time
        return {"n": d["n"], "ok": True}

    results = []
    tracker = ProgressTracker(None, 3, 3, show=False)
    run_tasks(work, None, iter([{"n": 0}, {"n": 1}, {"n": 2}]), on_result=lambda d, r: results.append(r),
              on_failure=lambda d, err: {"n": d["n"], "ok": False, "error": type(err).__name__}, progress=tracker,
              runner="local", attempts=4, name=lambda d: f"task {d['n']}")
    assert results == [{"n": 0, "ok": True}, {"n": 1, "ok": True}, {"n": 2, "ok": False, "error": "RuntimeError"}]
    assert calls == {0: 1, 1: 3, 2: 4}
    tracker.write(force=True)
    assert tracker.payload["retries_by_cause"] == {"OSError": 2, "RuntimeError": 4}
    assert tracker.payload["tasks_running"] == 0


@pytest.mark.ray
def test_a_hung_task_is_cancelled_at_its_deadline_and_run_again(tmp_path, start_local_ray):
    """The first attempt of task 1 hangs; the deadline cancels it and the second attempt completes."""
    import ray

    ray.shutdown()
    start_local_ray(num_cpus=2, log_to_driver=False)
    marker = tmp_path / "first-attempt-started"

    def work(context, d):
        import os
        import time as clock
        if d["n"] == 1:
            try:
                fd = os.open(context, os.O_CREAT | os.O_EXCL)   # only the first attempt gets here first
                os.close(fd)
                clock.sleep(3600)
            except FileExistsError:
                pass
        return {"n": d["n"]}

    results = []
    tracker = ProgressTracker(None, 3, 3, show=False)
    try:
        t = time.monotonic()
        run_tasks(work, str(marker), iter([{"n": n} for n in range(3)]), on_result=lambda d, r: results.append(r),
                  on_failure=lambda d, err: pytest.fail(f"task {d} failed: {err}"), progress=tracker, runner="ray",
                  attempts=3, deadline_s=5.0, name=lambda d: f"task {d['n']}")
        elapsed = time.monotonic() - t
    finally:
        ray.shutdown()
    assert sorted(r["n"] for r in results) == [0, 1, 2]
    assert marker.exists() and elapsed < 3600
    tracker.write(force=True)
    assert tracker.payload["retries_by_cause"] == {"DeadlineExceeded": 1}


def test_progress_reports_the_recent_rate_and_the_oldest_running_task(tmp_path, monkeypatch):
    import clipforge.pipeline.storage.progress as progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    tracker = ProgressTracker(Location(tmp_path), inputs_todo=1000, tasks_todo=10, show=False)
    tracker.task_started("shard 0")
    now[0] += 10
    tracker.task_started("shard 1")
    for _ in range(5):                       # fast at first: 100 inputs in 10 s
        tracker.add({"inputs": 20})
    now[0] += 600                            # then 10 minutes without a result
    tracker.add({"inputs": 20})
    tracker.write(force=True)
    written = __import__("json").loads((Path(tmp_path) / "progress.json").read_text())
    assert written["oldest_running"] == {"task": "shard 0", "age_s": 610.0}
    assert written["tasks_running"] == 2
    # over the last 5 minutes the rate is 20 inputs in ~600 s, not 120 in 610 s
    assert written["inputs_per_s"] < 0.1 < written["inputs_per_s_since_start"]
