"""The on-disk sample format (SPEC §3) and its safe decoding.

A sample is the set of tar members sharing a key: `KEY.json` (metadata), `KEY.txt` (clean caption),
`KEY.vtok.npy` (uint16 [frames, h, w]) and `KEY.ttok.npy` (int32 caption ids, no padding). Arrays are
written with `np.save(allow_pickle=False)` and read back with `allow_pickle=False`: nothing is a pickle.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

REQUIRED_MEMBERS = ("json", "txt", "vtok.npy", "ttok.npy")


_NPY_HEADERS: dict[tuple, bytes] = {}


def npy_bytes(array: np.ndarray) -> bytes:
    """`np.save` bytes (format 1.0, no pickle); the header is cached per dtype and shape, since
    building it costs more than the data for a sample's few KB of tokens."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("object arrays are not stored (they would need pickle)")
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
        header = _NPY_HEADERS[key] = buf.getvalue()
    return header + array.tobytes()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(key: str, meta: dict, caption: str, vtok: np.ndarray, ttok: np.ndarray) -> dict[str, Any]:
    """A webdataset sample dict whose values are already bytes (the writer does no encoding)."""
    return {
        "__key__": key,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8"),
        "txt": caption.encode("utf-8"),
        "vtok.npy": npy_bytes(vtok.astype(np.uint16, copy=False)),
        "ttok.npy": npy_bytes(ttok.astype(np.int32, copy=False)),
    }


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a raw webdataset sample (member name -> bytes) into python values.

    Returns {"key", "meta" (dict), "caption" (str), "vtok" (uint16 [T,h,w]), "ttok" (int32 [n])}.
    Raises ValueError on an incomplete sample.
    """
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks members {missing}")
    return {
        "key": sample["__key__"],
        "meta": json.loads(sample["json"]),
        "caption": sample["txt"].decode("utf-8"),
        "vtok": npy_load(sample["vtok.npy"]),
        "ttok": npy_load(sample["ttok.npy"]),
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
