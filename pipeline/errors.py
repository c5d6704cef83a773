"""The two kinds of expected failure:

- `ClipforgeError`: a user's mistake (a wrong path, a file of the wrong kind, a refused setting), said in
  one line by the CLI. Anything else that escapes a command is a bug and keeps its traceback.
- `InputFailure`: one input (a video, its fetch) cannot be used; its `reason` (one of schema.REASONS)
  goes to the ledger and the build goes on.
"""
from __future__ import annotations


class ClipforgeError(ValueError):
    """A mistake in what the user gave; its message is one line that names the file or setting.
    (A ValueError too, so callers that caught ValueError before keep working.)"""


class InputFailure(Exception):
    """An expected failure of one input, not of our code: `reason` is one of schema.REASONS and becomes the
    input's ledger row. Fetching (`FetchError`) and decoding (`DecodeFailure`) raise subclasses."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
