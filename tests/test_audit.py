"""`audit`: its numbers checked against direct pandas computations, and its duplicate finder against
datasketch itself."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipforge.pipeline.text.audit import PROXY_PREFIX, audit, proxy_tokens
from clipforge.pipeline.text.audit_figures import HIST_CAP, LengthStats
from clipforge.pipeline.text.caption_rules import FLAGS, clean_caption
from clipforge.pipeline.text.dedup import DedupConfig, MinHasher, candidate_pairs, components, dedup_tokens
from clipforge.pipeline.text.langid import detect_language, detect_script

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "captions"
LONG = ("a small brown dog with a red collar is playing with a yellow tennis ball on the green grass "
        "of a sunny park while children watch from a wooden bench nearby")
CAPTIONS = [
    "A man rides a bike down the street.",
    "a man rides a bike down the street!!",          # exact duplicate after normalization
    "The video shows a man rides a bike down the street",  # same after the prefix rule
    LONG,
    LONG.replace("nearby", "close by"),              # near duplicate of the previous one
    LONG.replace("nearby", "over there"),            # and another
    "Waves crash on rocks - stock footage 4K",
    "CafÃ© terrace at night https://example.com/v/1",
    "<script>alert(1)</script> cat &amp; mouse",
    "一只猫在沙发上睡觉",
    "一只猫在沙发上睡觉。",                              # exact duplicate (punctuation dropped)
    "これは猫です",
    "Кошка спит на диване",
    "https://example.com/only-a-link",                # empty after cleaning
    "",
    "x " * 80,                                        # long: cut at the slot
    "A completely unrelated caption about mountains at dawn",
]


# Written out by hand for CAPTIONS, row by row (not computed by the functions under test): the cleaned
# text, its flags, language, script, proxy tokens (one per word, CJK character and punctuation mark) and the
# duplicate key (lower-cased words and CJK characters, punctuation dropped; None: not compared).
MAN = "a man rides a bike down the street"
TRUTH = [
    ("A man rides a bike down the street.", [], "en", "Latin", 9, MAN),
    ("a man rides a bike down the street!!", [], "en", "Latin", 10, MAN),
    ("A man rides a bike down the street", ["prefix"], "en", "Latin", 8, MAN),
    (LONG, [], "en", "Latin", 31, LONG),
    (LONG.replace("nearby", "close by"), [], "en", "Latin", 32, LONG.replace("nearby", "close by")),
    (LONG.replace("nearby", "over there"), [], "en", "Latin", 32, LONG.replace("nearby", "over there")),
    ("Waves crash on rocks", ["boilerplate"], "en", "Latin", 4, "waves crash on rocks"),
    ("Café terrace at night", ["ftfy", "mojibake", "url"], "en", "Latin", 4, "café terrace at night"),
    ("alert(1) cat & mouse", ["html"], "und", "Latin", 7, "alert 1 cat mouse"),
    ("一只猫在沙发上睡觉", [], "zh", "Han", 9, "一 只 猫 在 沙 发 上 睡 觉"),
    ("一只猫在沙发上睡觉。", [], "zh", "Han", 10, "一 只 猫 在 沙 发 上 睡 觉"),
    ("これは猫です", [], "ja", "Kana", 6, "こ れ は 猫 で す"),
    ("Кошка спит на диване", [], "ru", "Cyrillic", 4, "кошка спит на диване"),
    ("", ["empty", "url"], "und", "None", 0, None),   # the script column's word for "no letters"
    ("", ["empty"], "und", "None", 0, None),
    (" ".join(["x"] * 80), ["whitespace"], "und", "Latin", 80, " ".join(["x"] * 80)),
    ("A completely unrelated caption about mountains at dawn", [], "en", "Latin", 8,
     "a completely unrelated caption about mountains at dawn"),
]


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.csv"
    pd.DataFrame({"video": [f"v{i}.mp4" for i in range(len(CAPTIONS))], "caption": CAPTIONS}).to_csv(path, index=False)
    return path


def _expected(raw: list[str], room: int, count=None, truth=None) -> pd.DataFrame:
    """Everything the audit reports, recomputed caption by caption with plain pandas.

    With `truth` (the hand-written TRUTH), per-caption features come from it, so the audit is checked
    against independent values. Without it (real files of hundreds of captions, where nobody writes the
    answers by hand), they come from the cleaning, language and duplicate functions, which TRUTH pins
    separately (test_per_caption_functions_match_the_hand_written_truth): those runs check the audit's
    aggregation, chunking and file handling. `count` replaces the token count (e.g. sentencepiece)."""
    df = pd.DataFrame({"caption_raw": raw})
    if truth is not None:
        assert len(truth) == len(raw)
        df["caption"] = [t[0] for t in truth]
        df["flags"] = [list(t[1]) for t in truth]
        df["language"] = [t[2] for t in truth]
        df["script"] = [t[3] for t in truth]
        df["tokens"] = [t[4] for t in truth] if count is None else df["caption"].map(count)
        df["key"] = [t[5] for t in truth]
    else:
        cleaned = df["caption_raw"].map(clean_caption)
        df["caption"] = cleaned.str[0]
        df["flags"] = cleaned.str[1]
        df["language"] = df["caption"].map(detect_language)
        df["script"] = df["caption"].map(detect_script)
        df["tokens"] = df["caption"].map(count or proxy_tokens)
        empty = df["flags"].map(lambda f: "empty" in f or "too_short" in f)
        # captions with no word or CJK token (only emoji or punctuation) are not compared
        df["key"] = [" ".join(dedup_tokens(c)) or None if not e else None for c, e in zip(df["caption"], empty)]
    df["empty"] = df["flags"].map(lambda f: "empty" in f or "too_short" in f)
    df["chars_raw"] = df["caption_raw"].str.len()
    df["chars"] = df["caption"].str.len()
    df["cut_after_prefix"] = (df["tokens"] > room) & ~df["empty"]
    return df


def test_per_caption_functions_match_the_hand_written_truth():
    for raw, (caption, flags, language, script, tokens, key) in zip(CAPTIONS, TRUTH):
        assert clean_caption(raw) == (caption, flags), raw
        assert (detect_language(caption), detect_script(caption)) == (language, script), raw
        assert proxy_tokens(caption) == tokens, raw
        assert (" ".join(dedup_tokens(caption)) or None if key is not None else None) == key, raw


def _check_against_pandas(summary: dict, out_dir: Path, exp: pd.DataFrame) -> pd.DataFrame:
    got = pd.read_parquet(out_dir / "captions.parquet")
    assert len(got) == len(exp) == summary["rows"]
    assert list(got["row"]) == list(range(len(exp)))
    assert list(got["caption"]) == list(exp["caption"])
    assert [list(f) for f in got["caption_flags"]] == list(exp["flags"])
    for col in ("chars_raw", "chars", "tokens", "cut_after_prefix", "language", "script", "empty"):
        assert list(got[col]) == list(exp[col]), col
    assert summary["changed"] == int((exp["caption"] != exp["caption_raw"]).sum())
    assert summary["empty"] == int(exp["empty"].sum())
    assert summary["usable"] == len(exp) - int(exp["empty"].sum())
    assert summary["cut_after_prefix"] == int(exp["cut_after_prefix"].sum())
    assert summary["cut_after_prefix_fraction"] == pytest.approx(exp["cut_after_prefix"].mean())
    flag_counts = exp["flags"].explode().value_counts()
    assert summary["flags"] == {f: int(flag_counts.get(f, 0)) for f in FLAGS}
    assert summary["languages"] == exp["language"].value_counts().to_dict()
    assert summary["scripts"] == exp["script"].value_counts().to_dict()
    for col in ("chars_raw", "chars", "tokens"):
        stats, s = summary[col], exp[col]
        assert stats["mean"] == pytest.approx(s.mean()) and stats["max"] == s.max() and stats["min"] == s.min()
        for q in (50, 90, 95, 99):
            assert stats[f"p{q}"] == pytest.approx(s.quantile(q / 100)), (col, q)
        hist = summary["histograms"][col]
        assert sum(hist["counts"]) == len(s)
        assert hist["counts"] == np.bincount(s // hist["width"]).tolist()
    # duplicates: exact ones by normalized text, clusters are unions of those plus near pairs
    keyed = exp[exp["key"].notna()]
    repeats = keyed.groupby("key")["key"].transform("size") > 1
    assert summary["duplicates"]["exact_rows"] == int(repeats.sum()) == int(got["dup_exact"].sum())
    assert list(got.loc[keyed.index, "dup_exact"]) == list(repeats)
    for _, members in keyed.groupby("key"):
        assert got.loc[members.index, "dup_cluster"].nunique() == 1
    clusters = got.groupby("dup_cluster")["row"]
    assert (clusters.min() == clusters.min().index).all()  # cluster id = first member's row
    assert (got["dup_cluster_size"] == got.groupby("dup_cluster")["row"].transform("size")).all()
    multi = got[got["dup_cluster_size"] > 1]
    assert summary["duplicates"]["clusters"] == multi["dup_cluster"].nunique()
    assert summary["duplicates"]["rows_in_clusters"] == len(multi)
    assert summary["duplicates"]["removable"] == len(multi) - multi["dup_cluster"].nunique()
    distinct = got.assign(key=exp["key"]).groupby("dup_cluster")["key"].transform("nunique")
    assert list(got["dup_near"]) == list(distinct > 1)
    assert summary["duplicates"]["near_rows"] == int(got["dup_near"].sum())
    assert json.loads((out_dir / "summary.json").read_text(encoding="utf-8")) == summary
    return got


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    summary = audit(_manifest(tmp), tmp / "out", chunk_rows=4)
    return tmp, summary


def test_audit_small_manifest_matches_pandas(small):
    tmp, summary = small
    out = tmp / "out"
    exp = _expected(CAPTIONS, room=64 - PROXY_PREFIX, truth=TRUTH)
    got = _check_against_pandas(summary, out, exp)
    assert summary["kind"] == "manifest" and summary["caption_column"] == "caption"
    assert summary["id_column"] == "video" and list(got["id"]) == [f"v{i}.mp4" for i in range(len(CAPTIONS))]
    assert summary["token_count"]["method"] == "proxy"
    # the hand-built duplicates are found as intended
    assert list(got["dup_cluster"][:3]) == [0, 0, 0] and not got["dup_near"][:3].any()
    assert list(got["dup_cluster"][3:6]) == [3, 3, 3] and got["dup_near"][3:6].all()
    assert list(got["dup_cluster"][9:11]) == [9, 9] and got["dup_exact"][9:11].all()
    assert got["dup_cluster_size"][16] == 1
    assert summary["duplicates"]["top"][0] == {
        "cluster": 0, "size": 3, "caption": "A man rides a bike down the street.",
        "examples": ["a man rides a bike down the street!!", "A man rides a bike down the street"]}
    assert got["cut_after_prefix"][15] and summary["cut_after_prefix_examples"][0]["tokens"] == 80
    assert not list(out.glob(".audit-*"))  # temporary files are gone


def test_report_shows_plots_numbers_examples_and_escapes(small):
    tmp, summary = small
    page = (tmp / "out" / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 6
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; cat &amp;amp; mouse" in page
    assert f"<b>{summary['rows']:,}</b>" in page and f"<b>{summary['cut_after_prefix']:,}</b>" in page
    for flag in ("html", "ftfy", "url", "boilerplate", "prefix", "empty", "email", "handle"):
        assert f"<b>{flag}</b>" in page  # a before/after row for every rule (illustrations where unused)
    assert "Waves crash on rocks - stock footage 4K" in page and "Café terrace at night" in page
    assert "illustration" in page  # email/handle did not occur in this input


def test_chunking_does_not_change_results(small, tmp_path):
    tmp, summary = small
    other = audit(_manifest(tmp_path), tmp_path / "out", chunk_rows=1000)
    a = pd.read_parquet(tmp / "out" / "captions.parquet")
    b = pd.read_parquet(tmp_path / "out" / "captions.parquet")
    pd.testing.assert_frame_equal(a, b)
    for key in ("seconds", "chunk_rows", "input"):
        summary, other = {**summary, key: None}, {**other, key: None}
    assert summary == other


def test_worker_processes_give_the_same_results(small, tmp_path, monkeypatch):
    import clipforge.pipeline.text.audit as audit_module
    tmp, summary = small
    monkeypatch.setattr(audit_module, "SLICE_ROWS", 3)  # 6 slices, 4 of them in forked workers
    other = audit(_manifest(tmp_path), tmp_path / "out", chunk_rows=4, workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp / "out" / "captions.parquet"),
                                  pd.read_parquet(tmp_path / "out" / "captions.parquet"))
    assert {**summary, "seconds": 0, "input": 0} == {**other, "seconds": 0, "input": 0}


def test_audit_with_sentencepiece_tokenizer(tmp_path):
    from clipforge.tokenizer.text import TextTokenizer, train_text_tokenizer
    model = tmp_path / "spm.model"
    train_text_tokenizer([c for c in CAPTIONS if c] * 20 + [LONG.replace("dog", w) for w in "abcdefgh"], model,
                         vocab_size=300)
    tok = TextTokenizer(model)
    summary = audit(_manifest(tmp_path), tmp_path / "out", text_tokenizer_path=model, slot=32)
    room = 32 - len(tok.span_prefix(16.0))
    assert summary["token_count"] == {**summary["token_count"], "method": "sentencepiece", "room": room,
                                      "tokenizer": tok.tokenizer_id, "slot": 32}
    exp = _expected(CAPTIONS, room, count=lambda c: len(tok.encode(c)), truth=TRUTH)
    _check_against_pandas(summary, tmp_path / "out", exp)
    assert summary["cut_after_prefix"] >= 2


def test_audit_dataset_directory(tmp_path):
    index = tmp_path / "ds" / "index"
    index.mkdir(parents=True)
    raws = CAPTIONS[:9]
    for shard, part in enumerate((raws[:5], raws[5:])):
        pd.DataFrame({"key": [f"k{shard}_{i}" for i in range(len(part))],
                      "caption": [clean_caption(c)[0] for c in part], "caption_raw": part,
                      "rate": 1.0}).to_parquet(index / f"train-{shard:06d}.parquet")
    summary = audit(tmp_path / "ds", tmp_path / "out", chunk_rows=3)
    assert summary["kind"] == "dataset" and summary["id_column"] == "key"
    got = _check_against_pandas(summary, tmp_path / "out", _expected(raws, 64 - PROXY_PREFIX, truth=TRUTH[:9]))
    assert list(got["caption_raw"]) == raws  # the raw text, not the stored clean one, is re-audited
    assert list(got["id"][:2]) == ["k0_0", "k0_1"]


def test_audit_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    summary = audit(tmp_path / "empty.txt", tmp_path / "out")
    assert summary["rows"] == 0 and summary["duplicates"]["clusters"] == 0
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "captions.parquet").exists()


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


REAL = [("msrvtt_jsfusion_test_1k.csv", "sentence", lambda p: pd.read_csv(p, sep=";")["sentence"]),
        ("webvid_sample_20rows.csv", "name", lambda p: pd.read_csv(p)["name"]),
        ("vbench_all_dimension.txt", "caption", _lines),
        ("vbench_all_dimension_cn.txt", "caption", _lines),
        ("vbench_all_dimension_longer.txt", "caption", _lines)]


@pytest.mark.skipif(not DATA.exists(), reason="shared test data not present")
@pytest.mark.parametrize("name, column, load", REAL, ids=[r[0] for r in REAL])
def test_audit_real_caption_files(tmp_path, name, column, load):
    summary = audit(DATA / name, tmp_path / "out", chunk_rows=400)
    raw = [str(x) for x in load(DATA / name)]
    assert summary["caption_column"] == column
    _check_against_pandas(summary, tmp_path / "out", _expected(raw, 64 - PROXY_PREFIX))
    langs = summary["languages"]
    if name.endswith("_cn.txt"):
        assert langs == {"zh": len(raw)} and summary["scripts"] == {"Han": len(raw)}
    else:
        assert max(langs, key=langs.get) == "en"
    if "longer" in name:
        assert summary["cut_after_prefix_fraction"] > 0.9  # GPT-lengthened prompts do not fit 64 tokens
    if "longer" in name:  # each prompt rewritten at length in its own words: nothing near at 0.7
        assert summary["duplicates"]["near_rows"] == 0 and summary["duplicates"]["exact_rows"] == 0
    elif name.startswith("vbench_all_dimension"):  # the same prompt in several styles: near duplicates
        assert summary["duplicates"]["near_rows"] > 50


# ----------------------------------------------------------------------------- the duplicate finder
def _template_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "man woman dog cat car bike park street beach snow runs walks jumps plays red blue big small".split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n // 3)]
    out = []
    for _ in range(n):
        b = rng.choice(base).split()
        if rng.random() < 0.5:
            b[rng.randrange(len(b))] = rng.choice(words)
        out.append(" ".join(b))
    return out + ["一只猫在沙发上睡觉", "一只猫在沙发上睡觉了", "猫"]


def test_minhash_and_lsh_match_datasketch():
    from datasketch import MinHash, MinHashLSH
    cfg = DedupConfig()
    hasher = MinHasher(cfg)
    caps = _template_captions(300)
    tokens = [dedup_tokens(c) for c in caps] + [[]]
    sig, has = hasher.signatures(tokens)
    h, owner = hasher.shingles(tokens)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    assert (lsh.b, lsh.r) == (hasher.bands, hasher.rows)
    sketches = []
    for i in range(len(tokens)):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=lambda x: x)
        m.update_batch([int(x) for x in h[owner == i]])
        assert (m.hashvalues == sig[i]).all()
        sketches.append(m)
        if has[i]:
            lsh.insert(i, m)
    assert not has[-1]
    bands = hasher.band_hashes(sig)
    u, v = candidate_pairs(bands, has)
    ours = set(zip(u.tolist(), v.tolist()))
    theirs = {(max(i, j), min(i, j)) for i in range(len(tokens)) if has[i]
              for j in lsh.query(sketches[i]) if j != i}
    # ours links each member to the first of its bucket; theirs lists every pair: same components
    assert ours <= theirs
    assert _components_of(len(tokens), ours) == _components_of(len(tokens), theirs)
    assert len(theirs) > 50


def _components_of(n, pairs):
    pairs = list(pairs)
    return components(n, np.array([p[0] for p in pairs], dtype=np.int64),
                      np.array([p[1] for p in pairs], dtype=np.int64)).tolist()


def test_components_against_brute_force():
    rng = random.Random(1)
    n = 60
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(45)]
    labels = _components_of(n, edges)
    comp = list(range(n))  # naive union-find
    def find(x):
        while comp[x] != x:
            x = comp[x]
        return x
    for a, b in edges:
        ra, rb = find(a), find(b)
        comp[max(ra, rb)] = min(ra, rb)
    assert labels == [find(i) for i in range(n)]


def test_lengths_quantiles_equal_numpy():
    rng = np.random.default_rng(0)
    values = np.r_[rng.integers(0, 300, 5000), rng.integers(HIST_CAP, HIST_CAP + 50_000, 40)]
    acc = LengthStats()
    for part in np.array_split(values, 7):
        acc.add(part)
    stats = acc.stats()
    assert stats["mean"] == pytest.approx(values.mean()) and stats["max"] == values.max()
    for q in (50, 90, 95, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(values, q))


def test_dedup_tokens_normalize_case_punctuation_width_and_cjk():
    assert dedup_tokens("A Man, riding!! a BIKE") == ["a", "man", "riding", "a", "bike"]
    assert dedup_tokens("ＡＢＣ ﬁne") == ["abc", "fine"]
    assert dedup_tokens("一只猫, cat") == ["一", "只", "猫", "cat"]
    assert proxy_tokens("A dog, 一只猫!") == 7
    assert re.fullmatch(r"\d+", str(proxy_tokens("")))


@pytest.mark.skipif(not (DATA.parent / "dirty_text").exists(), reason="shared test data not present")
def test_audit_survives_naughty_strings(tmp_path):
    path = DATA.parent / "dirty_text" / "blns.txt"
    summary = audit(path, tmp_path / "out", chunk_rows=100)
    with open(path, encoding="utf-8", errors="replace") as f:  # lines as text files define them (not U+2028)
        raw = [line.rstrip("\r\n") for line in f if line.strip()]
    _check_against_pandas(summary, tmp_path / "out", _expected(raw, 64 - PROXY_PREFIX))
    assert "<script>" not in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
