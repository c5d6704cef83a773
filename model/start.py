"""Where a training run starts: its configuration (a resumed run's own), the dataset's tokenizers checked
against its layout, and the model (a resumed checkpoint, another run's via `init_from`, or a fresh one).
"""
from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

from clipforge.model.checkpoint import load_checkpoint, model_from_checkpoint
from clipforge.model.config import CogVideoConfig, TrainConfig, default_window
from clipforge.model.data import open_pinned_tokenizers, read_dataset_info
from clipforge.model.gpt import CogVideo
from clipforge.pipeline.errors import ClipforgeError


def config_from_checkpoint(ckpt: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known})


def resumed_config(config: TrainConfig, run: Path, resume: bool) -> tuple[TrainConfig, dict | None]:
    """(configuration, checkpoint): with `resume` and a checkpoint in RUN, the configuration saved there
    (only `device` and `num_workers` of `config` still apply) and the checkpoint itself."""
    if not (resume and (run / "latest.json").exists()):
        return config, None
    state = load_checkpoint(run)
    saved = TrainConfig(**{**asdict(config_from_checkpoint(state)), "device": config.device,
                           "num_workers": config.num_workers})
    specs = run_tokenizer_specs(run)
    return replace(saved, image_tokenizer=saved.image_tokenizer or specs["image"],
                   text_tokenizer=saved.text_tokenizer or specs["text"]), state


def run_tokenizer_specs(run: Path) -> dict:
    """{"image": spec, "text": spec} of a run's own copies of its tokenizers (latest.json names them;
    runs before icetk support keep them at tokenizers/image and tokenizers/text.model)."""
    import json

    from clipforge.tokenizer.sources import relative_to

    recorded = {}
    if (run / "latest.json").exists():
        recorded = json.loads((run / "latest.json").read_text(encoding="utf-8")).get("tokenizers") or {}
    defaults = {"image": "tokenizers/image", "text": "tokenizers/text.model"}
    return {kind: relative_to((recorded.get(kind) or {}).get("path") or defaults[kind], str(run)) for kind in defaults}


def accumulation_steps(config: TrainConfig, world: int) -> int:
    if not config.global_batch:
        return config.grad_accum
    accum, rest = divmod(config.global_batch, config.batch_size * world)
    if rest or accum < 1:
        raise ClipforgeError(f"global_batch {config.global_batch} is not a multiple of batch_size "
                             f"{config.batch_size} x {world} rank(s)")
    return accum


def dataset_tokenizers(datasets: list, config: TrainConfig):
    """(layout, tokenizer paths, text tokenizer, image tokenizer) of the datasets, checked against their
    layout: several datasets (a mixture) must share one layout and one pair of tokenizers."""
    infos = [read_dataset_info(d) for d in datasets]
    layout = infos[0]["layout"]
    for other, info in zip(datasets[1:], infos[1:]):
        hashes = [{k: (i.get("tokenizers") or {}).get(k, {}).get("sha256") for k in ("image", "text")}
                  for i in (infos[0], info)]
        if info["layout"] != layout or hashes[0] != hashes[1]:
            raise ClipforgeError(f"{other} and {datasets[0]} differ in layout or tokenizers: a mixture needs "
                                 f"datasets of one token space")
    dataset_dir = datasets[0]
    paths, opened = open_pinned_tokenizers(dataset_dir, infos[0], config.image_tokenizer, config.text_tokenizer)
    text, image = opened["text"], opened["image"]
    if layout.get("frame_size"):
        image.fit_size(layout["frame_size"])
    if (image.tokens_hw[0], image.tokens_hw[1]) != (layout["tokens_h"], layout["tokens_w"]):
        raise ClipforgeError(f"image tokenizer gives {image.tokens_hw} codes, the dataset layout "
                             f"{layout['tokens_h']}x{layout['tokens_w']}")
    return layout, paths, text, image


def starting_model(config: TrainConfig, state: dict | None, layout: dict, text, image, world: int, run: Path,
                   log) -> tuple[CogVideo, list[str], str | None]:
    """(model, phases it was trained for so far, the phase of the run it starts from): a resumed run's,
    an `init_from` run's (attention-plus re-initialised from an image-phase base), or a fresh model."""
    if state is not None:
        if state.get("world_size", 1) != world:
            raise ClipforgeError(f"{run} was trained on {state.get('world_size', 1)} rank(s); resume it on as "
                                 f"many (the data position is per rank), not {world}")
        log(f"resume {run} at step {state['step']}")
        model, done, init_phase = model_from_checkpoint(state), list(state["phases"]), None
    elif config.init_from:
        ckpt = load_checkpoint(config.init_from)
        ckpt["model_config"] = {**ckpt["model_config"], "dropout": config.dropout}
        model = model_from_checkpoint(ckpt)
        init_phase, done = ckpt["phase"], list(ckpt.get("phases", [ckpt["phase"]]))
        if init_phase == "image" and config.phase != "image":
            model.init_plus_from_base()  # as in CogVideo: attention-plus starts as a copy of the trained base
        log(f"init from {config.init_from} (phase {init_phase}, step {ckpt['step']})")
    else:
        window = config.window or default_window(layout["tokens_h"], layout["tokens_w"])[0]
        shift = config.shift if config.shift is not None else window // 2
        model = CogVideo(CogVideoConfig(
            text_vocab=text.vocab_size, image_vocab=image.codebook_size, n_layer=config.n_layer,
            n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
            text_slot=layout["text_slot"], frames=layout["frames"], tokens_h=layout["tokens_h"],
            tokens_w=layout["tokens_w"], window=window, shift=shift, grid_rope=config.grid_rope))
        done, init_phase = [], None
    want = (text.vocab_size, image.codebook_size, layout["text_slot"], layout["frames"], layout["tokens_h"],
            layout["tokens_w"])
    if want != model.config.token_layout:
        raise ClipforgeError(f"{state and run or config.init_from} was trained for (text_vocab, image_vocab, "
                             f"text_slot, frames, tokens_h, tokens_w) = {model.config.token_layout}, this "
                             f"dataset has {want}")
    return model, done, init_phase


def what_trains(config: TrainConfig, state: dict | None, init_phase: str | None) -> tuple[bool, bool]:
    """(freeze_base, joint_image): a resumed run keeps its own; the defaults: model/train.py's docstring."""
    if state is not None:
        return state["freeze_base"], state["joint_image"]
    freeze = bool(config.freeze_base)
    joint = config.joint_image if config.joint_image is not None else (
        not freeze and config.phase != "image" and init_phase != "image")
    return freeze, joint
