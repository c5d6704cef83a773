"""One executor for every job that runs tasks over a dataset (build, reshard, verify): in process or on Ray.

`run_tasks(work, context, descriptors, ...)` calls `work(context, descriptor, *extra)` once per descriptor
and hands each result to `on_result` in the driver. What it adds, the same for every job:

- **Retries.** A task that raises (a bug, a lost node, a store that failed) is run again, up to
  `attempts` times; then `on_failure(descriptor, error)` makes the result instead (the build turns the
  shard's inputs into transient ledger rows), so nothing is lost and the job goes on.
- **Deadlines.** A task running longer than `deadline_s` is cancelled and counts as a failed attempt: a
  hang can delay a job, never stop it. Its clock starts when it is among the oldest `slots` tasks in
  flight (the ones the cluster can be running), not when it was queued.
- **Demand beyond the cluster.** On Ray, up to `slots + max(2, slots)` tasks are queued at once, so an
  autoscaler sees demand and adds nodes; `slots` is re-read every second, so a grown cluster gets more.
- **Progress.** Each start, finish and retry (with its cause) goes to `progress` (`ProgressTracker`).

Every result goes through the driver: tasks never commit (see `clipforge.pipeline.storage.commits`).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator

RAY_GET_TIMEOUT_S = 120.0


def start_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def cluster_cpus() -> int:
    import ray

    return max(1, int(float(ray.cluster_resources().get("CPU", 1)) + 1e-9))


def failure_cause(err: BaseException) -> str:
    """A short cause for progress.json's retry counts."""
    name = type(err).__name__
    for known in ("OutOfMemoryError", "WorkerCrashedError", "NodeDiedError", "TaskCancelledError",
                  "ObjectLostError", "RayActorError", "GetTimeoutError"):
        if known in name:
            return known
    return name


class DeadlineExceeded(TimeoutError):
    pass


def run_tasks(work: Callable, context, descriptors: Iterator[dict], *, on_result: Callable[[dict, dict], None],
              on_failure: Callable[[dict, BaseException], dict | None], progress=None, runner: str = "local",
              address: str | None = None, attempts: int = 4, deadline_s: float | None = None,
              slots: Callable[[], int] | None = None, extra_args: Callable[[], tuple] = tuple,
              tick: Callable[[], None] | None = None, num_cpus: float = 1, name: Callable[[dict], str] = str) -> None:
    """Run `work(context, d, *extra_args())` for every descriptor `d`; see the module's docstring."""
    if runner == "local":
        _run_local(work, context, descriptors, on_result, on_failure, progress, attempts, extra_args, name)
    elif runner == "ray":
        _run_ray(work, context, descriptors, on_result, on_failure, progress, address, attempts, deadline_s,
                 slots, extra_args, tick, num_cpus, name)
    else:
        raise ValueError(f"unknown runner {runner!r} (ray | local)")


def _run_local(work, context, descriptors, on_result, on_failure, progress, attempts, extra_args, name) -> None:
    for d in descriptors:
        for attempt in range(1, attempts + 1):
            if progress is not None:
                progress.task_started(name(d))
            try:
                result = work(context, d, *extra_args())
            except Exception as err:   # noqa: BLE001 — a failed attempt is retried, then becomes rows
                if progress is not None:
                    progress.task_failed(name(d), failure_cause(err), err)
                if attempt == attempts:
                    result = on_failure(d, err)
                    if result is not None:
                        on_result(d, result)
                continue
            if progress is not None:
                progress.task_finished(name(d))
            on_result(d, result)
            break


class _InFlight:
    __slots__ = ("d", "attempt", "started")

    def __init__(self, d: dict, attempt: int):
        self.d, self.attempt, self.started = d, attempt, None


def _run_ray(work, context, descriptors, on_result, on_failure, progress, address, attempts, deadline_s, slots,
             extra_args, tick, num_cpus, name) -> None:
    import ray

    start_ray(address)
    slots = slots or cluster_cpus
    # Ray re-runs a task whose worker or node died (system failures) on its own; errors raised by the
    # task, cancellations and deadlines are retried here, where they are counted and bounded
    task = ray.remote(work).options(num_cpus=num_cpus, max_retries=2)
    context_ref = ray.put(context)
    in_flight: dict = {}          # ObjectRef -> _InFlight, in submission order (dicts keep it)
    retry: deque = deque()
    pending = iter(descriptors)
    exhausted = False
    n_slots, last_plan = slots(), time.monotonic()

    def failed(entry: _InFlight, err: BaseException) -> None:
        if progress is not None:
            progress.task_failed(name(entry.d), failure_cause(err), err)
        if entry.attempt < attempts:
            retry.append((entry.d, entry.attempt + 1))
        else:
            result = on_failure(entry.d, err)
            if result is not None:
                on_result(entry.d, result)

    while True:
        now = time.monotonic()
        if now - last_plan > 1.0:
            n_slots, last_plan = slots(), now
            if tick is not None:
                tick()
        limit = n_slots + max(2, n_slots)   # queued demand beyond the slots: what an autoscaler sees
        while len(in_flight) < limit and (retry or not exhausted):
            if retry:
                d, attempt = retry.popleft()
            else:
                d = next(pending, None)
                if d is None:
                    exhausted = True
                    break
                attempt = 1
            in_flight[task.remote(context_ref, d, *extra_args())] = _InFlight(d, attempt)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0.5)
        for ref in ready:
            entry = in_flight.pop(ref)
            try:
                result = ray.get(ref, timeout=RAY_GET_TIMEOUT_S)
            except Exception as err:   # noqa: BLE001 — RayError, a task's own exception, a timeout
                failed(entry, err)
                continue
            if progress is not None:
                progress.task_finished(name(entry.d))
            on_result(entry.d, result)
        now = time.monotonic()
        for ref, entry in list(in_flight.items())[:n_slots]:   # the ones the cluster can be running
            if entry.started is None:
                entry.started = now
                if progress is not None:
                    progress.task_started(name(entry.d))
            elif deadline_s and now - entry.started > deadline_s:
                ray.cancel(ref, force=True)
                in_flight.pop(ref)
                failed(entry, DeadlineExceeded(f"{name(entry.d)} ran longer than {deadline_s:.0f} s"))
        if progress is not None:
            progress.write()
