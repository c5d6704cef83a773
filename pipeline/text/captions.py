"""Caption cleaning as a row stage (`CleanCaption`) and over a whole manifest file (`clean_manifest`).

The rules themselves (what each step removes, the flags, idempotence) are
`clipforge.pipeline.text.caption_rules`; `CleanConfig` comes from there too and is importable from here.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd

from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.schema import is_ok, mark_error
from clipforge.pipeline.stages import Stage
# CleanConfig is the rules' settings; stages.py and jobs/tokenizers.py import it from here too
from clipforge.pipeline.text.caption_rules import CleanConfig, as_text, clean_caption
from clipforge.pipeline.text.langid import script_and_language
from clipforge.pipeline.text.tables import TableWriter, caption_column, iter_table, table_format

STAGE = "captions"
RAW_CAPTION_CHARS = 8192   # of a caption's original text, kept in samples and the index


class CleanCaption(Stage):
    """Stage: clean each ok row's caption.

    Input keys: `caption` (any type; None/NaN count as empty) and, when the row was cleaned before,
    `caption_raw`, which is then the text that gets cleaned (so re-running is a no-op).
    Output keys: `caption_raw` (original), `caption` (clean), `caption_flags` (list[str]),
    `caption_script` (see clipforge.pipeline.text.langid.SCRIPTS), `caption_language` (ISO 639-1 or "und").
    Reasons: `empty_caption` (nothing, or fewer than `min_chars` characters, left after cleaning);
    `internal_error` (a bug, caught so the job survives). Error rows pass through unchanged.
    `stats()` counts total, kept, dropped by reason, and rows per flag.
    """

    name = STAGE

    def __init__(self, config: CleanConfig = CleanConfig()):
        super().__init__()
        self.config = config

    def process(self, row: dict) -> Iterator[dict]:
        self.counts["total"] += 1
        try:
            out = self._clean(row)
        except Exception as err:  # never let one caption kill a Ray block
            out = mark_error(row, STAGE, "internal_error", f"{type(err).__name__}: {err}")
        self.counts["kept" if is_ok(out) else f"dropped_{out['reason']}"] += 1
        yield out

    def _clean(self, row: dict) -> dict:
        raw = row["caption_raw"] if isinstance(row.get("caption_raw"), str) else row.get("caption")
        raw = raw if isinstance(raw, str) else as_text(raw)
        # a caption of megabytes would be copied into every clip's KEY.json and the index: what is kept
        # of the original (and cleaned) is bounded, and flagged when cut
        cut = len(raw) > RAW_CAPTION_CHARS
        raw = raw[:RAW_CAPTION_CHARS] if cut else raw
        clean, flags = clean_caption(raw, self.config)
        flags = [*flags, "raw_cut"] if cut else flags
        self.counts.update(f"flag_{f}" for f in flags)
        script, language = script_and_language(clean)
        out = dict(row)
        out.update(caption_raw=raw, caption=clean,
                   caption_flags=flags, caption_script=script, caption_language=language)
        if "empty" in flags:
            changed = [f for f in flags if f != "empty"]
            why = f" (removed by: {', '.join(changed)})" if changed else ""
            return mark_error(out, STAGE, "empty_caption", f"caption is empty after cleaning{why}")
        if "too_short" in flags:
            return mark_error(out, STAGE, "empty_caption",
                              f"caption has {len(clean)} characters after cleaning, fewer than "
                              f"min_chars={self.config.min_chars}")
        return out


# ---------------------------------------------------------------------------------- clean_manifest
def clean_manifest(in_path, out_path, config: CleanConfig = CleanConfig(), chunk_rows: int = 200_000) -> dict:
    """Clean a manifest's captions: `caption_raw` keeps the original, `caption` gets the clean text and
    `caption_flags` the flags (a list in parquet/jsonl/json, ';'-joined in csv/tsv). The output format
    follows `out_path`'s extension. When `caption_raw` already exists it is what gets cleaned, so a
    second run writes the same file. Other columns are carried unchanged. Returns a small summary.
    """
    out_path = Path(out_path)
    out_fmt = table_format(out_path, must_exist=False)
    if out_fmt in ("txt", "dataset"):
        raise ClipforgeError(f"{out_path}: write the cleaned manifest as parquet, csv, tsv, jsonl or json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    summary = {"rows": 0, "changed": 0, "empty": 0, "flags": Counter(), "out": str(out_path)}
    writer = TableWriter(tmp, out_fmt)
    try:
        for df in iter_table(in_path, chunk_rows, all_text=True):
            col = caption_column(df.columns)
            raw = df["caption_raw"] if "caption_raw" in df.columns else df[col]
            raw = [as_text(x) for x in raw]
            results = [clean_caption(x, config) for x in raw]
            clean = [c for c, _ in results]
            df = df.copy()
            df["caption"] = clean
            df["caption_raw"] = raw
            joined = out_fmt in ("csv", "tsv")
            df["caption_flags"] = [";".join(f) if joined else f for _, f in results]
            summary["caption_column"] = col
            summary["rows"] += len(df)
            summary["changed"] += sum(c != r for c, r in zip(clean, raw))
            summary["empty"] += sum(("empty" in f or "too_short" in f) for _, f in results)
            summary["flags"].update(f for _, fl in results for f in fl)
            writer.write(df)
        if not summary["rows"]:  # still write a valid, empty manifest
            writer.write(pd.DataFrame({"caption": [], "caption_raw": [], "caption_flags": []}, dtype=object))
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    summary["flags"] = dict(sorted(summary["flags"].items()))
    return summary
