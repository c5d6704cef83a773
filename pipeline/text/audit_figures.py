"""Running figures of the caption audit (`clipforge.pipeline.text.audit`), each in bounded memory: exact
length statistics and histograms (`LengthStats`) and the top word n-grams (`count_ngrams` per slice,
merged by `NgramCounts`)."""
from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np

from clipforge.pipeline.text.dedup import CJK_CHARS
from clipforge.pipeline.text.langid import STOPWORDS

HIST_CAP = 4096        # lengths below this are counted exactly per value; longer ones are kept in a list
NGRAM_PRUNE = 20_000   # a slice's n-gram vocabulary above this keeps only the n-grams seen twice

_STOP = frozenset(w for words in STOPWORDS.values() for w in words.split())


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


def count_ngrams(tokens_list: list[list[str]], prune: bool = False) -> tuple[dict[int, Counter], bool]:
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


class NgramCounts:
    """Top word n-grams (CJK: character n-grams) of the captions the audit samples (see
    `audit.NGRAM_ALL_ROWS`); exact unless a slice was pruned or a vocabulary outgrew `limit` (then cut to
    its heaviest half)."""

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
