"""`ClipforgeError`: a user's mistake (a wrong path, a file of the wrong kind, a refused setting), said in
one line by the CLI. Anything else that escapes a command is a bug and keeps its traceback."""
from __future__ import annotations


class ClipforgeError(ValueError):
    """A mistake in what the user gave; its message is one line that names the file or setting.
    (A ValueError too, so callers that caught ValueError before keep working.)"""
