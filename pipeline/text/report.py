"""report.html for `clipforge audit`: one self-contained page rendered from summary.json alone.

Plots are PNGs drawn with matplotlib's object API (no pyplot, so no global backend state) and inlined
as base64; every caption shown is HTML-escaped (captions are untrusted text: BLNS has <script> tags).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

RULES = {
    "html": ("HTML entities decoded, tags removed", "Sunset &amp; sea<br>timelapse"),
    "ftfy": ("text repaired by ftfy (mojibake, curly quotes, ligatures, NFC, fullwidth in Latin text)",
             "CafÃ© terrace at night, “golden hour”"),
    "mojibake": ("of which an encoding was repaired (mojibake)", "CafÃ© terrace at night"),
    "url": ("web addresses removed", "Beach walk https://example.com/v/123 at dawn"),
    "email": ("e-mail addresses removed", "Contact me@example.com for the full clip"),
    "handle": ("@handles removed", "Skate trick by @skater_99 in the park"),
    "control": ("control, zero-width and bidi characters removed", "Zero\u200bwidth\u0007 text\u202e"),
    "whitespace": ("whitespace runs collapsed, ends trimmed", "  too   many\tspaces\n here "),
    "boilerplate": ("stock-site boilerplate and resolution tags removed", "Waves on rocks - stock footage 4K"),
    "prefix": ("caption openers such as 'The video shows' removed", "The video shows a dog catching a frisbee."),
    "truncated": ("cut to max_chars", None),
    "empty": ("nothing left after cleaning (dropped by the build)", "https://example.com/watch"),
    "too_short": ("fewer than min_chars characters left (dropped by the build)", None),
}

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#f5f6f8;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;margin:8px 0;width:100%}td,th{border-bottom:1px solid #eee;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#fafafa}td.n{text-align:right;white-space:nowrap}
.ex{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word}
.before{color:#a33}.after{color:#262}.muted{color:#888}img{max-width:100%}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}.bar{background:#7aa6d8;height:10px;display:inline-block}
.ng{display:grid;grid-template-columns:repeat(3,1fr);gap:16px}
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure(w=6.0, h=3.2):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h))


def _hist_plot(summary: dict) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    for key, label in (("chars_raw", "raw"), ("chars", "clean")):
        hist = summary["histograms"][key]
        xs = [i * hist["width"] for i in range(len(hist["counts"]))]
        ax.step(xs, hist["counts"], where="post", label=label)
    ax.set_xlabel("characters")
    ax.set_ylabel("captions")
    ax.set_title("Caption length (characters)")
    ax.legend()
    return _png(fig)


def _token_plot(summary: dict) -> str:
    hist, tc = summary["histograms"]["tokens"], summary["token_count"]
    fig = _figure()
    ax = fig.add_subplot()
    xs = [i * hist["width"] for i in range(len(hist["counts"]))]
    colors = ["#d86a6a" if x >= tc["room"] else "#7aa6d8" for x in xs]
    ax.bar(xs, hist["counts"], width=hist["width"], align="edge", color=colors)
    ax.axvline(tc["room"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(f"tokens ({tc['method']})")
    ax.set_ylabel("captions")
    ax.set_title(f"Tokens vs room {tc['room']} of slot {tc['slot']}: {summary['cut_after_prefix']} cut "
                 f"({100 * summary['cut_after_prefix_fraction']:.1f}%)")
    return _png(fig)


def _barh(items: list, title: str, xlabel: str = "captions") -> str:
    fig = _figure(6.0, 0.3 * len(items) + 1.2)
    ax = fig.add_subplot()
    labels = [str(k) for k, _ in items][::-1]
    bars = ax.barh(range(len(labels)), [v for _, v in items][::-1], color="#7aa6d8", height=0.7)
    # captions are text, never markup: "$x$" in one must not go to matplotlib's math parser
    ax.set_yticks(range(len(labels)), labels)
    for tick in ax.get_yticklabels():
        tick.set_parse_math(False)
    ax.bar_label(bars, labels=[f"{v:,}" for _, v in items][::-1], padding=3, fontsize=8)
    ax.margins(x=0.15)
    ax.set_xlim(left=0, right=None if any(v for _, v in items) else 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _png(fig)


def _cards(summary: dict) -> str:
    d, rows = summary["duplicates"], max(summary["rows"], 1)
    lang = next(iter(summary["languages"].items()), ("-", 0))
    cards = [
        ("captions", f"{summary['rows']:,}", summary["kind"]),
        ("usable", f"{summary['usable']:,}", f"{summary['empty']:,} empty after cleaning"),
        ("changed by cleaning", f"{summary['changed']:,}", f"{100 * summary['changed'] / rows:.1f}%"),
        ("cut at slot", f"{summary['cut_after_prefix']:,}",
         f"{100 * summary['cut_after_prefix_fraction']:.1f}% (> {summary['token_count']['room']} tokens)"),
        ("exact duplicates", f"{d['exact_rows']:,}", "rows whose normalized text repeats"),
        ("near duplicates", f"{d['near_rows']:,}", f"Jaccard ≥ {d['threshold']}"),
        ("removable", f"{d['removable']:,}", f"keeping one per cluster ({d['clusters']:,} clusters)"),
        ("top language", f"{lang[0]}", f"{100 * lang[1] / rows:.1f}%"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><span>{_esc(k)}</span><b>{_esc(v)}</b><span>{_esc(sub)}</span></div>'
        for k, v, sub in cards) + "</div>"


def _stats_table(summary: dict) -> str:
    keys = ("mean", "min", "p50", "p90", "p95", "p99", "max")
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = ""
    for name in ("chars_raw", "chars", "tokens"):
        stats = summary[name]
        body += f"<tr><td>{name}</td>" + "".join(f'<td class="n">{stats[k]:,.1f}</td>' for k in keys) + "</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _rules_table(summary: dict, config: dict | None) -> str:
    from clipforge.pipeline.text.caption_rules import CleanConfig, clean_caption
    cfg = CleanConfig(**config) if config else CleanConfig()
    rows = max(summary["rows"], 1)
    out = ["<table><tr><th>rule</th><th>captions</th><th>before → after</th></tr>"]
    for flag, (desc, demo) in RULES.items():
        count = summary["flags"].get(flag, 0)
        examples = summary["examples"].get(flag, [])
        cells = "".join(f'<div class="ex"><span class="before">{_esc(e["raw"])}</span><br>→ '
                        f'<span class="after">{_esc(e["clean"])}</span></div>' for e in examples)
        if not examples and demo is not None:
            after, _ = clean_caption(demo, cfg)
            cells = (f'<div class="ex muted">illustration (no caption in this input): '
                     f'<span class="before">{_esc(demo)}</span><br>→ <span class="after">{_esc(after)}</span></div>')
        out.append(f"<tr><td><b>{flag}</b><br><span class='muted'>{_esc(desc)}</span></td>"
                   f'<td class="n">{count:,}<br><span class="muted">{100 * count / rows:.1f}%</span></td>'
                   f"<td>{cells}</td></tr>")
    return "".join(out) + "</table>"


def _short(text, limit: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _dup_table(summary: dict) -> str:
    top = summary["duplicates"]["top"]
    if not top:
        return "<p class='muted'>No duplicate clusters.</p>"
    # a person reads a cluster by its repeated text; the cluster id stays as a small reference for
    # captions.parquet's `dup_cluster` column
    out = ["<table><tr><th>repeated caption</th><th>size</th><th>other members</th><th>cluster id</th></tr>"]
    for c in top:
        others = "".join(f'<div class="ex">{_esc(e)}</div>' for e in c["examples"]) or \
            "<span class='muted'>identical after normalization</span>"
        out.append(f'<tr><td class="ex">{_esc(c["caption"])}</td><td class="n">{c["size"]:,}</td>'
                   f'<td>{others}</td><td class="n muted">{c["cluster"]}</td></tr>')
    return "".join(out) + "</table>"


def _ngram_tables(summary: dict) -> str:
    out = []
    for n, items in summary["top_ngrams"].items():
        top = max((c for _, c in items), default=1)
        rows = "".join(f'<tr><td class="ex">{_esc(g)}</td><td class="n">{c:,}</td>'
                       f'<td><span class="bar" style="width:{int(80 * c / top)}px"></span></td></tr>'
                       for g, c in items)
        title = {"1": "words (no stopwords)", "2": "bigrams", "3": "trigrams"}.get(n, n)
        out.append(f"<div><h3>{title}</h3><table>{rows}</table></div>")
    note = "" if summary.get("ngrams_exact", True) else "<p class='muted'>approximate (pruned counts)</p>"
    return f'<div class="ng">{"".join(out)}</div>{note}'


def render_report(summary: dict, path) -> None:
    """Write the report for `summary` (the dict `audit` returns) to `path`."""
    d = summary["duplicates"]
    flags = [(f, c) for f, c in summary["flags"].items()]
    langs = list(summary["languages"].items())[:15]
    scripts = list(summary["scripts"].items())[:12]
    cut = "".join(f'<div class="ex">[{e["tokens"]} tokens] {_esc(e["caption"])}</div>'
                  for e in summary["cut_after_prefix_examples"]) or "<p class='muted'>No caption exceeds the slot.</p>"
    sizes = [(_short(c["caption"]), c["size"]) for c in d["top"]]
    body = f"""
<h1>Caption audit</h1>
<p class="muted">{_esc(summary['input'])} · {summary['kind']} · caption column
<code>{_esc(summary.get('caption_column'))}</code> · {summary['seconds']} s</p>
{_cards(summary)}
<h2>Lengths</h2>
<div class="grid">{_hist_plot(summary)}{_token_plot(summary)}</div>
{_stats_table(summary)}
<p class="muted">{_esc(summary['token_count']['note'])}</p>
<h3>Captions cut at the slot (examples)</h3>{cut}
<h2>Cleaning</h2>
<div class="grid">{_barh(flags, "Captions per cleaning flag")}<div>
<p>{summary['changed']:,} of {summary['rows']:,} captions changed. Every rule is on by default and can be
switched off; the raw text is always kept as <code>caption_raw</code>.</p></div></div>
{_rules_table(summary, summary.get('config'))}
<h2>Languages and scripts</h2>
<div class="grid">{_barh(langs, "Languages (best effort)")}{_barh(scripts, "Dominant script")}</div>
<h2>Duplicates</h2>
<p>Exact: {d['exact_rows']:,} rows share their normalized text with another. Near: {d['near_rows']:,} rows
are in a cluster with a different text at estimated Jaccard ≥ {d['threshold']} ({d['ngram']}-gram shingles,
MinHash {d['num_perm']} permutations, LSH {d['bands']}×{d['rows_per_band']}). {d['clusters']:,} clusters hold
{d['rows_in_clusters']:,} rows; keeping one per cluster removes {d['removable']:,}.</p>
{_barh(sizes, "Largest duplicate clusters", "captions") if sizes else ""}
{_dup_table(summary)}
<h2>Top n-grams</h2>
{_ngram_tables(summary)}
<h2>Configuration</h2>
<pre class="ex">{_esc(json.dumps({"clean": summary.get("config"), "dedup": summary.get("dedup_config"),
                              "token_count": summary["token_count"]}, indent=1))}</pre>
"""
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>Caption audit</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
