"""Duplicate captions across a whole corpus: exact ones by a hash of the normalized text, near ones by
MinHash LSH, joined into clusters. Used by `clipforge.pipeline.text.audit`.

Near-duplicates follow datasketch exactly: the signatures equal `datasketch.MinHash(num_perm, seed,
hashfunc=identity).update_batch(shingle_hashes)`, and bands use `MinHashLSH`'s (b, r) for the
threshold, so a band collision here is a `MinHashLSH.query` candidate there (tests check both). What
differs is scale: `MinHashLSH` keeps a Python dict entry per caption per band (~1.5 GB per million
captions at the default 8 bands), whereas sorting each band's 64-bit hashes finds the same collisions with flat arrays.
Candidates are then verified on the full signatures (estimated Jaccard >= threshold) and joined into
connected components; a cluster's id is its first-seen member's row number.
"""
from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_DEDUP_TOKEN_RE = re.compile(rf"[{CJK_CHARS}]|[^\W_{CJK_CHARS}]+")
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


_area = getattr(np, "trapezoid", None) or np.trapz   # numpy 2 renamed trapz


def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= num_perm that minimises the weighted sum of the
    false-positive area (Jaccard below `threshold` still colliding) and the false-negative area (above it,
    not colliding) under the S-curve 1 - (1 - s^r)^b. This is the same criterion datasketch's
    MinHashLSH uses, so the choice matches its index for the same parameters."""
    s_lo = np.linspace(0.0, threshold, 1001)
    s_hi = np.linspace(threshold, 1.0, 1001)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _area(1 - (1 - s_lo ** r) ** b, s_lo)
            fn = _area((1 - s_hi ** r) ** b, s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class MinHasher:
    """Vectorized MinHash signatures and LSH band hashes for chunks of captions."""

    def __init__(self, config: DedupConfig = DedupConfig()):
        from datasketch import MinHash
        self.config = config
        a, b = MinHash(num_perm=config.num_perm, seed=config.seed).permutations
        self.a, self.b = a.astype(np.uint32), b.astype(np.uint32)
        self.bands, self.rows = lsh_bands(config.threshold, config.num_perm)
        self._cache: dict[str, int] = {}

    def _token_hashes(self, tokens: list[str]) -> np.ndarray:
        """datasketch's sha1_hash32 of each token, memoized (a corpus has far fewer words than tokens)."""
        cache = self._cache
        if len(cache) > 2_000_000:
            cache.clear()
        for w in {w for w in set(tokens) if w not in cache}:
            cache[w] = struct.unpack("<I", hashlib.sha1(w.encode("utf-8")).digest()[:4])[0]
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint32, count=len(tokens))

    def shingles(self, tokens_list: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes uint32, owner index per shingle, sorted) for a list of token lists."""
        n = self.config.ngram
        lens = np.fromiter((len(t) for t in tokens_list), dtype=np.int64, count=len(tokens_list))
        flat = self._token_hashes([w for t in tokens_list for w in t])
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
        step = max(1, (1 << 16) // p)  # [step, num_perm] uint32 = 256 kB: stays in cache
        buf = np.empty((step, p), dtype=np.uint32)
        i = 0
        while i < len(h):
            j = min(len(h), i + step)
            if j < len(h) and owner[j] == owner[j - 1]:  # never split one caption's shingles
                start = int(np.searchsorted(owner, owner[j], side="left"))
                j = start if start > i else int(np.searchsorted(owner, owner[j], side="right"))
            phv = buf[:j - i] if j - i <= step else np.empty((j - i, p), dtype=np.uint32)
            np.multiply(h[i:j, None], self.a[None, :], out=phv)  # uint32 wrap-around, as datasketch
            np.add(phv, self.b[None, :], out=phv)
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
    if not len(values):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((index, values))
    v, idx = values[order], index[order]
    new_run = np.r_[True, v[1:] != v[:-1]]
    first = idx[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
    keep = ~new_run
    return idx[keep], first[keep]


def candidate_pairs(bands, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LSH candidates: (u, v) with v < u sharing at least one band (MinHashLSH's rule), deduplicated.
    `bands` is an [n, b] array or a `SignatureStore` (one band column in memory at a time)."""
    index = np.flatnonzero(has)
    us, vs = [], []
    for k in range(bands.shape[1]):
        u, v = _run_edges(bands.column(k)[index] if isinstance(bands, SignatureStore) else bands[index, k], index)
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


class SignatureStore:
    """Signatures and band hashes on disk: row-major signatures, one file per band column. Read with
    plain file I/O, never mmap, so that only what is being used counts against memory."""

    def __init__(self, folder: Path, num_perm: int, bands: int):
        self.folder, self.p, self.shape = folder, num_perm, (0, bands)
        self.sig = open(folder / "sig.u32", "wb")
        self.band = [open(folder / f"band-{k}.u64", "wb") for k in range(bands)]

    def append(self, sig: np.ndarray, bands: np.ndarray) -> None:
        self.sig.write(sig.tobytes())
        for k, f in enumerate(self.band):
            f.write(np.ascontiguousarray(bands[:, k]).tobytes())
        self.shape = (self.shape[0] + len(sig), self.shape[1])

    def close(self) -> None:
        for f in [self.sig, *self.band]:
            f.close()

    def column(self, k: int) -> np.ndarray:
        return np.fromfile(self.folder / f"band-{k}.u64", dtype=np.uint64)

    def take(self, rows: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """Signatures of the sorted unique `rows`, reading the file in sequential blocks."""
        out = np.empty((len(rows), self.p), dtype=np.uint32)
        with open(self.folder / "sig.u32", "rb") as f:
            for start in range(0, self.shape[0], block):
                lo, hi = np.searchsorted(rows, [start, start + block])
                if lo < hi:
                    f.seek(start * self.p * 4)
                    chunk = np.fromfile(f, dtype=np.uint32, count=min(block, self.shape[0] - start) * self.p)
                    out[lo:hi] = chunk.reshape(-1, self.p)[rows[lo:hi] - start]
        return out


def find_duplicates(sig, bands, has, exact, config: DedupConfig) -> dict[str, np.ndarray]:
    """Per-row duplicate columns from signatures [n, P] and bands [n, b] (arrays, or one `SignatureStore`
    for both), has [n] and exact hashes [n]."""
    n = len(has)
    u, v = candidate_pairs(bands, has)
    if config.verify and len(u):
        check = exact[u] != exact[v]  # exact duplicates need no verification
        rows = np.unique(np.r_[u[check], v[check]])
        sigs = sig.take(rows) if isinstance(sig, SignatureStore) else sig[rows]
        same = (sigs[np.searchsorted(rows, u[check])] == sigs[np.searchsorted(rows, v[check])]).mean(axis=1)
        ok = np.ones(len(u), dtype=bool)
        ok[check] = same >= config.threshold
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
