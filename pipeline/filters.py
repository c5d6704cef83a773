"""A filter language that can only compare, for user expressions such as `reshard --filter`.

`rate >= 1 and caption_tokens <= 64`, `mode == "sequential"`, `decoder in ["pyav", "decord"]`,
`not caption_cut`, `1 <= span < 8`: column names, literals (numbers, strings, True, False, None, and
lists of them), comparisons, `in` / `not in`, `and` / `or` / `not`, parentheses. Nothing else is
accepted: no `@`, attribute, call, subscript, arithmetic or name that is not a column, so an expression
from a shared config file can select rows and do nothing more. (pandas' `DataFrame.query(...,
engine="python")` and `pd.eval` resolve `@name`, attribute chains and calls: a string given to them can
run any code.)

`parse_filter(text, columns)` checks an expression once and returns a `RowFilter`, whose call gives the
boolean mask of a pandas DataFrame's rows.
"""
from __future__ import annotations

import ast
import io
import tokenize

import numpy as np
import pandas as pd

from clipforge.pipeline.errors import ClipforgeError

GRAMMAR = "column names, literals, comparisons, in, and/or/not, parentheses"
ALLOWED_OPERATORS = {"(", ")", "[", "]", ",", "==", "!=", "<", "<=", ">", ">=", "-"}
KEYWORDS = {"and", "or", "not", "in", "True", "False", "None"}
COMPARE = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge"}


class FilterError(ClipforgeError):
    """An expression outside the filter language, or naming a column that does not exist."""


def _check_tokens(text: str) -> None:
    """Refuse, by its first offending token, anything the grammar does not have (before parsing, so that
    `@name` or a call is named as such, not reported as a Python syntax error)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError) as err:
        raise FilterError(f"cannot read the expression: {err}") from None
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
            continue
        if tok.type == tokenize.OP and tok.string in ALLOWED_OPERATORS:
            continue
        raise FilterError(f"{tok.string!r} is not allowed (only {GRAMMAR})")


FLIPPED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


class RowFilter:
    """A checked expression; `filter(frame)` is the boolean mask of the frame's rows (missing values
    compare false)."""

    def __init__(self, text: str, tree: ast.expr, columns: list[str]):
        self.text, self.tree, self.columns = text, tree, columns

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        frame = frame.reset_index(drop=True)
        try:
            return self._mask(self._eval(self.tree, frame), len(frame))
        except (TypeError, ValueError) as err:
            raise FilterError(f"cannot evaluate {self.text!r}: {err}") from None

    def _eval(self, node: ast.expr, frame: pd.DataFrame):
        n = len(frame)
        if isinstance(node, ast.BoolOp):
            masks = [self._mask(self._eval(v, frame), n) for v in node.values]
            out = masks[0]
            for m in masks[1:]:
                out = (out & m) if isinstance(node.op, ast.And) else (out | m)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self._mask(self._eval(node.operand, frame), n)
        if isinstance(node, ast.Compare):   # a < b < c is a < b and b < c
            out, left = np.ones(n, bool), self._eval(node.left, frame)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._eval(right_node, frame)
                out &= self._compare(left, op, right, n)
                left = right
            return out
        if isinstance(node, ast.Name):
            return frame[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):   # a negative number literal (checked by parse_filter)
            return -node.operand.value
        return [self._eval(e, frame) for e in node.elts]   # a list or tuple of literals

    @staticmethod
    def _compare(left, op: ast.cmpop, right, n: int) -> np.ndarray:
        if isinstance(op, (ast.In, ast.NotIn)):
            if isinstance(right, pd.Series):
                raise FilterError("`in` takes a list of literals on its right")
            values = right if isinstance(right, list) else [right]
            m = left.isin(values) if isinstance(left, pd.Series) else pd.Series([left in values] * n)
            m = ~m if isinstance(op, ast.NotIn) else m
        else:
            name = COMPARE[type(op)]
            if isinstance(left, pd.Series):
                m = getattr(left, name)(right)
            elif isinstance(right, pd.Series):
                m = getattr(right, FLIPPED[name])(left)
            else:
                m = pd.Series([getattr(pd.Series([left]), name)(right).iloc[0]] * n)
        return pd.Series(m).fillna(False).astype(bool).to_numpy()

    @staticmethod
    def _mask(value, n: int) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value.astype(bool)
        if isinstance(value, pd.Series):   # a bare boolean column
            return value.fillna(False).astype(bool).to_numpy()
        return np.full(n, bool(value))


def _check_tree(node: ast.AST, columns: list[str]) -> None:
    if isinstance(node, ast.Expression):
        return _check_tree(node.body, columns)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_tree(v, columns)
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _check_tree(node.operand, columns)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return None
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in COMPARE and not isinstance(op, (ast.In, ast.NotIn)):
                raise FilterError(f"the operator {type(op).__name__} is not allowed (only {GRAMMAR})")
        for operand in (node.left, *node.comparators):
            _check_tree(operand, columns)
        return None
    if isinstance(node, ast.Name):
        if node.id not in columns:
            raise FilterError(f"unknown column {node.id!r} (columns: {', '.join(columns)})")
        return None
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool)) and node.value is not None:
            raise FilterError(f"the literal {node.value!r} is not allowed (only {GRAMMAR})")
        return None
    if isinstance(node, (ast.List, ast.Tuple)):
        for e in node.elts:
            if not isinstance(e, ast.Constant) and not (isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub)):
                raise FilterError(f"a list may hold only literals (only {GRAMMAR})")
            _check_tree(e, columns)
        return None
    raise FilterError(f"{type(node).__name__.lower()} is not allowed (only {GRAMMAR})")


def parse_filter(text: str, columns: list[str]) -> RowFilter:
    """The checked expression, or FilterError with a one-line reason naming what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError("the expression is empty")
    if len(text) > 10_000:
        raise FilterError("the expression is longer than 10,000 characters")
    _check_tokens(text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise FilterError(f"cannot parse the expression: {err.msg}") from None
    _check_tree(tree, list(columns))
    return RowFilter(text, tree.body, list(columns))
