"""Caption cleaning rules: deterministic, idempotent, never raise, and say what they changed.

`clean_caption(text)` runs the steps below in order, every one on by default and switchable in
`CleanConfig`, and repeats the whole pass until nothing changes (at most `MAX_PASSES` times), so that
`clean_caption(clean_caption(x)[0])[0] == clean_caption(x)[0]` even when one step exposes work for an
earlier one (an HTML entity hiding mojibake, a prefix uncovered by removing boilerplate). Each step that
changed something adds its flag:

  html         HTML entities (`&amp;`, `&#39;`, nested `&amp;amp;`) and tags of known HTML elements
  ftfy         ftfy repair: mojibake, curly quotes, ligatures, NFC, fullwidth forms narrowed except in
               CJK text (where "，" is correct); "mojibake" is added when ftfy fixed an encoding
  url / email / handle   web addresses, e-mail addresses and @handles, removed
  control      control characters, zero-width and bidi formatting characters, lone surrogates
               (ZWJ/ZWNJ are kept between two visible characters: emoji sequences, Persian, Indic)
  whitespace   any Unicode whitespace run becomes one space; leading/trailing space is dropped
  boilerplate  stock-site phrases ("stock footage", "royalty free", "Shutterstock") and trailing
               resolution tags ("4K", "UHD", "1080p")
  prefix       caption openers such as "The video shows", "In this video,", "Footage of", "视频中展示了"
  truncated    text cut to `max_chars` (at the last space in the final 20%, else hard)
Two flags describe the result instead of a change: "empty" (nothing left) and "too_short" (fewer than
`min_chars` characters); the row stage `clipforge.pipeline.text.captions.CleanCaption` turns both into
`empty_caption` errors.
"""
from __future__ import annotations

import html as _html
import math
import re
from dataclasses import dataclass

import ftfy as _ftfy
from ftfy.fixes import fix_character_width as _fix_character_width
import pandas as pd

from clipforge.pipeline.text.langid import script_and_language

MAX_PASSES = 6
FLAGS = ("html", "ftfy", "mojibake", "url", "email", "handle", "control", "whitespace", "boilerplate",
         "prefix", "truncated", "empty", "too_short", "raw_cut")   # raw_cut: the build kept only the original's start


@dataclass(frozen=True)
class CleanConfig:
    """Which cleaning steps run (all by default) and the length limits (`max_chars=0`: no limit)."""
    html: bool = True
    ftfy: bool = True
    url: bool = True
    email: bool = True
    handle: bool = True
    control: bool = True
    whitespace: bool = True
    boilerplate: bool = True
    prefix: bool = True
    max_chars: int = 1000
    min_chars: int = 1


# ---------------------------------------------------------------------------------------------- steps
# Every pattern is linear-time on 100 kB inputs: quantifiers are bounded or anchored by a lookbehind, so
# the regex engine cannot backtrack quadratically.
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_TAG_NAMES = ("a|abbr|b|big|blockquote|body|br|center|cite|code|del|div|em|font|h[1-6]|head|hr|html|i|"
              "iframe|img|ins|li|link|mark|meta|ol|p|pre|q|s|script|small|source|span|strike|strong|"
              "style|sub|sup|table|tbody|td|th|title|tr|tt|u|ul|video")
_TAG_RE = re.compile(rf"(?:</?(?:{_TAG_NAMES})\b[^<>]{{0,500}}>\s*)+", re.I)  # a run of tags

_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_URL_RE = re.compile(
    rf"(?:\b(?:https?|ftp)://|(?<![\w@.-])www\.)[^\s<>\"'{_CJK}]{{1,2000}}"
    rf"|(?<![\w@./-])(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.){{1,8}}"
    rf"(?:com|net|org|edu|gov|info|biz|io|tv|ly)(?:\.[a-z]{{2}})?(?![\w-])(?:/[^\s<>\"'{_CJK}]{{0,2000}})?",
    re.I)
_URL_TAIL = ".,;:!?)]}'\"»"
_URL_HINT_RE = re.compile(r"://|www\.|\.(?:com|net|org|edu|gov|info|biz|io|tv|ly)(?![a-z0-9-])")
_EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
_HANDLE_RE = re.compile(r"(?<![\w@])@\w{1,30}(?![\w@])")

# Invisible format characters (Unicode category Cf, minus the visible Arabic number signs) and control
# characters other than whitespace. \x1c-\x1f count as whitespace for str.split but are separators.
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u061c\u070f\u180e\u200b\u200e\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]+")
_LOOSE_JOINER_RE = re.compile(r"(?<!\S)[\u200c\u200d]+|[\u200c\u200d]+(?!\S)")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

_STOCK_SITES = (r"shutterstock|pond5|getty\s?images|istock(?:photo)?|adobe\s?stock|storyblocks|"
                r"videoblocks|videohive|dreamstime|depositphotos|alamy|123rf|vecteezy")
_BOILER_RE = re.compile(
    r"\b(?:stock\s+(?:footage|video\s+clip|videos?|clip|photo)"
    r"|royalty[\s-]?free(?:\s+(?:stock\s+)?(?:footage|video))?"
    rf"|(?:footage|video|clip)\s+(?:by|from|via|on)\s+(?:{_STOCK_SITES}|pexels|pixabay|artgrid)"
    rf"|(?:{_STOCK_SITES})(?:\.com)?"
    r"|all\s+rights\s+reserved|editorial\s+use\s+only|no\s+(?:model|property)\s+release)\b", re.I)
_BOILER_LOW_RE = re.compile("(?=[acdefginprsv1])" + _BOILER_RE.pattern)
_SPACE_PUNCT_RE = re.compile(r" ([.,;:!?])")
_EMPTY_BRACKETS_RE = re.compile(r"[(\[] ?[)\]]")
_RES_TAGS = (r"4k(?:\s+uhd)?|8k|uhd|ultra\s?hd|full\s?hd|fhd|hd|hdr|1080p|720p|2160p|4320p|\d{2,3}\s?fps"
             r"|(?:shot|filmed)\s+(?:in|on)\s+4k|in\s+4k")
_TAIL_TAG_RE = re.compile(rf"[\s,;:|/(\[\u2013\u2014-]{{1,10}}(?:{_RES_TAGS})[\s)\]]{{0,3}}[.!]?\s*$", re.I)
_ONLY_TAG_RE = re.compile(rf"(?:{_RES_TAGS})[\s)\]]{{0,3}}[.!]?", re.I)
_TAIL_ENDS = ("4k", "8k", "hd", "hdr", "1080p", "720p", "2160p", "4320p", "fps")
_BOILER_KEYS = ("stock", "royalty", "rights", "editorial", "release", "pond5", "getty", "adobe", "storyblocks",
                "videoblocks", "videohive", "dreamstime", "depositphotos", "alamy", "123rf", "vecteezy")
_HEAD_TAG_RE = re.compile(rf"^(?:{_RES_TAGS})\s*[:|\u2013\u2014-]\s*", re.I)
_SEP_CHARS = " ,;:|/\u2013\u2014-"

_PREFIX_RE = re.compile(
    r"^(?:(?:(?:the|this|that|our|a|an)\s+)?(?:short\s+)?"
    r"(?:video|clip|footage|scene|image|picture|gif|animation|film|movie|shot|sequence)\s+"
    r"(?:shows|showcases|depicts|features|captures|presents|displays|illustrates|portrays|highlights|"
    r"contains|is\s+showing|is\s+about|begins\s+with|starts\s+with)(?:\s+(?:that|how))?"
    r"|(?:in|within|throughout)\s+(?:the|this)\s+(?:video|clip|footage|scene|image)"
    r"|(?:this|it)\s+is\s+(?:a|an)\s+(?:video|clip|footage)\s+(?:of|showing)"
    r"|(?:(?:a|an|the)\s+)?(?:video|clip|footage|close-?up\s+(?:video|shot))\s+(?:of|showing|featuring|depicting)"
    r"|(?:we|you)\s+(?:can\s+)?see)\s*[:,\u2013\u2014-]?\s+"
    r"|^(?:这段|这个|该|此|本)?(?:视频|影片|画面|镜头|短片)(?:中|里)?(?:展示|显示|描绘|呈现|记录)(?:了|的是|着)?[：:，,]?\s*"
    r"|^在?(?:这段|这个|该|此|本)(?:视频|影片|画面)(?:中|里)[，,]\s*", re.I)

_ARTICLES = {"the", "this", "that", "our", "a", "an", "it"}
_PREFIX_NOUNS = {"video", "clip", "footage", "scene", "image", "picture", "gif", "animation", "film", "movie",
                 "shot", "sequence", "short", "close-up", "closeup"}
_PREFIX_STARTS = _ARTICLES | _PREFIX_NOUNS | {"in", "within", "throughout", "we", "you"}
_PREFIX_SECOND = _PREFIX_NOUNS | {"is", "video,", "clip,", "footage,", "scene,", "image,"}
_PREFIX_CJK_STARTS = set("这该此本视影画镜短在")
_MOJIBAKE_FIXES = {"restore_byte_a0", "replace_lossy_sequences", "decode_inconsistent_utf8",
                   "fix_c1_controls", "fix_surrogates"}
_FTFY_CONFIG = _ftfy.TextFixerConfig(unescape_html=False, fix_character_width=False, explain=True)
# Text made only of these characters is left unchanged by ftfy (with the config above); skipping the
# call makes clean ASCII and CJK captions ~10x cheaper. tests/test_captions.py checks the claim.
_FULLWIDTH_RE = re.compile("[\uff01-\uff5e]")
_FTFY_SAFE_RE = re.compile("[\t\n\x20-\x7e\u3001-\u303f\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff"
                           "\uac00-\ud7a3\uff01-\uff5e]*")


def _html_step(text: str, flags: set) -> str:
    out = text
    if "&" in out:
        for _ in range(4):  # "&amp;amp;lt;" needs one round per level of escaping
            new = _ENTITY_RE.sub(lambda m: _html.unescape(m.group()), out)
            if new == out:
                break
            out = new
    if "<" in out:
        if "<!--" in out:
            out = _strip_comments(out)
        out = _TAG_RE.sub(_gap, out)
    if out != text:
        flags.add("html")
    return out


def _gap(m: re.Match) -> str:
    """What replaces removed markup: a space between two words, nothing next to a space or an end."""
    s, start, end = m.string, m.start(), m.end()
    return "" if start == 0 or end == len(s) or s[start - 1].isspace() else " "


def _strip_comments(text: str) -> str:
    parts, i = [], 0
    while True:  # str.find keeps this linear where a lazy regex would not be
        start = text.find("<!--", i)
        end = text.find("-->", start + 4) if start >= 0 else -1
        if end < 0:
            break
        end += 3
        while end < len(text) and text[end].isspace():
            end += 1
        gap = "" if start == 0 or end == len(text) or text[start - 1].isspace() else " "
        parts += [text[i:start], gap]
        i = end
    return "".join(parts) + text[i:]


def _ftfy_step(text: str, flags: set) -> str:
    fixed = text
    if not (text.isascii() and text.isprintable()) and not _FTFY_SAFE_RE.fullmatch(text):
        fixed, steps = _ftfy.fix_and_explain(text, config=_FTFY_CONFIG)
        for action, name in (steps or ()) if fixed != text else ():
            if action in ("encode", "decode", "transcode") or name in _MOJIBAKE_FIXES:
                flags.update(("ftfy", "mojibake"))
            elif name in ("remove_control_chars", "remove_terminal_escapes"):
                flags.add("control")
            elif name == "fix_line_breaks":
                flags.add("whitespace")
            else:
                flags.add("ftfy")
    # ftfy narrows fullwidth forms ("，" -> ","); right in Latin text, wrong in Chinese or Japanese.
    if _FULLWIDTH_RE.search(fixed) and script_and_language(fixed)[0] not in ("Han", "Kana", "Hangul"):
        narrowed = _fix_character_width(fixed)
        if narrowed != fixed:
            flags.add("ftfy")
            fixed = narrowed
    return fixed


def _strip_url(m: re.Match) -> str:
    url = m.group()
    kept = url.rstrip(_URL_TAIL)
    return url[len(kept):]  # sentence punctuation after a URL stays


def _url_guard(text: str) -> bool:
    return "://" in text or ("." in text and _URL_HINT_RE.search(text.lower()) is not None)


def _sub_step(pattern: re.Pattern, repl, flag: str, guard=None):
    def step(text: str, flags: set) -> str:
        if guard is not None and not (guard(text) if callable(guard) else guard in text):
            return text
        new = pattern.sub(repl, text)
        if new != text:
            flags.add(flag)
            new = _tidy(new)
        return new
    return step


def _control_step(text: str, flags: set) -> str:
    if text.isascii() and text.isprintable():
        return text
    new = _CONTROL_RE.sub("", text)
    if "\u200c" in new or "\u200d" in new:
        new = _LOOSE_JOINER_RE.sub("", new)
    if new != text:
        flags.add("control")
    return new


def _whitespace_step(text: str, flags: set) -> str:
    # printable text has no whitespace but the ASCII space (tabs, NBSP, U+2028... are not printable)
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    new = " ".join(text.split())
    if new != text:
        flags.add("whitespace")
    return new


def _tidy(text: str) -> str:
    """Close the gaps a removal leaves: doubled spaces, space before punctuation, dangling separators."""
    text = " ".join(text.split())
    if " " in text and _SPACE_PUNCT_RE.search(text):
        text = _SPACE_PUNCT_RE.sub(r"\1", text)
    if "(" in text or "[" in text:
        text = " ".join(_EMPTY_BRACKETS_RE.sub("", text).split())
    return text.strip(_SEP_CHARS)


def _boilerplate_step(text: str, flags: set) -> str:
    # Cheap substring guards first: the case-insensitive alternations cost ~10 us per caption.
    low = text.lower()
    new = text
    for key in _BOILER_KEYS:
        if key in low:
            if text.isascii():  # lower() keeps ASCII offsets; a case-sensitive search is ~3x faster
                pieces, i = [], 0
                for m in _BOILER_LOW_RE.finditer(low):
                    pieces += [text[i:m.start()], " "]
                    i = m.end()
                new = "".join(pieces) + text[i:]
            else:
                new = _BOILER_RE.sub(" ", new)
            break
    if low.rstrip(" .!)]").endswith(_TAIL_ENDS) or not new.strip():
        for _ in range(4):
            tail = new[-40:]
            m = _TAIL_TAG_RE.search(tail)
            if m is None:
                break
            new = new[:len(new) - len(tail) + m.start()]
        if _ONLY_TAG_RE.fullmatch(new.strip()):
            new = ""
    if new[:1] in "48uUfF1273" and new:
        new = _HEAD_TAG_RE.sub("", new, count=1)
    if new != text:
        flags.add("boilerplate")
        new = _tidy(new)
    return new


def _prefix_step(text: str, flags: set) -> str:
    words = text[:40].lower().split(None, 2)
    if not words or not (text[0] in _PREFIX_CJK_STARTS or words[0] in _PREFIX_STARTS and (
            words[0] not in _ARTICLES or len(words) > 1 and words[1] in _PREFIX_SECOND)):
        return text  # cheap guard: the regex below costs more than the rest of a cleaning pass
    m = _PREFIX_RE.match(text)
    if not m or m.end() >= len(text):
        return text
    rest = text[m.end():].lstrip(_SEP_CHARS)
    if rest and text[0].isupper() and rest[0].islower():
        rest = rest[0].upper() + rest[1:]
    if rest != text:
        flags.add("prefix")
    return rest


def _length_step(text: str, flags: set, max_chars: int) -> str:
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space >= 0.8 * max_chars:
        cut = cut[:space]
    flags.add("truncated")
    return cut.rstrip()


_STEPS = (
    ("html", _html_step),
    ("ftfy", _ftfy_step),
    ("url", _sub_step(_URL_RE, _strip_url, "url", guard=_url_guard)),
    ("email", _sub_step(_EMAIL_RE, "", "email", guard="@")),
    ("handle", _sub_step(_HANDLE_RE, "", "handle", guard="@")),
    ("control", _control_step),
    ("whitespace", _whitespace_step),
    ("boilerplate", _boilerplate_step),
    ("prefix", _prefix_step),
)


def as_text(value) -> str:
    """Captions arrive as str, bytes, None, NaN or pd.NA from Arrow/pandas/JSON; missing means ""."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        if pd.isna(value) is True:
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


_STEPS_CACHE: dict = {}


def _steps_for(config: CleanConfig) -> tuple:
    hit = _STEPS_CACHE.get(id(config))  # hashing a frozen dataclass costs more than a cleaning step
    if hit is None or hit[0] is not config:
        if len(_STEPS_CACHE) > 64:
            _STEPS_CACHE.clear()
        hit = _STEPS_CACHE[id(config)] = (config, tuple(fn for name, fn in _STEPS if getattr(config, name)))
    return hit[1]


def clean_caption(text, config: CleanConfig = CleanConfig()) -> tuple[str, list[str]]:
    """(clean text, sorted flags). Deterministic and idempotent; never raises on any input."""
    text = as_text(text)
    flags: set = set()
    if not text.isascii() and _SURROGATE_RE.search(text):
        # join surrogate pairs, drop lone halves (they cannot be encoded as UTF-8)
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")
        flags.add("control")
    steps = _steps_for(config)
    for _ in range(MAX_PASSES):
        before = text
        for fn in steps:
            text = fn(text, flags)
        text = _length_step(text, flags, config.max_chars)
        if text == before:
            break
    if not text:
        flags.add("empty")
    elif len(text) < config.min_chars:
        flags.add("too_short")
    return text, sorted(flags)
