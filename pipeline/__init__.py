"""clipforge.pipeline: the stages a video and its caption pass through, from manifest row to shard.

- `schema`: the row conventions every stage shares (reserved keys, failure reasons, keys and ids).
- `manifest`: reading a manifest into input rows.
- `video/`: probing, decoding and clip sampling, each decode in a killable child process; synthetic videos.
- `text/`: caption cleaning, language and script, near-duplicates, the caption audit and its report.
- `storage/`: paths on any filesystem, samples, tar writing, shard commits, resharding and verification.
- `tokenize`: the stage that turns clips and captions into token arrays.
"""
# The repository keeps the short folder name, but the package installs as `clipforge.pipeline` only: a
# bare `import pipeline` (a notebook next to this folder, say) must not load a second copy of our code.
if __name__ != "clipforge.pipeline":
    raise ImportError(f"clipforge's pipeline package is imported as `clipforge.pipeline`, not `{__name__}`")
