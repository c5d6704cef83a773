"""`clipforge audit`: caption quality of a manifest or a built dataset, in bounded memory.

Pass 1 reads the input in chunks of `chunk_rows`, cleans every caption (the same `clean_caption` the
build uses), measures it, and appends per-caption rows to temporary parquet parts and MinHash
signatures to a temporary file. Duplicates are then found across the whole corpus at once: exact ones
by a hash of the normalized text, near ones by MinHash LSH (bands sorted per band, so nothing but
compact arrays is held: ~50 bytes of RAM per caption plus 4*num_perm bytes on disk). Pass 2 writes
`captions.parquet` with the duplicate columns; then `summary.json` and `report.html`.

Near-duplicates follow datasketch exactly: the signatures equal `datasketch.MinHash(num_perm, seed,
hashfunc=identity).update_batch(shingle_hashes)`, and bands use `MinHashLSH`'s (b, r) for the
threshold, so a band collision here is a `MinHashLSH.query` candidate there (tests check both). What
differs is scale: `MinHashLSH` keeps a Python dict entry per caption per band (~1.5 GB per million
captions at b=5), whereas sorting each band's 64-bit hashes finds the same collisions with flat arrays.
Candidates are then verified on the full signatures (estimated Jaccard >= threshold) and joined into
connected components; a cluster's id is its first-seen member's row number.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import re
import struct
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.captions import (CAPTION_COLUMNS, FLAGS, CleanConfig, _as_text, caption_column, clean_caption,
                               iter_table, table_format)
from pipeline.langid import _STOPWORDS, detect_language, detect_script

ID_COLUMNS = ("key", "id", "video_id", "videoid", "vid_key", "video")
SPAN_FOR_ROOM = 16.0   # the longest span prefix ("16.0 s") bounds the room left for the caption
PROXY_PREFIX = 5       # proxy tokens taken by "16.0 s" + separator when no tokenizer is given
HIST_CAP = 4096        # lengths below this are counted exactly per value; longer ones are kept in a list
EXAMPLES = 3

_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_DEDUP_TOKEN_RE = re.compile(rf"[{_CJK_CHARS}]|[^\W_{_CJK_CHARS}]+")
_PROXY_TOKEN_RE = re.compile(rf"[{_CJK_CHARS}]|[^\W_{_CJK_CHARS}]+|[^\w\s]")
_STOP = frozenset(w for words in _STOPWORDS.values() for w in words.split())
_M32, _M64 = np.uint32(0xFFFFFFFF), np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class DedupConfig:
    num_perm: int = 64        # MinHash permutations (4 bytes each per caption, on disk)
    threshold: float = 0.7    # Jaccard similarity of shingle sets that counts as a near-duplicate
    ngram: int = 2            # shingles: word n-grams, character n-grams for Chinese/Japanese
    seed: int = 1             # datasketch's default seed
    verify: bool = True       # drop LSH candidates whose estimated Jaccard is below the threshold


def dedup_tokens(text: str) -> list[str]:
    """Normalized tokens for duplicate detection: NFKC, case-folded, punctuation dropped, each CJK
    character a token of its own, other words split on anything that is not a letter or digit."""
    text = text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()
    return _DEDUP_TOKEN_RE.findall(text)


def proxy_tokens(text: str) -> int:
    """Token count without a tokenizer: one per word, per CJK character and per punctuation mark."""
    return len(_PROXY_TOKEN_RE.findall(text))


def _fmix32(h: np.ndarray) -> np.ndarray:  # MurmurHash3's finalizer, as datasketch applies it
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _combine(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Hash of an n-gram from its tokens' 32-bit hashes (uint32 arrays in, uint32 out)."""
    return (_fmix64((h.astype(np.uint64) << np.uint64(32)) | t.astype(np.uint64)) >> np.uint64(32)).astype(np.uint32)


class MinHasher:
    """Vectorized MinHash signatures and LSH band hashes for chunks of captions."""

    def __init__(self, config: DedupConfig = DedupConfig()):
        from datasketch import MinHash
        from datasketch.lsh import _optimal_param
        self.config = config
        a, b = MinHash(num_perm=config.num_perm, seed=config.seed).permutations
        self.a, self.b = a.astype(np.uint32), b.astype(np.uint32)
        self.bands, self.rows = _optimal_param(config.threshold, config.num_perm, 0.5, 0.5)
        self._cache: dict[str, int] = {}

    def _token_hash(self, token: str) -> int:
        h = self._cache.get(token)
        if h is None:
            if len(self._cache) > 2_000_000:
                self._cache.clear()
            h = struct.unpack("<I", hashlib.sha1(token.encode("utf-8")).digest()[:4])[0]
            self._cache[token] = h
        return h

    def shingles(self, tokens_list: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes uint32, owner index per shingle, sorted) for a list of token lists."""
        n = self.config.ngram
        lens = np.fromiter((len(t) for t in tokens_list), dtype=np.int64, count=len(tokens_list))
        flat = np.fromiter((self._token_hash(w) for t in tokens_list for w in t), dtype=np.uint32,
                           count=int(lens.sum()))
        owner = np.repeat(np.arange(len(tokens_list)), lens)
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        # captions with >= n tokens: every n-gram; shorter ones: one shingle of all their tokens
        width = np.minimum(np.repeat(lens, lens), n)
        starts = np.flatnonzero(pos <= np.repeat(lens, lens) - width)
        h = flat[starts]
        for j in range(1, n):
            more = width[starts] > j
            h = h.copy()
            h[more] = _combine(h[more], flat[starts[more] + j])
        return h, owner[starts]

    def signatures(self, tokens_list: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 [m, num_perm], has_shingles bool [m]); rows without tokens stay all-max."""
        m, p = len(tokens_list), self.config.num_perm
        sig = np.full((m, p), _M32, dtype=np.uint32)
        h, owner = self.shingles(tokens_list)
        h = _fmix32(h)
        step = max(1, (1 << 22) // p)  # bound the [shingles, num_perm] temporary to ~16 MB
        i = 0
        while i < len(h):
            j = min(len(h), i + step)
            while j < len(h) and owner[j] == owner[j - 1]:
                j += 1  # never split one caption's shingles
            phv = h[i:j, None] * self.a[None, :] + self.b[None, :]  # (S, P), uint32 wrap-around
            first = np.flatnonzero(np.r_[True, owner[i + 1:j] != owner[i:j - 1]])
            sig[owner[i:j][first]] = np.minimum.reduceat(phv, first, axis=0)
            i = j
        has = np.zeros(m, dtype=bool)
        has[owner] = True
        return sig, has

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        """One 64-bit hash per LSH band: [m, bands] uint64."""
        out = np.empty((len(sig), self.bands), dtype=np.uint64)
        for k in range(self.bands):
            h = np.full(len(sig), ((k + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
            for j in range(k * self.rows, (k + 1) * self.rows):
                h = _fmix64(h ^ sig[:, j].astype(np.uint64)) * np.uint64(0x100000001B3)
            out[:, k] = _fmix64(h)
        return out


def _run_edges(values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (member, first member) within runs of equal `values`, first = lowest index."""
    order = np.lexsort((index, values))
    v, idx = values[order], index[order]
    new_run = np.r_[True, v[1:] != v[:-1]]
    first = idx[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
    keep = ~new_run
    return idx[keep], first[keep]


def candidate_pairs(bands: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LSH candidates: (u, v) with v < u sharing at least one band (MinHashLSH's rule), deduplicated."""
    index = np.flatnonzero(has)
    us, vs = [], []
    for k in range(bands.shape[1]):
        u, v = _run_edges(np.asarray(bands[index, k]), index)
        us.append(u)
        vs.append(v)
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    pairs = np.unique(u.astype(np.int64) * (len(has) + 1) + v)
    return pairs // (len(has) + 1), pairs % (len(has) + 1)


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components by min-label propagation: label = lowest row index in the component."""
    labels = np.arange(n)
    while len(u):
        new = labels.copy()
        low = np.minimum(labels[u], labels[v])
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        while True:  # pointer jumping
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def find_duplicates(sig, bands, has, exact, config: DedupConfig) -> dict[str, np.ndarray]:
    """Per-row duplicate columns from signatures [n, P], bands [n, b], has [n] and exact hashes [n]."""
    n = len(has)
    u, v = candidate_pairs(bands, has)
    if config.verify and len(u):
        same = np.empty(len(u), dtype=np.float64)
        for i in range(0, len(u), 65536):  # gather in blocks: the signatures may be a disk memmap
            a, b = np.asarray(sig[u[i:i + 65536]]), np.asarray(sig[v[i:i + 65536]])
            same[i:i + 65536] = (a == b).mean(axis=1)
        ok = same >= config.threshold
        u, v = u[ok], v[ok]
    eu, ev = _run_edges(exact[has], np.flatnonzero(has))  # exact duplicates always join
    labels = components(n, np.r_[u, eu], np.r_[v, ev])
    size = np.bincount(labels, minlength=n)[labels]
    ex_idx = np.flatnonzero(has)
    dup_exact = np.zeros(n, dtype=bool)
    if len(ex_idx):
        _, inv, cnt = np.unique(exact[ex_idx], return_inverse=True, return_counts=True)
        dup_exact[ex_idx] = cnt[inv] > 1
    # near: the row's cluster holds at least two different normalized texts
    multi = ex_idx[size[ex_idx] > 1]
    distinct = np.zeros(n, dtype=np.int64)
    if len(multi):
        pairs = np.unique(np.stack([labels[multi], exact[multi].astype(np.int64)], axis=1), axis=0)
        distinct = np.bincount(pairs[:, 0], minlength=n)
    dup_near = has & (distinct[labels] > 1)
    return {"dup_cluster": labels, "dup_cluster_size": size, "dup_exact": dup_exact, "dup_near": dup_near}


# ------------------------------------------------------------------------------------------ summary
class _Lengths:
    """Exact mean, min, max and quantiles of integer lengths in O(HIST_CAP) memory."""

    def __init__(self):
        self.counts = np.zeros(HIST_CAP, dtype=np.int64)
        self.over: list[int] = []
        self.n = 0
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.int64)
        small = values[values < HIST_CAP]
        self.counts += np.bincount(small, minlength=HIST_CAP)
        self.over.extend(values[values >= HIST_CAP].tolist())
        self.n += len(values)
        self.total += int(values.sum())

    def _order_stat(self, k: int) -> int:
        cum = np.cumsum(self.counts)
        if k < cum[-1]:
            return int(np.searchsorted(cum, k, side="right"))
        return sorted(self.over)[k - int(cum[-1])]

    def quantile(self, q: float) -> float:
        """Same as numpy/pandas' default (linear interpolation between order statistics)."""
        pos = (self.n - 1) * q
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        a, b = self._order_stat(lo), self._order_stat(hi)
        return float(a + (b - a) * (pos - lo))

    def stats(self) -> dict:
        if not self.n:
            return {"mean": 0.0, "min": 0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "max": 0}
        out = {"mean": self.total / self.n, "min": int(self._order_stat(0))}
        out.update({f"p{int(q * 100)}": self.quantile(q) for q in (0.5, 0.9, 0.95, 0.99)})
        out["max"] = int(self._order_stat(self.n - 1))
        return out

    def histogram(self, bins: int = 60) -> dict:
        top = int(self._order_stat(self.n - 1)) if self.n else 0
        width = max(1, int(np.ceil((top + 1) / bins)))
        counts = np.bincount(np.arange(HIST_CAP) // width, weights=self.counts).astype(np.int64)
        over = Counter(v // width for v in self.over)
        full = np.zeros(top // width + 1, dtype=np.int64)
        k = min(len(full), len(counts))
        full[:k] = counts[:k]
        for b_, c in over.items():
            full[b_] += c
        return {"width": width, "counts": full.tolist()}


class _Ngrams:
    """Top word (or CJK character) n-grams; exact until the vocabulary outgrows `limit` entries."""

    def __init__(self, limit: int = 400_000):
        self.counters = {1: Counter(), 2: Counter(), 3: Counter()}
        self.limit = limit
        self.exact = True

    def add(self, tokens_list: list[list[str]]) -> None:
        chain = itertools.chain.from_iterable
        self.counters[1].update(chain(((w,) for w in t if w not in _STOP and (len(w) > 1 or not w.isascii()))
                                      for t in tokens_list))
        self.counters[2].update(chain(zip(t, t[1:]) for t in tokens_list))
        self.counters[3].update(chain(zip(t, t[1:], t[2:]) for t in tokens_list))
        for n, c in self.counters.items():
            if len(c) > self.limit:  # keep the heaviest half: an approximate top-k from here on
                self.counters[n] = Counter(dict(heapq.nlargest(self.limit // 2, c.items(), key=lambda kv: kv[1])))
                self.exact = False

    def top(self, k: int = 25) -> dict:
        def text(gram):
            return "".join(w if (i == 0 or _is_cjk(w) and _is_cjk(gram[i - 1])) else " " + w
                           for i, w in enumerate(gram))
        return {str(n): [[text(g), c] for g, c in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
                for n, cnt in self.counters.items()}


def _is_cjk(token: str) -> bool:
    return len(token) == 1 and re.match(rf"[{_CJK_CHARS}]", token) is not None


def _stats_table(values: dict) -> dict:
    return dict(sorted(values.items(), key=lambda kv: (-kv[1], kv[0])))


# -------------------------------------------------------------------------------------------- audit
def audit(in_path, out_dir, text_tokenizer_path=None, slot: int = 64, chunk_rows: int = 200_000,
          config: CleanConfig = CleanConfig(), dedup: DedupConfig = DedupConfig(), caption_col=None) -> dict:
    """Audit the captions of a manifest file or a dataset directory; write captions.parquet,
    summary.json and report.html into `out_dir`; return the summary.

    Captions are cleaned with `config` from `caption_raw` when the input has it (a cleaned manifest
    or a built dataset), else from the caption column (`caption`, or an alias such as WebVid's `name`).
    Token lengths use the sentencepiece model at `text_tokenizer_path`; without one, a proxy (one token
    per word, CJK character and punctuation mark). A caption is *cut* when its tokens exceed the room
    the slot leaves after the longest span prefix ("16.0 s" + separator).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.report import render_report

    started = time.time()
    in_path, out_dir = Path(in_path), Path(out_dir)
    kind = "dataset" if table_format(in_path) == "dataset" else "manifest"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = None
    if text_tokenizer_path:
        from tokenizer.text import TextTokenizer
        tok = TextTokenizer(text_tokenizer_path)
        room = slot - len(tok.span_prefix(SPAN_FOR_ROOM))
    else:
        room = slot - PROXY_PREFIX
    hasher = MinHasher(dedup)
    lengths = {"chars_raw": _Lengths(), "chars": _Lengths(), "tokens": _Lengths()}
    flags, scripts, languages = Counter(), Counter(), Counter()
    ngrams = _Ngrams()
    examples: dict[str, list] = {f: [] for f in FLAGS}
    cut_examples: list = []
    counts = Counter()
    meta = {"caption_column": caption_col, "id_column": None}
    exact_parts, has_parts, parts = [], [], []
    wanted = set(CAPTION_COLUMNS) | set(ID_COLUMNS) | ({caption_col} if caption_col else set())

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".audit-") as tmp:
        tmp = Path(tmp)
        sig_file, band_file = open(tmp / "sig.u32", "wb"), open(tmp / "bands.u64", "wb")
        row0 = 0
        for df in iter_table(in_path, chunk_rows, columns=wanted):
            col = caption_col or caption_column(df.columns)
            id_col = next((c for c in ID_COLUMNS if c in df.columns and c != col), None)
            meta.update(caption_column=col, id_column=id_col)
            raw = [_as_text(x) for x in (df["caption_raw"] if "caption_raw" in df.columns else df[col])]
            results = [clean_caption(x, config) for x in raw]
            clean = [c for c, _ in results]
            fl = [f for _, f in results]
            m = len(clean)
            empty = np.fromiter((("empty" in f or "too_short" in f) for f in fl), dtype=bool, count=m)
            if tok is not None:
                ntok = np.fromiter((len(ids) for ids in tok.sp.encode(clean, out_type=int)), np.int64, count=m)
            else:
                ntok = np.fromiter((proxy_tokens(c) for c in clean), np.int64, count=m)
            cut = (ntok > room) & ~empty
            chars_raw = np.fromiter((len(r) for r in raw), np.int64, count=m)
            chars = np.fromiter((len(c) for c in clean), np.int64, count=m)
            script = [detect_script(c) for c in clean]
            lang = [detect_language(c) for c in clean]
            tokens = [dedup_tokens(c) if not e else [] for c, e in zip(clean, empty)]
            sig, has = hasher.signatures(tokens)
            exact = np.fromiter((int.from_bytes(hashlib.blake2b(" ".join(t).encode("utf-8"), digest_size=8)
                                                .digest(), "little") for t in tokens), np.uint64, count=m)
            sig_file.write(sig.tobytes())
            band_file.write(hasher.band_hashes(sig).tobytes())
            exact_parts.append(exact)
            has_parts.append(has)
            part = pd.DataFrame({
                "row": np.arange(row0, row0 + m, dtype=np.int64),
                "id": [None if pd.isna(x) else str(x) for x in df[id_col]] if id_col else [None] * m,
                "caption_raw": raw, "caption": clean, "caption_flags": fl,
                "chars_raw": chars_raw, "chars": chars, "words": [len(c.split()) for c in clean],
                "tokens": ntok, "cut": cut, "script": script, "language": lang, "empty": empty})
            parts.append(tmp / f"part-{len(parts):05d}.parquet")
            part.to_parquet(parts[-1], index=False)
            # summary accumulators
            for key, values in (("chars_raw", chars_raw), ("chars", chars), ("tokens", ntok)):
                lengths[key].add(values)
            counts.update(rows=m, empty=int(empty.sum()), cut=int(cut.sum()),
                          changed=sum(c != r for c, r in zip(clean, raw)))
            flags.update(f for row_flags in fl for f in row_flags)
            scripts.update(script)
            languages.update(lang)
            ngrams.add(tokens)
            for r, c, row_flags in zip(raw, clean, fl):
                for f in row_flags:
                    if len(examples[f]) < EXAMPLES and all(e["raw"] != r for e in examples[f]):
                        examples[f].append({"raw": r[:600], "clean": c[:600]})
            for i in np.flatnonzero(cut)[:EXAMPLES - len(cut_examples)]:
                cut_examples.append({"caption": clean[i][:600], "tokens": int(ntok[i])})
            row0 += m
        sig_file.close()
        band_file.close()
        n = row0
        exact = np.concatenate(exact_parts) if exact_parts else np.zeros(0, np.uint64)
        has = np.concatenate(has_parts) if has_parts else np.zeros(0, bool)
        if n:
            sig = np.memmap(tmp / "sig.u32", dtype=np.uint32, mode="r", shape=(n, dedup.num_perm))
            bands = np.memmap(tmp / "bands.u64", dtype=np.uint64, mode="r", shape=(n, hasher.bands))
            dups = find_duplicates(sig, bands, has, exact, dedup)
            del sig, bands
        else:
            dups = {k: np.zeros(0, dt) for k, dt in (("dup_cluster", np.int64), ("dup_cluster_size", np.int64),
                                                      ("dup_exact", bool), ("dup_near", bool))}
        sizes = dups["dup_cluster_size"]
        reps = np.flatnonzero((dups["dup_cluster"] == np.arange(n)) & (sizes > 1))
        top_ids = reps[np.lexsort((reps, -sizes[reps]))][:20]
        top = {int(c): {"cluster": int(c), "size": int(sizes[c]), "caption": None, "examples": []}
               for c in top_ids}
        # pass 2: the per-caption table with its duplicate columns
        writer = None
        tmp_out = out_dir / "captions.parquet.tmp"
        for path in parts:
            part = pd.read_parquet(path)
            rows = part["row"].to_numpy()
            for key, values in dups.items():
                part[key] = values[rows]
            for c, cap, row in zip(part["dup_cluster"], part["caption"], rows):
                if c in top:
                    entry = top[c]
                    if row == c:
                        entry["caption"] = cap[:600]
                    elif len(entry["examples"]) < EXAMPLES and cap not in entry["examples"] and cap != entry["caption"]:
                        entry["examples"].append(cap[:600])
            table = pa.Table.from_pandas(part, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp_out, table.schema)
            writer.write_table(table)
        if writer is None:
            pd.DataFrame({"row": pd.Series([], dtype="int64"), "caption": pd.Series([], dtype=str)}).to_parquet(tmp_out)
        else:
            writer.close()
        os.replace(tmp_out, out_dir / "captions.parquet")

    rows = counts["rows"]
    clusters = int(len(reps))
    in_clusters = int(sizes[reps].sum()) if clusters else 0
    summary = {
        "input": str(in_path), "kind": kind, **meta,
        "rows": rows, "usable": rows - counts["empty"], "empty": counts["empty"], "changed": counts["changed"],
        "flags": {f: flags.get(f, 0) for f in FLAGS},
        "chars_raw": lengths["chars_raw"].stats(), "chars": lengths["chars"].stats(),
        "tokens": lengths["tokens"].stats(),
        "token_count": {"method": "sentencepiece" if tok else "proxy",
                        "tokenizer": tok.tokenizer_id if tok else None, "slot": slot, "room": room,
                        "note": (f"room = slot - len(span prefix '{SPAN_FOR_ROOM:.1f} s' + separator)" if tok else
                                 "proxy: one token per word, CJK character and punctuation mark; "
                                 f"room = slot - {PROXY_PREFIX}")},
        "cut": counts["cut"], "cut_fraction": counts["cut"] / rows if rows else 0.0,
        "scripts": _stats_table(scripts), "languages": _stats_table(languages),
        "duplicates": {
            "method": "minhash-lsh", "num_perm": dedup.num_perm, "threshold": dedup.threshold,
            "bands": hasher.bands, "rows_per_band": hasher.rows, "ngram": dedup.ngram, "verified": dedup.verify,
            "exact_rows": int(dups["dup_exact"].sum()), "near_rows": int(dups["dup_near"].sum()),
            "clusters": clusters, "rows_in_clusters": in_clusters, "removable": in_clusters - clusters,
            "top": [top[int(c)] for c in top_ids]},
        "top_ngrams": ngrams.top(), "ngrams_exact": ngrams.exact,
        "histograms": {k: v.histogram() for k, v in lengths.items()},
        "examples": {f: e for f, e in examples.items() if e}, "cut_examples": cut_examples,
        "config": asdict(config), "dedup_config": asdict(dedup), "chunk_rows": chunk_rows,
        "seconds": round(time.time() - started, 3),
    }
    _write_json(out_dir / "summary.json", summary)
    render_report(summary, out_dir / "report.html")
    return summary


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
