"""The model's configuration (vocabularies, shape, token geometry), the training phases, and the
configurations of training and sampling: every default of `train` and `sample` is defined here.

A sample is one sequence of L = text_slot + n_frames * (1 + h*w) tokens; which frames it holds, in which
order, and which of them carry the loss depend on the training phase (model/gpt.py says why).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from clipforge.pipeline.errors import ClipforgeError

PHASES = ("image", "sequential", "interpolation")


@dataclass(frozen=True)
class CogVideoConfig:
    text_vocab: int = 8000      # size of the text tokenizer's vocabulary
    image_vocab: int = 20000    # size of the image tokenizer's codebook
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    text_slot: int = 64         # left-padded text slot: [pad ...][span prefix][sep][caption]
    frames: int = 5
    tokens_h: int = 20
    tokens_w: int = 20
    window: int = 10            # interpolation plus-channel window (window x window codes)
    shift: int = 5              # window shift on odd layers
    grid_rope: bool = False     # rotate half of each head's query/key dims by the code's grid row and column

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.image_vocab + 1

    @property
    def boi_id(self) -> int:
        return self.text_vocab + self.image_vocab

    @property
    def token_layout(self) -> tuple:
        """(text_vocab, image_vocab, text_slot, frames, tokens_h, tokens_w): what two models must share for
        one's tokens to mean the same to the other (a run and its dataset, a run and its companion runs)."""
        return (self.text_vocab, self.image_vocab, self.text_slot, self.frames, self.tokens_h, self.tokens_w)

    @property
    def frame_len(self) -> int:  # <boi> + h*w codes
        return 1 + self.tokens_h * self.tokens_w

    def frame_order(self, phase: str) -> list[int]:
        """Frame indices in sequence order for a phase."""
        if phase == "image":
            return [0]
        if phase == "sequential":
            return list(range(self.frames))
        if phase == "interpolation":
            if self.frames % 2 == 0:
                raise ClipforgeError(f"the interpolation phase needs an odd number of frames, got {self.frames}")
            return list(range(0, self.frames, 2)) + list(range(1, self.frames, 2))
        raise ClipforgeError(f"unknown phase {phase!r}; expected one of {PHASES}")

    def loss_frames(self, phase: str) -> list[int]:
        return {"image": [0], "sequential": list(range(1, self.frames)),
                "interpolation": list(range(1, self.frames, 2))}[phase]

    def seq_len(self, phase: str) -> int:
        return self.text_slot + len(self.frame_order(phase)) * self.frame_len

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ClipforgeError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.frames < 2:
            raise ClipforgeError(f"need at least 2 frames, got {self.frames}")
        if not 0 < self.window or not 0 <= self.shift < self.window:
            raise ClipforgeError(f"need 0 <= shift < window, got window {self.window} shift {self.shift}")

    def to_dict(self) -> dict:
        return asdict(self)


def default_window(tokens_h: int, tokens_w: int) -> tuple[int, int]:
    """CogVideo's 10x10 windows, shift 5, on a 20x20 grid, scaled to other grids: half the grid side."""
    window = max(1, min(tokens_h, tokens_w) // 2)
    return window, window // 2


@dataclass(frozen=True)
class TrainConfig:
    phase: str = "sequential"          # image | sequential | interpolation
    steps: int = 2000
    max_minutes: float | None = None   # stop at `steps` or after this long, whichever comes first
    batch_size: int | None = None      # per rank and micro-step; None: 32 in the image phase, 16 in the video phases
    grad_accum: int = 1                # micro-batches per optimizer step
    global_batch: int | None = None    # samples per optimizer step over all ranks (CogVideo's 416); sets
                                       # grad_accum = global_batch / (batch_size * world_size)
    lr: float | None = None            # None: 2e-3 in the image phase, 1e-3 in the video phases, with or without
                                       # init_from. Cosine decay with a short warmup, Adam (0.9, 0.95)
    min_lr: float | None = None        # end of the cosine; default lr / 10
    warmup_steps: int = 30             # capped at a tenth of `steps`
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1          # on matrices only (nanoGPT)
    grad_clip: float = 0.1             # CogVideo's gradient clipping (global norm); 0 disables
    eval_interval: int = 200
    eval_batches: int = 4
    ckpt_interval: int = 1000
    keep_checkpoints: int = 2          # older ckpt_*.pt files are removed (0 keeps all)
    log_interval: int = 20
    seed: int = 0
    device: str | None = None          # default: cuda when available, else cpu
    amp: bool = True                   # bf16 autocast (no loss scaling needed) on cuda and on cpus with
                                       # native bf16 (distributed.uses_bf16_autocast); float32 elsewhere
    grad_checkpoint: bool = False      # activation checkpointing, trades compute for memory
    init_from: str | None = None       # a RUN directory to start from (e.g. an image-phase run)
    freeze_base: bool = False          # True: from an image-phase run, only attention-plus, the mix vectors and the
                                       # new position tables train (CogVideo's choice for CogView2's 6B weights)
    joint_image: bool | None = None    # None: on when the base trains outside the image phase and no image-phase
                                       # run (init_from) is there to draw frame 0
    cond_drop: float = 0.1             # caption dropout, for classifier-free guidance
    clip_modes: list | None = None     # only samples whose meta "mode" is listed (None: all)
    holdout: float = 0.05              # fraction of source videos held out when there are no val shards
    weights: list | None = None        # with several datasets: their shares of the samples (None: equal)
    open_shards: int = 4               # shards each reader draws samples from at once (the shuffle's reach)
    num_workers: int = 0
    record_keys: bool = False          # write RUN/keys/rank{R}.txt: which sample each rank trained on, when
    image_tokenizer: str | None = None # the tokenizers the dataset was built with, when dataset.json does not
    text_tokenizer: str | None = None  # name their paths (checked against its sha256 either way)
    # model shape, for a fresh model (with init_from the model comes from that run)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float | None = None       # residual and MLP dropout; None: 0.1 in the image phase, 0 in the video
                                       # phases. Replaces the init run's: a training choice
    window: int | None = None          # default: half the grid side (10 on 20x20, as in CogVideo)
    shift: int | None = None           # default: half the window
    grid_rope: bool = True             # 2D rotary embeddings of the code grid in every attention (sequence.grid_rotary)

    def with_phase_defaults(self) -> TrainConfig:
        """This configuration with the phase's defaults in place of None (batch size, learning rate,
        dropout). They are the measured best of the recipe at fixed step counts (docs/model.md): with
        700 image-phase and 1,300 sequential steps they take 96 held-out captions to 82-85 % all three
        attributes right, where batch 8, a frozen base at 2e-4 and dropout got 4 %."""
        image = self.phase == "image"
        return replace(self, batch_size=self.batch_size if self.batch_size is not None else (32 if image else 16),
                       lr=self.lr if self.lr is not None else (2e-3 if image else 1e-3),
                       dropout=self.dropout if self.dropout is not None else (0.1 if image else 0.0))

    def validate(self) -> None:
        if self.phase not in PHASES:
            raise ClipforgeError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ClipforgeError("steps, batch_size and grad_accum must be >= 1")


@dataclass(frozen=True)
class SamplingConfig:
    """How codes are drawn (`sample`, `eval-synth`); the defaults are the best sampler measured on the
    recipe's held-out captions (docs/model.md)."""
    seed: int = 0
    guidance: float = 2.0            # classifier-free guidance scale; 1 turns guidance off
    temperature: float = 1.0
    top_k: int | None = 64
    top_p: float | None = 0.9        # nucleus: the most probable codes holding this share of the probability
    candidates: int = 4              # videos drawn per caption; the one the caption explains best is kept


SAMPLING = SamplingConfig()
