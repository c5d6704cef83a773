"""Caption cleaning, script/language identification, the CleanCaption stage and manifest cleaning."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import ftfy
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.schema import REASONS
from clipforge.pipeline.text.caption_rules import FLAGS, CleanConfig, clean_caption
from clipforge.pipeline.text.captions import CleanCaption, clean_manifest
from clipforge.pipeline.text.langid import detect_language, detect_script, script_and_language
from clipforge.pipeline.text.tables import iter_table, read_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DIRTY = DATA / "dirty_text"
OFF = dict(html=False, ftfy=False, url=False, email=False, handle=False, control=False, whitespace=False,
           boilerplate=False, prefix=False, max_chars=0)


def only(**on) -> CleanConfig:
    return CleanConfig(**{**OFF, **on})


# ----------------------------------------------------------------------------------------- each rule
RULE_CASES = [
    # (input, expected clean text, expected flags)
    ("A dog runs.", "A dog runs.", []),
    ("Tom &amp; Jerry &lt;3", "Tom & Jerry <3", ["html"]),
    ("&amp;amp;lt;b&amp;amp;gt;", "", ["empty", "html"]),  # doubly escaped tag: unescaped, then removed
    ("a <b>bold</b> move<br/>ok", "a bold move ok", ["html"]),
    ("x <!-- hidden --> y", "x y", ["html"]),
    ("a<b and c>d", "a d", ["html"]),  # known-tag names only; this one is a tag
    ("x < 5 and y > 3", "x < 5 and y > 3", []),
    ("CafÃ© terrace", "Café terrace", ["ftfy", "mojibake"]),
    ("“curly” quotes", '"curly" quotes', ["ftfy"]),
    ("Ningbo，China", "Ningbo,China", ["ftfy"]),         # fullwidth narrowed in Latin text
    ("在静止的画面中，一个停车标志", "在静止的画面中，一个停车标志", []),  # ... and kept in Chinese
    ("Watch https://example.com/a?b=1. Great!", "Watch. Great!", ["url"]),
    ("see www.example.org/x and shutterstock.com", "see and", ["url"]),
    ("Node.js and e.g. St.Louis", "Node.js and e.g. St.Louis", []),
    ("mail bob.smith+tag@example.co.uk today", "mail today", ["email"]),
    ("skate by @skater_99 in LA", "skate by in LA", ["handle"]),
    ("meet @ 5pm", "meet @ 5pm", []),
    ("zero\u200bwidth\u0007 bell\u202e", "zerowidth bell", ["control"]),
    ("family 👨\u200d👩\u200d👧 joins", "family 👨\u200d👩\u200d👧 joins", []),  # ZWJ inside an emoji: kept
    ("lone \ud800 surrogate", "lone surrogate", ["control", "whitespace"]),
    ("  too   many\tspaces\n here ", "too many spaces here", ["whitespace"]),
    ("non\u00a0breaking", "non breaking", ["whitespace"]),
    ("Waves on rocks - stock footage 4K", "Waves on rocks", ["boilerplate"]),
    ("Aerial view of city. 4K.", "Aerial view of city.", ["boilerplate"]),
    ("4K: drone over forest", "drone over forest", ["boilerplate"]),
    ("Happy girl. Royalty free stock video", "Happy girl.", ["boilerplate"]),
    ("Shutterstock dog on grass", "dog on grass", ["boilerplate"]),
    ("The video shows a dog catching a frisbee.", "A dog catching a frisbee.", ["prefix"]),
    ("the video shows a dog", "a dog", ["prefix"]),
    ("In this video, a cat sleeps", "A cat sleeps", ["prefix"]),
    ("Footage of people walking", "People walking", ["prefix"]),
    ("this is a video of a live tv show", "a live tv show", ["prefix"]),
    ("视频中展示了一只猫", "一只猫", ["prefix"]),
    ("The video shows", "The video shows", []),  # nothing after the opener: left alone
    ("https://example.com", "", ["empty", "url"]),
    ("", "", ["empty"]),
]


@pytest.mark.parametrize("text, expected, flags", RULE_CASES)
def test_each_rule_exact_output_and_flags(text, expected, flags):
    assert clean_caption(text) == (expected, flags)


def test_truncation_at_a_word_boundary_or_hard():
    cfg = CleanConfig(max_chars=20)
    assert clean_caption("one two three four five six", cfg) == ("one two three four", ["truncated"])
    assert clean_caption("x" * 50, cfg) == ("x" * 20, ["truncated"])
    assert clean_caption("猫" * 50, cfg) == ("猫" * 20, ["truncated"])
    assert clean_caption("x" * 50, CleanConfig(max_chars=0)) == ("x" * 50, [])


def test_min_chars_flags_too_short():
    assert clean_caption("ab", CleanConfig(min_chars=3)) == ("ab", ["too_short"])
    assert clean_caption("abc", CleanConfig(min_chars=3)) == ("abc", [])


@pytest.mark.parametrize("step, text", [
    ("html", "a &amp; b"), ("ftfy", "CafÃ©"), ("url", "go http://x.com now"), ("email", "a b@c.de"),
    ("handle", "hi @bob"), ("control", "a\u200bb"), ("whitespace", "a  b"), ("boilerplate", "sea stock footage"),
    ("prefix", "The video shows a cat")])
def test_each_step_can_be_switched_off(step, text):
    assert clean_caption(text, CleanConfig(**{step: False}))[0] == \
        clean_caption(text, only(**{s: True for s in OFF if s not in (step, "max_chars")}))[0]
    kept, flags = clean_caption(text, only())
    assert kept == text and flags == []
    assert clean_caption(text)[0] != text


@pytest.mark.parametrize("value", [None, math.nan, float("nan"), pd.NA])
def test_missing_values_are_empty(value):
    assert clean_caption(value) == ("", ["empty"])


def test_other_types_become_text():
    assert clean_caption(5) == ("5", [])
    assert clean_caption(b"caf\xc3\xa9 bar") == ("café bar", [])
    assert clean_caption(b"\xff\xfe bad") == ("\ufffd\ufffd bad", [])


# ------------------------------------------------------------------------------------- ftfy's cases
def _ftfy_cases(expect="pass"):
    if not DIRTY.exists():
        return []
    cases = []
    for path in sorted(DIRTY.glob("ftfy_*.json")):
        cases += [c for c in json.loads(path.read_text(encoding="utf-8")) if c.get("expect") == expect]
    return cases


@pytest.mark.skipif(not DIRTY.exists(), reason="shared test data not present")
def test_ftfy_cases_give_ftfys_expected_fix():
    cases = _ftfy_cases()
    assert len(cases) > 100
    repair = only(html=True, ftfy=True)  # ftfy's own scope: encodings, quotes, entities, C0 controls
    for case in cases:
        original, fixed = case["original"], case["fixed"]
        assert clean_caption(original, repair)[0] == fixed, case["label"]
        # with every rule on, the original and ftfy's fix clean to the same caption
        assert clean_caption(original)[0] == clean_caption(fixed)[0], case["label"]


@pytest.mark.skipif(not DIRTY.exists(), reason="shared test data not present")
def test_naughty_strings_and_known_failures_do_not_break_cleaning():
    strings = json.loads((DIRTY / "blns.json").read_text(encoding="utf-8"))
    strings += (DIRTY / "blns.txt").read_text(encoding="utf-8").splitlines()
    strings += [c["original"] for c in _ftfy_cases("fail")]
    for s in strings:
        _check_clean(s)


def _check_clean(text, config=CleanConfig()):
    out, flags = clean_caption(text, config)
    assert isinstance(out, str)
    out.encode("utf-8")  # no lone surrogates left
    assert set(flags) <= set(FLAGS) and flags == sorted(flags)
    assert not config.max_chars or len(out) <= config.max_chars
    again, flags2 = clean_caption(out, config)
    assert again == out, (text, out, again)
    assert set(flags2) <= {"empty", "too_short"}
    assert ("empty" in flags) == (out == "")
    return out


# ---------------------------------------------------------------------------------------- hypothesis
FRAGMENTS = ["a", "dog", " ", "  ", "\n", "\t", ".", ",", "-", "&amp;", "&lt;", "&#39;", "&", ";", "<b>", "</b>",
             "<br/>", "<!--", "-->", "<", ">", "http://", "https://x.com/", "www.", ".com", "/", "@", "bob",
             "@user", "e@x.org", "\u200b", "\u200d", "\u200c", "\u202e", "\x00", "\x1b[31m", "\x85", "\x9d",
             "\u00a0", "\u3000", "Ã©", "â€™", "Ã", "Â", "é", "“", "”", "ﬁ", "，", "猫", "视频中展示了", "の",
             "한", "й", "ש", "ع", "😀", "👨\u200d👩", "\ufe0f", "stock footage", "4K", "HD", " - ", "royalty free",
             "The video shows ", "In this video, ", "Footage of ", "\ud83d", "\ude00", "\ud800", "́"]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=200)  # surrogates included
configs = st.builds(CleanConfig, **{k: st.booleans() for k in OFF if k != "max_chars"},
                    max_chars=st.sampled_from([0, 5, 40, 1000]), min_chars=st.integers(0, 4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(any_text, fragment_text))
def test_idempotent_and_never_crashes_on_arbitrary_text(text):
    _check_clean(text)


@settings(max_examples=200, deadline=None)
@given(fragment_text, configs)
def test_idempotent_under_any_config(text, config):
    _check_clean(text, config)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="\t\n" + "".join(map(chr, range(0x20, 0x7F))) + "、。「」あいうアイウ猫狗的一가나다，！（）", max_size=80))
def test_ftfy_shortcut_is_exact(text):
    # _ftfy_step skips ftfy for text made of these characters; ftfy must indeed leave them unchanged
    assert ftfy.fix_text(text, unescape_html=False, fix_character_width=False) == text


def test_100kb_strings_are_clean():
    # no elapsed-time assert: on a loaded machine it fails for no fault of the code; a quadratic rule
    # would still show as this test taking minutes (bench/audit.py measures throughput)
    rng = random.Random(0)
    alphabet = [f for f in FRAGMENTS if len(f) == 1] + ["x", "y", "z", "é", "猫"]
    strings = ["".join(rng.choice(alphabet) for _ in range(100_000)), "a" * 100_000, " " * 100_000,
               "-" * 100_000, "<!--" * 25_000, "a@" * 50_000, "&amp;" * 20_000, "Ã©" * 50_000,
               "http://" + "a" * 100_000, "猫" * 100_000, "\u200d" * 100_000]
    for s in strings:
        out = _check_clean(s)
        assert len(out) <= 1000


# ---------------------------------------------------------------------------------- script/language
@pytest.mark.parametrize("text, script, lang", [
    ("a black dog wearing halloween costume", "Latin", "en"),
    ("在静止的画面中，一个停车标志", "Han", "zh"),
    ("これは猫です", "Kana", "ja"),
    ("日本語の文章", "Han", "ja"),
    ("고양이가 걷는다", "Hangul", "ko"),
    ("Кошка идёт по улице", "Cyrillic", "ru"),
    ("القط يمشي", "Arabic", "ar"),
    ("החתול הולך", "Hebrew", "he"),
    ("बिल्ली चलती है", "Devanagari", "hi"),
    ("Η γάτα περπατά", "Greek", "el"),
    ("แมวเดิน", "Thai", "th"),
    ("Der Hund läuft über die Straße", "Latin", "de"),
    ("Le chat est sur la table", "Latin", "fr"),
    ("El perro está en la casa", "Latin", "es"),
    ("Կատուն", "Other", "und"),
    ("123 !! 😀", "None", "und"),
    ("", "None", "und"),
])
def test_script_and_language(text, script, lang):
    assert detect_script(text) == script
    assert detect_language(text) == lang
    assert script_and_language(text) == (script, lang)


# ------------------------------------------------------------------------------------- CleanCaption
def test_clean_caption_stage_on_rows():
    stage = CleanCaption()
    error_row = {"key": "e", "status": "error", "reason": "missing", "error": "gone", "caption": "x"}
    rows = [
        {"key": "a", "caption": "The video shows a cat &amp; a dog. https://x.com"},
        {"key": "b", "caption": "一只猫在睡觉"},
        error_row,
        {"key": "c", "caption": "https://example.com/only-a-link"},
        {"key": "d", "caption": None},
        {"key": "f", "caption": float("nan")},
        {"key": "g"},
        {"key": "h", "caption": "   "},
    ]
    out = list(stage(iter(rows)))
    assert [r["key"] for r in out] == ["a", "b", "e", "c", "d", "f", "g", "h"]
    a, b, e = out[0], out[1], out[2]
    assert a["caption_raw"] == rows[0]["caption"]
    assert a["caption"] == "A cat & a dog."
    assert a["caption_flags"] == ["html", "prefix", "url"]
    assert (a["caption_script"], a["caption_language"]) == ("Latin", "en")
    assert (b["caption"], b["caption_flags"], b["caption_script"], b["caption_language"]) == \
        ("一只猫在睡觉", [], "Han", "zh")
    assert e is error_row  # passed through untouched
    for r in out[3:]:
        assert r["status"] == "error" and r["reason"] == "empty_caption" and r["stage"] == "captions"
        assert r["reason"] in REASONS and r["caption"] == "" and "empty" in r["caption_flags"]
    assert "url" in out[3]["error"]
    stats = stage.stats()
    assert stats["total"] == 7 and stats["kept"] == 2 and stats["dropped_empty_caption"] == 5


def test_clean_caption_stage_is_rerunnable_and_min_chars():
    stage = CleanCaption(CleanConfig(min_chars=4))
    once = list(stage([{"key": "a", "caption": "The video shows a dog"}]))
    twice = list(stage(once))
    assert once == twice
    assert twice[0]["caption_raw"] == "The video shows a dog"
    short = list(stage([{"key": "s", "caption": "cat"}]))[0]
    assert short["reason"] == "empty_caption" and "min_chars=4" in short["error"]


def test_clean_caption_stage_turns_bugs_into_internal_error(monkeypatch):
    import clipforge.pipeline.text.captions as captions

    def boom(text, config):
        raise RuntimeError("bug")
    monkeypatch.setattr(captions, "clean_caption", boom)
    out = list(CleanCaption()([{"key": "a", "caption": "x"}]))
    assert out[0]["status"] == "error" and out[0]["reason"] == "internal_error"
    assert "RuntimeError: bug" in out[0]["error"]


# ------------------------------------------------------------------------- tables and clean_manifest
def test_read_table_formats(tmp_path):
    (tmp_path / "semi.csv").write_text("key;sentence\nr0;NaN\nr1;1.00\nr2;\n", encoding="utf-8")
    df = read_table(tmp_path / "semi.csv")
    assert list(df["sentence"][:2]) == ["NaN", "1.00"] and pd.isna(df["sentence"][2])
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert list(read_table(tmp_path / "p.txt")["caption"]) == ["first prompt", "second prompt"]
    (tmp_path / "m.json").write_text(json.dumps({"a.mp4": ["x", "y"], "b.mp4": ["z"]}), encoding="utf-8")
    assert read_table(tmp_path / "m.json").to_dict("list") == {"video": ["a.mp4", "a.mp4", "b.mp4"],
                                                              "caption": ["x", "y", "z"]}
    (tmp_path / "s.json").write_text(json.dumps({"videos": [], "sentences": [{"caption": "c", "video_id": "v"}]}))
    assert list(read_table(tmp_path / "s.json")["caption"]) == ["c"]
    (tmp_path / "l.jsonl").write_text('{"caption": "a"}\n\n{"caption": null}\n', encoding="utf-8")
    assert len(read_table(tmp_path / "l.jsonl")) == 2
    chunks = list(iter_table(tmp_path / "semi.csv", chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 1]
    (tmp_path / "bad.jsonl").write_text('{"caption": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ClipforgeError, match="bad.jsonl:2"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(ClipforgeError, match="unsupported extension"):
        read_table(tmp_path / "x.xlsx")
    with pytest.raises(ClipforgeError, match="no such file"):   # a missing file says so, whatever its name
        read_table(tmp_path / "missing.parquet")


MANIFEST = pd.DataFrame({
    "video": ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"],
    "caption": ["The video shows a dog.", "CafÃ© at night https://x.com", "一只猫", "", "NaN"],
    "start": ["0.5", "", "1", "2", "3"],
})


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl", "json"])
def test_clean_manifest_round_trip_is_idempotent(tmp_path, ext):
    src = tmp_path / "in.csv"
    MANIFEST.to_csv(src, index=False)
    out1, out2 = tmp_path / f"out1.{ext}", tmp_path / f"out2.{ext}"
    summary = clean_manifest(src, out1)
    assert summary["rows"] == 5 and summary["changed"] == 2 and summary["empty"] == 1
    assert summary["flags"] == {"empty": 1, "ftfy": 1, "mojibake": 1, "prefix": 1, "url": 1}
    df = read_table(out1)
    # (csv and tsv read "" back as NaN)
    assert list(df["caption"].fillna("")) == ["A dog.", "Café at night", "一只猫", "", "NaN"]
    assert list(df["caption_raw"].fillna("")) == list(MANIFEST["caption"])
    flags = list(df["caption_flags"])
    if ext in ("csv", "tsv"):
        flags = [f.split(";") if isinstance(f, str) and f else [] for f in flags]
    assert [list(f) for f in flags] == [["prefix"], ["ftfy", "mojibake", "url"], [], ["empty"], []]
    assert list(df["video"]) == list(MANIFEST["video"])
    clean_manifest(out1, out2)
    assert out1.read_bytes() == out2.read_bytes()  # running it twice changes nothing
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not (DATA / "captions").exists(), reason="shared test data not present")
def test_clean_manifest_on_real_webvid_csv(tmp_path):
    summary = clean_manifest(DATA / "captions" / "webvid_sample_20rows.csv", tmp_path / "webvid.parquet")
    df = pd.read_parquet(tmp_path / "webvid.parquet")
    assert summary["caption_column"] == "name" and summary["rows"] == 20 == len(df)
    assert list(df["caption_raw"]) == list(df["name"])


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.tsv", "manifest.jsonl", "manifest.parquet"])
def test_tables_read_from_object_storage_through_the_one_filesystem_layer(s3_server, tmp_path, name):
    """A manifest on s3:// reads like a local one in every format (no fsspec backend is installed)."""
    import pyarrow.fs as pafs

    frame = pd.DataFrame({"video": ["s3://videos/a.mp4", "s3://videos/b.mp4"], "caption": ["a red ball", "ein Hund"]})
    local = tmp_path / name
    {"manifest.csv": lambda: frame.to_csv(local, index=False),
     "manifest.tsv": lambda: frame.to_csv(local, sep="\t", index=False),
     "manifest.jsonl": lambda: frame.to_json(local, orient="records", lines=True, force_ascii=False),
     "manifest.parquet": lambda: frame.to_parquet(local, index=False)}[name]()
    fs = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    with fs.open_output_stream(f"datasets/{name}") as out:
        out.write(local.read_bytes())
    got = pd.concat(list(iter_table(f"s3://datasets/{name}", chunk_rows=1)), ignore_index=True)
    assert got[["video", "caption"]].to_dict("records") == frame.to_dict("records")
    assert read_table(f"s3://datasets/{name}")["caption"].tolist() == ["a red ball", "ein Hund"]
