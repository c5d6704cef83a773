"""icetk's tokenizers (CogView2 / CogVideo) read from icetk's own files, without the `icetk` package.

Image: `ice_image.pt` (`{"module": state_dict}` of icetk's hierarchical VQ-VAE, 20,000 codes). Frames are
turned into icetk's input exactly as icetk does it (uint8 -> float / 255, then its per-channel mean and
standard deviation), run through `clipforge.tokenizer.icetk_net` at compression 8 (160x160 -> 20x20) or
16, and give the codes `icetk.encode(image_torch=...)` gives. float32 by default; float16 or bfloat16 run
the whole network in that type, as icetk's `fp16=True` does (codes can then differ from float32's at
near-ties, so the dtype is recorded with the dataset).

Text: `ice_text.model` (sentencepiece). Ids are the sentencepiece ids plus 20,000 (icetk's text ids
follow its image codes), exactly as `icetk.encode(text)`; `<pad>` pads and `<n>` separates the duration
("4.0秒", cogdata's prefix) from the caption.

Nothing is ever downloaded: a missing file is a one-line error naming it.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from clipforge.pipeline.errors import ClipforgeError
from clipforge.tokenizer.icetk_net import CODES, COMPRESSIONS, MEAN, STD, IceImageNetwork
from clipforge.tokenizer.image import ImageTokenizer, default_device
from clipforge.tokenizer.text import TextTokenizer

IMAGE_FILE = "ice_image.pt"
TEXT_FILE = "ice_text.model"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DURATION_UNIT = "秒"     # cogdata's duration text: f"{float(seconds)}秒"


def icetk_file(path: str | Path, name: str) -> Path:
    """`path` itself, or `path/name` when `path` is a folder (icetk keeps both files in one folder)."""
    path = Path(path).expanduser()
    found = path / name if path.is_dir() else path
    if not found.is_file():
        raise ClipforgeError(f"icetk's {name} not found at {found} (clipforge never downloads it: get it "
                             f"with the icetk package or from THUDM and pass its path)")
    return found


def required_keys(state: dict, level: int) -> list[str]:
    """The state-dict names that encoding and decoding at `level` read, absent from `state` (icetk loads
    non-strictly and would run with random tensors in their place; we refuse)."""
    with torch.device("meta"):
        names = list(IceImageNetwork().state_dict())
    needed = [k for k in names
              if k.startswith("enc.") or k in ("quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight")
              or any(k.startswith(f"down_samplers.{i}.") for i in range(level)) or k.startswith(f"decs.{2 - level}.")]
    return [k for k in needed if k not in state]


class IceImageTokenizer(ImageTokenizer):
    """`ImageTokenizer`'s API (uint8 frames <-> uint16 codes, micro-batches of fixed shape, staged copies)
    over icetk's network. Fully convolutional: any frame size that is a multiple of the compression."""

    def __init__(self, network: IceImageNetwork, sha256: str, compression: int = 8, image_size: int = 160,
                 device: str | torch.device | None = None, dtype: str = "float32", batch_size: int = 16):
        if dtype not in DTYPES:
            raise ClipforgeError(f"icetk dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if compression not in COMPRESSIONS:
            raise ClipforgeError(f"icetk compression must be one of {sorted(COMPRESSIONS)}, got {compression}")
        self.device = torch.device(device or default_device())
        self.dtype, self.batch_size, self.compression = dtype, batch_size, compression
        self.level = COMPRESSIONS[compression]
        self.channels_last = False    # icetk's own layout: NCHW contiguous, so the arithmetic is its own
        self.model = network.to(self.device, DTYPES[dtype]).eval()
        self._sha256 = sha256
        self._staging = []
        self.frame_size = image_size
        self.mean = torch.tensor(MEAN, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(STD, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    @classmethod
    def load(cls, path, device=None, dtype: str = "float32", compression: int = 8, **kwargs) -> "IceImageTokenizer":
        file = icetk_file(path, IMAGE_FILE)
        blob = file.read_bytes()
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            state = state["module"] if isinstance(state, dict) and "module" in state else state
            missing = required_keys(state, COMPRESSIONS.get(compression, 1))
            if missing:
                raise KeyError(f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
            network = IceImageNetwork()
            network.load_state_dict(state, strict=False)
        except (ValueError, TypeError, RuntimeError, KeyError, EOFError, AttributeError) as err:
            raise ClipforgeError(f"{file}: not icetk's image tokenizer ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]})") from None
        return cls(network, hashlib.sha256(blob).hexdigest(), compression=compression, device=device,
                   dtype=dtype, **kwargs)

    # --- identity -----------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return CODES

    @property
    def downsample(self) -> int:
        return self.compression

    @property
    def image_size(self) -> int:
        return self.frame_size

    @property
    def tokens_hw(self) -> tuple[int, int]:
        side = self.image_size // self.compression
        return side, side

    @property
    def tokenizer_id(self) -> str:
        return f"icetk-image-c{self.compression}-{self.sha256[:12]}"

    def fit_size(self, size: int) -> None:
        if size % self.compression:
            raise ClipforgeError(f"icetk at compression {self.compression} needs a frame size that is a "
                                 f"multiple of {self.compression}, not {size}")
        self.frame_size = size

    def save(self, directory) -> None:
        raise ClipforgeError("icetk's tokenizer is read from its own file, never written by clipforge")

    # --- encode / decode ----------------------------------------------------------------------------
    def codes_from_device_frames(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) on the device -> int64 codes (B, h, w), icetk's normalisation included."""
        x = x.permute(0, 3, 1, 2).float().contiguous() / 255.0      # icetk's image_torch, in [0, 1]
        x = (x - self.mean) / self.std                              # torchvision's Normalize: sub, then div
        return self.model.encode(x.to(DTYPES[self.dtype]), self.level)

    def frames_from_device_codes(self, codes: torch.Tensor) -> np.ndarray:
        y = self.model.decode(codes, self.level).float() * self.std + self.mean   # back to [0, 1]
        y = (y.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return y.permute(0, 2, 3, 1).cpu().numpy()


class IceTextTokenizer(TextTokenizer):
    """icetk's text ids: sentencepiece ids of `ice_text.model` offset by the 20,000 image codes."""

    offset = CODES

    def __init__(self, path):
        file = icetk_file(path, TEXT_FILE)
        self.path = file
        blob = file.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=blob)
        except (RuntimeError, OSError, ValueError) as err:
            raise ClipforgeError(f"{file} is not a sentencepiece model ({' '.join(str(err).split())[:160]})") from None
        pieces = {name: self.sp.piece_to_id(name) for name in ("<pad>", "<n>")}
        absent = [name for name, i in pieces.items() if i == self.sp.unk_id()]
        if absent:
            raise ClipforgeError(f"{file}: not icetk's text model (no {' or '.join(absent)} piece)")
        self.vocab_size = self.offset + self.sp.get_piece_size()     # icetk's num_tokens
        self.pad_id, self.sep_id = pieces["<pad>"] + self.offset, pieces["<n>"] + self.offset
        self.unk_id = self.sp.unk_id() + self.offset
        self.bos_id = self.eos_id = self.boi_id = -1                   # icetk's text has none of ours

    @property
    def tokenizer_id(self) -> str:
        return f"icetk-text-{self.sp.get_piece_size()}-{self.sha256[:12]}"

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self.sp.encode(text, out_type=int)]

    def decode(self, ids) -> str:
        keep = [int(i) - self.offset for i in ids if int(i) >= self.offset and int(i) not in (self.pad_id, self.sep_id)]
        return self.sp.decode(keep)

    def span_prefix(self, span_seconds: float) -> list[int]:
        """cogdata's duration text ("4.0秒") and `<n>`."""
        return self.encode(duration_text(span_seconds)) + [self.sep_id]


def duration_text(seconds: float) -> str:
    return f"{float(seconds)}{DURATION_UNIT}"
