"""The one adapter between Ray Data and our stages: batch → rows → stage → rows → batch.

Rows cross Arrow with a fixed schema (key, status, meta as JSON text, arrays as `.npy` bytes), so that
blocks holding ok rows and error rows always unify. Any exception escaping a stage is caught here and the
whole batch becomes `internal_error` rows: Ray Data's default `max_errored_blocks=0` would otherwise fail
the job, and raising that limit drops whole blocks silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from clipforge.pipeline.storage.samples import npy_bytes, npy_load
from clipforge.pipeline.schema import mark_error

ARRAY_FIELDS = ("frames", "vtok", "ttok")


def pack_row(row: dict) -> dict:
    packed = {"key": str(row.get("key", "")), "status": str(row.get("status", "ok")),
              "meta": json.dumps({k: v for k, v in row.items() if k not in ARRAY_FIELDS}, default=_plain)}
    for name in ARRAY_FIELDS:
        packed[name] = npy_bytes(row[name]) if name in row else b""
    return packed


def unpack_row(packed: dict) -> dict:
    row = json.loads(packed["meta"])
    for name in ARRAY_FIELDS:
        blob = packed.get(name)
        if blob is not None and len(blob):
            row[name] = npy_load(bytes(blob))
    return row


SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("meta", pa.string())]
                   + [(name, pa.binary()) for name in ARRAY_FIELDS])


def batch_to_rows(batch: pa.Table) -> list[dict]:
    return [unpack_row(p) for p in batch.to_pylist()]


def rows_to_batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([pack_row(r) for r in rows], schema=SCHEMA)


@dataclass
class StageSpec:
    """How one stage runs on Ray: its factory (called once per actor) and its resources."""
    name: str
    factory: Callable[[], Any]
    batch_size: int = 1
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    options: dict = field(default_factory=dict)


class RayStage:
    """A Ray Data callable class wrapping one stage instance."""

    def __init__(self, spec: StageSpec):
        self.name = spec.name
        self.stage = spec.factory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch_to_rows(batch)
        try:
            out = list(self.stage(iter(rows)))
        except Exception as err:   # noqa: BLE001 — a bug in a stage must not kill the job
            out = [mark_error(r, self.name, "internal_error", f"{type(err).__name__}: {err}") for r in rows]
        return rows_to_batch(out)


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
