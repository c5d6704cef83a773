"""`--config FILE` for every command: a TOML or YAML table whose keys mirror the flags (dashes or
underscores), applied as the command's defaults so that flags on the command line win."""
from __future__ import annotations

import argparse
from pathlib import Path
from clipforge.pipeline.errors import ClipforgeError


def load_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:   # a multi-line report with the offending text: one line of it
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ClipforgeError(f"not valid YAML{where}: {getattr(err, 'problem', None) or type(err).__name__}") from None
    else:
        try:
            import tomllib                  # Python 3.11+
        except ModuleNotFoundError:         # Python 3.10: the same parser, packaged as tomli
            import tomli as tomllib
        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ClipforgeError(f"{path}: expected a table of flag = value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The subparser that will handle argv (to apply --config defaults to it)."""
    for action in parser._actions:   # argparse has no public walk of subparsers
        if isinstance(action, argparse._SubParsersAction):
            for i, token in enumerate(argv):
                if token in action.choices:
                    return leaf_parser(action.choices[token], argv[i + 1:])
    return parser


def find_config_path(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None
