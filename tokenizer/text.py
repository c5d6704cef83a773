"""Text tokenizer: sentencepiece over cleaned captions, with the special symbols the model needs.

The model's text slot (64 tokens in CogVideo) holds `[pad ... pad] <span> SEP caption`, left-padded; the
span prefix ("4.0 s") is built by the model from the numbers stored in each sample, so shards store the
caption ids only (`ttok`, without padding).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from clipforge.pipeline.errors import ClipforgeError

# Special pieces. `<sep>` separates the time-span prefix from the caption; `<boi>` begins each frame.
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SEP, BOI = "<sep>", "<boi>"
USER_SYMBOLS = (SEP, BOI)


class TextTokenizer:
    """encode/decode captions; special-token ids are attributes (`pad_id`, `sep_id`, `boi_id`, ...)."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ClipforgeError(f"{self.path} is not a text tokenizer file (a sentencepiece .model, as "
                                 f"`clipforge tokenizer train-text` writes)")
        blob = self.path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=blob)
        except (RuntimeError, OSError, ValueError) as err:
            raise ClipforgeError(f"{self.path} is not a sentencepiece model ({' '.join(str(err).split())[:160]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.sep_id = self.sp.piece_to_id(SEP)
        self.boi_id = self.sp.piece_to_id(BOI)
        if self.pad_id < 0 or self.sep_id == self.unk_id or self.boi_id == self.unk_id:
            raise ClipforgeError(f"{model_path}: not a clipforge text tokenizer (missing <pad>/<sep>/<boi>)")

    @property
    def tokenizer_id(self) -> str:
        return f"spm-{self.vocab_size}-{self.sha256[:12]}"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.pad_id, self.sep_id, self.boi_id, self.bos_id, self.eos_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def encode_caption(self, text: str, max_tokens: int | None = None) -> tuple[np.ndarray, bool]:
        """Caption ids as int32 and whether they were cut to `max_tokens` (the room left in the slot)."""
        ids = self.encode(text)
        cut = max_tokens is not None and len(ids) > max_tokens
        if cut:
            ids = ids[:max_tokens]
        return np.asarray(ids, dtype=np.int32), cut

    def span_prefix(self, span_seconds: float) -> list[int]:
        """Ids of the time-span prefix, e.g. "4.0 s", followed by the separator."""
        return self.encode(f"{span_seconds:.1f} s") + [self.sep_id]

    def build_slot(self, caption_ids: Iterable[int], span_seconds: float | None, slot: int) -> tuple[np.ndarray, bool]:
        """The fixed text slot: left padding, optional span prefix + separator, caption ids (cut to fit)."""
        prefix = self.span_prefix(span_seconds) if span_seconds is not None else [self.sep_id]
        room = slot - len(prefix)
        caption = list(caption_ids)
        cut = len(caption) > room
        body = prefix + caption[: max(room, 0)]
        out = np.full(slot, self.pad_id, dtype=np.int64)
        out[slot - len(body):] = body[-slot:]
        return out, cut


def train_text_tokenizer(captions: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 8000,
                         character_coverage: float = 0.9995) -> TextTokenizer:
    """Train a unigram sentencepiece model on cleaned captions and write it to `out_path`.

    `character_coverage` below 1.0 keeps rare characters out while leaving room for CJK, which needs a
    large character inventory; the vocabulary shrinks automatically on tiny corpora.
    """
    text = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    # digits, "." and "s" must exist for the span prefix even if no caption contains them
    text += [f"{s:.1f} s" for s in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    if len(text) < 8:
        raise ClipforgeError("need at least a few captions to train a text tokenizer")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in text), encoding="utf-8")
        model = io.BytesIO()
        size = vocab_size
        while True:
            try:
                spm.SentencePieceTrainer.train(
                    input=str(corpus), model_writer=model, vocab_size=size, model_type="unigram",
                    character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                    user_defined_symbols=list(USER_SYMBOLS), hard_vocab_limit=False,
                    minloglevel=2, num_threads=1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
                    byte_fallback=True)
                break
            except RuntimeError as err:
                # small corpora: the vocabulary must hold every required character plus the 256
                # byte-fallback pieces, and may not exceed what the corpus supports
                message = str(err)
                needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
                if needed and size < int(needed.group(2)) + 8:
                    size = int(needed.group(2)) + 8
                elif "too high" in message and size > 300:
                    size = max(300, size * 3 // 4)
                else:
                    raise
                model = io.BytesIO()
    tmp_out = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp_out.write_bytes(model.getvalue())
    os.replace(tmp_out, out_path)
    return TextTokenizer(out_path)
