"""Train the CogVideo-style model on a built dataset: one explicit loop, like nanoGPT's train.py.

(One file over 400 lines on purpose: the whole training run, read top to bottom as nanoGPT's train.py is;
where a run starts is model/start.py, the optimizer model/optim.py, the data model/data.py.)

    train(DATASET, RUN, TrainConfig(phase="sequential", steps=2000, max_minutes=3))
    train(DATASET, RUN, resume=True)          # continue a killed run from its latest checkpoint
    torchrun --nproc_per_node=N -m clipforge.jobs.cli train DATASET --out RUN ...   # data parallel

RUN/ after a run:
    ckpt_{step:06d}.pt    model, configs, losses, spans and everything a resume needs (optimizer, schedule,
                           RNG and data position per rank): plain data, torch.load(weights_only=True)
    latest.json           the newest checkpoint's name and metadata (step, losses, configs, default span)
    log.jsonl             one JSON object per log line (train and eval)
    keys/rank{R}.txt      with record_keys: "step key" for every sample rank R trained on
    tokenizers/image/     copy of the image tokenizer (config.json, weights.pt)
    tokenizers/text.model copy of the sentencepiece model
so model/sample.py rebuilds everything from RUN alone.

Phases (CogVideo, ICLR 2023): "image" trains the base text-to-image model (text + frame 0); "sequential" and
"interpolation" train the video model. Starting from an image-phase run (`init_from`), attention-plus
is re-initialised from the base channel and the whole model trains; with `freeze_base` only attention-plus,
the mix vectors and the new position tables do (CogVideo's choice on CogView2's weights). `joint_image`
adds the image-phase loss (text + frame 0, base channel alone) to every step, so that the base channel
can draw frame 0 at sampling time; it is on by default only without an image-phase run to draw it.

Data parallel (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): every rank reads its own share of the data
(model/data.py), gradients are averaged across ranks before each optimizer step, rank 0 writes the run.
One optimizer step sees batch_size * grad_accum * world_size samples (`global_batch` sets grad_accum).
"""
from __future__ import annotations

import json
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from clipforge.model.distributed import (all_reduce_mean, dist_context, rng_state, uses_bf16_autocast,
                                         set_rng_state, weights_digest)
from clipforge.model.data import MixtureStream, SequenceBuilder, ShardStream, make_loader, shard_urls
from clipforge.model.checkpoint import (copy_tokenizers, default_spans, truncate_jsonl, write_json)
from clipforge.model.config import TrainConfig
from clipforge.model.optim import Schedule, adamw
from clipforge.model.run_folder import RunFolder
from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.dataset import absolute
from clipforge.model.start import accumulation_steps, dataset_tokenizers, resumed_config, starting_model, what_trains
from clipforge.tokenizer.sources import relative_to


# ----------------------------------------------------------------------------------------------------
# the run


class TrainingRun:
    """One training run: everything the loop needs, made in `__init__` in the order a resume relies on
    (seed, model, data, optimizer), then `loop()`. `train()` below is the whole of its use."""

    def __init__(self, datasets: list, folder: RunFolder, config: TrainConfig, state: dict | None, log):
        self.datasets, self.folder, self.run = datasets, folder, folder.local
        # the checkpoint itself is not kept: its weights and optimizer state are copied in, then freed
        self.config, self.resumed = config, state is not None
        run = self.run
        self.rank, self.world, self.device, self.joined = dist_context(config.device)
        self.master = self.rank == 0
        self.log = log if self.master else (lambda msg: None)
        torch.manual_seed(config.seed + self.rank)  # dropout differs between ranks, as it would with more data
        run.mkdir(parents=True, exist_ok=True)
        self.accum = accumulation_steps(config, self.world)
        layout, tok_paths, self.text, self.image = dataset_tokenizers(datasets, config)
        self.model, done, init_phase = starting_model(config, state, layout, self.text, self.image, self.world,
                                                      run, self.log)
        self.mc = self.model.config
        self.freeze, self.joint = what_trains(config, state, init_phase)
        self.phases = done + ([config.phase] if not done or done[-1] != config.phase else [])
        self.prepare_model()
        self.tokenizer_specs = copy_tokenizers(tok_paths, run) if self.master else None
        self.start_step = state["step"] if state is not None else 0
        # where each of this rank's readers stood after the last batch the run consumed
        self.positions: dict[int, str] = dict((state or {}).get("data", {}).get("positions", {}).get(
            str(self.rank), {}))
        self.open_data()
        self.schedule = Schedule(config)
        self.optimizer, self.params = adamw(self.model, config, self.schedule.base_lr, self.device)
        self.use_amp = uses_bf16_autocast(self.device, config.amp)
        self.n0 = self.mc.text_slot + self.mc.frame_len  # text + frame 0: the image-phase prefix of every layout
        self.ckpts: list[Path] = []
        self.seconds_before = 0.0
        if state is not None:
            self.restore(state)
        self.describe()

    def prepare_model(self) -> None:
        self.model.freeze_base(self.freeze)
        self.model.gradient_checkpointing = self.config.grad_checkpoint
        self.model.to(self.device)
        if self.world > 1 and not self.resumed:  # every rank starts from rank 0's weights
            for p in self.model.state_dict().values():
                dist.broadcast(p, 0)

    def open_data(self) -> None:
        """The training stream (at the resumed position) and a fixed set of evaluation batches: the val
        split, else source videos held out of the training split, else (tiny datasets) training batches."""
        config = self.config
        self.builder = builder = SequenceBuilder(self.mc, self.text, config.phase)
        per_dataset = [shard_urls(d, "train") for d in self.datasets]
        val_urls = [url for d in self.datasets for url in shard_urls(d, "val")]
        for dataset, urls in zip(self.datasets, per_dataset):
            if not urls:
                raise FileNotFoundError(f"{dataset}: no committed train shards")
        train_urls = [url for urls in per_dataset for url in urls]
        modes = tuple(config.clip_modes) if config.clip_modes else None
        holdout = 0.0 if val_urls else config.holdout
        streams = [ShardStream(urls, builder, shuffle=True, repeat=True, seed=config.seed + 7919 * i,
                               open_shards=config.open_shards, cond_drop=config.cond_drop, holdout=holdout,
                               holdout_side="exclude", modes=modes, rank=self.rank, world_size=self.world)
                   for i, urls in enumerate(per_dataset)]
        self.train_stream = streams[0] if len(streams) == 1 else MixtureStream(
            streams, config.weights or [1.0] * len(streams), seed=config.seed)
        self.train_stream.resume_from(self.positions)
        val_stream = ShardStream(val_urls or train_urls, builder, shuffle=False, repeat=False, holdout=holdout,
                                 holdout_side="only" if holdout else "exclude", modes=modes)
        self.val_set, self.eval_split = self.eval_batches(val_stream), "val" if val_urls else "holdout"
        if not self.val_set:
            self.eval_split = "train"
            self.val_set = self.eval_batches(ShardStream(train_urls, builder, shuffle=False, repeat=False,
                                                         modes=modes))
        # words past the slot never reach the model: at 24 tokens half the synthetic captions lost their direction
        self.cut_share = builder.captions_cut / max(1, builder.captions)
        if self.cut_share > 0.01:
            self.log(f"warning: {builder.captions_cut} of {builder.captions} evaluation captions "
                     f"({self.cut_share:.0%}) are cut to fit the {self.mc.text_slot}-token text slot; the words past "
                     f"it never reach the model (build the dataset with a larger --text-slot; `clipforge audit` "
                     f"shows caption lengths)")
        self.train_iter = iter(make_loader(self.train_stream, config.batch_size, config.num_workers))

    def eval_batches(self, stream) -> list:
        batches = []
        for tokens, targets, _, _ in make_loader(stream, self.config.batch_size):
            batches.append((tokens, targets))
            if len(batches) >= self.config.eval_batches:
                break
        return batches

    def restore(self, state: dict) -> None:
        """Everything the uninterrupted run would hold at this step; files written after it are dropped."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.horizon = state["scheduler"]["horizon"]
        self.seconds_before = state["seconds"]
        set_rng_state(state["rng"][self.rank], self.device)
        for path in sorted(self.run.glob("ckpt_*.pt")):
            if int(path.stem.split("_")[1]) > self.start_step:
                path.unlink()  # written by the killed run after latest.json's checkpoint
            else:
                self.ckpts.append(path)
        if self.master:
            truncate_jsonl(self.run / "log.jsonl", self.start_step)

    def describe(self) -> None:
        config, n_params = self.config, self.model.get_num_params()
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"model: {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; phase {config.phase}, "
                 f"sequence {self.mc.seq_len(config.phase)} tokens, freeze_base={self.freeze}, "
                 f"joint_image={self.joint}, device {self.device}{' (bf16 autocast)' if self.use_amp else ''}, "
                 f"{self.world} rank(s) x {config.batch_size} x {self.accum} accumulation = "
                 f"{self.world * config.batch_size * self.accum} per step")

    def losses(self, tokens, targets):
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.use_amp
                    else nullcontext())
        with autocast:
            _, loss = self.model(tokens, targets, phase=self.config.phase)
            loss_image = None
            if self.joint:
                _, loss_image = self.model(tokens[:, :self.n0], targets[:, :self.n0], phase="image")
        return loss, loss_image

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        out, out_img = [], []
        for tokens, targets in self.val_set:
            loss, loss_image = self.losses(tokens.to(self.device), targets.to(self.device))
            out.append(loss.item())
            if loss_image is not None:
                out_img.append(loss_image.item())
        self.model.train()
        res = {"val_loss": sum(out) / len(out) if out else None}
        if out_img:
            res["val_loss_image"] = sum(out_img) / len(out_img)
        return res

    def checkpoint(self, step: int, train_loss: float, val: dict, seconds: float) -> str:
        """Collective (all ranks call it): every rank's RNG (ranks draw different dropout masks) and a digest
        of its weights, which must agree on all ranks; rank 0 writes the checkpoint and latest.json."""
        mine = (rng_state(self.device), weights_digest(self.model), dict(self.positions))
        gathered = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        rngs, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        positions = {str(rank): g[2] for rank, g in enumerate(gathered)}
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel ranks hold different weights at step {step}: {digests}")
        name = f"ckpt_{step:06d}.pt"
        if not self.master:
            if self.folder.remote and self.config.record_keys:   # each rank's keys live where it runs
                self.folder.publish_file(f"keys/rank{self.rank}.txt")
            return name
        spans = default_spans(self.train_stream.spans)
        self.write_checkpoint(name, self.checkpoint_blob(step, train_loss, val, seconds, spans, rngs, digests,
                                                         positions))
        write_json(self.run / "latest.json", {
            "ckpt": name, "step": step, "phase": self.config.phase, "phases": self.phases, "train_loss": train_loss,
            **val, "eval_split": self.eval_split, "seconds": round(seconds, 1), "default_span": spans,
            "dataset": absolute(self.datasets[0]), "datasets": [absolute(d) for d in self.datasets],
            "model_config": self.mc.to_dict(), "train_config": asdict(self.config), "tokenizers": {
                kind: {"id": tok.tokenizer_id, "sha256": tok.sha256, "path": self.tokenizer_specs[kind]}
                for kind, tok in (("image", self.image), ("text", self.text))}})
        if self.run / name not in self.ckpts:
            self.ckpts.append(self.run / name)
        while self.config.keep_checkpoints and len(self.ckpts) > self.config.keep_checkpoints:
            self.ckpts.pop(0).unlink(missing_ok=True)
        self.folder.publish(name, self.ckpts)   # object storage: latest.json last, then old checkpoints go
        return name

    def checkpoint_blob(self, step, train_loss, val, seconds, spans, rngs, digests, positions) -> dict:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "model_config": self.mc.to_dict(), "train_config": asdict(self.config), "step": step,
                "phase": self.config.phase, "phases": self.phases, "train_loss": train_loss,
                "val_loss": val.get("val_loss"), "spans": {k: float(v) for k, v in spans.items()},
                "dataset": absolute(self.datasets[0]), "datasets": [absolute(d) for d in self.datasets],
                "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state(),
                "rng": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()} for r in rngs],
                # each rank's readers' positions: a resume starts there and reads nothing before them
                "data": {"batches_per_rank": step * self.accum, "batch_size": self.config.batch_size,
                         "positions": positions},
                "seconds": seconds, "world_size": self.world, "rank_weights_sha256": digests,
                "freeze_base": self.freeze, "joint_image": self.joint}

    def write_checkpoint(self, name: str, blob: dict) -> None:
        with open(self.run / (name + ".tmp"), "wb") as f:   # fsynced before the rename that publishes it
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.run / (name + ".tmp"), self.run / name)

    def optimizer_step(self, step: int, lr: float, keys_file) -> tuple[float, float, int]:
        """One optimizer step over `accum` micro-batches: (loss, image-phase loss, tokens seen by all ranks)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, image_sum, tokens_seen = 0.0, 0.0, 0
        for _ in range(self.accum):
            tokens, targets, keys, positions = next(self.train_iter)
            last = json.loads(positions[-1])   # a batch comes from one reader
            self.positions[last["reader"]] = positions[-1]
            if keys_file:
                keys_file.write("".join(f"{step} {k}\n" for k in keys))
            tokens, targets = tokens.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            loss, loss_image = self.losses(tokens, targets)
            total = loss + loss_image if loss_image is not None else loss
            (total / self.accum).backward()
            loss_sum += loss.item() / self.accum
            image_sum += loss_image.item() / self.accum if loss_image is not None else 0.0
            tokens_seen += self.world * (tokens.numel() + (tokens[:, :self.n0].numel() if self.joint else 0))
        all_reduce_mean([p.grad for p in self.params if p.grad is not None], self.world)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return loss_sum, image_sum, tokens_seen

    def keys_file(self):
        """With record_keys, RUN/keys/rank{R}.txt, cut back to the resumed step."""
        if not self.config.record_keys:
            return None
        (self.run / "keys").mkdir(exist_ok=True)
        path = self.run / "keys" / f"rank{self.rank}.txt"
        if self.resumed:
            truncate_jsonl(path, self.start_step, key=lambda line: int(line.split()[0]))
        return open(path, "a" if self.resumed else "w", encoding="utf-8")

    def agreed_stop(self, elapsed: float) -> bool:
        """Whether max_minutes has run out; with several ranks, rank 0's schedule and verdict for all."""
        out_of_time = self.config.max_minutes is not None and elapsed >= self.config.max_minutes * 60
        if self.world > 1 and self.config.max_minutes is not None:
            flags = torch.tensor([float(self.schedule.horizon), float(out_of_time)], device=self.device)
            dist.broadcast(flags, 0)
            self.schedule.horizon, out_of_time = int(flags[0].item()), bool(flags[1].item())
        return out_of_time

    def loop(self) -> dict:
        config = self.config
        keys_file, log_file = self.keys_file(), open(self.run / "log.jsonl", "a", encoding="utf-8") if self.master else None
        progress = {"step": self.start_step, "stopped_by": "steps", "val": {}, "ckpt": None, "recent": [],
                    "first_loss": None, "tokens_seen": 0}
        self.model.train()
        t0 = time.time() - self.seconds_before
        completed = False
        try:
            for step in range(self.start_step + 1, config.steps + 1):
                progress["step"] = step
                if config.max_minutes is not None and step > self.start_step + 10:
                    per_step = (time.time() - t0 - self.seconds_before) / (step - 1 - self.start_step)
                    left = config.max_minutes * 60 - (time.time() - t0)
                    self.schedule.horizon = min(config.steps, max(step, int(step - 1 + left / per_step)))
                lr = self.schedule.lr_at(step - 1)
                loss, image_loss, tokens = self.optimizer_step(step, lr, keys_file)
                progress["tokens_seen"] += tokens
                progress["first_loss"] = progress["first_loss"] if progress["first_loss"] is not None else loss
                progress["recent"] = (progress["recent"] + [loss])[-config.log_interval:]
                elapsed = time.time() - t0
                out_of_time = self.agreed_stop(elapsed)
                self.report(step, step == config.steps or out_of_time, lr, loss, image_loss, elapsed, progress,
                            log_file)
                if out_of_time:
                    progress["stopped_by"] = "max_minutes"
                    break
            completed = True
        finally:
            for f in (log_file, keys_file):
                if f:
                    f.close()
            if self.joined:
                # rank 0 is still writing its last checkpoint when the others are done; tearing gloo down under
                # a peer that has not arrived aborted a rank now and then ("terminate called without an active
                # exception"), so all ranks meet first. Not after an exception: the others might never arrive.
                if completed:
                    dist.barrier()
                dist.destroy_process_group()
        return progress

    def report(self, step, last, lr, loss, image_loss, elapsed, progress, log_file) -> None:
        """Log, evaluate and checkpoint at their intervals and at the last step."""
        config = self.config

        def record(entry: dict) -> None:
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()

        if step % config.log_interval == 0 or step == 1 or last:
            entry = {"step": step, "loss": round(loss, 5), "lr": lr, "seconds": round(elapsed, 2),
                     "tokens_per_s": round(progress["tokens_seen"] / max(elapsed - self.seconds_before, 1e-9))}
            if self.joint:
                entry["loss_image"] = round(image_loss, 5)
            record(entry)
            self.log(f"step {step:6d} loss {loss:.4f}" + (f" (image {image_loss:.4f})" if self.joint else "")
                     + f" lr {lr:.2e} {entry['tokens_per_s']} tok/s {elapsed:.0f}s")
        if step % config.eval_interval == 0 or last:
            progress["val"] = self.evaluate()
            record({"step": step, "eval": self.eval_split, **progress["val"]})
            self.log(f"step {step:6d} eval ({self.eval_split}) "
                     + " ".join(f"{k} {v:.4f}" for k, v in progress["val"].items() if v is not None))
        if step % config.ckpt_interval == 0 or last:
            recent = progress["recent"]
            progress["ckpt"] = self.checkpoint(step, sum(recent) / len(recent), progress["val"], elapsed)

    def summary(self, progress: dict, seconds: float, cpu_seconds: float) -> dict:
        recent = progress["recent"]
        return {"phase": self.config.phase, "steps": progress["step"], "stopped_by": progress["stopped_by"],
                "seconds": round(seconds, 1),
                # CPU time of this process (all its threads): on a shared machine, what the run really cost
                "cpu_seconds": round(cpu_seconds, 1), "lr": self.schedule.base_lr,
                "resumed_from": self.start_step if self.resumed else None,
                "first_loss": progress["first_loss"], "train_loss": sum(recent) / len(recent) if recent else None,
                **progress["val"], "eval_split": self.eval_split,
                "tokens_per_s": round(progress["tokens_seen"] / max(seconds - self.seconds_before, 1e-9)),
                "params": self.model.get_num_params(),
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "freeze_base": self.freeze, "joint_image": self.joint, "device": str(self.device),
                "autocast": "bfloat16" if self.use_amp else None, "world_size": self.world,
                "grad_accum": self.accum, "global_batch": self.world * self.config.batch_size * self.accum,
                "samples_seen": self.train_stream.seen, "skipped": dict(self.train_stream.skipped),
                # samples this run decoded (in process; DataLoader workers count their own): a resumed run
                # decodes none that came before its position
                "samples_decoded": len(self.train_stream.decoded_keys) if not self.config.num_workers else None,
                "eval_captions_cut": round(self.cut_share, 4),
                "ckpt": str(self.run / progress["ckpt"]) if progress["ckpt"] else None, "tokenizers": {
                    kind: relative_to(spec, str(self.run)) for kind, spec in (self.tokenizer_specs or {}).items()}}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train(dataset_dir: str | os.PathLike | list, out_dir: str | os.PathLike, config: TrainConfig | None = None,
          log: Callable[[str], None] | None = print, resume: bool = False, overwrite: bool = False) -> dict:
    """Train on DATASET's shards into RUN; returns {"train_loss", "val_loss", "steps", "seconds",
    "tokens_per_s", "params", "trainable_params", "phase", "ckpt", ...}.

    resume: continue RUN from its latest checkpoint (model, optimizer, schedule, step, RNG, data
    position) with the configuration saved there (`device` and `num_workers` of `config` still apply);
    a RUN without a checkpoint starts afresh."""
    folder = RunFolder(out_dir)
    master = int(os.environ.get("RANK", "0")) == 0
    if resume and folder.remote and folder.has_checkpoint():
        folder.pull()   # the latest checkpoint, its log, keys and tokenizers, into the working copy
    elif not resume and master:   # only rank 0 writes the run's files
        folder.claim(overwrite)
    config, state = resumed_config(config or TrainConfig(), folder.local, resume)
    config = config.with_phase_defaults()
    config.validate()
    cpu0 = cpu_seconds()
    datasets = [str(d) for d in dataset_dir] if isinstance(dataset_dir, (list, tuple)) else [str(dataset_dir)]
    if config.weights and len(config.weights) != len(datasets):
        raise ClipforgeError(f"{len(config.weights)} weights for {len(datasets)} dataset(s)")
    training = TrainingRun(datasets, folder, config, state, log or (lambda msg: None))
    t0 = time.time() - training.seconds_before
    progress = training.loop()
    summary = training.summary(progress, time.time() - t0, cpu_seconds() - cpu0)
    if training.master:
        write_json(folder.local / "summary.json", summary)
        folder.publish_file("summary.json")
    return summary
