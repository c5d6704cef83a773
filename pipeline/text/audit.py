"""`clipforge audit`: caption quality of a manifest or a built dataset, in bounded memory.

Pass 1 reads the input in chunks of `chunk_rows`, cleans every caption (the same `clean_caption` the
build uses), measures it, and appends per-caption rows to temporary parquet parts and MinHash
signatures to a temporary file. Duplicates are then found across the whole corpus at once: exact ones
by a hash of the normalized text, near ones by MinHash LSH (bands sorted per band, so nothing but
compact arrays is held: ~50 bytes of RAM per caption plus 4*num_perm bytes on disk). Pass 2 writes
`captions.parquet` with the duplicate columns; then `summary.json` and `report.html`.

The duplicate finder (MinHash signatures, LSH bands, clusters) is `clipforge.pipeline.text.dedup`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from clipforge.pipeline.text.captions import FLAGS, CleanConfig, as_text, clean_caption
from clipforge.pipeline.text.dedup import CJK_CHARS, DedupConfig, MinHasher, SignatureStore, dedup_tokens, find_duplicates
from clipforge.pipeline.text.langid import STOPWORDS, script_and_language
from clipforge.pipeline.text.tables import CAPTION_COLUMNS, caption_column, iter_table, table_format

ID_COLUMNS = ("key", "id", "video_id", "videoid", "vid_key", "video")
SPAN_FOR_ROOM = 16.0   # the longest span prefix ("16.0 s") bounds the room left for the caption
PROXY_PREFIX = 5       # proxy tokens taken by "16.0 s" + separator when no tokenizer is given
HIST_CAP = 4096        # lengths below this are counted exactly per value; longer ones are kept in a list
EXAMPLES = 3

_PROXY_TOKEN_RE = re.compile(rf"[{CJK_CHARS}]|[^\W_{CJK_CHARS}]+|[^\w\s]")
_ASCII_WORD_SPACE = bytes(c for c in range(128) if chr(c).isalnum() or chr(c).isspace() or c == 95)
_STOP = frozenset(w for words in STOPWORDS.values() for w in words.split())


def proxy_tokens(text: str) -> int:
    """Token count without a tokenizer: one per word, per CJK character and per punctuation mark."""
    return len(_PROXY_TOKEN_RE.findall(text))


# ------------------------------------------------------------------------------------------ summary
class LengthStats:
    """Exact mean, min, max and quantiles of integer lengths in O(HIST_CAP) memory."""

    def __init__(self):
        self.counts = np.zeros(HIST_CAP, dtype=np.int64)
        self.over: list[int] = []
        self.n = self.total = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.int64)
        self.counts += np.bincount(values[values < HIST_CAP], minlength=HIST_CAP)
        self.over.extend(values[values >= HIST_CAP].tolist())
        self.n += len(values)
        self.total += int(values.sum())

    def _order_stat(self, k: int) -> int:
        cum = np.cumsum(self.counts)
        return int(np.searchsorted(cum, k, side="right")) if k < cum[-1] else sorted(self.over)[k - int(cum[-1])]

    def quantile(self, q: float) -> float:
        """As numpy's and pandas' default: linear interpolation between order statistics."""
        pos = (self.n - 1) * q
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        a, b = self._order_stat(lo), self._order_stat(hi)
        return float(a + (b - a) * (pos - lo))

    def stats(self) -> dict:
        if not self.n:
            return {"mean": 0.0, "min": 0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "max": 0}
        out = {"mean": self.total / self.n, "min": self._order_stat(0)}
        out.update({f"p{int(q * 100)}": self.quantile(q) for q in (0.5, 0.9, 0.95, 0.99)})
        return {**out, "max": self._order_stat(self.n - 1)}

    def histogram(self, bins: int = 60) -> dict:
        top = self._order_stat(self.n - 1) if self.n else 0
        width = max(1, -(-(top + 1) // bins))
        full = np.zeros(top // width + 1, dtype=np.int64)
        small = np.bincount(np.arange(HIST_CAP) // width, weights=self.counts).astype(np.int64)
        k = min(len(full), len(small))
        full[:k] = small[:k]
        for v in self.over:
            full[v // width] += 1
        return {"width": width, "counts": full.tolist()}


def _count_ngrams(tokens_list: list[list[str]], prune: bool = False) -> tuple[dict[int, Counter], bool]:
    """Counts in C; stopwords are dropped when reporting. With `prune`, a slice with a big vocabulary
    keeps only n-grams seen twice: merging counters is a Python loop, and a gram seen once in 25,000
    captions is not a corpus-wide top gram."""
    chain = itertools.chain.from_iterable
    out = {1: Counter(chain(zip(t) for t in tokens_list)), 2: Counter(chain(zip(t, t[1:]) for t in tokens_list)),
           3: Counter(chain(zip(t, t[1:], t[2:]) for t in tokens_list))}
    pruned = False
    for n, c in out.items():
        if prune and len(c) > NGRAM_PRUNE:
            out[n], pruned = Counter({g: k for g, k in c.items() if k > 1}), True
    return out, pruned


class _Ngrams:
    """Top word n-grams (CJK: character n-grams) of the first NGRAM_ALL_ROWS captions and every
    NGRAM_STRIDE-th after; exact unless a slice was pruned or a vocabulary outgrew `limit` (then cut
    to its heaviest half)."""

    def __init__(self, limit: int = 100_000):
        self.counters: dict[int, Counter] = {1: Counter(), 2: Counter(), 3: Counter()}
        self.limit, self.exact, self.rows = limit, True, 0

    def add(self, counters: dict[int, Counter], pruned: bool, rows: int) -> None:
        self.rows += rows
        self.exact &= not pruned
        for n, c in counters.items():
            self.counters[n].update(c)
            if len(self.counters[n]) > self.limit:
                self.counters[n] = Counter(dict(self.counters[n].most_common(self.limit // 2)))
                self.exact = False

    def top(self, k: int = 25) -> dict:
        def text(gram):
            return "".join(w if i == 0 or (_is_cjk(w) and _is_cjk(gram[i - 1])) else " " + w
                           for i, w in enumerate(gram))
        def keep(gram):  # unigrams: no stopwords, no single Latin letters
            return len(gram) > 1 or gram[0] not in _STOP and (len(gram[0]) > 1 or not gram[0].isascii())
        out = {}
        for n, cnt in self.counters.items():
            best = [(g, c) for g, c in cnt.most_common(k + (len(_STOP) + 40 if n == 1 else 0)) if keep(g)]
            out[str(n)] = [[text(g), c] for g, c in sorted(best, key=lambda kv: (-kv[1], kv[0]))[:k]]
        return out


def _is_cjk(token: str) -> bool:
    return len(token) == 1 and re.match(rf"[{CJK_CHARS}]", token) is not None


def _by_count(counter: Counter) -> dict:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------------------- one slice
SLICE_ROWS = 25_000          # rows per unit of work (and per temporary part file)
NGRAM_ALL_ROWS, NGRAM_STRIDE, NGRAM_PRUNE = 100_000, 10, 20_000
_STATE: dict = {}


def _audit_slice(task: dict) -> dict:
    """Clean and measure one slice of captions; return its part of captions.parquet, arrays and counters.
    Runs in the calling process or in a forked worker (pure Python and numpy: Arrow stays in the parent)."""
    key = (task["dedup"], task["tokenizer"])
    if key not in _STATE:
        from clipforge.tokenizer.text import TextTokenizer
        _STATE.clear()
        _STATE[key] = (MinHasher(task["dedup"]), TextTokenizer(task["tokenizer"]) if task["tokenizer"] else None)
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
            "ngrams": _count_ngrams(sampled, prune=True), "ngram_rows": len(sampled), "examples": examples,
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.pipeline.text.report import render_report

    started = time.time()
    in_path, out_dir = Path(in_path), Path(out_dir)
    kind = "dataset" if table_format(in_path) == "dataset" else "manifest"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = str(Path(text_tokenizer_path).resolve()) if text_tokenizer_path else None
    tok = None
    if tok_path:
        from clipforge.tokenizer.text import TextTokenizer
        tok = TextTokenizer(tok_path)
    room = slot - len(tok.span_prefix(SPAN_FOR_ROOM)) if tok else slot - PROXY_PREFIX
    workers = workers or min(os.cpu_count() or 1, 8)
    hasher = MinHasher(dedup)
    lengths = {"chars_raw": LengthStats(), "chars": LengthStats(), "tokens": LengthStats()}
    counts, flags, scripts, languages = Counter(), Counter(), Counter(), Counter()
    ngrams, examples, cut_examples = _Ngrams(), {}, []
    meta = {"caption_column": caption_col, "id_column": None}
    exact_parts, has_parts, parts = [], [], []
    wanted = set(CAPTION_COLUMNS) | set(ID_COLUMNS) | ({caption_col} if caption_col else set())

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".audit-") as tmp:
        tmp = Path(tmp)
        store = SignatureStore(tmp, dedup.num_perm, hasher.bands)

        def merge(res: dict) -> None:
            parts.append(tmp / f"part-{len(parts):06d}.arrow")
            res["part"].to_feather(parts[-1], compression="uncompressed")  # temporary: fastest to write
            store.append(res["sig"], res["bands"])
            exact_parts.append(res["exact"])
            has_parts.append(res["has"])
            for k, v in res["lengths"].items():
                lengths[k].add(v)
            counts.update(res["counts"])
            flags.update(res["flags"])
            scripts.update(res["scripts"])
            languages.update(res["languages"])
            ngrams.add(*res["ngrams"], res["ngram_rows"])
            for f, ex in res["examples"].items():
                mine = examples.setdefault(f, [])
                mine += [e for e in ex if all(e["raw"] != x["raw"] for x in mine)][:EXAMPLES - len(mine)]
            cut_examples.extend(res["cut_after_prefix_examples"][:EXAMPLES - len(cut_examples)])

        pool, pending, row0 = None, [], 0
        try:
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
                    task = {"raw": raw, "ids": ids, "row0": row0,
                            "config": config, "dedup": dedup, "tokenizer": tok_path, "room": room}
                    row0 += stop - start
                    if workers > 1 and pool is None and row0 > 2 * SLICE_ROWS and sys.platform == "linux":
                        # fork: no __main__ guard needed by callers, and workers start at once
                        import multiprocessing
                        from concurrent.futures import ProcessPoolExecutor
                        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
                    if pool is None:
                        merge(_audit_slice(task))
                        continue
                    pending.append(pool.submit(_audit_slice, task))
                    while len(pending) > 2 * workers:
                        merge(pending.pop(0).result())
            for future in pending:  # results are merged in row order: the output is deterministic
                merge(future.result())
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        store.close()
        n = row0
        exact = np.concatenate(exact_parts) if exact_parts else np.zeros(0, np.uint64)
        has = np.concatenate(has_parts) if has_parts else np.zeros(0, bool)
        dups = find_duplicates(store, store, has, exact, dedup)
        sizes = dups["dup_cluster_size"]
        reps = np.flatnonzero((dups["dup_cluster"] == np.arange(n)) & (sizes > 1))
        top_ids = reps[np.lexsort((reps, -sizes[reps]))][:20]
        top = {int(c): {"cluster": int(c), "size": int(sizes[c]), "caption": None, "examples": []} for c in top_ids}
        # pass 2: the per-caption table with its duplicate columns
        tmp_out = out_dir / "captions.parquet.tmp"
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
        os.replace(tmp_out, out_dir / "captions.parquet")

    rows = counts["rows"]
    clusters = int(len(reps))
    in_clusters = int(sizes[reps].sum()) if clusters else 0
    summary = {
        "input": str(in_path), "kind": kind, **meta,
        "rows": rows, "usable": rows - counts["empty"], "empty": counts["empty"], "changed": counts["changed"],
        "flags": {f: flags.get(f, 0) for f in FLAGS},
        **{k: v.stats() for k, v in lengths.items()},
        "token_count": {"method": "sentencepiece" if tok else "proxy",
                        "tokenizer": tok.tokenizer_id if tok else None, "slot": slot, "room": room,
                        "note": (f"room = slot - len(span prefix '{SPAN_FOR_ROOM:.1f} s' + separator)" if tok else
                                 "proxy: one token per word, CJK character and punctuation mark; "
                                 f"room = slot - {PROXY_PREFIX}")},
        "cut_after_prefix": counts["cut_after_prefix"], "cut_after_prefix_fraction": counts["cut_after_prefix"] / rows if rows else 0.0,
        "scripts": _by_count(scripts), "languages": _by_count(languages),
        "duplicates": {
            "method": "minhash-lsh", "num_perm": dedup.num_perm, "threshold": dedup.threshold,
            "bands": hasher.bands, "rows_per_band": hasher.rows, "ngram": dedup.ngram, "verified": dedup.verify,
            "exact_rows": int(dups["dup_exact"].sum()), "near_rows": int(dups["dup_near"].sum()),
            "clusters": clusters, "rows_in_clusters": in_clusters, "removable": in_clusters - clusters,
            "top": [top[int(c)] for c in top_ids]},
        "top_ngrams": ngrams.top(), "ngrams_exact": ngrams.exact, "ngram_rows": ngrams.rows,
        "histograms": {k: v.histogram() for k, v in lengths.items()},
        "examples": {f: examples[f] for f in FLAGS if f in examples}, "cut_after_prefix_examples": cut_examples,
        "config": asdict(config), "dedup_config": asdict(dedup), "chunk_rows": chunk_rows,
        "seconds": round(time.time() - started, 3),
    }
    _write_json(out_dir / "summary.json", summary)
    render_report(summary, out_dir / "report.html")
    return summary


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
