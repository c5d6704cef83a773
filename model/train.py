"""Train the CogVideo-style model on a built dataset: one explicit loop, like nanoGPT's train.py.

    train(DATASET, RUN, TrainConfig(stage="sequential", steps=2000, max_minutes=3))
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

Stages (SPEC §1): "image" trains the base text-to-image model (text + frame 0); "sequential" and
"interpolation" train the video model. Starting from an image-stage run (`init_from`), attention-plus
is re-initialised from the base channel and only attention-plus, the mix vectors and the new position
tables train (`freeze_base`, on by default then). Without an image-stage run everything trains, and
`joint_image` adds the image-stage loss (text + frame 0, base channel alone) to every step, so that the
base channel can draw frame 0 at sampling time; it is on by default whenever the base trains.

Data parallel (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): every rank reads its own share of the data
(model/data.py), gradients are averaged across ranks before each optimizer step, rank 0 writes the run.
One optimizer step sees batch_size * grad_accum * world_size samples (`global_batch` sets grad_accum).
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from clipforge.model.distributed import (all_reduce_mean, default_device, dist_context, rng_state, uses_bf16_autocast,
                                         set_rng_state, weights_digest)
from clipforge.model.data import SequenceBuilder, ShardStream, make_loader, read_dataset_info, shard_urls, tokenizer_paths
from clipforge.model.checkpoint import (claim_run_folder, copy_tokenizers, default_spans, load_checkpoint, model_from_checkpoint,
                                        truncate_jsonl, write_json)
from clipforge.model.gpt import STAGES, CogVideo, CogVideoConfig, default_window


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sequential"          # image | sequential | interpolation
    steps: int = 2000
    max_minutes: float | None = None   # stop at `steps` or after this long, whichever comes first
    batch_size: int = 8                # per rank and micro-step
    grad_accum: int = 1                # micro-batches per optimizer step
    global_batch: int | None = None    # samples per optimizer step over all ranks (the SPEC's 416); sets
                                       # grad_accum = global_batch / (batch_size * world_size)
    lr: float | None = None            # None: 2e-4 with init_from (the SPEC's fine-tuning rate), else 1e-3
                                       # (a fresh model; after 1 min of the demo 2e-4 was at val loss 2.8,
                                       # 1e-3 at 1.2). Cosine decay with a short warmup, Adam (0.9, 0.95)
    min_lr: float | None = None        # end of the cosine; default lr / 10
    warmup_steps: int = 50             # capped at a tenth of `steps`
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1          # on matrices only (nanoGPT)
    grad_clip: float = 0.1             # SPEC: gradient clipping 0.1 (global norm); 0 disables
    eval_interval: int = 200
    eval_batches: int = 4
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2          # older ckpt_*.pt files are removed (0 keeps all)
    log_interval: int = 20
    seed: int = 0
    device: str | None = None          # default: cuda when available, else cpu
    amp: bool = True                   # bf16 autocast (no loss scaling needed) on cuda and on cpus with
                                       # native bf16 (distributed.uses_bf16_autocast); float32 elsewhere
    grad_checkpoint: bool = False      # activation checkpointing (SPEC), trades compute for memory
    init_from: str | None = None       # a RUN directory to start from (e.g. an image-stage run)
    freeze_base: bool | None = None    # None: True when init_from is an image-stage run and stage != image
    joint_image: bool | None = None    # None: True when the base trains (not frozen) and stage != image
    cond_drop: float = 0.1             # caption dropout, for classifier-free guidance
    clip_modes: list | None = None     # only samples whose meta "mode" is listed (None: all)
    holdout: float = 0.05              # fraction of source videos held out when there are no val shards
    shuffle_buffer: int = 256
    num_workers: int = 0
    record_keys: bool = False          # write RUN/keys/rank{R}.txt: which sample each rank trained on, when
    image_tokenizer: str | None = None # the tokenizers the dataset was built with, when dataset.json does not
    text_tokenizer: str | None = None  # name their paths (checked against its sha256 either way)
    # model shape, for a fresh model (with init_from the model comes from that run)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float | None = None       # residual and MLP dropout; None: 0.1 for a fresh model (on the demo's ~80
                                       # clips: val loss 1.28 vs 1.85 without, after 800 steps), the init run's
                                       # with init_from. A value also replaces the init run's: a training choice
    window: int | None = None          # default: half the grid side (10 on 20x20, as in the SPEC)
    shift: int | None = None           # default: half the window
    grid_rope: bool = True             # 2D rotary embeddings of the code grid in every attention (layout.grid_rotary)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")


# ----------------------------------------------------------------------------------------------------
# checkpoints


def config_from_checkpoint(ckpt: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known})


# ----------------------------------------------------------------------------------------------------
# the loop


def train(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig | None = None,
          log: Callable[[str], None] | None = print, resume: bool = False, overwrite: bool = False) -> dict:
    """Train on DATASET's shards into RUN; returns {"train_loss", "val_loss", "steps", "seconds",
    "tokens_per_s", "params", "trainable_params", "stage", "ckpt", ...}.

    resume: continue RUN from its latest checkpoint (model, optimizer, schedule, step, RNG, data
    position) with the configuration saved there (`device` and `num_workers` of `config` still apply);
    a RUN without a checkpoint starts afresh."""
    from clipforge.tokenizer.image import ImageTokenizer
    from clipforge.tokenizer.text import TextTokenizer

    config = config or TrainConfig()
    run = Path(out_dir)
    state = None
    if resume and (run / "latest.json").exists():
        state = load_checkpoint(run)
        config = TrainConfig(**{**asdict(config_from_checkpoint(state)), "device": config.device,
                                "num_workers": config.num_workers})
        config = replace(config, image_tokenizer=config.image_tokenizer or str(run / "tokenizers" / "image"),
                         text_tokenizer=config.text_tokenizer or str(run / "tokenizers" / "text.model"))
    config.validate()
    rank, world, device, joined = dist_context(config.device)
    master = rank == 0
    if master and not resume:   # only rank 0 writes the run's files
        claim_run_folder(run, overwrite)
    log = (log or (lambda msg: None)) if master else (lambda msg: None)
    torch.manual_seed(config.seed + rank)  # dropout differs between ranks, as it would with more data
    run.mkdir(parents=True, exist_ok=True)
    accum = config.grad_accum
    if config.global_batch:
        accum, rest = divmod(config.global_batch, config.batch_size * world)
        if rest or accum < 1:
            raise ValueError(f"global_batch {config.global_batch} is not a multiple of batch_size "
                             f"{config.batch_size} x {world} rank(s)")

    # --- data and tokenizers ------------------------------------------------------------------------
    info = read_dataset_info(dataset_dir)
    lay = info["layout"]
    tok_paths = tokenizer_paths(dataset_dir, info, config.image_tokenizer, config.text_tokenizer)
    text = TextTokenizer(tok_paths["text"])
    image = ImageTokenizer.load(tok_paths["image"])
    if (image.tokens_hw[0], image.tokens_hw[1]) != (lay["tokens_h"], lay["tokens_w"]):
        raise ValueError(f"image tokenizer gives {image.tokens_hw} codes, the dataset layout "
                         f"{lay['tokens_h']}x{lay['tokens_w']}")

    # --- model ----------------------------------------------------------------------------------------
    stages_done: list[str] = []
    init_stage = None
    if state is not None:
        model = model_from_checkpoint(state)
        mc = model.config
        stages_done = list(state["stages"])
        if state.get("world_size", 1) != world:
            raise ValueError(f"{run} was trained on {state.get('world_size', 1)} rank(s); resume it on as many "
                             f"(the data position is per rank), not {world}")
        log(f"resume {run} at step {state['step']}")
    elif config.init_from:
        ckpt = load_checkpoint(config.init_from)
        if config.dropout is not None:
            ckpt["model_config"] = {**ckpt["model_config"], "dropout": config.dropout}
        model = model_from_checkpoint(ckpt)
        init_stage, stages_done = ckpt["stage"], list(ckpt.get("stages", [ckpt["stage"]]))
        mc = model.config
        if init_stage == "image" and config.stage != "image":
            model.init_plus_from_base()  # SPEC: attention-plus starts as a copy of the trained base
        log(f"init from {config.init_from} (stage {init_stage}, step {ckpt['step']})")
    else:
        window = config.window or default_window(lay["tokens_h"], lay["tokens_w"])[0]
        shift = config.shift if config.shift is not None else window // 2
        mc = CogVideoConfig(text_vocab=text.vocab_size, image_vocab=image.codebook_size, n_layer=config.n_layer,
                            n_head=config.n_head, n_embd=config.n_embd,
                            dropout=0.1 if config.dropout is None else config.dropout,
                            text_slot=lay["text_slot"], frames=lay["frames"], tokens_h=lay["tokens_h"],
                            tokens_w=lay["tokens_w"], window=window, shift=shift, grid_rope=config.grid_rope)
        model = CogVideo(mc)
    want = (text.vocab_size, image.codebook_size, lay["text_slot"], lay["frames"], lay["tokens_h"], lay["tokens_w"])
    have = mc.token_layout
    if want != have:
        raise ValueError(f"{state and run or config.init_from} was trained for (text_vocab, image_vocab, text_slot, "
                         f"frames, tokens_h, tokens_w) = {have}, this dataset has {want}")
    if state is not None:
        freeze, joint = state["freeze_base"], state["joint_image"]
    else:
        freeze = config.freeze_base if config.freeze_base is not None else (
            init_stage == "image" and config.stage != "image")
        joint = config.joint_image if config.joint_image is not None else (not freeze and config.stage != "image")
    model.freeze_base(freeze)
    model.gradient_checkpointing = config.grad_checkpoint
    model.to(device)
    if world > 1 and state is None:  # every rank starts from rank 0's weights
        for p in model.state_dict().values():
            dist.broadcast(p, 0)
    n_params = model.get_num_params()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    use_amp = uses_bf16_autocast(device, config.amp)
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; stage {config.stage}, "
        f"sequence {mc.seq_len(config.stage)} tokens, freeze_base={freeze}, joint_image={joint}, device {device}"
        f"{' (bf16 autocast)' if use_amp else ''}, "
        f"{world} rank(s) x {config.batch_size} x {accum} accumulation = {world * config.batch_size * accum} per step")

    tokenizers = copy_tokenizers(tok_paths, run) if master else None
    builder = SequenceBuilder(mc, text, config.stage)
    train_urls, val_urls = shard_urls(dataset_dir, "train"), shard_urls(dataset_dir, "val")
    if not train_urls:
        raise FileNotFoundError(f"{dataset_dir}: no shards/train-*.tar")
    modes = tuple(config.clip_modes) if config.clip_modes else None
    holdout = 0.0 if val_urls else config.holdout
    train_stream = ShardStream(train_urls, builder, shuffle=True, repeat=True, seed=config.seed,
                               buffer=config.shuffle_buffer, cond_drop=config.cond_drop, holdout=holdout,
                               holdout_side="exclude", modes=modes, rank=rank, world_size=world)
    start_step = state["step"] if state is not None else 0
    train_stream.resume_at(start_step * accum, config.batch_size)
    val_stream = ShardStream(val_urls or train_urls, builder, shuffle=False, repeat=False, holdout=holdout,
                             holdout_side="only" if holdout else "exclude", modes=modes)

    def eval_batches(stream):
        batches = []
        for tokens, targets, _ in make_loader(stream, config.batch_size):
            batches.append((tokens, targets))
            if len(batches) >= config.eval_batches:
                break
        return batches

    val_set = eval_batches(val_stream)
    eval_split = "val" if val_urls else "holdout"
    if not val_set:  # tiny datasets: nothing held out, evaluate on fixed training batches instead
        eval_split = "train"
        val_set = eval_batches(ShardStream(train_urls, builder, shuffle=False, repeat=False, modes=modes))
    # words past the slot never reach the model: at 24 tokens half the synthetic captions lost their direction
    cut_share = builder.captions_cut / max(1, builder.captions)
    if cut_share > 0.01:
        log(f"warning: {builder.captions_cut} of {builder.captions} evaluation captions ({cut_share:.0%}) are cut "
            f"to fit the {mc.text_slot}-token text slot; the words past it never reach the model "
            f"(build the dataset with a larger --text-slot; `clipforge audit` shows caption lengths)")
    train_iter = iter(make_loader(train_stream, config.batch_size, config.num_workers))

    # --- optimizer and schedule -------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = config.lr if config.lr is not None else (2e-4 if config.init_from else 1e-3)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},  # nanoGPT:
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]                  # no decay on
    fused = device.type == "cuda"                                                                  # biases, norms
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(config.beta1, config.beta2),
                                  **({"fused": True} if fused else {}))
    min_lr = config.min_lr if config.min_lr is not None else base_lr / 10
    warmup = max(1, min(config.warmup_steps, config.steps // 10))

    def lr_at(step, horizon):
        if step < warmup:
            return base_lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, horizon - warmup))
        return min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (base_lr - min_lr)

    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_amp else nullcontext
    n0 = mc.text_slot + mc.frame_len  # text + frame 0: the image-stage prefix of every layout

    def losses(tokens, targets):
        with autocast():
            _, loss = model(tokens, targets, stage=config.stage)
            loss_image = None
            if joint:
                _, loss_image = model(tokens[:, :n0], targets[:, :n0], stage="image")
        return loss, loss_image

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        out, out_img = [], []
        for tokens, targets in val_set:
            loss, loss_image = losses(tokens.to(device), targets.to(device))
            out.append(loss.item())
            if loss_image is not None:
                out_img.append(loss_image.item())
        model.train()
        res = {"val_loss": sum(out) / len(out) if out else None}
        if out_img:
            res["val_loss_image"] = sum(out_img) / len(out_img)
        return res

    stages = stages_done + ([config.stage] if not stages_done or stages_done[-1] != config.stage else [])
    ckpts: list[Path] = []
    horizon = config.steps  # where the cosine ends; with max_minutes, re-estimated from the measured speed
    seconds_before = 0.0
    if state is not None:  # resume: everything the uninterrupted run would hold at this step
        optimizer.load_state_dict(state["optimizer"])
        horizon = state["scheduler"]["horizon"]
        seconds_before = state["seconds"]
        set_rng_state(state["rng"][rank], device)
        for path in sorted(run.glob("ckpt_*.pt")):
            if int(path.stem.split("_")[1]) > start_step:
                path.unlink()  # written by the killed run after latest.json's checkpoint
            else:
                ckpts.append(path)
        if master:
            truncate_jsonl(run / "log.jsonl", start_step)
    keys_file = None
    if config.record_keys:
        (run / "keys").mkdir(exist_ok=True)
        keys_path = run / "keys" / f"rank{rank}.txt"
        if state is not None:
            truncate_jsonl(keys_path, start_step, key=lambda line: int(line.split()[0]))
        keys_file = open(keys_path, "a" if state is not None else "w", encoding="utf-8")
    log_file = open(run / "log.jsonl", "a", encoding="utf-8") if master else None

    def record(entry: dict) -> None:
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    def checkpoint(step: int, train_loss: float, val: dict, seconds: float) -> str:
        # every rank's RNG (ranks draw different dropout masks) and a digest of its weights, which must
        # agree on all ranks; collective, so all ranks call this
        mine = (rng_state(device), weights_digest(model))
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        rngs, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        if len(set(digests)) > 1:
            raise RuntimeError(f"data-parallel ranks hold different weights at step {step}: {digests}")
        name = f"ckpt_{step:06d}.pt"
        if not master:
            return name
        spans = default_spans(train_stream.spans)
        blob = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "model_config": mc.to_dict(), "train_config": asdict(config), "step": step,
                "stage": config.stage, "stages": stages, "train_loss": train_loss,
                "val_loss": val.get("val_loss"), "spans": {k: float(v) for k, v in spans.items()},
                "dataset": str(Path(dataset_dir).resolve()),
                "optimizer": optimizer.state_dict(), "scheduler": {"horizon": horizon, "warmup": warmup,
                                                                   "base_lr": base_lr, "min_lr": min_lr},
                "rng": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()} for r in rngs],
                "data": {"batches_per_rank": step * accum, "batch_size": config.batch_size},
                "seconds": seconds, "world_size": world, "rank_weights_sha256": digests,
                "freeze_base": freeze, "joint_image": joint}
        with open(run / (name + ".tmp"), "wb") as f:   # fsynced before the rename that publishes it
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(run / (name + ".tmp"), run / name)
        write_json(run / "latest.json", {
            "ckpt": name, "step": step, "stage": config.stage, "stages": stages, "train_loss": train_loss,
            **val, "eval_split": eval_split, "seconds": round(seconds, 1), "default_span": spans,
            "dataset": str(Path(dataset_dir).resolve()),
            "model_config": mc.to_dict(), "train_config": asdict(config), "tokenizers": {
                "image": {"id": image.tokenizer_id, "sha256": image.sha256, "path": "tokenizers/image"},
                "text": {"id": text.tokenizer_id, "sha256": text.sha256, "path": "tokenizers/text.model"}}})
        if run / name not in ckpts:
            ckpts.append(run / name)
        while config.keep_checkpoints and len(ckpts) > config.keep_checkpoints:
            ckpts.pop(0).unlink(missing_ok=True)
        return name

    # --- loop -------------------------------------------------------------------------------------------
    model.train()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.time() - seconds_before
    tokens_seen = 0
    recent: list[float] = []
    first_loss = None
    val = {}
    ckpt_name = None
    step = start_step
    stop_reason = "steps"
    completed = False
    try:
        for step in range(start_step + 1, config.steps + 1):
            if config.max_minutes is not None and step > start_step + 10:
                per_step = (time.time() - t0 - seconds_before) / (step - 1 - start_step)
                left = config.max_minutes * 60 - (time.time() - t0)
                horizon = min(config.steps, max(step, int(step - 1 + left / per_step)))
            lr = lr_at(step - 1, horizon)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum, image_sum = 0.0, 0.0
            for _ in range(accum):
                tokens, targets, keys = next(train_iter)
                if keys_file:
                    keys_file.write("".join(f"{step} {k}\n" for k in keys))
                tokens, targets = tokens.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                loss, loss_image = losses(tokens, targets)
                total = loss + loss_image if loss_image is not None else loss
                (total / accum).backward()
                loss_sum += loss.item() / accum
                image_sum += loss_image.item() / accum if loss_image is not None else 0.0
                tokens_seen += world * (tokens.numel() + (tokens[:, :n0].numel() if joint else 0))
            all_reduce_mean([p.grad for p in params if p.grad is not None], world)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            first_loss = first_loss if first_loss is not None else loss_sum
            recent = (recent + [loss_sum])[-config.log_interval:]
            elapsed = time.time() - t0
            out_of_time = config.max_minutes is not None and elapsed >= config.max_minutes * 60
            if world > 1 and config.max_minutes is not None:  # ranks must agree on the schedule and the stop
                flags = torch.tensor([float(horizon), float(out_of_time)], device=device)
                dist.broadcast(flags, 0)
                horizon, out_of_time = int(flags[0].item()), bool(flags[1].item())
            last = step == config.steps or out_of_time
            if step % config.log_interval == 0 or step == 1 or last:
                entry = {"step": step, "loss": round(loss_sum, 5), "lr": lr, "seconds": round(elapsed, 2),
                         "tokens_per_s": round(tokens_seen / max(elapsed - seconds_before, 1e-9))}
                if joint:
                    entry["loss_image"] = round(image_sum, 5)
                record(entry)
                log(f"step {step:6d} loss {loss_sum:.4f}" + (f" (image {image_sum:.4f})" if joint else "")
                    + f" lr {lr:.2e} {entry['tokens_per_s']} tok/s {elapsed:.0f}s")
            if step % config.eval_interval == 0 or last:
                val = evaluate()
                record({"step": step, "eval": eval_split, **val})
                log(f"step {step:6d} eval ({eval_split}) "
                    + " ".join(f"{k} {v:.4f}" for k, v in val.items() if v is not None))
            if step % config.ckpt_interval == 0 or last:
                ckpt_name = checkpoint(step, sum(recent) / len(recent), val, time.time() - t0)
            if out_of_time:
                stop_reason = "max_minutes"
                break
        completed = True
    finally:
        for f in (log_file, keys_file):
            if f:
                f.close()
        if joined:
            # rank 0 is still writing its last checkpoint when the others are done; tearing gloo down under
            # a peer that has not arrived aborted a rank now and then ("terminate called without an active
            # exception"), so all ranks meet first. Not after an exception: the others might never arrive.
            if completed:
                dist.barrier()
            dist.destroy_process_group()
    seconds = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"stage": config.stage, "steps": step, "stopped_by": stop_reason, "seconds": round(seconds, 1),
               # CPU time of this process (all its threads): on a shared machine, what the run really cost
               "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu0, 1),
               "lr": base_lr, "resumed_from": start_step if state is not None else None,
               "first_loss": first_loss, "train_loss": sum(recent) / len(recent) if recent else None, **val,
               "eval_split": eval_split,
               "tokens_per_s": round(tokens_seen / max(seconds - seconds_before, 1e-9)), "params": n_params,
               "trainable_params": n_train, "freeze_base": freeze, "joint_image": joint, "device": str(device),
               "autocast": "bfloat16" if use_amp else None,
               "world_size": world, "grad_accum": accum, "global_batch": world * config.batch_size * accum,
               "samples_seen": train_stream.seen, "skipped": dict(train_stream.skipped),
               "eval_captions_cut": round(cut_share, 4),
               "ckpt": str(run / ckpt_name) if ckpt_name else None, "tokenizers": tokenizers}
    if master:
        write_json(run / "summary.json", summary)
    return summary
