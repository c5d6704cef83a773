"""`clipforge audit`: caption quality of a manifest or a built dataset, in bounded memory.

Pass 1 reads the input in chunks of `chunk_rows`, cleans every caption (the same `clean_caption` the
build uses), measures it, and appends per-caption rows to temporary parquet parts and MinHash
signatures to a temporary file. Duplicates are then found across the whole corpus at once: exact ones
by a hash of the normalized text, near ones by MinHash LSH (bands sorted per band, so nothing but
compact arrays is held: ~50 bytes of RAM per caption plus 4*num_perm bytes on disk). Pass 2 writes
`captions.parquet` with the duplicate columns; then `summary.json` and `report.html`.

The duplicate finder (MinHash signatures, LSH bands, clusters) is `clipforge.pipeline.text.dedup`; the
running length statistics and n-gram counts are `clipforge.pipeline.text.audit_figures`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from clipforge.pipeline.text.audit_figures import LengthStats, NgramCounts, count_ngrams
from clipforge.pipeline.text.caption_rules import FLAGS, CleanConfig, as_text, clean_caption
from clipforge.pipeline.text.dedup import CJK_CHARS, DedupConfig, MinHasher, SignatureStore, dedup_tokens, find_duplicates
from clipforge.pipeline.text.langid import script_and_language
from clipforge.pipeline.text.tables import CAPTION_COLUMNS, caption_column, iter_table, table_format

ID_COLUMNS = ("key", "id", "video_id", "videoid", "vid_key", "video")
SPAN_FOR_ROOM = 16.0   # the longest span prefix ("16.0 s") bounds the room left for the caption
PROXY_PREFIX = 5       # proxy tokens taken by "16.0 s" + separator when no tokenizer is given
EXAMPLES = 3

_PROXY_TOKEN_RE = re.compile(rf"[{CJK_CHARS}]|[^\W_{CJK_CHARS}]+|[^\w\s]")
_ASCII_WORD_SPACE = bytes(c for c in range(128) if chr(c).isalnum() or chr(c).isspace() or c == 95)


def proxy_tokens(text: str) -> int:
    """Token count without a tokenizer: one per word, per CJK character and per punctuation mark."""
    return len(_PROXY_TOKEN_RE.findall(text))


# ---------------------------------------------------------------------------------------- one slice
SLICE_ROWS = 25_000          # rows per unit of work (and per temporary part file)
NGRAM_ALL_ROWS, NGRAM_STRIDE = 100_000, 10   # captions whose n-grams are counted: all of the first, then every 10th
_STATE: dict = {}


def _audit_slice(task: dict) -> dict:
    """Clean and measure one slice of captions; return its part of captions.parquet, arrays and counters.
    Runs in the calling process or in a forked worker (pure Python and numpy: Arrow stays in the parent)."""
    key = (task["dedup"], task["tokenizer"])
    if key not in _STATE:
        from clipforge.tokenizer.sources import open_text_tokenizer
        _STATE.clear()
        _STATE[key] = (MinHasher(task["dedup"]), open_text_tokenizer(task["tokenizer"]) if task["tokenizer"] else None)
    hasher, tok = _STATE[key]
    raw, row0, room = task["raw"], task["row0"], task["room"]
    m = len(raw)
    results = [clean_caption(x, task["config"]) for x in raw]
    clean, flags = [c for c, _ in results], [f for _, f in results]
    empty = np.fromiter((("empty" in f or "too_short" in f) for f in flags), dtype=bool, count=m)
    tokens = [dedup_tokens(c) if not e else [] for c, e in zip(clean, empty)]
    if tok is not None:
        ntok = np.fromiter(map(len, tok.sp.encode(clean, out_type=int) if m else []), np.int64, count=m)
    else:  # = proxy_tokens(c); for ASCII, from the dedup tokens plus a C-speed punctuation count
        ntok = np.fromiter((len(t) + len(c.encode().translate(None, _ASCII_WORD_SPACE)) if c.isascii() and t
                            else proxy_tokens(c) for c, t in zip(clean, tokens)), np.int64, count=m)
    cut = (ntok > room) & ~empty
    script, lang = zip(*map(script_and_language, clean)) if m else ((), ())
    sig, has = hasher.signatures(tokens)
    exact = np.fromiter((int.from_bytes(hashlib.blake2b(" ".join(t).encode("utf-8"), digest_size=8).digest(),
                                        "little") for t in tokens), np.uint64, count=m)
    part = pd.DataFrame({
        "row": np.arange(row0, row0 + m, dtype=np.int64), "id": task["ids"] or [None] * m,
        "caption_raw": raw, "caption": clean, "caption_flags": flags,
        "chars_raw": np.fromiter(map(len, raw), np.int64, count=m),
        "chars": np.fromiter(map(len, clean), np.int64, count=m),
        "words": [len(c.split()) for c in clean], "tokens": ntok, "cut_after_prefix": cut,
        "script": list(script), "language": list(lang), "empty": empty})
    sampled = [t for i, t in enumerate(tokens, row0) if i < NGRAM_ALL_ROWS or i % NGRAM_STRIDE == 0]
    examples: dict[str, list] = {}
    for r, c, fl in zip(raw, clean, flags):
        for f in fl:
            ex = examples.setdefault(f, [])
            if len(ex) < EXAMPLES and all(e["raw"] != r for e in ex):
                ex.append({"raw": r[:600], "clean": c[:600]})
    return {"rows": m, "part": part, "sig": sig, "bands": hasher.band_hashes(sig), "exact": exact, "has": has,
            "lengths": {"chars_raw": part["chars_raw"].to_numpy(), "chars": part["chars"].to_numpy(), "tokens": ntok},
            "counts": Counter(rows=m, empty=int(empty.sum()), cut_after_prefix=int(cut.sum()),
                              changed=sum(c != r for c, r in zip(clean, raw))),
            "flags": Counter(f for fl in flags for f in fl), "scripts": Counter(script), "languages": Counter(lang),
            "ngrams": count_ngrams(sampled, prune=True), "ngram_rows": len(sampled), "examples": examples,
            "cut_after_prefix_examples": [{"caption": clean[i][:600], "tokens": int(ntok[i])}
                             for i in np.flatnonzero(cut)[:EXAMPLES]]}


# -------------------------------------------------------------------------------------------- audit
def audit(in_path, out_dir, text_tokenizer_path=None, slot: int = 64, chunk_rows: int = 200_000,
          config: CleanConfig = CleanConfig(), dedup: DedupConfig = DedupConfig(), caption_col=None,
          workers: int | None = None) -> dict:
    """Audit the captions of a manifest file or a dataset directory; write captions.parquet,
    summary.json and report.html into `out_dir`; return the summary.

    Captions are cleaned with `config` from `caption_raw` when the input has it (a cleaned manifest
    or a built dataset), else from the caption column (`caption`, or an alias such as WebVid's `name`).
    Token lengths use the sentencepiece model at `text_tokenizer_path`; without one, a proxy (one token
    per word, CJK character and punctuation mark). A caption is *cut* when its tokens exceed the room
    the slot leaves after the longest span prefix ("16.0 s" + separator). Slices of SLICE_ROWS rows are
    processed by `workers` forked processes on Linux (default: the CPU count, at most 8; 1 = in this
    process), at most 2 per worker in flight, so memory stays bounded whatever the input size.
    """
    from clipforge.pipeline.text.report import render_report

    started = time.time()
    in_path = str(in_path) if "://" in str(in_path) else Path(in_path)   # a dataset or manifest on s3:// stays a URL
    out_dir = Path(out_dir)
    kind = "dataset" if table_format(in_path) == "dataset" else "manifest"
    out_dir.mkdir(parents=True, exist_ok=True)
    from clipforge.tokenizer.sources import absolute_spec, open_text_tokenizer

    tok_path = absolute_spec(text_tokenizer_path) if text_tokenizer_path else None
    tok = open_text_tokenizer(tok_path) if tok_path else None
    room = slot - len(tok.span_prefix(SPAN_FOR_ROOM)) if tok else slot - PROXY_PREFIX
    workers = workers or min(os.cpu_count() or 1, 8)
    hasher = MinHasher(dedup)
    meta = {"caption_column": caption_col, "id_column": None}
    settings = {"config": config, "dedup": dedup, "tokenizer": tok_path, "room": room}

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".audit-") as tmp:
        totals = _AuditTotals(Path(tmp), SignatureStore(Path(tmp), dedup.num_perm, hasher.bands))
        rows = _run_slices(_slice_tasks(in_path, chunk_rows, caption_col, meta, settings), workers, totals.merge)
        totals.store.close()
        dups, reps, top_ids = _find_clusters(totals, rows, dedup)
        top = _write_captions_table(totals.parts, dups, top_ids, out_dir / "captions.parquet")

    summary = {
        "input": str(in_path), "kind": kind, **meta, **_totals_summary(totals),
        "token_count": _token_count_summary(tok, slot, room), **_cut_summary(totals),
        "scripts": _by_count(totals.scripts), "languages": _by_count(totals.languages),
        "duplicates": _duplicates_summary(dups, reps, top, dedup, hasher),
        **_text_summary(totals),
        "config": asdict(config), "dedup_config": asdict(dedup), "chunk_rows": chunk_rows,
        "seconds": round(time.time() - started, 3),
    }
    _write_json(out_dir / "summary.json", summary)
    render_report(summary, out_dir / "report.html")
    return summary


class _AuditTotals:
    """What pass 1 keeps of the slices, merged in row order: each slice's part file, its MinHash
    signatures (in `store`) and exact-duplicate keys, and the running figures of the summary."""

    def __init__(self, tmp: Path, store: SignatureStore):
        self.tmp, self.store = tmp, store
        self.lengths = {"chars_raw": LengthStats(), "chars": LengthStats(), "tokens": LengthStats()}
        self.counts, self.flags, self.scripts, self.languages = Counter(), Counter(), Counter(), Counter()
        self.ngrams, self.examples, self.cut_examples = NgramCounts(), {}, []
        self.exact_parts, self.has_parts, self.parts = [], [], []

    def merge(self, res: dict) -> None:
        self.parts.append(self.tmp / f"part-{len(self.parts):06d}.arrow")
        res["part"].to_feather(self.parts[-1], compression="uncompressed")  # temporary: fastest to write
        self.store.append(res["sig"], res["bands"])
        self.exact_parts.append(res["exact"])
        self.has_parts.append(res["has"])
        for k, v in res["lengths"].items():
            self.lengths[k].add(v)
        self.counts.update(res["counts"])
        self.flags.update(res["flags"])
        self.scripts.update(res["scripts"])
        self.languages.update(res["languages"])
        self.ngrams.add(*res["ngrams"], res["ngram_rows"])
        for f, ex in res["examples"].items():
            mine = self.examples.setdefault(f, [])
            mine += [e for e in ex if all(e["raw"] != x["raw"] for x in mine)][:EXAMPLES - len(mine)]
        self.cut_examples.extend(res["cut_after_prefix_examples"][:EXAMPLES - len(self.cut_examples)])


def _slice_tasks(in_path, chunk_rows: int, caption_col, meta: dict, settings: dict) -> Iterator[dict]:
    """Pass 1's units of work in row order: the raw captions (and ids) of SLICE_ROWS rows each, plus
    `settings`. `meta` gets the caption and id columns found."""
    wanted = set(CAPTION_COLUMNS) | set(ID_COLUMNS) | ({caption_col} if caption_col else set())
    row0 = 0
    for df in iter_table(in_path, chunk_rows, columns=wanted):
        col = caption_col or caption_column(df.columns)
        id_col = next((c for c in ID_COLUMNS if c in df.columns and c != col), None)
        meta.update(caption_column=col, id_column=id_col)
        raw_col = df["caption_raw"] if "caption_raw" in df.columns else df[col]
        for start in range(0, len(df), SLICE_ROWS):
            stop = min(len(df), start + SLICE_ROWS)
            ids = None
            if id_col:
                ids = [x if type(x) is str else None if pd.isna(x) else str(x)
                       for x in df[id_col].iloc[start:stop].tolist()]
            raw = [x if type(x) is str else as_text(x) for x in raw_col.iloc[start:stop].tolist()]
            yield {"raw": raw, "ids": ids, "row0": row0, **settings}
            row0 += stop - start


def _run_slices(tasks: Iterator[dict], workers: int, merge: Callable[[dict], None]) -> int:
    """`_audit_slice` every task and `merge` the results in row order (the output is deterministic): in
    this process, or from the third slice on in `workers` forked processes; returns the rows seen."""
    pool, pending, rows = None, [], 0
    try:
        for task in tasks:
            rows = task["row0"] + len(task["raw"])
            if workers > 1 and pool is None and rows > 2 * SLICE_ROWS and sys.platform == "linux":
                # fork: no __main__ guard needed by callers, and workers start at once
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            if pool is None:
                merge(_audit_slice(task))
                continue
            pending.append(pool.submit(_audit_slice, task))
            while len(pending) > 2 * workers:   # bounded memory: at most 2 slices per worker in flight
                merge(pending.pop(0).result())
        for future in pending:
            merge(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


def _find_clusters(totals: _AuditTotals, rows: int, dedup: DedupConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """Duplicate columns of every row, the clusters' representative rows, and the 20 biggest clusters'."""
    exact = np.concatenate(totals.exact_parts) if totals.exact_parts else np.zeros(0, np.uint64)
    has = np.concatenate(totals.has_parts) if totals.has_parts else np.zeros(0, bool)
    dups = find_duplicates(totals.store, totals.store, has, exact, dedup)
    sizes = dups["dup_cluster_size"]
    reps = np.flatnonzero((dups["dup_cluster"] == np.arange(rows)) & (sizes > 1))
    top_ids = reps[np.lexsort((reps, -sizes[reps]))][:20]
    return dups, reps, top_ids


def _write_captions_table(parts: list[Path], dups: dict, top_ids: np.ndarray, out_path: Path) -> list[dict]:
    """Pass 2: the per-caption table (the part files with their duplicate columns) at `out_path`; returns
    the top clusters, each with its representative's caption and up to EXAMPLES others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = dups["dup_cluster_size"]
    top = {int(c): {"cluster": int(c), "size": int(sizes[c]), "caption": None, "examples": []} for c in top_ids}
    tmp_out = out_path.with_name(out_path.name + ".tmp")
    with pq.ParquetWriter(tmp_out, _schema()) as writer:
        for path in parts:
            part = pd.read_feather(path)
            rows = part["row"].to_numpy()
            for k, values in dups.items():
                part[k] = values[rows]
            for i in np.flatnonzero(np.isin(part["dup_cluster"].to_numpy(), top_ids)):
                entry, cap = top[int(part["dup_cluster"].iat[i])], part["caption"].iat[i]
                if rows[i] == entry["cluster"]:
                    entry["caption"] = cap[:600]
                elif len(entry["examples"]) < EXAMPLES and cap not in entry["examples"] and cap != entry["caption"]:
                    entry["examples"].append(cap[:600])
            writer.write_table(pa.Table.from_pandas(part, schema=_schema(), preserve_index=False)
                               .replace_schema_metadata(None))
    os.replace(tmp_out, out_path)
    return [top[int(c)] for c in top_ids]


# ------------------------------------------------------------------------------- summary.json parts
def _by_count(counter: Counter) -> dict:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _totals_summary(totals: _AuditTotals) -> dict:
    rows, counts = totals.counts["rows"], totals.counts
    return {"rows": rows, "usable": rows - counts["empty"], "empty": counts["empty"], "changed": counts["changed"],
            "flags": {f: totals.flags.get(f, 0) for f in FLAGS},
            **{k: v.stats() for k, v in totals.lengths.items()}}


def _token_count_summary(tok, slot: int, room: int) -> dict:
    return {"method": "sentencepiece" if tok else "proxy",
            "tokenizer": tok.tokenizer_id if tok else None, "slot": slot, "room": room,
            "note": (f"room = slot - len(span prefix '{SPAN_FOR_ROOM:.1f} s' + separator)" if tok else
                     "proxy: one token per word, CJK character and punctuation mark; "
                     f"room = slot - {PROXY_PREFIX}")}


def _cut_summary(totals: _AuditTotals) -> dict:
    rows, cut = totals.counts["rows"], totals.counts["cut_after_prefix"]
    return {"cut_after_prefix": cut, "cut_after_prefix_fraction": cut / rows if rows else 0.0}


def _duplicates_summary(dups: dict, reps: np.ndarray, top: list[dict], dedup: DedupConfig,
                        hasher: MinHasher) -> dict:
    clusters = int(len(reps))
    in_clusters = int(dups["dup_cluster_size"][reps].sum()) if clusters else 0
    return {"method": "minhash-lsh", "num_perm": dedup.num_perm, "threshold": dedup.threshold,
            "bands": hasher.bands, "rows_per_band": hasher.rows, "ngram": dedup.ngram, "verified": dedup.verify,
            "exact_rows": int(dups["dup_exact"].sum()), "near_rows": int(dups["dup_near"].sum()),
            "clusters": clusters, "rows_in_clusters": in_clusters, "removable": in_clusters - clusters,
            "top": top}


def _text_summary(totals: _AuditTotals) -> dict:
    """Top n-grams, length histograms and example captions."""
    return {"top_ngrams": totals.ngrams.top(), "ngrams_exact": totals.ngrams.exact, "ngram_rows": totals.ngrams.rows,
            "histograms": {k: v.histogram() for k, v in totals.lengths.items()},
            "examples": {f: totals.examples[f] for f in FLAGS if f in totals.examples},
            "cut_after_prefix_examples": totals.cut_examples}


def _schema():
    import pyarrow as pa
    s, i, b = pa.string(), pa.int64(), pa.bool_()
    return pa.schema([("row", i), ("id", s), ("caption_raw", s), ("caption", s), ("caption_flags", pa.list_(s)),
                      ("chars_raw", i), ("chars", i), ("words", i), ("tokens", i), ("cut_after_prefix", b), ("script", s),
                      ("language", s), ("empty", b), ("dup_cluster", i), ("dup_cluster_size", i),
                      ("dup_exact", b), ("dup_near", b)])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
