"""The Ray wiring of `clipforge build`: shard tasks on CPUs, image tokenizer workers on GPUs.

- Each shard is one Ray task (`num_cpus=1`) running `BuildShard` on its descriptor: it reads its manifest
  slice, decodes in its isolated child, and commits its shard itself. Tasks are submitted as slots free
  up, and the number of slots is re-read from the cluster every second, so an autoscaling cluster that
  grows gets more tasks in flight (and one that shrinks gets fewer). Ray re-runs a task whose node died;
  the commit protocol makes a re-run, or a duplicate, harmless.
- When the cluster has GPUs, image tokenization runs in `ImageTokenizerWorker` actors that hold a GPU
  share each (`tokenize_gpus`, fractional allowed) and batch frames across the clips of every shard task
  that calls them; shard tasks then send frames to them instead of loading the model. Their CPU share is
  set aside before the shard slots are counted, so the plan fits any cluster shape.
- A shard whose task keeps failing is committed by the driver with every input as a transient
  `internal_error` ledger row (retry with `--retry-failed`): no input is ever lost.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from typing import Iterator

import numpy as np

from clipforge.pipeline.build_shard import lost_inputs
from clipforge.pipeline.manifest import manifest_rows, read_manifest_slice

TASK_ATTEMPTS = 4          # driver-side resubmissions of a shard whose task raised (node loss is retried by Ray too)
_builders: dict = {}       # per worker process: one BuildShard (and its decode child) per plan


def start_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


class ImageTokenizerWorker:
    """A Ray actor holding the image tokenizer on one GPU share. Concurrent `encode` calls from many
    shard tasks are queued and run as one batch of up to `batch_frames` frames, so the GPU sees large
    batches even though each shard sends a few clips at a time. Codes do not depend on the batch."""

    def __init__(self, image_tokenizer: str, dtype: str, batch_frames: int):
        import ray
        import torch

        from clipforge.tokenizer.image import ImageTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"   # declared GPUs without CUDA: run on CPU
        options = {"dtype": dtype} if dtype != "float32" else {}
        self.tokenizer = ImageTokenizer.load(image_tokenizer, device=device, **options)
        gpus = ",".join(str(g) for g in ray.get_gpu_ids()) or "none"
        self.name = f"{socket.gethostname()}:{os.getpid()}:gpu{gpus}"
        self.batch_frames = batch_frames
        self.queue: asyncio.Queue | None = None
        self.compute_s = 0.0

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
            except Exception as err:   # noqa: BLE001 — each caller gets the error, the server keeps going
                for _, done in batch:
                    done.set_exception(err)
                continue
            seconds = time.perf_counter() - t
            start = 0
            for frames, done in batch:
                done.set_result((codes[start:start + len(frames)], seconds * len(frames) / size))
                start += len(frames)


class RemoteImageEncoder:
    """What a shard task's `TokenizeClips` calls instead of a local model: frames go to a GPU worker
    (the shard's own first, the others if it is gone). Counts calls per worker and splits the time of a
    call into the worker's compute and the rest (transfer and queueing)."""

    def __init__(self, workers: list, tokenizer_ids: dict, preferred: int):
        self.workers, self.preferred = workers, preferred
        self.tokenizer_id = tokenizer_ids["image"]["id"]
        self.sha256 = tokenizer_ids["image"]["sha256"]
        self.calls_by_worker: dict[str, int] = {}
        self.compute_s = self.call_s = 0.0
        self._settings = None

    def encode_settings(self) -> dict:
        import ray

        if self._settings is None:
            self._settings = ray.get(self._ordered()[0].settings.remote())
        return self._settings

    def _ordered(self):
        n = len(self.workers)
        return [self.workers[(self.preferred + i) % n] for i in range(n)]

    def encode(self, frames: np.ndarray) -> np.ndarray:
        import ray

        last = None
        for worker in self._ordered():
            t = time.perf_counter()
            try:
                codes, name, compute = ray.get(worker.encode.remote(frames))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                last = err
                continue
            self.call_s += time.perf_counter() - t
            self.compute_s += compute
            self.calls_by_worker[name] = self.calls_by_worker.get(name, 0) + 1
            return codes
        raise RuntimeError(f"no image tokenizer worker answered: {last}")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import ray

        return ray.get(self._ordered()[0].decode.remote(codes))


def build_one_shard(plan, descriptor: dict, workers: list) -> dict:
    """The body of a shard task (runs on a worker process; its BuildShard is reused across tasks)."""
    key = (plan.out, plan.manifest, plan.image_tokenizer, plan.text_tokenizer, bool(workers))
    builder = _builders.get(key)
    if builder is None:
        _builders.clear()
        encoder = RemoteImageEncoder(workers, plan.tokenizer_ids, 0) if workers else None
        builder = _builders[key] = plan.shard_builder(image_encoder=encoder)
    for _, stage in builder.stages:   # spread shards over GPU workers; count per shard
        encoder = getattr(stage, "image", None)
        if isinstance(encoder, RemoteImageEncoder):
            encoder.preferred = descriptor["shard"]
            encoder.calls_by_worker = {}
            encoder.compute_s = encoder.call_s = 0.0
    record = builder.build(descriptor)
    for _, stage in builder.stages:
        encoder = getattr(stage, "image", None)
        if isinstance(encoder, RemoteImageEncoder):
            seconds = record["run"]["seconds"]
            seconds["transfer"] = max(0.0, encoder.call_s - encoder.compute_s)
            seconds["tokenize"] = max(0.0, seconds.get("tokenize", 0.0) - seconds["transfer"])
    return record


def plan_resources(config) -> tuple[int, int, float]:
    """(shard slots, tokenizer workers, GPUs) for the cluster as it is now."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    workers = 0
    if gpus > 0:
        per = max(config.tokenize_gpus, 1e-3)
        workers = config.tokenize_workers or max(1, int(math.floor(gpus / per + 1e-9)))
    cpu_left = cpus - workers * config.tokenize_cpus
    slots = max(1, int(math.floor(cpu_left + 1e-9)))
    if config.decode_workers:
        slots = min(slots, config.decode_workers)
    return slots, workers, gpus


def run_on_ray(plan, descriptors: Iterator[dict], todo: int, tracker, address: str | None) -> None:
    import ray

    start_ray(address)
    config = plan.config
    slots, n_workers, _ = plan_resources(config)
    actor_cls = ray.remote(ImageTokenizerWorker).options(
        num_gpus=config.tokenize_gpus, num_cpus=config.tokenize_cpus, max_restarts=-1, max_task_retries=-1,
        max_concurrency=1000)
    workers = [actor_cls.remote(plan.image_tokenizer, config.tokenize_dtype,
                                config.tokenize_batch * config.clips.frames) for _ in range(n_workers)]
    task = ray.remote(build_one_shard).options(num_cpus=1, max_retries=3)
    plan_ref = ray.put(plan)
    in_flight: dict = {}       # object ref -> (descriptor, attempt)
    pending = iter(descriptors)
    retry: list = []
    exhausted = False
    last_plan = time.monotonic()
    while True:
        if time.monotonic() - last_plan > 1.0:   # follow an autoscaling cluster
            slots = plan_resources(config)[0]
            last_plan = time.monotonic()
        while len(in_flight) < slots and (retry or not exhausted):
            if retry:
                d, attempt = retry.pop()
            else:
                d = next(pending, None)
                if d is None:
                    exhausted = True
                    break
                attempt = 1
            in_flight[task.remote(plan_ref, d, workers)] = (d, attempt)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        for ref in ready:
            d, attempt = in_flight.pop(ref)
            try:
                tracker.add(ray.get(ref))
            except (ray.exceptions.RayError, OSError) as err:
                tracker.task_error(err)
                if attempt < TASK_ATTEMPTS:
                    tracker.retried += 1
                    retry.append((d, attempt + 1))
                else:
                    tracker.add(commit_failed_shard(plan, d, err))
        tracker.write()
    for w in workers:
        ray.kill(w)


def commit_failed_shard(plan, d: dict, err: Exception) -> dict:
    """Every input of a shard whose task never succeeded becomes a transient ledger row."""
    rows = list(manifest_rows(read_manifest_slice(plan.manifest, d["start"], d["stop"]), first_index=d["start"]))
    message = f"the shard task failed {TASK_ATTEMPTS} times: {type(err).__name__}: {str(err)[:200]}"
    lost = [dict(r, **{"error": message}) for r in lost_inputs(rows, [])]
    record = plan.committer().write(d["shard"], lost, inputs=len(rows), attempts=d.get("attempts"),
                                    extra={"videos_decoded": 0, "clips": 0, "roundtrip_psnr": [],
                                           "rows": [d["start"], d["stop"]]})
    return {**record, "run": {"seconds": {}, "worker": "driver"}}
