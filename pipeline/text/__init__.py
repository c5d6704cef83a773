"""Text: table input/output for manifests and caption files, caption cleaning with flags, script and
language identification, MinHash near-duplicate clusters, and the caption-quality audit with its report."""
