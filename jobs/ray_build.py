"""The Ray wiring of `clipforge build`: shard tasks on CPUs, image tokenizer workers on GPUs.

- Each shard is one Ray task (`num_cpus=1`) run by the one executor (`clipforge.jobs.executor`): queued
  beyond the cluster's CPUs so an autoscaler sees demand, with a deadline, retried, its result committed
  by the driver.
- With GPUs, image tokenization runs in `ImageTokenizerWorker` actors. The pool is planned per node and
  per GPU, so that every worker can be placed: a share of 0.4 puts two workers on each whole GPU (Ray
  never splits one actor's share across two GPUs, and a worker that cannot be placed waits forever).
  The pool is re-planned every few seconds: it grows when GPUs join and drops workers beyond the spec
  when GPUs leave. New shard tasks get the current workers.
- A shard task sends frames to a worker and keeps decoding while they are encoded (`TokenizeClips`
  keeps several batches in flight, bounded in bytes). Every call has a timeout; a worker that does not
  answer is skipped for the next; when none answers, the clips become `tokenize_transient` ledger rows,
  which `--retry-failed` redoes. A worker's batch that fails is retried item by item, so one shard's bad
  frames never fail another shard's.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import time
import uuid
from typing import Iterator

import numpy as np

from clipforge.pipeline.build_shard import BuildSpec, shard_builder_for
from clipforge.jobs.executor import run_tasks, start_ray
from clipforge.pipeline.tokenize import EncoderUnavailable

WORKER_CONCURRENCY = 32    # encode calls an actor accepts at once; callers bound their bytes in flight too
POOL_EVERY_S = 5.0


class ImageTokenizerWorker:
    """A Ray actor holding the image tokenizer on one GPU share. Concurrent `encode` calls from many
    shard tasks are queued and run as one batch of up to `batch_frames` frames, so the GPU sees large
    batches even though each shard sends a few clips at a time. Codes do not depend on the batch."""

    def __init__(self, image_tokenizer: str, dtype: str, batch_frames: int):
        import ray
        import torch

        from clipforge.tokenizer.sources import open_image_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"   # declared GPUs without CUDA: run on CPU
        self.tokenizer = open_image_tokenizer(image_tokenizer, device=device, dtype=dtype)
        gpus = ",".join(str(g) for g in ray.get_gpu_ids()) or "none"
        self.name = f"{socket.gethostname()}:{os.getpid()}:gpu{gpus}"
        self.batch_frames = batch_frames
        self.queue: asyncio.Queue | None = None

    async def ready(self) -> str:
        return self.name

    async def encode(self, frames: np.ndarray) -> tuple[np.ndarray, str, float]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((frames, done))
        codes, seconds = await done
        return codes, self.name, seconds

    async def settings(self) -> dict:
        return self.tokenizer.encode_settings

    async def decode(self, codes: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.decode, codes)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0][0])
            while size < self.batch_frames and not self.queue.empty():
                item = self.queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            t = time.perf_counter()
            try:
                codes = await loop.run_in_executor(None, self.tokenizer.encode,
                                                   np.concatenate([frames for frames, _ in batch]))
            except Exception:   # noqa: BLE001 — one caller's bad frames must not fail the others
                for frames, done in batch:
                    try:
                        one = await loop.run_in_executor(None, self.tokenizer.encode, frames)
                        done.set_result((one, time.perf_counter() - t))
                    except Exception as err:   # noqa: BLE001 — this caller's error, to this caller
                        done.set_exception(err)
                continue
            seconds = time.perf_counter() - t
            start = 0
            for frames, done in batch:
                done.set_result((codes[start:start + len(frames)], seconds * len(frames) / size))
                start += len(frames)


class RemoteImageEncoder:
    """An `ImageEncoder` whose work is done by GPU workers: `submit` sends frames to one (the shard's
    own first) and returns at once; `result` waits, with a timeout, and fails over to the next worker.
    Counts calls per worker and splits a call's time into the worker's compute and the rest."""

    def __init__(self, workers: list, tokenizer_ids: dict, timeout_s: float):
        self.workers, self.preferred, self.timeout_s = list(workers), 0, timeout_s
        self.tokenizer_id = tokenizer_ids["image"]["id"]
        self.sha256 = tokenizer_ids["image"]["sha256"]
        self.calls_by_worker: dict[str, int] = {}
        self.compute_s = self.call_s = 0.0
        self._settings = None

    def reset(self, workers: list, preferred: int) -> None:
        self.workers, self.preferred = list(workers), preferred
        self.calls_by_worker, self.compute_s, self.call_s = {}, 0.0, 0.0

    @property
    def encode_settings(self) -> dict:
        import ray

        if self._settings is None:
            for worker in self._ordered():
                try:
                    self._settings = ray.get(worker.settings.remote(), timeout=self.timeout_s)
                    break
                except (ray.exceptions.RayError, TimeoutError):
                    continue
        return self._settings or {}

    def _ordered(self) -> list:
        n = len(self.workers)
        return [self.workers[(self.preferred + i) % n] for i in range(n)]

    def submit(self, frames: np.ndarray):
        order = self._ordered()
        if not order:
            raise EncoderUnavailable("no image tokenizer worker in the pool")
        return [frames, order, order[0].encode.remote(frames), time.perf_counter()]

    def result(self, handle) -> np.ndarray:
        import ray

        frames, order, ref, t = handle
        last = None
        for i, worker in enumerate(order):
            if i:
                ref, t = worker.encode.remote(frames), time.perf_counter()
            try:
                codes, name, compute = ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as err:   # pending, hung or restarting: try the next
                ray.cancel(ref)
                last = err
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                last = err
                continue
            self.call_s += time.perf_counter() - t
            self.compute_s += compute
            self.calls_by_worker[name] = self.calls_by_worker.get(name, 0) + 1
            return codes
        raise EncoderUnavailable(f"no image tokenizer worker answered within {self.timeout_s:.0f} s: "
                                 f"{type(last).__name__ if last else 'no workers'}")

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self.result(self.submit(frames))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import ray

        for worker in self._ordered():
            try:
                return ray.get(worker.decode.remote(codes), timeout=self.timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                continue
        raise EncoderUnavailable("no image tokenizer worker answered a decode")


def ray_shard_task(spec: BuildSpec, descriptor: dict, workers: list) -> dict:
    """A shard task on a Ray worker: the process's BuildShard, its encoder pointed at the current pool
    (without workers, the task tokenizes in its own process)."""
    import ray

    builder = shard_builder_for(spec, (lambda: RemoteImageEncoder(workers, spec.tokenizer_ids,
                                                                  spec.config.tokenize_timeout_s)) if workers else None)
    encoder = next((s.image for s in builder.stages if isinstance(getattr(s, "image", None), RemoteImageEncoder)),
                   None)
    if encoder is not None:
        encoder.reset(workers, descriptor["shard"])
    record = builder.build(descriptor)
    run = record["run"]
    run["node"] = ray.get_runtime_context().get_node_id()
    if encoder is not None:
        run["tokenize_workers"] = dict(encoder.calls_by_worker)
        run["seconds"]["transfer"] = max(0.0, encoder.call_s - encoder.compute_s)
    return record


def tokenizer_worker_count(config, nodes: list[dict] | None = None) -> int:
    """Tokenizer workers that can all be placed: per alive node, whole GPUs times the shares one GPU
    holds (a share is never split across GPUs), or GPUs / share for shares above one GPU."""
    import ray

    if config.tokenize_workers:
        return config.tokenize_workers
    share = max(config.tokenize_gpus, 1e-3)
    total = 0
    for node in nodes if nodes is not None else ray.nodes():
        if not node.get("Alive", True):
            continue
        gpus = float(node.get("Resources", {}).get("GPU", 0))
        if share <= 1:
            total += int(math.floor(gpus + 1e-9)) * int(math.floor(1 / share + 1e-9))
        else:
            total += int(math.floor(gpus / share + 1e-9))
    return total


class TokenizerPool:
    """The GPU tokenizer workers of one build, following the cluster's GPUs."""

    def __init__(self, spec: BuildSpec, tracker):
        import ray

        config = spec.config
        self.spec, self.tracker = spec, tracker
        self.actor_cls = ray.remote(ImageTokenizerWorker)
        self.actor_options = dict(num_gpus=config.tokenize_gpus, num_cpus=config.tokenize_cpus, max_restarts=-1,
                                  max_task_retries=0, max_concurrency=WORKER_CONCURRENCY)
        self.workers: list = []
        self.last, self.made, self.run = 0.0, 0, uuid.uuid4().hex[:8]
        self.resize()

    def _new_worker(self):
        config = self.spec.config
        self.made += 1
        # named, so that an operator (or a test) can find and inspect a build's workers
        return self.actor_cls.options(name=f"clipforge-tokenizer-{self.run}-{self.made}", **self.actor_options).remote(
            self.spec.image_tokenizer, config.tokenize_dtype, config.tokenize_batch * config.clips.frames)

    def resize(self) -> None:
        import ray

        self.last = time.monotonic()
        want = tokenizer_worker_count(self.spec.config)
        while len(self.workers) < want:
            self.workers.append(self._new_worker())
        while len(self.workers) > want:
            ray.kill(self.workers.pop())
        self.tracker.actors = self.states()

    def states(self) -> dict:
        """{worker: alive | starting or busy | dead, replaced} from a short ping of each; a worker that
        died for good (not restarting) is replaced."""
        import ray

        refs = [w.ready.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0) if refs else ([], [])
        done = set(ready)
        states = {}
        for i, ref in enumerate(refs):
            if ref not in done:
                states[f"tokenizer-{i}"] = "starting or busy"
                continue
            try:
                states[ray.get(ref, timeout=1)] = "alive"
            except ray.exceptions.RayActorError:
                states[f"tokenizer-{i}"] = "dead, replaced"
                self.workers[i] = self._new_worker()
            except Exception:   # noqa: BLE001 — an actor that answers with an error is still there
                states[f"tokenizer-{i}"] = "not answering"
        return states

    def tick(self) -> None:
        if time.monotonic() - self.last > POOL_EVERY_S:
            self.resize()

    def shard_slots(self) -> int:
        import ray

        res = ray.cluster_resources()
        cpu_left = float(res.get("CPU", 1)) - len(self.workers) * self.spec.config.tokenize_cpus
        slots = max(1, int(math.floor(cpu_left + 1e-9)))
        return min(slots, self.spec.config.shard_tasks) if self.spec.config.shard_tasks else slots

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []


def run_on_ray(spec: BuildSpec, descriptors: Iterator[dict], tracker, address: str | None, on_result,
               on_failure) -> None:
    start_ray(address)
    pool = TokenizerPool(spec, tracker)   # no GPUs (yet): no workers, shard tasks tokenize themselves
    try:
        run_tasks(ray_shard_task, spec, descriptors, on_result=on_result, on_failure=on_failure, progress=tracker,
                  runner="ray", attempts=spec.config.task_attempts, deadline_s=spec.config.shard_timeout_s,
                  slots=pool.shard_slots, extra_args=lambda: (list(pool.workers),), tick=pool.tick,
                  name=lambda d: f"shard {d['shard']}")
    finally:
        pool.close()
