"""The stage contract and the image encoder contract.

A stage is a callable over an iterator of row dicts (datatrove's `run`, webdataset's `_map`): expensive
setup in `__init__`, `__call__(rows)` yields 0, 1 or N rows per input. `Stage` declares the contract and
does the part every stage shares: an error row passes through untouched, once, and only ok rows reach
`process`. A stage that batches (`TokenizeClips`) overrides `__call__` and calls `passthrough` itself.

The build's chain of stages is made in one place, `clipforge.pipeline.chain.build_stages`.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from clipforge.pipeline.schema import is_ok


class Stage:
    """Base of every row stage. Subclasses set `name` (the ledger's `stage`) and implement `process`.

    `produces_clips` is True for the stage that turns an input into clip rows (decode): the shard
    builder counts decoded inputs after it and marks a few clips for the tokenizer's round-trip check.
    """

    name = "stage"
    produces_clips = False

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            if not is_ok(row):
                yield self.passthrough(row)
                continue
            yield from self.process(row)

    def passthrough(self, row: dict) -> dict:
        self.counts["passed_through"] += 1
        return row

    def process(self, row: dict) -> Iterator[dict]:
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters of this stage since it was made (rows in, kept, dropped by reason, ...); the shard
        builder reports each shard's share of them, and progress.json sums them (`stage_counts`)."""
        return dict(self.counts)

    @property
    def encode_settings(self) -> dict | None:
        """The image encoder's settings (dtype, device) for a stage that encodes frames; None otherwise."""
        return None

    def close(self) -> None:
        """Release what `__init__` took (a child process, a GPU)."""


@runtime_checkable
class ImageEncoder(Protocol):
    """What `TokenizeClips` needs from an image tokenizer: local (`clipforge.tokenizer.image.ImageTokenizer`)
    or remote (GPU workers, `clipforge.jobs.ray_build.RemoteImageEncoder`).

    `submit` starts encoding and returns a handle; `result` waits for it. A local encoder may do the work
    in `submit`; a remote one returns at once, so the caller keeps decoding while the GPU encodes.
    """

    tokenizer_id: str
    sha256: str

    @property
    def encode_settings(self) -> dict: ...

    def encode(self, frames: np.ndarray) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...
