"""The on-disk sample format (docs/format.md) and its safe decoding.

A sample is the set of tar members sharing a key: `KEY.json` (metadata), `KEY.txt` (clean caption),
`KEY.vtok.npy` (uint16 [frames, h, w]) and `KEY.ttok.npy` (int32 caption ids, no padding). Arrays are
written with `np.save(allow_pickle=False)` and read back with `allow_pickle=False`: nothing is a pickle.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from clipforge.pipeline.storage.redact import redact_url

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


# KEY.json has one typed schema: the same keys with the same types in every sample of every dataset, so
# readers that infer a schema from the first samples (Hugging Face `datasets`, Ray Data, pandas'
# json_normalize) get one table. No value is ever null and no list is typed by its first element: a
# missing number is -1, a missing string "", caption flags are one ";"-joined string, and the manifest's
# extra columns (whose types differ between corpora) travel as one JSON text. docs/format.md lists it.
SOURCE_INFO_FIELDS = {"width": int, "height": int, "fps": float, "frames": int, "duration": float,
                      "rotation": int, "codec": str, "sar": float, "video_streams": int, "stream_index": int}
LAYOUT_FIELDS = ("frames", "frame_size", "tokens_h", "tokens_w", "text_slot", "image_vocab")


def _typed(value, kind):
    if value is None:
        return "" if kind is str else kind(-1)
    if kind is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            return -1.0
        return out if out == out else -1.0   # NaN is not JSON
    try:
        return kind(value)
    except (TypeError, ValueError):
        return "" if kind is str else kind(-1)


_TYPED_CACHE: dict = {}


def _typed_once(kind: str, value: dict, build):
    """Layout and tokenizer ids are the same object for every row of a shard: type them once."""
    key = (kind, id(value))
    hit = _TYPED_CACHE.get(key)
    if hit is None or hit[0] is not value:
        if len(_TYPED_CACHE) > 64:
            _TYPED_CACHE.clear()
        hit = _TYPED_CACHE[key] = (value, build(value))
    return hit[1]


def _typed_tokenizers(tokenizers: dict) -> dict:
    return {kind: {"id": _typed((tokenizers.get(kind) or {}).get("id"), str),
                   "sha256": _typed((tokenizers.get(kind) or {}).get("sha256"), str)} for kind in ("image", "text")}


def _typed_layout(layout: dict) -> dict:
    return {k: _typed(layout.get(k), int) for k in LAYOUT_FIELDS}


def sample_metadata(row: dict, layout: dict) -> dict:
    """KEY.json for one clip row: the fixed, typed schema described above."""
    info = row.get("source_info") or {}
    tokenizers = row.get("tokenizers") or {}
    flags = row.get("caption_flags") or []
    crop = [int(v) for v in (row.get("crop") or [])] + [-1] * max(0, 4 - len(row.get("crop") or []))
    return {
        "key": _typed(row.get("key"), str),
        "row_id": _typed(row.get("row_id"), str),
        "video_id": _typed(row.get("video_id"), str),
        "source": _typed(redact_url(row["source"]) if isinstance(row.get("source"), str) else None, str),
        "row_index": _typed(row.get("row_index"), int),
        "clip_index": _typed(row.get("clip_index"), int),
        "clips_total": _typed(row.get("clips_total"), int),
        "mode": _typed(row.get("mode"), str),
        "rate": _typed(row.get("rate"), float),
        "span": _typed(row.get("span"), float),
        "frame_indices": [int(i) for i in row.get("frame_indices") or []],
        "timestamps": [float(t) for t in row.get("timestamps") or []],
        "crop": crop[:4],
        "decoder": _typed(row.get("decoder"), str),
        "clock": _typed(row.get("clock"), str),
        "trim_start": _typed(row.get("start"), float),
        "trim_end": _typed(row.get("end"), float),
        "source_info": {k: _typed(info.get(k), kind) for k, kind in SOURCE_INFO_FIELDS.items()},
        "caption": _typed(row.get("caption"), str),
        "caption_raw": _typed(row.get("caption_raw"), str),
        "caption_flags": ";".join(map(str, flags)) if not isinstance(flags, str) else flags,
        "caption_tokens": _typed(row.get("caption_tokens"), int),
        "caption_cut": bool(row.get("caption_cut") or False),
        "extra": json.dumps(row.get("extra") or {}, sort_keys=True, ensure_ascii=False, default=_json_default),
        "tokenizers": _typed_once("tokenizers", tokenizers, _typed_tokenizers),
        "layout": _typed_once("layout", layout, _typed_layout),
    }


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
