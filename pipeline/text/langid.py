"""Offline script and language identification for captions.

No model files, no network: the dominant *script* is counted from Unicode ranges (exact, fast, and the
thing that matters most for a tokenizer: CogVideo's captions were Chinese, so CJK is first-class), and
the *language* is derived from the script; only for Latin text a small stopword vote guesses among a few
common languages ("und" when there is no evidence). This is a best effort meant for corpus statistics,
not a language identifier for individual short strings.
"""
from __future__ import annotations

import re

# Letter ranges per script. Only letters are counted: digits, punctuation, symbols and emoji belong to
# no script ("Common"), so a caption made only of them is "None".
_RANGES = {
    "Latin": "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u1e00-\u1eff\u2c60-\u2c7f"
             "\ua720-\ua7ff\uab30-\uab6f\uff21-\uff3a\uff41-\uff5a",
    "Han": "\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
           "\U00020000-\U0003134f",
    "Kana": "\u3041-\u309f\u30a1-\u30ff\u31f0-\u31ff\uff66-\uff9f\U0001b000-\U0001b16f",
    "Hangul": "\u1100-\u11ff\u3131-\u318e\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uffa0-\uffdc",
    "Cyrillic": "\u0400-\u0481\u048a-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "Arabic": "\u0620-\u064a\u066e-\u06d3\u06d5\u06fa-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff"
              "\ufe70-\ufefc",
    "Hebrew": "\u05d0-\u05ea\u05ef-\u05f2\ufb1d-\ufb4f",
    "Devanagari": "\u0900-\u097f\ua8e0-\ua8ff",
    "Greek": "\u0370-\u0373\u0376-\u03ff\u1f00-\u1fff",
    "Thai": "\u0e01-\u0e3a\u0e40-\u0e4e",
}
SCRIPTS = tuple(_RANGES) + ("Other", "None")
# One pass over the text: runs of one script's letters, or any other single letter ("Other").
_SCRIPT_RE = re.compile("|".join(f"(?P<{name}>[{chars}]+)" for name, chars in _RANGES.items())
                        + r"|(?P<Other>[^\W\d_])")
# Long texts are judged on their head: the dominant script of 100 kB is that of its first 20k chars.
_MAX_SCAN = 20_000

_LANG_OF_SCRIPT = {"Han": "zh", "Kana": "ja", "Hangul": "ko", "Cyrillic": "ru", "Arabic": "ar",
                   "Hebrew": "he", "Devanagari": "hi", "Greek": "el", "Thai": "th"}

# Function words only (content words would bias the vote toward what captions talk about). A word
# listed for several languages splits its vote of 60 between them (integers: sums are exact in any order).
STOPWORDS = {
    "en": "the a an and of to is are was in on with at for from by his her their its this that it "
          "while into over near through up down some two other next as be being has have out around",
    "de": "der die das und ist sind ein eine einer einem einen mit auf im den dem nicht sich von zu "
          "des vor bei einer durch über unter wird",
    "fr": "le la les et est sont un une des du dans sur avec pour qui en au aux une ce cette par "
          "sous pendant",
    "es": "el la los las y es son un una con en del por para que se al sobre unos unas está entre",
    "it": "il lo la gli le e è sono un una con di del della che per sul nel dei delle alla sulla",
    "pt": "o os as e é são um uma com de do da dos das em no na para que ao pela pelo sobre",
    "nl": "de het een en is zijn van met op in die dat niet voor naar bij door",
}
_VOTES: dict[str, dict[str, int]] = {}
for _lang, _words in STOPWORDS.items():
    for _w in set(_words.split()):
        _VOTES.setdefault(_w, {})[_lang] = 60
for _w, _langs in _VOTES.items():
    for _lang in _langs:
        _langs[_lang] = 60 // len(_langs)
_VOTE_WORDS = frozenset(_VOTES)
_WORD_RE = re.compile(r"[^\W\d_]+")
# Letters that single out a language within its script.
_HINTS = (
    ("Cyrillic", re.compile("[ґєії]", re.I), "uk"),
    ("Arabic", re.compile("[پچژگ]"), "fa"),
    ("Latin", re.compile("[ßäöü]", re.I), "de"),
    ("Latin", re.compile("[ñ¿¡]", re.I), "es"),
    ("Latin", re.compile("[ãõ]", re.I), "pt"),
    ("Latin", re.compile("œ", re.I), "fr"),
)


_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_PRIORITY = {name: -i for i, name in enumerate(SCRIPTS)}


def script_counts(text) -> dict[str, int]:
    """Letters per script in `text` (only the first 20k characters are scanned)."""
    counts: dict[str, int] = {}
    if not isinstance(text, str) or not text:
        return counts
    text = text[:_MAX_SCAN]
    if text.isascii():  # the common case: count letters with bytes.translate instead of the regex
        raw = text.encode("ascii")
        n = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        if n:
            counts["Latin"] = n
        return counts
    for m in _SCRIPT_RE.finditer(text):
        counts[m.lastgroup] = counts.get(m.lastgroup, 0) + m.end() - m.start()
    return counts


def _dominant(counts: dict) -> str:
    if not counts:
        return "None"
    return max(counts.items(), key=lambda kv: (kv[1], _PRIORITY[kv[0]]))[0]


def detect_script(text) -> str:
    """The dominant Unicode script of `text`'s letters: one of `SCRIPTS` ("None" when it has no letters).

    Ties go to the script listed first in `SCRIPTS`.
    """
    return _dominant(script_counts(text))


def detect_language(text) -> str:
    """Best-effort ISO 639-1 code from scripts (and stopwords for Latin); "und" when undetermined.

    Japanese mixes Han and Kana: any text whose CJK letters are at least 10% Kana is "ja".
    """
    return script_and_language(text)[1]


def script_and_language(text) -> tuple[str, str]:
    """(detect_script(text), detect_language(text)) for the price of one scan."""
    counts = script_counts(text)
    script = _dominant(counts)
    if script == "None":
        return script, "und"
    if script in ("Han", "Kana"):
        cjk = counts.get("Han", 0) + counts.get("Kana", 0)
        return script, "ja" if counts.get("Kana", 0) >= 0.1 * cjk else "zh"
    if script != "Latin":
        for hint_script, pattern, lang in _HINTS:
            if hint_script == script and pattern.search(text[:_MAX_SCAN]):
                return script, lang
        return script, _LANG_OF_SCRIPT.get(script, "und")
    return script, _latin_language(text[:_MAX_SCAN])


def _latin_language(text: str) -> str:
    # Distinct stopwords present vote (a set intersection runs in C; counting repeats adds little).
    score: dict[str, int] = {}
    low = text.lower()
    words = low.split() if low.isascii() else _WORD_RE.findall(low)  # split(): fast, misses "the,"
    for word in _VOTE_WORDS.intersection(words):
        for lang, vote in _VOTES[word].items():
            score[lang] = score.get(lang, 0) + vote
    if not text.isascii():  # the hint letters are all non-ASCII
        for hint_script, pattern, lang in _HINTS:
            if hint_script == "Latin" and pattern.search(text):
                score[lang] = score.get(lang, 0) + 60
    best, top, second = "und", 0, 0
    for lang in sorted(score):  # sorted: the same answer whatever the set's iteration order
        value = score[lang]
        if value > top:
            best, top, second = lang, value, top
        elif value > second:
            second = value
    return best if top >= 60 and second < top else "und"
